"""Certificate authority and certificate issuance for cloudfed (ECDSA P-256).

A PKI directory holds ``ca.pem`` / ``ca-key.pem`` and one ``<name>.pem`` /
``<name>-key.pem`` pair per issued certificate. Private keys are written 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.identity import SpiffeId
from common.revocation import crl_number

CA_DAYS = 3650
LEAF_DAYS = 90
CRL_DAYS = 30
REVOCATION_REASONS = {
    r.name: r
    for r in (
        x509.ReasonFlags.unspecified,
        x509.ReasonFlags.key_compromise,
        x509.ReasonFlags.affiliation_changed,
        x509.ReasonFlags.superseded,
        x509.ReasonFlags.cessation_of_operation,
    )
}
"""Reasons ``cloudfed-pki revoke --reason`` accepts (the CRL carries their RFC 5280 names)."""
_BACKDATE = dt.timedelta(minutes=5)


class PkiError(RuntimeError):
    """A PKI operation could not be done; the message says why."""


@dataclass(frozen=True)
class Issued:
    """A certificate with its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        """PEM of the certificate."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM of the private key."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    days: float,
    not_before: dt.datetime | None,
) -> x509.CertificateBuilder:
    start = not_before if not_before is not None else _now() - _BACKDATE
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def create_ca(common_name: str, days: float = CA_DAYS, not_before: dt.datetime | None = None) -> Issued:
    """A new self-signed CA that may only sign leaf certificates."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _builder(name, name, key.public_key(), days, not_before)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _leaf(
    ca: Issued,
    common_name: str,
    san: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    days: float,
    not_before: dt.datetime | None,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _builder(subject, ca.cert.subject, key.public_key(), days, not_before)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue_server(
    ca: Issued,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str] = (),
    days: float = LEAF_DAYS,
    not_before: dt.datetime | None = None,
) -> Issued:
    """A TLS server certificate for the aggregator with DNS/IP SANs."""
    if not dns_names and not ip_addresses:
        raise PkiError("a server certificate needs at least one DNS name or IP address")
    san: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    cn = dns_names[0] if dns_names else ip_addresses[0]
    return _leaf(ca, cn, san, ExtendedKeyUsageOID.SERVER_AUTH, days, not_before)


def issue_agent(
    ca: Issued, spiffe: SpiffeId, days: float = LEAF_DAYS, not_before: dt.datetime | None = None
) -> Issued:
    """A TLS client certificate whose only SAN is the agent's SPIFFE URI."""
    san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe.uri)]
    return _leaf(ca, f"{spiffe.cloud}/{spiffe.name}", san, ExtendedKeyUsageOID.CLIENT_AUTH, days, not_before)


def spiffe_ids_of(cert: x509.Certificate) -> list[str]:
    """All ``spiffe://`` URI SANs of a certificate."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]


def build_crl(
    ca: Issued, revoked: Sequence[x509.RevokedCertificate], number: int, days: float = CRL_DAYS
) -> x509.CertificateRevocationList:
    """A CRL of ``ca`` listing ``revoked``, valid for ``days``, with CRL number ``number``."""
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - _BACKDATE)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(ca.key, hashes.SHA256())


def revoked_entry(serial: int, reason: x509.ReasonFlags | None = None) -> x509.RevokedCertificate:
    """One CRL entry: ``serial`` revoked now, for ``reason``."""
    builder = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(_now())
    if reason is not None:
        builder = builder.add_extension(x509.CRLReason(reason), critical=False)
    return builder.build()


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def load_issued(cert_path: Path, key_path: Path) -> Issued:
    """Load a certificate and its private key from PEM files."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path}: not an EC private key")
    return Issued(cert, key)


@dataclass(frozen=True)
class PkiDir:
    """A directory holding a CA and the certificates it issued."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca-key.pem"

    @property
    def crl(self) -> Path:
        """The CA's certificate revocation list (PEM)."""
        return self.root / "crl.pem"

    def cert(self, name: str) -> Path:
        """Certificate path of an issued name."""
        return self.root / f"{name}.pem"

    def key(self, name: str) -> Path:
        """Private key path of an issued name."""
        return self.root / f"{name}-key.pem"

    def init(self, common_name: str, days: float = CA_DAYS, force: bool = False) -> Issued:
        """Create the CA; refuse to overwrite one unless ``force``."""
        if self.ca_cert.exists() and not force:
            raise PkiError(f"{self.ca_cert} exists; pass --force to replace the CA")
        ca = create_ca(common_name, days)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        write_private(self.ca_key, ca.key_pem())
        self.ca_cert.write_bytes(ca.cert_pem())
        self.crl.unlink(missing_ok=True)  # a replaced CA's list no longer verifies
        self.write_crl([])
        return ca

    def load_ca(self) -> Issued:
        """The CA of this directory."""
        if not self.ca_cert.exists():
            raise PkiError(f"no CA in {self.root}; run 'cloudfed-pki init' first")
        return load_issued(self.ca_cert, self.ca_key)

    def save(self, name: str, issued: Issued) -> tuple[Path, Path]:
        """Write an issued certificate and key under ``name``."""
        if not name or "/" in name or name.startswith(".") or name in ("ca", "ca-key", "crl"):
            raise PkiError(f"bad certificate name {name!r}")
        write_private(self.key(name), issued.key_pem())
        self.cert(name).write_bytes(issued.cert_pem())
        return self.cert(name), self.key(name)

    def list(self) -> list[tuple[str, x509.Certificate]]:
        """Every certificate in the directory, the CA first."""
        out = []
        for path in sorted(self.root.glob("*.pem")):
            if path.name.endswith("-key.pem") or path == self.crl:
                continue
            out.append((path.stem, x509.load_pem_x509_certificate(path.read_bytes())))
        out.sort(key=lambda item: item[0] != "ca")
        return out

    def revoked(self) -> Sequence[x509.RevokedCertificate]:
        """The entries of the current CRL (none if there is no CRL yet)."""
        if not self.crl.exists():
            return []
        crl = x509.load_pem_x509_crl(self.crl.read_bytes())
        if not crl.is_signature_valid(self.load_ca().key.public_key()):
            raise PkiError(f"{self.crl} is not signed by this directory's CA")
        return list(crl)

    def write_crl(self, revoked: Sequence[x509.RevokedCertificate], days: float = CRL_DAYS) -> Path:
        """Sign and write a new CRL with ``revoked``; its number follows the current one's."""
        number = 1
        if self.crl.exists():
            number = crl_number(x509.load_pem_x509_crl(self.crl.read_bytes())) + 1
        crl = build_crl(self.load_ca(), revoked, number, days)
        tmp = self.crl.with_suffix(".tmp")
        tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        os.replace(tmp, self.crl)  # readers see the old list or the new one, never half
        return self.crl

    def revoke(self, serial: int, reason: x509.ReasonFlags | None = None, days: float = CRL_DAYS) -> bool:
        """Add ``serial`` to the CRL (re-signed); False if it was already revoked."""
        revoked = self.revoked()
        if any(r.serial_number == serial for r in revoked):
            self.write_crl(revoked, days)
            return False
        self.write_crl([*revoked, revoked_entry(serial, reason)], days)
        return True
