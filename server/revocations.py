"""The aggregator's current CRL: re-read when its file changes, kept when a new one is bad."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path

from common.revocation import RevocationError, RevocationList
from server.metrics import CRL_NEXT_UPDATE, CRL_RELOAD_FAILURES, CRL_REVOKED

log = logging.getLogger(__name__)


class RevocationWatch:
    """Holds the last good CRL of ``crl`` (verified against ``ca``) and reloads it.

    ``on_change`` runs with each newly taken list, so live calls of newly revoked
    certificates can be ended.
    """

    def __init__(self, crl: Path, ca: Path) -> None:
        self._crl, self._ca = Path(crl), Path(ca)
        self.current, self.pem = self._read()
        self._seen = self._mtimes()
        self.on_change: Callable[[RevocationList], object] | None = None
        self._was_stale = False
        self._publish()
        log.info("CRL %s: %d certificate(s) revoked", self._crl, len(self.current.entries))

    def _read(self) -> tuple[RevocationList, bytes]:
        """The file's list, verified, and its bytes (served to agents as they are)."""
        return RevocationList.read(self._crl, self._ca)

    def _mtimes(self) -> tuple[int, int]:
        return self._crl.stat().st_mtime_ns, self._ca.stat().st_mtime_ns

    def _publish(self) -> None:
        CRL_REVOKED.set(len(self.current.entries))
        next_update = self.current.next_update
        CRL_NEXT_UPDATE.set(next_update.timestamp() if next_update else float("inf"))

    def refresh(self, force: bool = False) -> bool:
        """Take the file's list if it changed (or ``force``) and verifies; True if taken."""
        try:
            seen = self._mtimes()
        except OSError as exc:
            CRL_RELOAD_FAILURES.inc()
            log.error("CRL %s unreadable, keeping the current list: %s", self._crl, exc)
            return False
        self._warn_if_stale()
        if seen == self._seen and not force:
            return False
        self._seen = seen
        try:
            newer, pem = self._read()
            self.current.check_successor(newer)
        except RevocationError as exc:
            CRL_RELOAD_FAILURES.inc()
            log.error("keeping the current CRL (%d revoked): %s", len(self.current.entries), exc)
            return False
        added = newer.entries.keys() - self.current.entries.keys()
        self.current, self.pem = newer, pem
        self._publish()
        log.info("CRL reloaded: %d revoked (%d new)", len(newer.entries), len(added))
        if self.on_change is not None:
            self.on_change(newer)
        return True

    def _warn_if_stale(self) -> None:
        stale = self.current.stale(dt.datetime.now(dt.UTC))
        if stale and not self._was_stale:
            log.warning(
                "CRL %s passed its next update (%s) and is still enforced; re-sign it (cloudfed-pki crl)",
                self._crl,
                self.current.next_update,
            )
        self._was_stale = stale

    async def poll(self, interval_s: float) -> None:
        """Refresh every ``interval_s`` until cancelled (Kubernetes updates mounted files in place)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.refresh()
            except Exception:  # a bug here must not stop revocation for good
                log.exception("CRL refresh failed")


__all__ = ["RevocationError", "RevocationWatch"]
