"""Every RPC of the aggregator, sent edge values in each field (largest integers, NaN and
infinities, out-of-range enums, empty and oversized strings and bytes) by a joined agent, in
every phase of masked rounds that run meanwhile: each call gets a status that says what was
wrong, never UNKNOWN or INTERNAL (an exception the servicer did not map). Then a participant's
own upload, valid but for one field at a time, in a plain and in a masked round's upload phase,
where every check of an upload is reached: each is refused."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from agent.client import AggregatorClient
from protos.cloudfed.v1 import federation_pb2 as pb
from tests.agentsim import Watcher, in_key_phase, upload_header, write_payload
from tests.conftest import Pki
from tests.test_secagg_service import NUMEL, play_agent, secure_config

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


def one_field_off(valid: Message) -> Iterator[tuple[str, Message]]:
    """``valid`` with one field at a time (nested ones too) set to each edge value, the rest kept."""
    for field in valid.DESCRIPTOR.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE and _repeated(field):
            items = getattr(valid, field.name)
            if not items:
                continue
            lists = [("[]", [])]
            for i in range(len(items)):  # every element: once more beside itself, and left out
                lists.append((f"[{i} twice]", [*items[: i + 1], items[i], *items[i + 1 :]]))
                if len(items) > 1:
                    lists.append((f"[without {i}]", [*items[:i], *items[i + 1 :]]))
            for label, changed in lists:
                m = type(valid)()
                m.CopyFrom(valid)
                del getattr(m, field.name)[:]
                getattr(m, field.name).extend(changed)
                yield f"{field.name}={label}", m
            for i, item in enumerate(items):
                for name, inner in one_field_off(item):
                    m = type(valid)()
                    m.CopyFrom(valid)
                    getattr(m, field.name)[i].CopyFrom(inner)
                    yield f"{field.name}[{i}].{name}", m
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if _repeated(field) or field.message_type.full_name.startswith("google.protobuf."):
                continue
            for name, inner in one_field_off(getattr(valid, field.name)):
                m = type(valid)()
                m.CopyFrom(valid)
                getattr(m, field.name).CopyFrom(inner)
                yield f"{field.name}.{name}", m
            continue
        for value in edge_values(field):
            m = type(valid)()
            m.CopyFrom(valid)
            setattr(m, field.name, value)
            yield f"{field.name}={str(value)[:20]!r}", m


async def _send_upload(
    client: AggregatorClient, *messages: pb.UploadUpdateRequest
) -> tuple[grpc.StatusCode, pb.UploadUpdateResponse | None]:
    async def stream() -> AsyncIterator[pb.UploadUpdateRequest]:
        for m in messages:
            yield m

    try:
        return grpc.StatusCode.OK, await client.stub.UploadUpdate(stream(), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), None


def _fresh(header: pb.UploadHeader) -> pb.UploadHeader:
    copy = pb.UploadHeader()
    copy.CopyFrom(header)
    copy.upload_id = uuid.uuid4().hex
    return copy


async def sweep_upload(
    client: AggregatorClient, valid: pb.UploadHeader, payload: bytes
) -> tuple[int, list[str]]:
    """Send ``valid`` with one field at a time at an edge value, then ``valid`` with edge chunks:
    (calls made, those not refused with a status that says what was wrong). Then the valid upload,
    which must be taken."""
    began, calls, unmapped = time.monotonic(), 0, []
    for name, header in one_field_off(valid):
        assert time.monotonic() - began < SECONDS
        if not name.startswith("upload_id"):
            header.upload_id = uuid.uuid4().hex
        code, _ = await _send_upload(client, pb.UploadUpdateRequest(header=header))
        calls += 1
        if code not in REFUSALS:  # each is one bad field: none may start an upload
            unmapped.append(f"header {name}: {code.name}")
    for name, chunk in one_field_off(pb.Chunk(offset=0, data=payload)):
        assert time.monotonic() - began < SECONDS
        first = pb.UploadUpdateRequest(header=_fresh(valid))
        code, receipt = await _send_upload(client, first, pb.UploadUpdateRequest(chunk=chunk))
        calls += 1
        # No edge chunk is the whole, right payload; one that could begin it (masked codes are
        # any bytes) may be kept as the committed prefix of an upload to resume, nothing more.
        kept = receipt is not None and not receipt.digest_verified
        prefix = kept and receipt is not None and receipt.committed_bytes == len(chunk.data) < len(payload)
        if code not in REFUSALS and not prefix:
            unmapped.append(f"chunk {name}: {code.name} {receipt}")
    whole = pb.UploadUpdateRequest(chunk=pb.Chunk(data=payload))
    code, receipt = await _send_upload(client, pb.UploadUpdateRequest(header=_fresh(valid)), whole)
    assert code == grpc.StatusCode.OK and receipt is not None and receipt.digest_verified
    return calls, unmapped


def _header(event: pb.RoundEvent, join: pb.JoinResponse, payload: bytes, weight: float) -> pb.UploadHeader:
    return upload_header(
        event,
        join.settings.layout.digest,
        weight,
        codec=join.settings.codec,
        total_bytes=len(payload),
        sha256=hashlib.sha256(payload).digest(),
    )


async def test_plain_upload_headers_and_chunks_from_a_participant_are_refused_one_by_one(
    start_aggregator, tmp_path: Path
) -> None:
    """A participant in a plain round's upload phase, where every check of an upload is reached:
    a valid header with one field at a time at an edge value, then the valid header with an edge
    chunk. Each is refused with a status that says what was wrong (the sweep found a NaN,
    infinite or negative header weight accepted and recorded); the valid upload itself, sent
    last, is taken and the round completes with it."""
    run = await start_aggregator(min_agents=2, min_uploads=1, upload_deadline_s=60)
    numel = run.agg.rounds.layout.numel
    async with run.client("fuzzer") as client, run.client("bystander") as other:
        join = await client.join(num_examples=10)
        await other.join(num_examples=10)
        watcher, watching = Watcher(other), Watcher(client)
        try:
            event = await watching.until(pb.ROUND_PHASE_UPLOAD)
            delta = np.full(numel, 0.01, dtype=np.float32)
            payload = write_payload(tmp_path / "p.bin", delta, 10.0).read_bytes()
            calls, unmapped = await sweep_upload(client, _header(event, join, payload, 10.0), payload)
            await other.decline_round(event.round_id, pb.DECLINE_REASON_TRAINING, "sits it out")
            done = await watching.until_version(1, timeout=30)
            assert done.phase == pb.ROUND_PHASE_COMPLETED
        finally:
            await watcher.close()
            await watching.close()
    assert calls > 20
    assert not unmapped, "\n".join(unmapped)
    assert run.agg.rounds.store.manifest(1).participants == [join.agent_id]


async def test_masked_upload_headers_and_chunks_from_a_participant_are_refused_one_by_one(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    """The same in a masked round: the fuzzer shares its keys as an agent does, then sweeps its
    masked upload's header and chunks; its valid masked upload is taken and the round, with an
    honest second agent, unmasks and completes."""
    config = secure_config(pki, tmp_path / "agg0", min_agents=2, min_uploads=2, upload_deadline_s=60)
    run = await start_aggregator(config=config)
    rng = np.random.default_rng(3)
    honest = asyncio.create_task(play_agent(run, "honest", rng.normal(size=NUMEL) * 0.01, 10, tmp_path))
    try:
        async with in_key_phase(run, "fuzzer") as k:
            await k.part.keys()
            weight = k.part.weight(10)
            payload = k.part.mask(rng.normal(size=NUMEL) * 0.01, weight)
            header = _header(k.event, k.join, payload, weight)
            calls, unmapped = await sweep_upload(k.client, header, payload)
            await k.part.unmask()
            done = await k.watcher.until_version(1, timeout=30)
            assert done.phase == pb.ROUND_PHASE_COMPLETED
            await asyncio.wait_for(honest, 30)
    finally:
        honest.cancel()
    assert calls > 20
    assert not unmapped, "\n".join(unmapped)
    assert len(run.agg.rounds.store.manifest(1).participants) == 2


async def test_shares_and_reveals_from_a_participant_are_refused_one_by_one(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    """In a masked round of 4 where one agent deals its shares and then declines (so survivors
    reveal its mask-key shares and each other's self-seed shares), the fuzzer runs the real agent
    code, but before it sends its sealed shares and its revealed shares it sends each request valid
    but for one field at a time: every share's fields at edge values (a share of the other kind for
    the same agent among them), no shares, each share left out, each share twice. Each is refused
    with a status that says what was wrong, and the round, with its valid requests, completes.
    The sweep found a sealed share of any size accepted (an empty one broke its recipient's round)
    and an empty reveal taken as the fuzzer's answer (its real one was then refused)."""
    config = secure_config(pki, tmp_path / "agg0", min_agents=4, min_uploads=3, upload_deadline_s=60)
    run = await start_aggregator(config=config)
    rng = np.random.default_rng(4)
    honest = [
        asyncio.create_task(play_agent(run, name, rng.normal(size=NUMEL) * 0.01, 10, tmp_path))
        for name in ("honest1", "honest2")
    ]
    honest.append(asyncio.create_task(deal_then_decline(run)))
    revealed_kinds: set[int] = set()
    unmapped: list[str] = []
    swept: dict[str, int] = {}

    def sweeping(client: AggregatorClient, method: str) -> None:
        send = getattr(client, {"ShareKeys": "share_keys", "RevealShares": "reveal_shares"}[method])

        async def sweep_then_send(valid: Message) -> None:
            for name, variant in one_field_off(valid):
                code = await _call(client.stub, method, variant)
                swept[method] = swept.get(method, 0) + 1
                if code not in REFUSALS:
                    unmapped.append(f"{method} {name}: {code.name}")
            if method == "RevealShares":
                revealed_kinds.update(share.kind for share in valid.shares)
            await send(valid)

        setattr(client, send.__name__, sweep_then_send)

    try:
        async with in_key_phase(run, "fuzzer") as k:
            sweeping(k.client, "ShareKeys")
            sweeping(k.client, "RevealShares")
            await k.part.keys()
            weight = k.part.weight(10)
            payload = k.part.mask(rng.normal(size=NUMEL) * 0.01, weight)
            (tmp_path / "fuzzer.bin").write_bytes(payload)
            header = _header(k.event, k.join, payload, weight)
            await k.client.upload(tmp_path / "fuzzer.bin", header, new=True)
            await k.part.unmask()
            done = await k.watcher.until_version(1, timeout=30)
            assert done.phase == pb.ROUND_PHASE_COMPLETED
            await asyncio.wait_for(asyncio.gather(*honest), 30)
    finally:
        for task in honest:
            task.cancel()
    assert swept.get("ShareKeys", 0) >= 20 and swept.get("RevealShares", 0) >= 30, swept
    assert revealed_kinds == {pb.SHARE_KIND_SELF_SEED, pb.SHARE_KIND_MASK_KEY}  # the dropper's key too
    assert not unmapped, "\n".join(unmapped)
    assert len(run.agg.rounds.store.manifest(1).participants) == 3


async def deal_then_decline(run) -> None:  # type: ignore[no-untyped-def]
    """An agent that deals its shares, then sits the round out before uploading."""
    async with in_key_phase(run, "dropper") as k:
        await k.part.keys()
        await k.client.decline_round(k.event.round_id, pb.DECLINE_REASON_TRAINING, "dropped on purpose")
