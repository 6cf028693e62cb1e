"""Adaptive clipping (common/secagg/clips.py, server/aggregates.py): bounds per segment from the last
aggregate, masked sums that still decode, and fewer bits for the same error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import ConfigError, InvalidArgument
from common.secagg.clips import FLOOR, SegmentClips
from common.secagg.local import Federation, run_round
from common.secagg.params import SecAggParams
from common.secagg.ring import ring_bits
from server.aggregates import AggregateStore

AGENTS = 4


@pytest.fixture(scope="module")
def federation() -> Federation:
    return Federation.create(AGENTS)


def test_bounds_are_a_multiple_of_each_segments_rms_with_a_floor() -> None:
    aggregate = np.concatenate([np.full(8, 2.0), np.full(8, -0.5), np.zeros(8), np.full(3, 1.0)])
    clips = SegmentClips.from_aggregate(aggregate, 8, 3.0)
    np.testing.assert_allclose(clips.bounds, [6.0, 1.5, 3.0 * FLOOR * 2.0, 3.0], rtol=1e-6)
    per = clips.per_coordinate(aggregate.size)
    assert per.shape == aggregate.shape and per[8] == pytest.approx(1.5) and per[-1] == pytest.approx(3.0)


@settings(max_examples=40, deadline=None)
@given(
    count=st.integers(1, 300),
    segment=st.integers(1, 64),
    seed=st.integers(0, 2**32 - 1),
)
def test_scaling_down_then_up_is_the_identity(count: int, segment: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    clips = SegmentClips.from_aggregate(rng.standard_normal(count), segment, 2.5)
    values = rng.standard_normal(count).astype(np.float32)
    np.testing.assert_allclose(clips.scale_up(clips.scale_down(values)), values, rtol=1e-5, atol=1e-6)


def test_bad_bounds_and_sizes_are_refused_with_the_reason() -> None:
    with pytest.raises(InvalidArgument, match="positive and finite"):
        SegmentClips(4, np.array([1.0, 0.0]))
    with pytest.raises(InvalidArgument, match="positive and finite"):
        SegmentClips(4, np.array([1.0, np.nan]))
    with pytest.raises(ConfigError, match="segment must be >= 1"):
        SegmentClips(0, np.array([1.0]))
    with pytest.raises(InvalidArgument, match="do not cover 9 coordinates"):
        SegmentClips(4, np.ones(2, dtype=np.float32)).scale_down(np.ones(9, dtype=np.float32))
    with pytest.raises(InvalidArgument, match="all zeros"):
        SegmentClips.from_aggregate(np.zeros(10), 4, 3.0)
    with pytest.raises(ConfigError, match="multiple must be positive"):
        SegmentClips.from_aggregate(np.ones(10), 4, 0.0)


def _masked_mean(
    federation: Federation, updates: list[np.ndarray], bits: int, clips: SegmentClips | None, clip: float
) -> np.ndarray:
    """The aggregator's mean of masked, fixed-point updates (weights 1), as the daemons compute it."""
    params = SecAggParams(3, 0, 1.0 if clips else clip, bits, ring_bits(bits, AGENTS)).check(AGENTS)
    fp, rng = params.fixed_point, np.random.default_rng(0)
    codes = {
        agent: fp.encode_weighted(u if clips is None else clips.scale_down(u), 1.0, rng)
        for agent, u in zip(sorted(federation.agents), updates, strict=True)
    }
    result = run_round(federation, codes, params, seed=b"clips")
    assert set(result.upload_bytes.values()) == {fp.wire_bytes(fp.masked_length(updates[0].size))}
    mean, weight = fp.decode_weighted_mean(result.total, AGENTS)
    assert weight == pytest.approx(AGENTS, rel=1e-6)  # the weight's digits: exact at any bits
    return mean if clips is None else clips.scale_up(mean)


def test_adaptive_bounds_cut_the_error_of_a_narrow_ring_on_mixed_scales(federation: Federation) -> None:
    """LoRA-like updates: a segment of 1e-1 values beside one of 1e-3. At 4 bits one fixed clip wide
    enough for the large segment drowns the small one; bounds from the last aggregate do not."""
    rng = np.random.default_rng(3)
    scale = np.repeat([1e-1, 1e-3], 512)
    direction = rng.standard_normal(1024) * scale
    noise = [0.3 * rng.standard_normal(1024) * scale for _ in range(AGENTS)]
    updates = [(direction + n).astype(np.float32) for n in noise]
    true = np.mean(updates, axis=0)
    previous = (direction + 0.1 * rng.standard_normal(1024) * scale).astype(np.float32)  # last round
    clips = SegmentClips.from_aggregate(previous, 256, 3.0)
    adaptive = _masked_mean(federation, updates, 4, clips, 1.0)
    fixed = _masked_mean(federation, updates, 4, None, float(3 * np.abs(previous).max()))
    small = slice(512, 1024)

    def error(x: np.ndarray, part: slice) -> float:
        return float(np.linalg.norm(x[part] - true[part]) / np.linalg.norm(true[part]))

    assert error(adaptive, small) < 0.5 < 10 * error(adaptive, small) < error(fixed, small)
    assert error(adaptive, slice(0, 1024)) < 0.5


def test_uniform_bounds_reproduce_the_fixed_clip_exactly(federation: Federation) -> None:
    rng = np.random.default_rng(4)
    updates = [(0.01 * rng.standard_normal(300)).astype(np.float32) for _ in range(AGENTS)]
    uniform = _masked_mean(federation, updates, 12, SegmentClips.uniform(300, 64, 0.05), 1.0)
    fixed = _masked_mean(federation, updates, 12, None, 0.05)
    np.testing.assert_allclose(uniform, fixed, rtol=0, atol=1e-6)


def test_aggregate_store_keeps_the_newest_two_and_refuses_what_does_not_fit(tmp_path: Path) -> None:
    store = AggregateStore(tmp_path / "aggregates")
    for version in range(1, 5):
        store.save(version, np.full(6, float(version)))
    assert sorted(p.name for p in (tmp_path / "aggregates").iterdir()) == [
        "mean-v00000003.npy",
        "mean-v00000004.npy",
    ]
    np.testing.assert_array_equal(store.load(4, 6), np.full(6, 4.0, dtype=np.float32))
    assert store.load(2, 6) is None  # pruned
    assert store.load(4, 7) is None  # another layout
    store.save(5, np.array([1.0, np.inf, 0, 0, 0, 0]))
    assert store.load(5, 6) is None  # never a bound from a non-finite aggregate
