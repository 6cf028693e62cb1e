"""The aggregator's CG-FedLLM schedule: warm-up, TGAP, encoded rounds, FAF refreshes, restarts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from common.codecs.autoencoder import _training_rows, load_autoencoder
from common.codecs.registry import CodecSettings
from common.config import AggregatorConfig
from common.errors import ConfigError
from server.autoencoder import AutoencoderPlan, AutoencoderSchedule
from tests.conftest import Pki, aggregator_config

NUMEL = 3000
BASE = CodecSettings("autoencoder", ratio=8.0)
IDENTITY_SETTINGS = CodecSettings("identity")
PLAN = AutoencoderPlan(ratio=8.0, block=32, hidden=32, warmup=2, refresh=3, tgap_steps=60, faf_steps=20)


def mean_update(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    directions = np.random.default_rng(0).standard_normal((2, 32))
    return (rng.standard_normal((NUMEL // 32 + 1, 2)) @ directions).reshape(-1)[:NUMEL].astype(np.float32)


def test_warm_up_then_encode_then_refresh_and_every_step_survives_a_restart(tmp_path: Path) -> None:
    schedule = AutoencoderSchedule(PLAN, NUMEL, tmp_path)
    names, digests = [], []
    for i in range(9):
        if i == 5:  # the aggregator restarts mid-federation: network, window and count come back
            schedule = AutoencoderSchedule(PLAN, NUMEL, tmp_path)
        settings = schedule.settings(BASE)
        names.append(settings.name)
        digests.append(settings.state_sha256)
        schedule.observe(settings, [mean_update(i)])
    # 2 full (TGAP after the 2nd), 2 encoded, 1 full (FAF), 2 encoded, 1 full (FAF), 1 encoded
    assert names == ["identity"] * 2 + ["autoencoder"] * 2 + ["identity"] + ["autoencoder"] * 2 + [
        "identity",
        "autoencoder",
    ]
    assert digests[2] == digests[3] != digests[5] == digests[6] != digests[8]  # FAF makes a new network
    assert schedule.state(digests[6]) is not None and schedule.state(digests[8]) is not None
    assert schedule.state(digests[2]) is None  # two networks are served: the current and the one before
    state = schedule.state(digests[8])
    assert state is not None
    model = load_autoencoder(state.path)
    assert model.block == 32 and model.code == 4 and model.linear_decoder
    assert schedule.codec is not None and schedule.codec.coordinates(NUMEL) == (NUMEL // 32 + 1) * 4
    assert len(list((tmp_path / "snapshots").glob("*.npy"))) == 4  # the full rounds' means, in the window


def test_never_refresh_keeps_encoding(tmp_path: Path) -> None:
    schedule = AutoencoderSchedule(dataclasses.replace(PLAN, warmup=1, refresh=0), NUMEL, tmp_path)
    names = []
    for i in range(5):
        settings = schedule.settings(BASE)
        names.append(settings.name)
        schedule.observe(settings, [mean_update(i)])
    assert names == ["identity"] + ["autoencoder"] * 4


def test_bad_autoencoder_settings_are_refused(pki: Pki, tmp_path: Path) -> None:
    base = aggregator_config(pki, tmp_path / "agg")

    def config(**federation: object) -> AggregatorConfig:
        f = dataclasses.replace(base.federation, codec="autoencoder", **federation)
        return dataclasses.replace(base, federation=f)

    config(codec_ratio=8.0).validate()
    for bad, match in [
        ({"autoencoder_decoder": "conv"}, "linear' or 'mlp"),
        ({"autoencoder_warmup_rounds": 0}, "warmup"),
        ({"codec_ratio": 128.0}, "autoencoder_block"),
    ]:
        with pytest.raises(ConfigError, match=match):
            config(**bad).validate()
    masked = dataclasses.replace(
        config(autoencoder_decoder="mlp"), secagg=dataclasses.replace(base.secagg, enabled=True)
    )
    with pytest.raises(ConfigError, match="nonlinear"):
        dataclasses.replace(masked, rounds=dataclasses.replace(base.rounds, min_agents=3)).validate()


def test_a_diverged_training_never_reaches_the_agents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    schedule = AutoencoderSchedule(dataclasses.replace(PLAN, warmup=1, refresh=2), NUMEL, tmp_path)
    schedule.observe(schedule.settings(BASE), [mean_update(0)])  # TGAP: a working network
    good = schedule.settings(BASE)
    assert good.name == "autoencoder"
    schedule.observe(good, [mean_update(1)])
    refresh = schedule.settings(BASE)
    assert refresh.name == "identity"
    monkeypatch.setattr("server.autoencoder.train_autoencoder", lambda *a, **k: float("nan"))
    schedule.observe(refresh, [mean_update(2)])  # FAF diverges
    after = schedule.settings(BASE)
    assert after.name == "autoencoder" and after.state_sha256 == good.state_sha256  # the previous network
    fresh = AutoencoderSchedule(dataclasses.replace(PLAN, warmup=1), NUMEL, tmp_path / "fresh")
    fresh.observe(fresh.settings(BASE), [mean_update(0)])  # TGAP diverges too: rounds stay full
    assert fresh.settings(BASE).name == "identity" and fresh.codec is None


def test_a_trusted_aggregator_learns_from_each_agents_staged_update(tmp_path: Path) -> None:
    """Plain rounds: each agent's update is staged as it arrives and becomes a snapshot when the
    round commits; warm-up counts full rounds, not snapshots; an abandoned round's are dropped."""
    plan = dataclasses.replace(PLAN, warmup=2, refresh=0, window=2)
    schedule = AutoencoderSchedule(plan, NUMEL, tmp_path)
    agents = 3
    for r in range(2):
        settings = schedule.settings(BASE)
        assert settings.name == "identity"
        for a in range(agents):  # weighted payloads, memory-mapped, scaled back by 1 / weight
            np.save(tmp_path / "payload.npy", 0.5 * mean_update(10 * r + a))
            schedule.stage(np.load(tmp_path / "payload.npy", mmap_mode="r"), scale=2.0)
        if r == 0:
            schedule.discard_staged()  # the round was abandoned: its updates never count
            for a in range(agents):
                schedule.stage(mean_update(10 * r + a))
        schedule.observe(settings, [np.full(NUMEL, 99.0, np.float32)])  # the mean: unused here
        assert not list((tmp_path / "staged").glob("*.npy"))
        names = sorted(p.name for p in (tmp_path / "snapshots").glob("*.npy"))
        assert names == [f"{i:08d}-{a:03d}.npy" for i in range(r + 1) for a in range(agents)]
        if r == 0:
            assert schedule.codec is None  # one full round of 3 agents is not 2 rounds of warm-up
    np.testing.assert_allclose(
        np.load(tmp_path / "snapshots" / "00000001-002.npy"), mean_update(12), rtol=1e-6
    )
    assert schedule.codec is not None and schedule.settings(BASE).name == "autoencoder"
    encoded = schedule.settings(BASE)
    schedule.stage(mean_update(50))  # stray: an encoded round never stages
    schedule.observe(encoded, [])
    assert not list((tmp_path / "staged").glob("*.npy"))
    schedule.observe(IDENTITY_SETTINGS, [mean_update(60)])  # a third full round: the window keeps 2
    rounds = {p.name.split("-")[0] for p in (tmp_path / "snapshots").glob("*.npy")}
    assert rounds == {"00000001", "00000002"}


def test_training_reads_a_bounded_sample_of_each_snapshot(tmp_path: Path) -> None:
    block, rows = 16, 5000
    vector = np.random.default_rng(0).standard_normal(block * rows - 3).astype(np.float32) * 3
    np.save(tmp_path / "big.npy", vector)
    mapped = np.load(tmp_path / "big.npy", mmap_mode="r")
    drawn = _training_rows(mapped, block, 100, np.random.default_rng(1))
    assert drawn.shape == (100, block)
    rms = float(np.sqrt(np.mean(vector.astype(np.float64) ** 2)))
    padded = np.zeros(block * rows, np.float32)
    padded[: vector.size] = vector / rms
    whole = padded.reshape(rows, block)
    matches = [np.flatnonzero(np.all(np.isclose(whole, row, atol=1e-6), axis=1)) for row in drawn]
    assert all(len(m) == 1 for m in matches)  # each drawn row is one real block, normalised
    assert len({int(m[0]) for m in matches}) == 100  # drawn without replacement
    small = _training_rows(vector[:160], block, 100, np.random.default_rng(1))
    assert small.shape == (10, block)  # fewer blocks than the cap: all of them
