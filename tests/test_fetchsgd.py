"""FetchSGD's server loop (server/fetchsgd.py) over the count sketch (common/codecs/countsketch.py):
sparse steps, error accumulation that applies what earlier rounds left out, state across restarts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.codecs import countsketch, registry
from common.codecs.countsketch import CountSketch
from common.errors import ConfigError, InvalidArgument
from server.fetchsgd import FetchSGD

NUMEL = 4000


def _update(seed: int) -> np.ndarray:
    """Heavy-tailed, like an update: a few large coordinates over many small ones."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(NUMEL) * 1e-3
    heavy = rng.choice(NUMEL, 20, replace=False)
    x[heavy] = rng.standard_normal(20) * 0.1
    return x.astype(np.float32)


def test_steps_are_k_sparse_and_error_accumulation_applies_what_was_left_out(tmp_path: Path) -> None:
    """The same update every round: the sketch's estimates of it are off (20 heavy coordinates
    among 4000 in 200 buckets a row), and without error accumulation they stay off by the same amount;
    FetchSGD keeps the difference in its error sketch and applies it in later rounds."""
    sketch = CountSketch(NUMEL, ratio=4, seed=1)
    loop = FetchSGD(sketch, k=30, momentum=0.0, state_dir=tmp_path)
    g = _update(2)
    estimate = sketch.decode(sketch.encode(g))
    one_shot = np.zeros(NUMEL, dtype=np.float32)
    top = np.argpartition(np.abs(estimate), -30)[-30:]
    one_shot[top] = estimate[top]
    without = float(np.linalg.norm(one_shot - g) / np.linalg.norm(g))
    applied = np.zeros(NUMEL)
    errors = []
    for version in range(1, 31):
        delta = loop.step(sketch.encode(g), version)
        assert np.count_nonzero(delta) <= 30
        applied += delta
        errors.append(float(np.linalg.norm(applied - version * g) / np.linalg.norm(version * g)))
    assert errors[0] == pytest.approx(without, rel=1e-5)  # round 1: nothing accumulated yet
    # later rounds correct earlier estimates (the floor is the small coordinates' 14% of the norm,
    # which top-30 reaches only as they accumulate), and the loop stays stable
    assert max(errors[1:]) < 0.75 * without, (without, errors[::5])


def test_momentum_and_error_survive_a_restart(tmp_path: Path) -> None:
    sketch = CountSketch(NUMEL, ratio=4, seed=1)
    updates = [sketch.encode(_update(s)) for s in range(4)]
    continuous = FetchSGD(sketch, 80, 0.9, tmp_path / "a")
    expected = [continuous.step(u, v) for v, u in enumerate(updates, start=1)]
    first = FetchSGD(sketch, 80, 0.9, tmp_path / "b")
    got = [first.step(u, v) for v, u in enumerate(updates[:2], start=1)]
    again = FetchSGD(sketch, 80, 0.9, tmp_path / "b")  # a new process: state from disk
    got += [again.step(u, v) for v, u in enumerate(updates[2:], start=3)]
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(e, g)
    assert not np.array_equal(expected[3], FetchSGD(sketch, 80, 0.9, tmp_path / "c").step(updates[3], 4))
    assert len(list((tmp_path / "b").glob("fetchsgd-v*.safetensors"))) == 2  # the newest two kept


def test_bad_sketches_and_settings_are_refused(tmp_path: Path) -> None:
    sketch = CountSketch(NUMEL, ratio=4, seed=1)
    loop = FetchSGD(sketch, 10, 0.9, tmp_path)
    with pytest.raises(InvalidArgument, match="expected"):
        loop.step(np.zeros(7, dtype=np.float32), 1)
    bad = sketch.encode(_update(1))
    bad[3] = np.nan
    with pytest.raises(InvalidArgument, match="not finite"):
        loop.step(bad, 1)
    assert not list(tmp_path.glob("fetchsgd-v*"))  # nothing saved for a refused round
    with pytest.raises(ConfigError, match="k must be"):
        FetchSGD(sketch, 0, 0.9, tmp_path)
    with pytest.raises(ConfigError, match="momentum"):
        FetchSGD(sketch, 10, 1.0, tmp_path)


def test_sketch_hashes_drawn_block_by_block_stay_linear_and_find_heavy_hitters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(countsketch, "BLOCK", 1000)  # 4 blocks of hashes
    sketch = CountSketch(NUMEL, ratio=8, seed=5)
    a, b = _update(6), _update(7)
    np.testing.assert_allclose(sketch.encode(a) + sketch.encode(b), sketch.encode(a + b), atol=1e-5)
    x = np.zeros(NUMEL, dtype=np.float32)
    x[[10, 1500, 2999, 3999]] = [1.0, -2.0, 0.5, 3.0]  # one heavy coordinate in every block
    estimate = sketch.decode(sketch.encode(x))
    np.testing.assert_allclose(estimate[[10, 1500, 2999, 3999]], [1.0, -2.0, 0.5, 3.0], atol=1e-6)


def test_plain_sketch_payloads_are_summed_undecoded_and_bad_ones_refused() -> None:
    """Without masking the aggregator adds each agent's weighted sketch (FetchSGD decodes the sum)."""
    sketch = CountSketch(NUMEL, ratio=4, seed=1)
    x = _update(3)
    weighted, weight = registry.weighted_payload(sketch, registry.encode_plain(sketch, x, 2.5), NUMEL)
    assert weight == 2.5
    np.testing.assert_allclose(weighted, 2.5 * sketch.encode(x), rtol=1e-6)
    payload = bytearray(registry.encode_plain(sketch, x, 2.5))
    with pytest.raises(InvalidArgument, match="expected"):
        registry.weighted_payload(sketch, bytes(payload[:-4]), NUMEL)
    payload[8:12] = np.float32(np.nan).tobytes()
    with pytest.raises(InvalidArgument, match="NaN"):
        registry.weighted_payload(sketch, bytes(payload), NUMEL)
    payload[:4] = np.float32(-1).tobytes()
    with pytest.raises(InvalidArgument, match="weight must be positive"):
        registry.weighted_payload(sketch, bytes(payload), NUMEL)
