"""Certificate revocation lists (CRLs) signed by the federation's CA.

A CRL file holds one or more PEM CRLs (one per CA of the ``tls.ca`` bundle, so a
CA rotation can revoke under both). Each must be signed by a CA of the bundle;
an entry revokes one certificate, named by its issuer and serial number. Protocol
core: no gRPC here; the aggregator's auth layer asks :meth:`RevocationList.lookup`
on every call.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import CRLEntryExtensionOID

from common.errors import ConfigError

log = logging.getLogger(__name__)

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.S)
CLOCK_SKEW = dt.timedelta(minutes=5)
"""A CRL issued up to this far in the future still loads (clocks of the CA host and ours)."""


class RevocationError(ConfigError):
    """A CRL file cannot be trusted or read; the message says why."""


@dataclass(frozen=True, slots=True)
class Revoked:
    """One revoked certificate."""

    serial: int
    revoked_at: dt.datetime
    reason: str | None

    def describe(self) -> str:
        """``serial 0x.. revoked at <time> (reason)`` for errors and logs."""
        why = f" ({self.reason})" if self.reason else ""
        return f"serial {self.serial:#x} was revoked at {self.revoked_at:%Y-%m-%d %H:%M:%S} UTC{why}"


@dataclass(frozen=True)
class RevocationList:
    """The revoked certificates of every CRL in one file, keyed by (issuer DER, serial)."""

    entries: Mapping[tuple[bytes, int], Revoked] = field(default_factory=dict)
    numbers: Mapping[bytes, int] = field(default_factory=dict)
    """CRL number per issuer (0 where a CRL carries none): a reload may not go back."""
    next_update: dt.datetime | None = None
    """The earliest ``nextUpdate`` of the file's CRLs: after it the list is stale."""

    def lookup(self, cert: x509.Certificate) -> Revoked | None:
        """The revocation of ``cert``, or None if it is not revoked."""
        return self.lookup_serial(cert.issuer.public_bytes(), cert.serial_number)

    def lookup_serial(self, issuer_der: bytes, serial: int) -> Revoked | None:
        """The revocation of the certificate ``serial`` of the issuer ``issuer_der``, or None."""
        return self.entries.get((issuer_der, serial))

    def stale(self, now: dt.datetime) -> bool:
        """True once the CRL's issuer promised a newer one."""
        return self.next_update is not None and now > self.next_update

    @classmethod
    def load(cls, crl_path: Path, ca_path: Path, now: dt.datetime | None = None) -> RevocationList:
        """Read and verify ``crl_path`` against the CA bundle at ``ca_path`` (``parse``)."""
        return cls.read(crl_path, ca_path, now)[0]

    @classmethod
    def read(
        cls, crl_path: Path, ca_path: Path, now: dt.datetime | None = None
    ) -> tuple[RevocationList, bytes]:
        """As ``load``, with the file's bytes as they were verified (to hand on unchanged)."""
        try:
            data = Path(crl_path).read_bytes()
            cas = Path(ca_path).read_bytes()
        except OSError as exc:
            raise RevocationError(f"cannot read {crl_path} or its CA {ca_path}: {exc}") from exc
        return cls.parse(data, cas, str(crl_path), str(ca_path), now), data

    @classmethod
    def parse(
        cls, data: bytes, cas_pem: bytes, source: str, bundle: str, now: dt.datetime | None = None
    ) -> RevocationList:
        """Verify the PEM CRLs ``data`` (named ``source`` in errors) against the CA bundle
        ``cas_pem`` (named ``bundle``).

        Raises RevocationError when a CRL is unreadable, signed by no CA of the
        bundle, or issued in the future.
        """
        try:
            cas = x509.load_pem_x509_certificates(cas_pem)
        except ValueError as exc:
            raise RevocationError(f"cannot read the CA bundle {bundle}: {exc}") from exc
        blocks = _PEM_CRL.findall(data)
        if not blocks:
            raise RevocationError(f"{source}: no PEM CRL (-----BEGIN X509 CRL-----) in it")
        now = now or dt.datetime.now(dt.UTC)
        entries: dict[tuple[bytes, int], Revoked] = {}
        numbers: dict[bytes, int] = {}
        next_updates: list[dt.datetime] = []
        for block in blocks:
            try:
                crl = x509.load_pem_x509_crl(block)
            except ValueError as exc:
                raise RevocationError(f"{source}: unreadable CRL: {exc}") from exc
            issuer = crl.issuer.public_bytes()
            signers = [ca for ca in cas if ca.subject.public_bytes() == issuer]
            if not any(crl.is_signature_valid(ca.public_key()) for ca in signers):  # type: ignore[arg-type]
                raise RevocationError(
                    f"{source}: the CRL of {crl.issuer.rfc4514_string()} is not signed by a CA in {bundle}"
                )
            if issuer in numbers:
                raise RevocationError(f"{source}: two CRLs of {crl.issuer.rfc4514_string()}")
            if crl.last_update_utc > now + CLOCK_SKEW:
                raise RevocationError(
                    f"{source}: the CRL of {crl.issuer.rfc4514_string()} is dated "
                    f"{crl.last_update_utc:%Y-%m-%d %H:%M} UTC, in the future"
                )
            numbers[issuer] = crl_number(crl)
            if crl.next_update_utc is not None:
                next_updates.append(crl.next_update_utc)
            for revoked in crl:
                entries[(issuer, revoked.serial_number)] = Revoked(
                    revoked.serial_number, revoked.revocation_date_utc, _reason(revoked)
                )
        return cls(entries, numbers, min(next_updates, default=None))

    def merged(self, other: RevocationList) -> RevocationList:
        """For each issuer, the entries of whichever list has its higher CRL number (this one on a
        tie): a newer list from any source wins and an older one cannot roll it back. The next
        update is the earlier of the two."""
        numbers = dict(self.numbers)
        source = dict.fromkeys(self.numbers, self)
        for issuer, number in other.numbers.items():
            if number > numbers.get(issuer, -1):
                numbers[issuer], source[issuer] = number, other
        entries = {key: r for lst in (self, other) for key, r in lst.entries.items() if source[key[0]] is lst}
        updates = [u for u in (self.next_update, other.next_update) if u is not None]
        return RevocationList(entries, numbers, min(updates, default=None))

    def check_successor(self, newer: RevocationList) -> None:
        """Raise RevocationError if ``newer`` rolls back an issuer's CRL number."""
        for issuer, number in self.numbers.items():
            if newer.numbers.get(issuer, number) < number:
                raise RevocationError(
                    f"CRL number went back from {number} to {newer.numbers[issuer]}: refusing an older CRL"
                )


def crl_number(crl: x509.CertificateRevocationList) -> int:
    """The CRL's number extension (0 when it carries none)."""
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0


def _reason(revoked: x509.RevokedCertificate) -> str | None:
    try:
        ext = revoked.extensions.get_extension_for_oid(CRLEntryExtensionOID.CRL_REASON)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    return value.reason.value if isinstance(value, x509.CRLReason) else None
