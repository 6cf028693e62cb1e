"""What an agent sends the aggregator in a round, and its size on the wire.

The daemon builds its upload header here, and ``bench.quality`` counts a round's uplink with the
same messages: protobuf bytes plus gRPC's 5-byte length prefix a message. HTTP/2 and TLS framing
are not counted (tens of bytes a call, the same for every codec).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence

from google.protobuf.message import Message

from common.chunks import MAX_CHUNK_BYTES
from common.secagg.keys import Advertisement
from common.secagg_pb import STATE_WAITS, advertise_request, reveal_request, share_request, state_request
from protos.cloudfed.v1 import federation_pb2 as pb

GRPC_PREFIX_BYTES = 5
"""gRPC's message header: a compression flag and a 4-byte length."""


def message_bytes(*messages: Message) -> int:
    """Bytes of ``messages`` as gRPC sends them."""
    return sum(m.ByteSize() + GRPC_PREFIX_BYTES for m in messages)


def upload_header(
    round_id: int,
    codec: pb.CodecSpec,
    layout_digest: str,
    base_version: int,
    weight: float,
    payload: bytes,
    epsilon_spent: float = 0.0,
) -> pb.UploadHeader:
    """The header of a round's upload of ``payload``, under a fresh upload id (``epsilon_spent``:
    the agent's DP spend, this round included)."""
    return pb.UploadHeader(
        epsilon_spent=epsilon_spent,
        round_id=round_id,
        upload_id=f"r{round_id}-{uuid.uuid4().hex[:16]}",
        codec=codec,
        layout_sha256=bytes.fromhex(layout_digest),
        base_version=base_version,
        weight=weight,
        total_bytes=len(payload),
        sha256=hashlib.sha256(payload).digest(),
    )


def upload_bytes(header: pb.UploadHeader, chunk_bytes: int = MAX_CHUNK_BYTES) -> int:
    """A new upload that goes through at the first attempt (no status probe): the header and the
    chunks of ``header.total_bytes``."""
    total = message_bytes(pb.UploadUpdateRequest(header=header))
    for offset in range(0, header.total_bytes, chunk_bytes):
        size = min(chunk_bytes, header.total_bytes - offset)
        total += message_bytes(pb.UploadUpdateRequest(chunk=pb.Chunk(offset=offset, data=bytes(size))))
    return total


def secagg_key_bytes(
    round_id: int,
    advertisement: Advertisement,
    sealed: Mapping[str, bytes],
    reveals: Mapping[str, tuple[int, bytes]],
    roster: Sequence[str],
) -> int:
    """A masked round's key traffic from one agent: its advertisement, sealed shares, the phases
    it waits for and its revealed shares."""
    return message_bytes(
        advertise_request(advertisement),
        share_request(round_id, sealed, roster),
        *(state_request(round_id, phase) for phase in STATE_WAITS),
        reveal_request(round_id, reveals, roster),
    )


def evaluation_bytes(version: int, loss: float, tokens: int) -> int:
    """Fetching a new global version and reporting its eval loss (every round, any codec)."""
    return message_bytes(
        pb.DownloadModelRequest(version=version),
        pb.ReportEvalRequest(global_version=version, eval_loss=loss, eval_tokens=tokens),
    )
