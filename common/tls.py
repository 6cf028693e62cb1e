"""gRPC TLS credentials and peer identity.

The server side uses gRPC's dynamic credentials: certificate files are re-read
when they change on disk (Kubernetes Secret rotation, cert-manager, ExecReload),
so rotation needs no restart and drops no connection.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509

from common.errors import ConfigError, Unauthenticated
from common.identity import IdentityError, SpiffeId
from common.pki import spiffe_ids_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for one side of an mTLS connection."""

    cert: Path
    key: Path
    ca: Path

    def check(self, field: str = "tls") -> None:
        """Raise ConfigError naming the first missing or unreadable file."""
        for name in ("cert", "key", "ca"):
            path = Path(getattr(self, name))
            if not path.is_file():
                raise ConfigError(f"{field}.{name}: file not found: {path}")
            if not os.access(path, os.R_OK):
                raise ConfigError(f"{field}.{name}: file not readable: {path}")

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(cert, key, ca) bytes."""
        return Path(self.cert).read_bytes(), Path(self.key).read_bytes(), Path(self.ca).read_bytes()

    def mtimes(self) -> tuple[int, ...]:
        """Modification times, to notice rotation."""
        return tuple(Path(p).stat().st_mtime_ns for p in (self.cert, self.key, self.ca))


class ReloadingServerCredentials:
    """Server credentials that pick up rotated certificate files at the next handshake."""

    def __init__(self, files: TlsFiles, on_load: Callable[[TlsFiles], object] | None = None) -> None:
        files.check()
        self._files = files
        self._on_load = on_load
        self._lock = threading.Lock()
        self._seen = files.mtimes()
        self._forced = False

    def _config(self) -> grpc.ServerCertificateConfiguration:
        cert, key, ca = self._files.read()
        config = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
        if self._on_load is not None:
            try:
                self._on_load(self._files)
            except Exception:  # an observer must never break the handshake
                log.exception("certificate observer failed")
        return config

    def reload(self) -> None:
        """Re-read the files at the next handshake even if mtimes did not change."""
        with self._lock:
            self._forced = True

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            try:
                now = self._files.mtimes()
            except OSError as exc:
                log.warning("certificate files unreadable, keeping the current ones: %s", exc)
                return None
            if now == self._seen and not self._forced:
                return None
            self._seen, self._forced = now, False
        try:
            config = self._config()
        except OSError as exc:
            log.warning("could not reload certificates: %s", exc)
            return None
        log.info("reloaded TLS certificates from %s", self._files.cert)
        return config

    def credentials(self) -> grpc.ServerCredentials:
        """gRPC credentials requiring and verifying a client certificate."""
        fetch: Callable[[], grpc.ServerCertificateConfiguration] = self._fetch  # type: ignore[assignment]
        return grpc.dynamic_ssl_server_credentials(self._config(), fetch, require_client_authentication=True)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Client credentials presenting our certificate and trusting the CA."""
    files.check()
    cert, key, ca = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def peer_certificate_pem(auth_context: Mapping[str, Iterable[bytes]]) -> bytes:
    """The caller's certificate (PEM) from a TLS auth context."""
    pems = list(auth_context.get("x509_pem_cert", ()))
    if not pems:
        raise Unauthenticated("no client certificate")
    return bytes(pems[0])


def peer_certificate(auth_context: Mapping[str, Iterable[bytes]]) -> x509.Certificate:
    """The caller's parsed certificate from a TLS auth context."""
    if list(auth_context.get("transport_security_type", ())) != [b"ssl"]:
        raise Unauthenticated("connection is not TLS")
    try:
        return x509.load_pem_x509_certificate(peer_certificate_pem(auth_context))
    except ValueError as exc:
        raise Unauthenticated(f"unreadable client certificate: {exc}") from exc


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The one SPIFFE id of a client certificate."""
    uris = spiffe_ids_of(cert)
    if len(uris) != 1:
        raise Unauthenticated(f"client certificate must carry exactly one SPIFFE id, found {len(uris)}")
    try:
        return SpiffeId.parse(uris[0])
    except IdentityError as exc:
        raise Unauthenticated(str(exc)) from exc


def peer_spiffe_id(auth_context: Mapping[str, Iterable[bytes]]) -> SpiffeId:
    """The caller's SPIFFE id from a TLS auth context; exactly one must be present."""
    return spiffe_id_of(peer_certificate(auth_context))
