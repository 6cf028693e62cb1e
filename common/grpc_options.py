"""Every gRPC channel and server option in one place, each with its reason."""

from __future__ import annotations

MiB = 1024 * 1024
MAX_CHUNK_BYTES = 1 * MiB
"""Hard ceiling for one chunk's payload; configs may lower it, never raise it."""

MAX_MESSAGE_BYTES = 4 * MiB
"""Receive limit on both sides: one chunk plus framing. No 2 GB message ceiling can exist."""


def server_options(max_connection_age_s: float = 3600.0) -> list[tuple[str, int]]:
    """Options for the aggregator's mTLS server."""
    return [
        # Chunks are <= 1 MiB, so a few MiB bounds every message; huge messages are refused early.
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Ping idle agents so dead cross-cloud connections (NAT, LB timeouts) are noticed.
        ("grpc.keepalive_time_ms", 30_000),
        # A ping unanswered for 10 s means the peer is gone.
        ("grpc.keepalive_timeout_ms", 10_000),
        # Agents ping every 30 s too; accept that cadence without GOAWAY(too_many_pings).
        ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # WatchRounds streams live for hours; allow pings with no data in flight.
        ("grpc.http2.max_pings_without_data", 0),
        # Recycle connections so certificate rotation and load balancers take effect.
        ("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
        # Give in-flight uploads time to finish when a connection is recycled.
        ("grpc.max_connection_age_grace_ms", 300_000),
        # Let a lagging stream use large HTTP/2 windows (BDP probing) for throughput.
        ("grpc.http2.bdp_probe", 1),
        # No port sharing: a second aggregator on the same port must fail, not split traffic.
        ("grpc.so_reuseport", 0),
    ]


def channel_options(server_name_override: str | None = None) -> list[tuple[str, int | str]]:
    """Options for an agent's channel to the aggregator."""
    options: list[tuple[str, int | str]] = [
        # The aggregator streams chunks of <= 1 MiB; bound what we accept.
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Detect a dead aggregator while idling on WatchRounds.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect quickly after an aggregator restart; our own loop adds jittered backoff.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 10_000),
        # Large HTTP/2 windows for upload throughput over long cross-cloud paths.
        ("grpc.http2.bdp_probe", 1),
        # Each agent is one tenant; never share subchannels across channel objects.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if server_name_override:
        # Certificates name the aggregator's DNS name; dial by IP in tests/dev.
        options.append(("grpc.ssl_target_name_override", server_name_override))
    return options


def upload_deadline_s(total_bytes: int, min_rate_bytes_s: float = 1 * MiB, base_s: float = 60.0) -> float:
    """Deadline for an upload or download call: a base plus time at a minimum rate."""
    return base_s + total_bytes / min_rate_bytes_s


UNARY_DEADLINE_S = 30.0
"""Deadline for small unary calls (join, status, report)."""

DOWNLOAD_DEADLINE_S = 3600.0
"""Deadline for one download call (the size is unknown until its header); resumes continue after it."""
