"""Rounds over real mTLS: concurrent agents, weighted mean, deadline, abandonment."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.codecs.identity import FiniteChecker
from common.errors import InvalidArgument
from protos.cloudfed.v1 import federation_pb2 as pb
from tests.agentsim import Watcher, upload_header, write_payload

UPLOAD = pb.ROUND_PHASE_UPLOAD


async def _agent(run, name: str, delta: np.ndarray, weight: float, tmp: Path, upload: bool = True):
    client = run.client(name)
    join = await client.join(num_examples=int(weight))
    watcher = Watcher(client)
    event = await watcher.until(UPLOAD)
    if upload:
        payload = write_payload(tmp / f"{name}.bin", delta, weight)
        receipt = await client.upload(payload, upload_header(event, join.settings.layout.digest, weight))
        assert receipt.digest_verified
    return client, watcher


async def test_concurrent_uploads_aggregate_to_the_weighted_mean(start_aggregator, tmp_path: Path) -> None:
    run = await start_aggregator(min_agents=4)
    numel = run.agg.rounds.layout.numel
    rng = np.random.default_rng(7)
    deltas = [rng.standard_normal(numel, dtype=np.float32) for _ in range(4)]
    weights = [1.0, 2.0, 3.0, 10.0]
    agents = await asyncio.gather(
        *(_agent(run, f"a{i}", d, w, tmp_path) for i, (d, w) in enumerate(zip(deltas, weights, strict=True)))
    )
    done = await agents[0][1].until_version(1)
    assert done.phase == pb.ROUND_PHASE_COMPLETED
    expected = sum(w * d.astype(np.float64) for d, w in zip(deltas, weights, strict=True)) / sum(weights)
    got = run.agg.rounds.layout.flatten(run.agg.rounds.store.load(1))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    manifest = run.agg.rounds.store.manifest(1)
    assert manifest.parent == 0
    assert len(manifest.participants) == 4
    for client, watcher in agents:
        await watcher.close()
        await client.close()


async def test_straggler_is_dropped_at_the_deadline(start_aggregator, tmp_path: Path) -> None:
    run = await start_aggregator(min_agents=2, min_uploads=1, upload_deadline_s=2.0)
    numel = run.agg.rounds.layout.numel
    ones = np.ones(numel, dtype=np.float32)
    fast, slow = await asyncio.gather(
        _agent(run, "fast", ones, 1.0, tmp_path), _agent(run, "slow", ones, 1.0, tmp_path, upload=False)
    )
    done = await fast[1].until_version(1, timeout=30)
    assert done.phase == pb.ROUND_PHASE_COMPLETED
    manifest = run.agg.rounds.store.manifest(1)
    assert manifest.participants == ["spiffe://test.cloudfed/cloud/aws/agent/fast"]
    for client, watcher in (fast, slow):
        await watcher.close()
        await client.close()


async def test_too_few_uploads_abandon_the_round_and_it_is_retried(start_aggregator, tmp_path: Path) -> None:
    run = await start_aggregator(min_agents=1, upload_deadline_s=1.0, retry_delay_s=0.1)
    client, watcher = await _agent(run, "idle", np.zeros(1), 1.0, tmp_path, upload=False)
    abandoned = await watcher.until(pb.ROUND_PHASE_ABANDONED, timeout=30)
    assert "0 of 1 uploads" in abandoned.reason
    retried = await watcher.until(UPLOAD, timeout=30)
    assert retried.round_id == abandoned.round_id + 1
    assert retried.global_version == 0
    assert run.agg.rounds.store.latest() == 0
    await watcher.close()
    await client.close()


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=64),
    cuts=st.lists(st.integers(min_value=0, max_value=256), max_size=8),
)
def test_finite_check_is_exact_across_any_chunk_boundaries(values: list[float], cuts: list[int]) -> None:
    data = np.array(values, dtype="<f4").tobytes()
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    checker = FiniteChecker()
    finite = bool(np.all(np.isfinite(np.array(values, dtype=np.float32))))
    try:
        for a, b in itertools.pairwise(bounds):
            checker(data[a:b])
    except InvalidArgument:
        assert not finite
    else:
        assert finite


def test_finite_check_rejects_nan_split_across_chunks() -> None:
    data = np.array([1.0, np.nan, 2.0], dtype="<f4").tobytes()
    checker = FiniteChecker()
    checker(data[:5])  # the NaN's first byte only: not complete yet
    with pytest.raises(InvalidArgument):
        checker(data[5:])
