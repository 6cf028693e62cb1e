"""Codecs through the real aggregator: plain rounds decode each payload; mismatches are refused."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import struct
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from common.codecs import registry
from protos.cloudfed.v1 import federation_pb2 as pb
from tests.agentsim import Watcher, upload_header
from tests.conftest import Pki, aggregator_config

UPLOAD = pb.ROUND_PHASE_UPLOAD


def codec_config(pki: Pki, state: Path, codec: str, **federation: object):  # type: ignore[no-untyped-def]
    base = aggregator_config(pki, state, min_agents=3)
    f = dataclasses.replace(base.federation, codec=codec, **federation)
    return dataclasses.replace(base, federation=f).validate()


async def send(
    run, name: str, delta: np.ndarray, weight: float, tmp: Path, **header: object
) -> pb.RoundEvent:  # type: ignore[no-untyped-def]
    """Join, wait for the round, encode with the announced codec, upload; the round event."""
    async with run.client(name) as client:
        join = await client.join(num_examples=int(weight))
        watcher = Watcher(client)
        try:
            event = await watcher.until(UPLOAD)
            spec = join.settings.codec
            settings = registry.settings_from(
                spec.name, json_format.MessageToDict(spec.params), join.settings.training.seed
            )
            codec = registry.make(settings, delta.size, event.round_id)
            data = registry.encode_plain(codec, delta, weight)
            path = tmp / f"{name}.bin"
            path.write_bytes(data)
            head = upload_header(
                event, join.settings.layout.digest, weight, codec=spec, sha256=hashlib.sha256(data).digest()
            )
            for key, value in header.items():
                getattr(head, key).CopyFrom(value) if hasattr(value, "CopyFrom") else setattr(
                    head, key, value
                )
            await client.upload(path, head)
            await watcher.until_version(1)
            return event
        finally:
            await watcher.close()


@pytest.mark.parametrize(
    ("codec", "params", "tolerance"),
    [
        ("quantize", {"codec_bits": 12, "codec_clip": 4.0}, 4.0 / 2047),
        # each agent's bound per 256 values (3 x RMS, about 1.7 here) travels in its payload
        ("quantize", {"codec_bits": 12, "codec_clip": 3.0, "codec_segment": 256}, 3.0 * 0.65 / 2047),
        ("topk", {"codec_ratio": 4.0}, 1e-6),  # deterministic: the mean of the kept entries, exactly
        ("projection", {"codec_ratio": 1.0}, None),  # a square random basis: unbiased, not exact
    ],
)
async def test_plain_rounds_decode_each_payload_to_the_weighted_mean(
    start_aggregator, pki: Pki, tmp_path: Path, codec: str, params: dict, tolerance: float | None
) -> None:
    run = await start_aggregator(config=codec_config(pki, tmp_path / "agg0", codec, **params))
    numel = run.agg.rounds.layout.numel
    rng = np.random.default_rng(8)
    deltas = [rng.uniform(-1, 1, numel).astype(np.float32) for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    await asyncio.gather(
        *(send(run, f"c{i}", d, w, tmp_path) for i, (d, w) in enumerate(zip(deltas, weights, strict=True)))
    )
    if codec == "topk":  # what the agents sent is the top entries of each update
        top = registry.make(registry.CodecSettings("topk", ratio=4.0), numel, 1)
        assert top is not None
        deltas = [top.decode(top.encode(d)) for d in deltas]
    expected = sum(w * d.astype(np.float64) for d, w in zip(deltas, weights, strict=True)) / sum(weights)
    got = run.agg.rounds.layout.flatten(run.agg.rounds.store.load(1)).astype(np.float64)
    if tolerance is not None:
        np.testing.assert_allclose(got, expected, atol=tolerance * 1.01)
    else:
        cosine = float(got @ expected / np.linalg.norm(got) / np.linalg.norm(expected))
        assert cosine > 0.5, cosine  # one random basis: a noisy but aligned estimate


async def test_mismatched_codec_parameters_or_a_nan_payload_are_refused(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    run = await start_aggregator(config=codec_config(pki, tmp_path / "agg0", "quantize", codec_bits=8))
    numel = run.agg.rounds.layout.numel
    async with run.client("x1") as client:
        join = await client.join(num_examples=1)
        watchers = [Watcher(client)]
        others = [run.client(f"x{i}") for i in (2, 3)]
        for other in others:
            await other.join(num_examples=1)
            watchers.append(Watcher(other))
        try:
            event = await watchers[0].until(UPLOAD)
            codec = registry.make(registry.CodecSettings("quantize", bits=8), numel, event.round_id)
            good = registry.encode_plain(codec, np.zeros(numel, np.float32), 1.0)
            wrong = pb.CodecSpec(name="quantize")
            wrong.params.update({"bits": 4.0, "clip": 0.1})
            cases = {
                "params": (good, wrong),
                "nan weight": (struct.pack("<f", float("nan")) + good[4:], join.settings.codec),
            }
            for label, (data, spec) in cases.items():
                path = tmp_path / f"{label}.bin"
                path.write_bytes(data)
                header = upload_header(
                    event, join.settings.layout.digest, 1.0, codec=spec, sha256=hashlib.sha256(data).digest()
                )
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await client.upload(path, header)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, label
            acc = run.agg.rounds._acc
            assert acc is not None and acc.count == 0 and not acc.total.any()  # the sum was not touched
        finally:
            for w in watchers:
                await w.close()
            for other in others:
                await other.close()
