"""How long a daemon's own TLS certificate and its CA stay valid, and what to say when they do not.

An expired certificate fails the TLS handshake, which gRPC reports only as
UNAVAILABLE; reading the dates here lets the daemons say why, and lets Prometheus
warn weeks before.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from common.errors import ConfigError
from common.tls import TlsFiles

EXPIRY_WARNING = dt.timedelta(days=14)
"""Certificates closer than this to their end are worth a warning (the alerts use the same)."""


def certificate_end(path: Path) -> dt.datetime:
    """When the (first) certificate in the PEM file ``path`` ends (OSError, ValueError)."""
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc


def bundle_end(path: Path) -> dt.datetime:
    """The earliest end among the certificates of the PEM bundle ``path`` (OSError, ValueError)."""
    return min(c.not_valid_after_utc for c in x509.load_pem_x509_certificates(path.read_bytes()))


@dataclass(frozen=True)
class Validity:
    """The validity windows of ``cert`` and of the CA bundle that verifies peers."""

    cert: Path
    not_before: dt.datetime
    not_after: dt.datetime
    ca_not_after: dt.datetime
    """The earliest end among the bundle's CA certificates."""

    @classmethod
    def of(cls, files: TlsFiles) -> Validity:
        """Read the dates of ``files.cert`` and ``files.ca`` (ConfigError if unreadable)."""
        try:
            cert = x509.load_pem_x509_certificate(Path(files.cert).read_bytes())
            ca_end = bundle_end(Path(files.ca))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"tls: cannot read {files.cert} or {files.ca}: {exc}") from exc
        return cls(Path(files.cert), cert.not_valid_before_utc, cert.not_valid_after_utc, ca_end)

    def problem(self, now: dt.datetime | None = None) -> str | None:
        """Why the certificate cannot be used now, or None when it can."""
        now = now or dt.datetime.now(dt.UTC)
        if now >= self.not_after:
            return (
                f"tls.cert {self.cert} expired at {self.not_after:%Y-%m-%d %H:%M} UTC; install a renewed"
                " certificate (it is read again at each reconnect)"
            )
        if now < self.not_before:
            return (
                f"tls.cert {self.cert} is not valid before {self.not_before:%Y-%m-%d %H:%M} UTC"
                " (is this machine's clock right?)"
            )
        if now >= self.ca_not_after:
            return (
                f"the CA in tls.ca expired at {self.ca_not_after:%Y-%m-%d %H:%M} UTC; no peer can be verified"
            )
        return None

    def expiring(self, now: dt.datetime | None = None) -> str | None:
        """A warning when the certificate or the CA ends within EXPIRY_WARNING, else None (also
        once one has ended: :meth:`problem` says so)."""
        now = now or dt.datetime.now(dt.UTC)
        end, what = min((self.not_after, f"tls.cert {self.cert}"), (self.ca_not_after, "the CA in tls.ca"))
        if end <= now or now + EXPIRY_WARNING <= end:
            return None
        return f"{what} expires in {(end - now).total_seconds() / 86400:.1f} days ({end:%Y-%m-%d %H:%M} UTC)"
