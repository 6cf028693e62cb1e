"""Chunked streaming over real mTLS: big uploads, resume after a cut, malformed streams."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common.codecs import identity
from common.grpc_options import channel_options
from common.tls import TlsFiles
from protos.cloudfed.v1 import federation_pb2 as pb
from protos.cloudfed.v1 import federation_pb2_grpc as pb_grpc
from tests.agentsim import Watcher, upload_header, write_payload
from tests.conftest import small_adapter
from tests.netproxy import CuttingProxy

MiB = 1024 * 1024
UPLOAD = pb.ROUND_PHASE_UPLOAD
COMPLETED = pb.ROUND_PHASE_COMPLETED


def adapter_of_payload_size(payload_bytes: int) -> dict[str, torch.Tensor]:
    """An adapter whose identity-encoded update is exactly ``payload_bytes``."""
    return small_adapter(payload_bytes // 4 - 1)


async def test_64mib_upload_arrives_intact_and_steps_the_model(start_aggregator, tmp_path: Path) -> None:
    run = await start_aggregator(adapter_of_payload_size(64 * MiB))
    layout = run.agg.rounds.layout
    rng = np.random.default_rng(1)
    delta = rng.standard_normal(layout.numel, dtype=np.float32)
    async with run.client("big") as client:
        join = await client.join(num_examples=3)
        watcher = Watcher(client)
        event = await watcher.until(UPLOAD)
        payload = write_payload(tmp_path / "u.bin", delta, weight=3.0)
        assert payload.stat().st_size == 64 * MiB
        receipt = await client.upload(payload, upload_header(event, join.settings.layout.digest, 3.0))
        assert receipt.digest_verified and receipt.committed_bytes == 64 * MiB
        done = await watcher.until(COMPLETED)
        assert done.global_version == 1
        header = await client.download_model(tmp_path / "v1.safetensors", version=1)
        await watcher.close()
    assert header.sha256 == hashlib.sha256((tmp_path / "v1.safetensors").read_bytes()).digest()
    new = layout.flatten(load_file(tmp_path / "v1.safetensors"))
    np.testing.assert_allclose(new, delta, rtol=1e-6, atol=1e-7)


async def test_upload_cut_mid_stream_resumes_from_committed_offset(start_aggregator, tmp_path: Path) -> None:
    size = 64 * MiB
    run = await start_aggregator(adapter_of_payload_size(size))
    proxy = await CuttingProxy(run.agg.port, cut_after=size // 2).start()
    delta = np.random.default_rng(2).standard_normal(run.agg.rounds.layout.numel, dtype=np.float32)
    try:
        async with run.client("flaky", port=proxy.port) as client:
            join = await client.join(num_examples=1)
            watcher = Watcher(client)
            event = await watcher.until(UPLOAD)
            payload = write_payload(tmp_path / "u.bin", delta, weight=1.0)
            header = upload_header(event, join.settings.layout.digest, 1.0)
            receipt = await client.upload(payload, header, new=True)  # no probe until the cut
            await watcher.until_version(1)
            await watcher.close()
    finally:
        await proxy.stop()
    assert proxy.cuts == 1
    assert receipt.digest_verified and receipt.committed_bytes == size
    # A restart from zero would have sent >= 1.5x the payload; a resume sends little more than 1x.
    assert proxy.bytes_up < 1.2 * size, proxy.bytes_up
    new = run.agg.rounds.layout.flatten(run.agg.rounds.store.load(1))
    np.testing.assert_allclose(new, delta, rtol=1e-6, atol=1e-7)


async def test_download_cut_mid_stream_resumes(start_aggregator, tmp_path: Path) -> None:
    size = 32 * MiB
    run = await start_aggregator(adapter_of_payload_size(size))
    proxy = await CuttingProxy(run.agg.port, cut_after=size // 2, direction="down").start()
    try:
        async with run.client("dl", port=proxy.port) as client:
            header = await client.download_model(tmp_path / "v0.safetensors")
    finally:
        await proxy.stop()
    expected = run.agg.rounds.store.path(0).read_bytes()
    assert proxy.cuts == 1
    assert header.version == 0 and header.total_bytes == len(expected)
    assert (tmp_path / "v0.safetensors").read_bytes() == expected
    assert not (tmp_path / "v0.safetensors.part").exists()
    assert proxy.bytes_down < 1.2 * len(expected), proxy.bytes_down


class Malformed:
    """Raw stream builders for one agent in an open round."""

    def __init__(self, target: str, files: TlsFiles, event: pb.RoundEvent, digest: str) -> None:
        self.target, self.files, self.event, self.digest = target, files, event, digest

    async def send(self, messages: list[pb.UploadUpdateRequest]) -> grpc.StatusCode:
        """Send a raw stream with the sync client, which keeps the server's status when the server
        ends the call early (the aio client may report INTERNAL instead: grpc/grpc#36066)."""

        def call() -> grpc.StatusCode:
            files = self.files
            creds = grpc.ssl_channel_credentials(
                files.ca.read_bytes(), files.key.read_bytes(), files.cert.read_bytes()
            )
            with grpc.secure_channel(self.target, creds, options=channel_options("localhost")) as ch:
                try:
                    pb_grpc.FederationServiceStub(ch).UploadUpdate(iter(messages), timeout=30)
                except grpc.RpcError as exc:
                    return exc.code()  # type: ignore[no-any-return, attr-defined]
            return grpc.StatusCode.OK

        return await asyncio.to_thread(call)

    def header(self, data: bytes, **kw: object) -> pb.UploadUpdateRequest:
        fields: dict[str, object] = {"total_bytes": len(data), "sha256": hashlib.sha256(data).digest()}
        fields.update(kw)
        digest = str(fields.pop("layout_digest", self.digest))
        return pb.UploadUpdateRequest(header=upload_header(self.event, digest, 1.0, **fields))

    @staticmethod
    def chunks(data: bytes, size: int = MiB, start: int = 0) -> list[pb.UploadUpdateRequest]:
        return [
            pb.UploadUpdateRequest(chunk=pb.Chunk(offset=o, data=data[o : o + size]))
            for o in range(start, len(data), size)
        ]


async def test_malformed_streams_get_their_status_and_leave_no_trace(
    start_aggregator, tmp_path: Path
) -> None:
    run = await start_aggregator(adapter_of_payload_size(3 * MiB))
    layout = run.agg.rounds.layout
    good = identity.encode(np.ones(layout.numel, dtype=np.float32), 1.0)
    nan_delta = np.ones(layout.numel, dtype=np.float32)
    async with run.client("m") as client:
        join = await client.join(num_examples=1)
        watcher = Watcher(client)
        event = await watcher.until(UPLOAD)
        m = Malformed(run.target, run.pki.agent("m"), event, join.settings.layout.digest)
        C = grpc.StatusCode
        cases: dict[str, tuple[list[pb.UploadUpdateRequest], grpc.StatusCode]] = {}
        cases["first message not a header"] = (m.chunks(good), C.INVALID_ARGUMENT)
        h = m.header(good)
        cases["chunk at wrong offset"] = ([h, *m.chunks(good, start=4096)], C.INVALID_ARGUMENT)
        h = m.header(good)
        cases["header twice"] = ([h, h, *m.chunks(good)], C.INVALID_ARGUMENT)
        h = m.header(good)
        extra = pb.UploadUpdateRequest(chunk=pb.Chunk(offset=len(good), data=b"x" * 10))
        cases["data past the total"] = ([h, *m.chunks(good), extra], C.INVALID_ARGUMENT)
        h = m.header(good, sha256=hashlib.sha256(b"other").digest())
        cases["digest mismatch"] = ([h, *m.chunks(good)], C.DATA_LOSS)
        h = m.header(good, total_bytes=10 * 1024**3)
        cases["declared too large"] = ([h], C.RESOURCE_EXHAUSTED)
        h = m.header(good)
        cases["chunk over the chunk limit"] = ([h, *m.chunks(good, size=2 * MiB)], C.RESOURCE_EXHAUSTED)
        h = m.header(good)
        cases["message over the receive limit"] = ([h, *m.chunks(good, size=5 * MiB)], C.RESOURCE_EXHAUSTED)
        h = m.header(good, round_id=event.round_id + 7)
        cases["unknown round"] = ([h, *m.chunks(good)], C.FAILED_PRECONDITION)
        h = m.header(good, codec=pb.CodecSpec(name="topk"))
        cases["wrong codec"] = ([h, *m.chunks(good)], C.INVALID_ARGUMENT)
        h = m.header(good, layout_digest="0" * 64)
        cases["wrong layout"] = ([h, *m.chunks(good)], C.INVALID_ARGUMENT)
        h = m.header(good[:-4])
        cases["wrong size for the layout"] = ([h, *m.chunks(good[:-4])], C.INVALID_ARGUMENT)
        h = m.header(good, upload_id="../../etc")
        cases["bad upload id"] = ([h, *m.chunks(good)], C.INVALID_ARGUMENT)
        h = m.header(good, epsilon_spent=float("nan"))
        cases["NaN privacy spend"] = ([h, *m.chunks(good)], C.INVALID_ARGUMENT)
        nan_delta[12345] = np.nan
        nan = nan_delta.astype("<f4").tobytes() + np.float32(1).tobytes()
        h = m.header(nan)
        cases["NaN update"] = ([h, *m.chunks(nan)], C.INVALID_ARGUMENT)
        got = {}
        for name, (messages, _) in cases.items():
            got[name] = await m.send(messages)
            header = next((x.header for x in messages if x.WhichOneof("message") == "header"), None)
            if header is not None and header.upload_id and name != "bad upload id":
                assert await client.upload_status(header.upload_id) is None, f"{name} left a trace"
        assert got == {name: code for name, (_, code) in cases.items()}
        assert run.agg.rounds.state.phase == UPLOAD and run.agg.rounds.state.round_id == event.round_id
        # The round still takes a correct upload from the same agent afterwards.
        receipt = await client.upload(
            write_payload(tmp_path / "ok.bin", np.ones(layout.numel, np.float32), 1.0),
            upload_header(event, join.settings.layout.digest, 1.0),
        )
        assert receipt.digest_verified
        done = await watcher.until(COMPLETED)
        await watcher.close()
    assert done.global_version == 1
    np.testing.assert_allclose(layout.flatten(run.agg.rounds.store.load(1)), 1.0)


@pytest.mark.parametrize("size", [1, 4096, MiB - 1, MiB, MiB + 1])
async def test_uploads_of_awkward_sizes_roundtrip(size: int, tmp_path: Path) -> None:
    """The chunk receiver reassembles any size exactly (no gRPC involved)."""
    from common.chunks import ChunkReceiver, iter_file_chunks

    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    src = tmp_path / "src"
    src.write_bytes(data)
    rx = ChunkReceiver(tmp_path / "dst", size, hashlib.sha256(data).digest(), MiB)
    for offset, chunk in iter_file_chunks(src, MiB):
        rx.write(offset, chunk)
    rx.verify()
    rx.close()
    assert (tmp_path / "dst").read_bytes() == data


async def test_client_upload_of_a_rejected_header_raises_the_servers_status(
    start_aggregator, tmp_path: Path
) -> None:
    run = await start_aggregator(adapter_of_payload_size(32 * MiB))  # writes still in flight at the reject
    payload = write_payload(tmp_path / "u.bin", np.ones(run.agg.rounds.layout.numel, np.float32), 1.0)
    async with run.client("late") as client:
        join = await client.join(num_examples=1)
        watcher = Watcher(client)
        event = await watcher.until(UPLOAD)
        codes = []
        for _ in range(6):
            header = upload_header(event, join.settings.layout.digest, 1.0, round_id=event.round_id + 1)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.upload(payload, header)
            codes.append(err.value.code())
        await watcher.close()
    assert codes == [grpc.StatusCode.FAILED_PRECONDITION] * 6


async def test_header_probe_recovers_the_verdict_without_racing_writes(
    start_aggregator, tmp_path: Path
) -> None:
    """The path upload() takes when grpc aio loses the status to a late write (grpc/grpc#36066)."""
    run = await start_aggregator(adapter_of_payload_size(4 * MiB))
    payload = write_payload(tmp_path / "u.bin", np.ones(run.agg.rounds.layout.numel, np.float32), 1.0)
    digest = hashlib.sha256(payload.read_bytes()).digest()
    async with run.client("probe") as client:
        join = await client.join(num_examples=1)
        watcher = Watcher(client)
        event = await watcher.until(UPLOAD)
        fields = {"total_bytes": payload.stat().st_size, "sha256": digest}
        bad = upload_header(event, join.settings.layout.digest, 1.0, round_id=event.round_id + 1, **fields)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client._probe_header(bad)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        good = upload_header(event, join.settings.layout.digest, 1.0, **fields)
        receipt = await client._probe_header(good)
        assert receipt.committed_bytes == 0
        assert not receipt.digest_verified
        # ... and the upload then proceeds from there.
        assert (await client.upload(payload, good)).digest_verified
        await watcher.close()
