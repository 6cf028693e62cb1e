"""Codecs (common/codecs): linearity, error bounds, bit packing, error feedback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from common.codecs.countsketch import CountSketch
from common.codecs.feedback import ErrorFeedback
from common.codecs.projection import Projection
from common.codecs.quantize import Quantize
from common.codecs.topk import TopK
from common.errors import ConfigError, InvalidArgument

values = st.floats(min_value=-2, max_value=2, width=32, allow_nan=False)


@given(
    updates=st.lists(arrays(np.float32, 300, elements=values), min_size=2, max_size=6),
    bits=st.integers(min_value=2, max_value=16),
)
@settings(max_examples=30, deadline=None)
def test_quantize_decode_of_summed_codes_is_the_sum_of_decodes(updates: list[np.ndarray], bits: int) -> None:
    codec = Quantize(clip=1.0, bits=bits, rng=np.random.default_rng(0))
    payloads = [codec.encode(u) for u in updates]
    summed = np.sum(payloads, axis=0)
    np.testing.assert_allclose(
        codec.decode(summed), np.sum([codec.decode(p) for p in payloads], axis=0), atol=1e-5
    )


@given(updates=st.lists(arrays(np.float32, 700, elements=values), min_size=2, max_size=5))
@settings(max_examples=30, deadline=None)
def test_projection_decode_of_summed_payloads_is_the_sum_of_decodes(updates: list[np.ndarray]) -> None:
    codec = Projection.seeded(700, ratio=8, seed=11, block=256)
    summed = np.sum([codec.encode(u) for u in updates], axis=0)
    np.testing.assert_allclose(
        codec.decode(summed), np.sum([codec.decode(codec.encode(u)) for u in updates], axis=0), atol=1e-3
    )


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_quantize_round_trip_within_one_step_and_unbiased(bits: int) -> None:
    codec = Quantize(clip=0.5, bits=bits, rng=np.random.default_rng(1))
    x = np.random.default_rng(2).uniform(-0.5, 0.5, 100_000).astype(np.float32)
    decoded = codec.decode(codec.encode(x))
    assert np.max(np.abs(decoded - x)) <= codec.step * (1 + 1e-6)
    assert abs(float(np.mean(decoded - x))) < codec.step / 20
    packed = codec.pack(codec.encode(x))
    assert len(packed) == codec.payload_bytes(x.size) == (x.size * bits + 7) // 8
    codes = codec.encode(x)
    np.testing.assert_array_equal(codec.unpack(codec.pack(codes), x.size), codes)
    with pytest.raises(InvalidArgument):
        codec.unpack(packed[:-1], x.size)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_segmented_quantize_scales_each_segment_by_its_own_rms(bits: int) -> None:
    """Two parts a thousand times apart in scale: one shared clip leaves the small part a fraction
    of one step; per-segment bounds keep both within one step of their own scale, unbiased."""
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(2048) * 1e-4, rng.standard_normal(2000) * 1e-1]).astype(
        np.float32
    )
    codec = Quantize(clip=3.0, bits=bits, rng=np.random.default_rng(4), segment=256)
    assert not codec.linear
    payload = codec.encode(x)
    data = codec.to_bytes(payload)
    assert len(data) == codec.payload_bytes(x.size) == (x.size * bits + 7) // 8 + 4 * 16
    decoded = codec.decode(codec.from_bytes(data, x.size))
    small, large = slice(0, 2048), slice(2048, None)
    for part in (small, large):  # each within a step (3 x its RMS over the levels) of its own scale
        rel = np.linalg.norm(decoded[part] - x[part]) / np.linalg.norm(x[part])
        assert rel < 3.0 / (1 << (bits - 1)) * 1.2, (part, rel)
    if bits >= 4:  # a shared clip spends its steps on the large part: the small one is noise
        shared = Quantize(clip=float(np.abs(x).max()), bits=bits, rng=np.random.default_rng(4))
        shared_small = shared.decode(shared.encode(x))[small]
        assert np.linalg.norm(shared_small - x[small]) > 5 * np.linalg.norm(decoded[small] - x[small])
    runs = np.mean([codec.decode(codec.encode(x)) for _ in range(200)], axis=0)
    inside = np.abs(x) < 2.5 * np.repeat(codec._split(payload)[1].bounds, 256)[: x.size] / 3.0
    assert abs(float(np.mean((runs - x)[inside] / np.abs(x[inside]).mean()))) < 0.02  # unbiased inside
    zeros = codec.decode(codec.encode(np.zeros(300, np.float32)))
    np.testing.assert_array_equal(zeros, 0.0)
    bad = bytearray(data)
    bad[-4:] = np.array([np.inf], "<f4").tobytes()
    with pytest.raises(InvalidArgument, match="positive and finite"):
        codec.from_bytes(bytes(bad), x.size)
    with pytest.raises(InvalidArgument, match="expected"):
        codec.from_bytes(data[:-1], x.size)


def test_projection_is_an_orthogonal_projection_shared_by_seed() -> None:
    x = np.random.default_rng(3).standard_normal(4096).astype(np.float32)
    codec = Projection.seeded(4096, ratio=4, seed=0, block=512)
    np.testing.assert_allclose(codec.basis.T @ codec.basis, np.eye(128), atol=1e-5)  # orthonormal columns
    once = codec.decode(codec.encode(x))
    np.testing.assert_allclose(codec.decode(codec.encode(once)), once, atol=1e-4)  # idempotent
    np.testing.assert_allclose(float(once @ (x - once)), 0.0, atol=1e-2)  # the error is orthogonal
    assert 0.4 < np.linalg.norm(once) / np.linalg.norm(x) < 0.6  # keeps ~sqrt(1/4) of a generic vector
    assert codec.biased
    same = Projection.seeded(4096, ratio=4, seed=0, block=512)
    np.testing.assert_array_equal(same.encode(x), codec.encode(x))
    assert not np.array_equal(Projection.seeded(4096, ratio=4, seed=1, block=512).encode(x), codec.encode(x))
    assert codec.payload_bytes(4096) * 4 == 4 * 4096


def test_error_feedback_with_fresh_subspaces_sends_all_of_a_constant_update(tmp_path: Path) -> None:
    n = 2048
    x = np.random.default_rng(7).standard_normal(n).astype(np.float32)
    feedback = ErrorFeedback(Projection.seeded(n, ratio=8, seed=0, block=256), n, tmp_path / "r.npy")
    sent = np.zeros(n, dtype=np.float64)
    errors = []
    for rounds in range(1, 201):
        feedback.codec = Projection.seeded(n, ratio=8, seed=rounds, block=256)  # the round's subspace
        sent += feedback.codec.decode(feedback.encode(x))
        errors.append(np.linalg.norm(sent / rounds - x) / np.linalg.norm(x))
    assert errors[0] > 0.9  # one round keeps 1/8 of the energy
    assert errors[-1] < 0.1 and errors[-1] < errors[9] / 5


def test_topk_keeps_the_largest_entries_exactly() -> None:
    x = np.random.default_rng(4).standard_normal(10_000).astype(np.float32)
    codec = TopK(10_000, ratio=20)
    payload = codec.encode(x)
    assert payload.nbytes == codec.payload_bytes(10_000) and codec.ratio(10_000) == pytest.approx(
        20, rel=0.01
    )
    decoded = codec.decode(payload)
    kept = np.flatnonzero(decoded)
    assert kept.size == codec.k
    np.testing.assert_array_equal(decoded[kept], x[kept])
    assert np.min(np.abs(x[kept])) >= np.max(np.abs(np.delete(x, kept)))
    assert codec.linear is False
    with pytest.raises(InvalidArgument):
        codec.decode(payload[:-1])


@pytest.mark.parametrize(
    "make",
    [lambda n: TopK(n, ratio=10), lambda n: Quantize(clip=0.05, bits=2, rng=np.random.default_rng(5))],
    ids=["topk", "quantize-2bit"],
)
def test_error_feedback_drives_the_accumulated_error_of_a_constant_update_to_zero(
    make, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    n = 2000
    x = np.random.default_rng(6).uniform(-0.01, 0.01, n).astype(np.float32)
    residual_file = tmp_path / "residual.npy"
    feedback = ErrorFeedback(make(n), n, residual_file)
    sent = np.zeros(n, dtype=np.float64)
    errors = []
    for rounds in range(1, 401):
        if rounds == 200:  # a restart half-way: the residual comes back from disk
            feedback = ErrorFeedback(make(n), n, residual_file)
        sent += feedback.codec.decode(feedback.encode(x))
        errors.append(np.linalg.norm(sent / rounds - x) / np.linalg.norm(x))
    assert errors[-1] < 0.1 and errors[-1] < errors[9] / 5  # falls like 1 / rounds
    without = make(n)
    plain = np.mean([without.decode(without.encode(x)) for _ in range(20)], axis=0)
    if isinstance(without, TopK):  # without feedback, top-k never sends most coordinates
        assert np.linalg.norm(plain - x) / np.linalg.norm(x) > 0.5


def test_bad_codec_settings_are_refused() -> None:
    with pytest.raises(ConfigError):
        Quantize(clip=1.0, bits=1)
    with pytest.raises(ConfigError):
        Quantize(clip=0.0, bits=8)
    with pytest.raises(ConfigError, match="segment"):
        Quantize(clip=2.0, bits=4, segment=-1)
    with pytest.raises(ConfigError):
        TopK(100, ratio=0.5)
    with pytest.raises(ConfigError):
        Projection(100, np.zeros((4, 8), np.float32))
    with pytest.raises(InvalidArgument, match="NaN"):
        Quantize(clip=1.0, bits=8).encode(np.array([np.nan], np.float32))


@given(updates=st.lists(arrays(np.float32, 500, elements=values), min_size=2, max_size=5))
@settings(max_examples=30, deadline=None)
def test_countsketch_sketch_of_a_sum_is_the_sum_of_sketches(updates: list[np.ndarray]) -> None:
    codec = CountSketch(500, ratio=4, seed=3)
    summed = np.sum([codec.encode(u) for u in updates], axis=0)
    np.testing.assert_allclose(summed, codec.encode(np.sum(updates, axis=0)), atol=1e-4)


def test_countsketch_recovers_heavy_hitters() -> None:
    x = np.random.default_rng(9).normal(0, 1e-3, 20_000).astype(np.float32)
    heavy = np.random.default_rng(10).choice(20_000, 5, replace=False)
    x[heavy] = 1.0
    codec = CountSketch(20_000, ratio=20, seed=4)
    assert codec.payload_bytes(20_000) == pytest.approx(4 * 20_000 / 20, rel=0.01)
    estimate = codec.decode(codec.encode(x))
    assert set(np.flatnonzero(np.abs(estimate) > 0.5)) == set(heavy)
    np.testing.assert_allclose(estimate[heavy], 1.0, atol=0.05)
