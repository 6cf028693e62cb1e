"""Every RPC of the aggregator, sent edge values in each field (largest integers, NaN and
infinities, out-of-range enums, empty and oversized strings and bytes) by a joined agent, in
every phase of masked rounds that run meanwhile: each call gets a status that says what was
wrong, never UNKNOWN or INTERNAL (an exception the servicer did not map)."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from protos.cloudfed.v1 import federation_pb2 as pb
from tests.agentsim import Watcher
from tests.conftest import Pki
from tests.test_secagg_service import secure_config

U64 = 2**64 - 1
NUMBERS = {
    FieldDescriptor.TYPE_UINT64: (U64, 2**63),
    FieldDescriptor.TYPE_UINT32: (2**32 - 1,),
    FieldDescriptor.TYPE_INT64: (2**63 - 1, -(2**63)),
    FieldDescriptor.TYPE_INT32: (2**31 - 1, -(2**31)),
    FieldDescriptor.TYPE_DOUBLE: (math.nan, math.inf, -math.inf, -1.0),
    FieldDescriptor.TYPE_FLOAT: (math.nan, -math.inf),
}
TEXT = ("", "\x00", "é" * 5000)
BLOBS = (b"", b"\xff" * 65, b"\x00" * 100_000)
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.PERMISSION_DENIED,
}
SECONDS = 60.0
"""The whole sweep stops by itself after this long (it takes a few seconds)."""


def edge_values(field: FieldDescriptor) -> tuple[object, ...]:
    if field.type == FieldDescriptor.TYPE_ENUM:
        return (len(field.enum_type.values) + 7,)
    if field.type == FieldDescriptor.TYPE_STRING:
        return TEXT
    if field.type == FieldDescriptor.TYPE_BYTES:
        return BLOBS
    if field.type == FieldDescriptor.TYPE_BOOL:
        return (True,)
    return NUMBERS.get(field.type, ())


def variants(message: type[Message], round_id: int, depth: int = 0) -> Iterator[Message]:
    """``message`` with one field at a time set to each edge value (nested messages too, one
    level down), then every field at its first edge value at once; a ``round_id`` field is the
    current round unless it is the one varied, so that checks past the round's are reached."""

    def base() -> Message:
        m = message()
        if "round_id" in message.DESCRIPTOR.fields_by_name:
            m.round_id = round_id  # type: ignore[attr-defined]
        return m

    everything = message()
    for field in message.DESCRIPTOR.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth > 0 or field.message_type.GetOptions().map_entry:
                continue
            inner_type = type(getattr(message(), field.name)) if not _repeated(field) else None
            if inner_type is None:
                continue
            for inner in variants(inner_type, round_id, depth + 1):
                m = base()
                getattr(m, field.name).CopyFrom(inner)
                yield m
            continue
        for value in edge_values(field):
            m = base()
            if _repeated(field):
                getattr(m, field.name).append(value)
            else:
                setattr(m, field.name, value)
            yield m
        values = edge_values(field)
        if values and not _repeated(field):
            setattr(everything, field.name, values[0])
    yield everything


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


async def _call(stub: object, method: str, request: Message) -> grpc.StatusCode:
    call = getattr(stub, method)
    try:
        if method in ("WatchRounds", "DownloadModel", "DownloadCodecState"):
            stream = call(request, timeout=5)
            async for _ in stream:
                break
            stream.cancel()
        elif method == "UploadUpdate":

            async def one() -> object:
                yield request

            await call(one(), timeout=5)
        else:
            await call(request, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_edge_values_in_every_field_get_a_status_that_says_what_was_wrong(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    config = secure_config(pki, tmp_path / "agg0", min_agents=2, min_uploads=2, upload_deadline_s=2.0)
    config = dataclasses.replace(
        config,
        secagg=dataclasses.replace(config.secagg, key_deadline_s=1.0),
        rounds=dataclasses.replace(config.rounds, retry_delay_s=0.2),
    )
    run = await start_aggregator(config=config)
    service = pb.DESCRIPTOR.services_by_name["FederationService"]
    unmapped: list[str] = []
    calls = 0
    async with run.client("fuzzer") as client, run.client("bystander") as other:
        await client.join(num_examples=10)
        await other.join(num_examples=10)
        watcher, watching = Watcher(other), Watcher(client)  # connected: rounds invite both
        try:
            event = await watcher.until(pb.ROUND_PHASE_ADVERTISE_KEYS)
            began = time.monotonic()
            for method in service.methods:
                request_type = getattr(pb, method.input_type.name)
                if method.name == "UploadUpdate":
                    request_type = pb.UploadUpdateRequest
                for request in variants(request_type, event.round_id):
                    assert time.monotonic() - began < SECONDS
                    code = await _call(client.stub, method.name, request)
                    calls += 1
                    if code not in REFUSALS | {grpc.StatusCode.OK}:
                        unmapped.append(f"{method.name} {code.name}: {str(request)[:200]!r}")
        finally:
            await watcher.close()
            await watching.close()
    assert calls > 100
    assert not unmapped, "\n".join(unmapped)
