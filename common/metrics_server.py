"""The /metrics HTTP(S) server: prometheus_client's WSGI app behind our own TLS.

prometheus_client's ``start_http_server`` offers TLS 1.2 CBC suites (LUCKY13, per testssl.sh),
cannot be told otherwise, and keeps the certificate it started with. Here the scrape endpoint
gets what the gRPC port has: TLS 1.2 or 1.3 with forward-secret AEAD suites only, no
renegotiation, an optional required client certificate, and certificate files re-read at the
next handshake after they change on disk (cert-manager and Secret rotation, as for gRPC).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, make_wsgi_app

log = logging.getLogger(__name__)

TLS12_SUITES = "ECDHE+AESGCM:ECDHE+CHACHA20"
"""TLS 1.2 suites: ECDHE key exchange, AEAD ciphers (TLS 1.3's are all AEAD)."""
REQUEST_TIMEOUT_S = 10.0
"""A scrape (handshake included) that stalls longer is dropped: no thread is held by a slow client."""
MAX_CONNECTIONS = 16
"""Connections served at once; one more is closed at once (a flood holds no more threads)."""


@dataclass(frozen=True)
class MetricsTls:
    """The scrape endpoint's certificate, key and, to require client certificates, their CA."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def mtimes(self) -> tuple[int, ...]:
        """Modification times of the files, to notice rotation."""
        files = [self.cert, self.key, *([self.client_ca] if self.client_ca else [])]
        return tuple(p.stat().st_mtime_ns for p in files)

    def context(self) -> ssl.SSLContext:
        """A server context: TLS 1.2+, ECDHE AEAD suites, no renegotiation or compression."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(TLS12_SUITES)
        ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
        ctx.load_cert_chain(str(self.cert), str(self.key))
        if self.client_ca is not None:
            ctx.load_verify_locations(cafile=str(self.client_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


class _RotatingContext:
    """The current SSL context, rebuilt when the files change (a bad new file keeps the old one)."""

    def __init__(self, tls: MetricsTls, on_load: Callable[[MetricsTls], object] | None = None) -> None:
        self._tls = tls
        self._on_load = on_load or (lambda _: None)
        self._lock = threading.Lock()
        self._stamp = tls.mtimes()
        self._ctx = tls.context()
        self._on_load(tls)

    def current(self) -> ssl.SSLContext:
        with self._lock:
            try:
                stamp = self._tls.mtimes()
                if stamp != self._stamp:
                    self._ctx, self._stamp = self._tls.context(), stamp
                    self._on_load(self._tls)
            except (OSError, ssl.SSLError):  # half-written during rotation: retry next handshake
                pass
            return self._ctx


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr; a stalled connection times out."""

    timeout = REQUEST_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer(ThreadingMixIn, WSGIServer):
    """A threaded WSGI server whose accepted sockets are wrapped in the current TLS context."""

    daemon_threads = True
    tls: _RotatingContext | None = None
    slots: threading.BoundedSemaphore
    """Set by start_metrics_server: MAX_CONNECTIONS for this server."""

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve in a thread of its own while fewer than MAX_CONNECTIONS are; else close it."""
        if not self.slots.acquire(blocking=False):
            log.debug("metrics: %d connections open; closing one from %s", MAX_CONNECTIONS, client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = self.socket.accept()
        if self.tls is None:
            return conn, addr
        # The handshake runs in the request's own thread, at its first read, not in the accept loop.
        return self.tls.current().wrap_socket(conn, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A refused handshake or a dropped scraper: one debug line, not a traceback on stderr."""
        log.debug("metrics: request from %s failed", client_address, exc_info=True)


def start_metrics_server(
    listen: str, tls: MetricsTls | None = None, on_load: Callable[[MetricsTls], object] | None = None
) -> MetricsServer:
    """Serve ``REGISTRY`` at ``host:port`` (port 0: any free one) from a daemon thread; ``on_load``
    is called with ``tls`` whenever its files are (re)loaded."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM)[0][0]
    server_class = type("MetricsServerFor", (MetricsServer,), {"address_family": family})
    server: MetricsServer = make_server(
        host, int(port), make_wsgi_app(REGISTRY), server_class, handler_class=_QuietHandler
    )
    server.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    if tls is not None:
        server.tls = _RotatingContext(tls, on_load)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
