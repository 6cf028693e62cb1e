"""Stream a global version or the codec state to an agent: a header, then chunks from an offset."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from common.chunks import iter_file_chunks
from common.codecs.state import CodecState
from common.errors import InvalidArgument, NotFound
from common.identity import SpiffeId
from common.metrics import TRANSFER_BYTES, TRANSFER_SECONDS, peer_labels
from protos.cloudfed.v1 import federation_pb2 as pb
from server.checkpoints import CheckpointStore


async def send_model(
    agent: SpiffeId, store: CheckpointStore, version: int, offset: int, chunk_bytes: int
) -> AsyncIterator[pb.DownloadModelResponse]:
    """The checkpoint of ``version`` from byte ``offset`` (resumable), after its header."""
    manifest = store.manifest(version)
    if offset > manifest.size_bytes:
        raise InvalidArgument(f"offset {offset} is past the end ({manifest.size_bytes} bytes)")
    yield pb.DownloadModelResponse(
        header=pb.ModelHeader(
            version=version,
            total_bytes=manifest.size_bytes,
            sha256=bytes.fromhex(manifest.sha256),
            layout_digest=manifest.layout_digest,
            format="safetensors",
        )
    )
    sent = TRANSFER_BYTES.labels(direction="sent", kind="model", **peer_labels(agent))
    began = time.perf_counter()
    for chunk_offset, data in iter_file_chunks(store.path(version), chunk_bytes, offset):
        # Page-cache reads of 1 MiB: cheaper inline than via a thread.
        yield pb.DownloadModelResponse(chunk=pb.Chunk(offset=chunk_offset, data=data))
        sent.inc(len(data))
    TRANSFER_SECONDS.labels(direction="sent", kind="model").observe(time.perf_counter() - began)


async def send_codec_state(
    agent: SpiffeId, state: CodecState | None, sha256: bytes, offset: int, chunk_bytes: int
) -> AsyncIterator[pb.DownloadCodecStateResponse]:
    """The codec state file named by ``sha256`` (``state``, looked up by the caller) from byte
    ``offset``; NOT_FOUND when there is none by that digest."""
    if state is None or sha256.hex() != state.sha256:
        raise NotFound(f"no codec state with sha256 {sha256.hex() or '(empty)'}")
    if offset > state.size:
        raise InvalidArgument(f"offset {offset} is past the end ({state.size} bytes)")
    yield pb.DownloadCodecStateResponse(
        header=pb.CodecStateHeader(total_bytes=state.size, sha256=sha256, format="safetensors")
    )
    sent = TRANSFER_BYTES.labels(direction="sent", kind="control", **peer_labels(agent))
    for chunk_offset, data in iter_file_chunks(state.path, chunk_bytes, offset):
        yield pb.DownloadCodecStateResponse(chunk=pb.Chunk(offset=chunk_offset, data=data))
        sent.inc(len(data))
