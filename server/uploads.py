"""Receive one upload stream into the spool and hand it to the round."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

from google.protobuf import json_format

from common.errors import CloudfedError, DataLoss, InvalidArgument, ResourceExhausted
from common.identity import SpiffeId
from common.metrics import CHUNK_SECONDS, TRANSFER_BYTES, TRANSFER_SECONDS, peer_labels
from protos.cloudfed.v1 import federation_pb2 as pb
from server.admission import check_spend
from server.rounds import RoundCoordinator
from server.spool import UploadMeta, UploadSpool

log = logging.getLogger(__name__)


def meta_of(agent: SpiffeId, header: pb.UploadHeader) -> UploadMeta:
    """The spool's view of an upload header; INVALID_ARGUMENT for a DP spend that is no number."""
    check_spend(header.epsilon_spent, "epsilon_spent")
    return UploadMeta(
        agent=agent.uri,
        round_id=header.round_id,
        upload_id=header.upload_id,
        codec=header.codec.name,
        layout_digest=header.layout_sha256.hex(),
        total_bytes=header.total_bytes,
        sha256=header.sha256.hex(),
        base_version=header.base_version,
        weight=header.weight,
        codec_params=params_key(header.codec),
        epsilon_spent=header.epsilon_spent,
    )


def params_key(spec: pb.CodecSpec) -> str:
    """Codec parameters in one canonical string, to compare an upload with its round."""
    return json.dumps(json_format.MessageToDict(spec.params), sort_keys=True)


async def receive_upload(
    agent: SpiffeId,
    messages: AsyncIterator[pb.UploadUpdateRequest],
    spool: UploadSpool,
    rounds: RoundCoordinator,
) -> pb.UploadUpdateResponse:
    """Validate and spool one stream; commit to the round once complete.

    Protocol violations discard the upload (no trace in the round); a broken
    connection keeps the committed prefix for resuming.
    """
    first = await anext(messages, None)
    if first is None or first.WhichOneof("message") != "header":
        raise InvalidArgument("the first message of an upload must be a header")
    meta = meta_of(agent, first.header)
    spool.check_limits(meta)
    rounds.check_upload(agent, meta)
    writer = spool.open(agent, meta, rounds.payload_validator())
    received = TRANSFER_BYTES.labels(direction="received", kind="update", **peer_labels(agent))
    chunk_seconds = CHUNK_SECONDS.labels(direction="received")
    began = time.perf_counter()
    try:
        try:
            async for msg in messages:
                if msg.WhichOneof("message") != "chunk":
                    raise InvalidArgument("only chunks may follow the header")
                # Inline, not to_thread: validating, hashing and writing 1 MiB takes ~1 ms, less than a
                # thread hand-off costs; measured 355 vs 277 MB/s median (bench/transport.py, 2 cores).
                t0 = time.perf_counter()
                writer.write(msg.chunk.offset, msg.chunk.data)
                chunk_seconds.observe(time.perf_counter() - t0)
                received.inc(len(msg.chunk.data))
            verified = writer.finish()
            TRANSFER_SECONDS.labels(direction="received", kind="update").observe(time.perf_counter() - began)
        finally:
            writer.close()
    except (InvalidArgument, ResourceExhausted, DataLoss):
        spool.discard(agent, meta.upload_id)
        raise
    committed = writer.committed
    if verified:
        try:
            await rounds.commit_upload(agent, meta, writer.path)
        except CloudfedError:
            spool.discard(agent, meta.upload_id)  # rejected content (NaN, round moved on) leaves no trace
            raise
    return pb.UploadUpdateResponse(
        upload_id=meta.upload_id, committed_bytes=committed, digest_verified=verified
    )
