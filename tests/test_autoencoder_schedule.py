"""The aggregator's CG-FedLLM schedule: warm-up, TGAP, encoded rounds, FAF refreshes, restarts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from common.codecs.autoencoder import load_autoencoder
from common.codecs.registry import CodecSettings
from common.config import AggregatorConfig
from common.errors import ConfigError
from server.autoencoder import AutoencoderPlan, AutoencoderSchedule
from tests.conftest import Pki, aggregator_config

NUMEL = 3000
BASE = CodecSettings("autoencoder", ratio=8.0)
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
