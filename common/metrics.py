"""Prometheus metrics: definitions shared by both daemons, the gRPC server interceptor, /metrics.

Names follow Prometheus conventions (``cloudfed_`` prefix, base units, counters
end in ``_total``); labels stay low-cardinality: cloud and agent name, never a
round number or upload id. The gRPC metrics use the names community dashboards
expect (``grpc_server_handled_total`` and friends). ``_created`` series are off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from common.cert_validity import Validity, bundle_end, certificate_end
from common.errors import CloudfedError
from common.grpc_wrap import AroundInterceptor, Context
from common.identity import SpiffeId
from common.metrics_server import MetricsTls, start_metrics_server
from common.tls import TlsFiles, peer_spiffe_id

log = logging.getLogger(__name__)
disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
    1200,
    1800,
)
"""Milliseconds to tens of minutes: a chunk takes ms, a round phase can take half an hour."""

CERT_EXPIRY = Gauge(
    "cloudfed_tls_certificate_expiry_timestamp_seconds",
    "When this daemon's TLS certificate (role=cert) and the earliest-ending CA of its bundle (role=ca),"
    " and those of its TLS /metrics endpoint (metrics_cert, metrics_client_ca), stop being valid (unix"
    " time); updated at start and whenever the files are read again.",
    ["role"],
)


def publish_validity(files: TlsFiles) -> Validity:
    """Read and export the end dates of this daemon's certificate and CA; log an error if either
    cannot be used now (peers refuse the handshake) and a warning if either ends within 14 days."""
    validity = Validity.of(files)
    problem, soon = validity.problem(), validity.expiring()
    if problem is not None:
        log.error("%s: peers will refuse the TLS handshake", problem)
    elif soon is not None:
        log.warning("%s: renew it before then", soon)
    CERT_EXPIRY.labels(role="cert").set(validity.not_after.timestamp())
    CERT_EXPIRY.labels(role="ca").set(validity.ca_not_after.timestamp())
    return validity


TRANSFER_BYTES = Counter(
    "cloudfed_transfer_bytes",
    "Payload bytes moved between agents and the aggregator, by direction (as seen by this process) and kind.",
    ["direction", "kind", "cloud", "agent"],
)
CHUNK_SECONDS = Histogram(
    "cloudfed_chunk_seconds",
    "Time to process one chunk (validate, hash, write / read).",
    ["direction"],
    buckets=LATENCY_BUCKETS,
)
TRANSFER_SECONDS = Histogram(
    "cloudfed_transfer_seconds",
    "Time of one whole upload or download call.",
    ["direction", "kind"],
    buckets=LATENCY_BUCKETS,
)

GRPC_STARTED = Counter(
    "grpc_server_started", "RPCs started on the server.", ["grpc_type", "grpc_service", "grpc_method"]
)
GRPC_HANDLED = Counter(
    "grpc_server_handled",
    "RPCs completed on the server, by status code.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
GRPC_MSG_RECEIVED = Counter(
    "grpc_server_msg_received",
    "Stream messages received by the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
)
GRPC_MSG_SENT = Counter(
    "grpc_server_msg_sent",
    "Stream messages sent by the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
)
GRPC_HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Time from start to end of an RPC on the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS,
)


def peer_labels(peer: SpiffeId) -> dict[str, str]:
    """The cloud/agent labels of an agent."""
    return {"cloud": peer.cloud, "agent": peer.name}


MESSAGE_KINDS = {
    "Join": "control",
    "WatchRounds": "control",
    "GetUploadStatus": "control",
    "ReportEval": "control",
    "AdvertiseKeys": "keys",
    "ShareKeys": "keys",
    "GetSecAggState": "keys",
    "RevealShares": "keys",
    "DeclineRound": "control",
    "GetRevocationList": "control",
}
"""Methods whose whole messages are counted, by kind: control traffic and secure-aggregation keys.
Update and model bytes are counted where they stream."""


@dataclass
class _Counting:
    received_counter: Counter
    sent_counter: Counter
    control_in: Counter | None = None
    control_out: Counter | None = None

    def received(self, message: Any) -> None:
        self.received_counter.inc()
        if self.control_in is not None:
            self.control_in.inc(message.ByteSize())

    def sent(self, message: Any) -> None:
        self.sent_counter.inc()
        if self.control_out is not None:
            self.control_out.inc(message.ByteSize())


def _control_counters(context: Context, method: str) -> tuple[Counter | None, Counter | None]:
    kind = MESSAGE_KINDS.get(method)
    if kind is None:
        return None, None
    try:
        labels = peer_labels(peer_spiffe_id(context.auth_context()))
    except CloudfedError:  # the auth interceptor rejects the call; nothing to attribute
        return None, None
    return (
        TRANSFER_BYTES.labels(direction="received", kind=kind, **labels),
        TRANSFER_BYTES.labels(direction="sent", kind=kind, **labels),
    )


def grpc_metrics_interceptor(rpc_types: dict[str, str]) -> AroundInterceptor:
    """Server metrics for every call; ``rpc_types`` maps '/pkg.Service/Method' to its grpc_type."""

    @asynccontextmanager
    async def around(context: Context, method: str) -> AsyncIterator[_Counting]:
        service, _, name = method.lstrip("/").rpartition("/")
        labels = {"grpc_type": rpc_types.get(method, "unary"), "grpc_service": service, "grpc_method": name}
        GRPC_STARTED.labels(**labels).inc()
        began = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            control_in, control_out = _control_counters(context, name)
            yield _Counting(
                GRPC_MSG_RECEIVED.labels(**labels), GRPC_MSG_SENT.labels(**labels), control_in, control_out
            )
        except BaseException:
            code = (
                context.code() or grpc.StatusCode.UNKNOWN
            )  # set by context.abort(); else an unexpected error
            raise
        finally:
            if code is grpc.StatusCode.OK and context.code() not in (None, grpc.StatusCode.OK):
                code = context.code()
            GRPC_HANDLING.labels(**labels).observe(time.perf_counter() - began)
            GRPC_HANDLED.labels(**labels, grpc_code=code.name).inc()

    return AroundInterceptor(around)


def rpc_types_of(service_descriptor: object) -> dict[str, str]:
    """'/pkg.Service/Method' -> unary | client_stream | server_stream | bidi_stream."""
    types = {}
    for m in service_descriptor.methods:  # type: ignore[attr-defined]
        kind = {
            (False, False): "unary",
            (True, False): "client_stream",
            (False, True): "server_stream",
            (True, True): "bidi_stream",
        }[(m.client_streaming, m.server_streaming)]
        types[f"/{service_descriptor.full_name}/{m.name}"] = kind  # type: ignore[attr-defined]
    return types


def serve_metrics(listen: str, tls: MetricsTls | None = None) -> int:
    """Serve /metrics on ``host:port`` (over ``tls`` if given: files re-read after rotation, and
    their end dates exported); return the bound port."""
    return int(start_metrics_server(listen, tls, publish_metrics_validity).server_port)


def publish_metrics_validity(tls: MetricsTls) -> None:
    """Export when the /metrics certificate (role=metrics_cert) and its scrapers' CA
    (role=metrics_client_ca) end; the certificate-expiry alert covers them like the daemon's own."""
    try:
        CERT_EXPIRY.labels(role="metrics_cert").set(certificate_end(tls.cert).timestamp())
        if tls.client_ca is not None:
            CERT_EXPIRY.labels(role="metrics_client_ca").set(bundle_end(tls.client_ca).timestamp())
    except (OSError, ValueError) as exc:  # the TLS context just loaded them: only a race gets here
        log.warning("metrics: cannot read the end dates of %s: %s", tls.cert, exc)
