"""The revocation list an agent checks secure-aggregation rosters against: its own ``tls.crl``
file, the CRL the aggregator serves, and the newest this agent has seen (kept in
``<state_dir>/revocations/crl.pem``), merged issuer by issuer by CRL number. Every list must be
signed by a CA of the agent's own bundle, so the aggregator cannot forge one; and since the newest
wins, it cannot roll the list back to before a revocation the agent has seen. What it can still do
is withhold a newer list than any the agent has seen: the list's next-update time bounds that, and
the agent warns once it has passed.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from common.config import AgentTlsConfig
from common.durable import replace_durably
from common.revocation import RevocationError, RevocationList
from common.secagg.keys import RosterError

log = logging.getLogger(__name__)

SERVED = "the aggregator's CRL"


class AgentRevocations:
    """Combines the agent's sources of revocations for one round's roster check."""

    def __init__(self, state_dir: Path, tls: AgentTlsConfig) -> None:
        self.kept = state_dir / "revocations" / "crl.pem"
        self.local = tls.crl
        self.ca = tls.ca

    def for_round(self, served: bytes | None) -> RevocationList | None:
        """The list to check this round's roster against (None: no source has one). RosterError
        when ``tls.crl`` or the served list does not verify: a roster this agent cannot check is
        a roster it refuses."""
        try:
            cas = Path(self.ca).read_bytes()
        except OSError as exc:
            raise RosterError(f"cannot read the CA bundle {self.ca}: {exc}") from exc
        lists = []
        if self.local is not None:
            try:
                lists.append(RevocationList.load(self.local, self.ca))
            except RevocationError as exc:
                raise RosterError(f"cannot check peers' certificates against tls.crl: {exc}") from exc
        kept = self._kept(cas)
        if served is not None:
            try:
                fresh = RevocationList.parse(served, cas, SERVED, str(self.ca))
            except RevocationError as exc:
                raise RosterError(f"{SERVED} does not verify, so no roster can be checked: {exc}") from exc
            if kept is None or _succeeds(kept, fresh):
                replace_durably(self.kept, served)
                kept = fresh
            else:
                log.warning(
                    "%s is older than one this agent has seen (CRL numbers %s < %s); using the newer",
                    SERVED,
                    sorted(fresh.numbers.values()),
                    sorted(kept.numbers.values()),
                )
                lists.append(fresh)
        if kept is not None:
            lists.append(kept)
        if not lists:
            return None
        merged = lists[0]
        for other in lists[1:]:
            merged = merged.merged(other)
        if merged.stale(dt.datetime.now(dt.UTC)):
            log.warning(
                "the newest CRL this agent has passed its next update (%s); still checking peers against it",
                merged.next_update,
            )
        return merged

    def _kept(self, cas: bytes) -> RevocationList | None:
        if not self.kept.exists():
            return None
        try:
            return RevocationList.parse(self.kept.read_bytes(), cas, str(self.kept), str(self.ca))
        except (OSError, RevocationError) as exc:  # e.g. the CA bundle rotated past its issuer
            log.warning("the CRL kept in %s is set aside: %s", self.kept, exc)
            return None


def _succeeds(kept: RevocationList, fresh: RevocationList) -> bool:
    try:
        kept.check_successor(fresh)
    except RevocationError:
        return False
    return True


def describe_revocations(revocations: RevocationList | None, served: bool) -> str:
    """One line for ``cloudfed-agent check``: what rosters are checked against."""
    if revocations is None:
        return "none: rosters are not checked against a CRL (the aggregator serves none, tls.crl unset)"
    until = f", next update {revocations.next_update:%Y-%m-%d %H:%M} UTC" if revocations.next_update else ""
    where = "the aggregator's CRL" if served else "tls.crl"
    return (
        f"{len(revocations.entries)} certificate(s) revoked (newest of {where} and those seen before{until})"
    )
