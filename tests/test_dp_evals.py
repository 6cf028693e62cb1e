"""Eval losses released with differential privacy: each held-out unit's mean token loss clipped
and summed, the sum noised, over the noisy count of units, weighed by the noisy capped tokens;
a budget of the held-out data's own in the ledger, kept apart from the training rounds'."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.causal_loss import per_record_loss
from agent.data import TokenBlocks
from agent.dp_budget import (
    EVAL_TOKENS,
    EVAL_UNITS,
    CountRelease,
    EvalTooNoisy,
    PrivacyBudgetSpent,
    PrivacyLedger,
    epsilon,
    eval_preview,
)
from agent.dp_units import PrivacyUnits
from agent.trainer import LoraTrainer, initial_adapter
from common.config import DpConfig
from common.errors import ConfigError
from tests.test_dp import LORA, tiny  # noqa: F401 - the module's tiny model and 24 one-row records

DP = DpConfig(
    enabled=True,
    noise_multiplier=1.0,
    max_epsilon=8.0,
    delta=1e-5,
    eval_noise=20.0,
    eval_max_deviation=math.inf,
)


def test_a_release_is_the_clipped_sum_noised_over_the_noisy_count(tmp_path: Path) -> None:
    """The released loss is the noisy sum over the noisy count (within 0..clip), the weight the
    noisy capped tokens; both counts are released once, the sum once a subject, all durably; the
    held-out data's epsilon composes exactly these three Gaussian releases, and none of it is the
    training data's."""
    ledger = PrivacyLedger(tmp_path, DP)
    loss, weight, stddev = ledger.release_eval("model-a:data", 3, 2100.0, 500, 31_000, 64)
    (units, tokens), (release,) = ledger.counts, ledger.evals
    assert stddev == pytest.approx(20.0 * 10.0 / units.released)  # the sum's noise over the released count
    assert (units.units, units.kind, units.sensitivity, units.noise) == (500, EVAL_UNITS, 1, 20.0)
    assert (tokens.units, tokens.kind, tokens.sensitivity) == (31_000, EVAL_TOKENS, 64)
    assert (release.version, release.clipped_sum, release.noise, release.clip) == (3, 2100.0, 20.0, 10.0)
    assert loss == pytest.approx(min(max(release.released_sum / units.released, 0.0), 10.0))
    assert weight == tokens.released
    assert ledger.epsilon == 0.0  # the training data's budget is untouched
    three = [units, tokens, CountRelease(0, 0, 20.0)]  # each one step of noise 20 over its sensitivity
    assert ledger.eval_epsilon == pytest.approx(epsilon([], DP.delta, DP.accountant, three))
    assert ledger.eval_epsilon > 0
    assert ledger.guarantee == ledger.eval_epsilon

    restarted = PrivacyLedger(tmp_path, DP)  # durable; the same subject gets the same release back
    assert restarted.release_eval("model-a:data", 3, 2100.0, 500, 31_000, 64) == (loss, weight, stddev)
    assert restarted.evals == [release] and restarted.eval_epsilon == ledger.eval_epsilon
    restarted.release_eval("model-b:data", 4, 2000.0, 500, 31_000, 64)  # a new version: a new release
    assert len(restarted.evals) == 2 and len(restarted.counts) == 2  # the same counts, not again
    assert restarted.eval_epsilon > ledger.eval_epsilon


def test_the_noise_on_the_sum_has_the_configured_deviation(tmp_path: Path) -> None:
    """Over 300 releases (each a new subject), the released sums' deviation from the true one is
    eval_noise x eval_loss_clip (within the sampling error of 300 draws), and their mean is the
    true sum: the noise is unbiased and of the stated scale."""
    config = dataclasses.replace(DP, eval_noise=3.0, eval_loss_clip=5.0, max_epsilon=1e6)
    ledger = PrivacyLedger(tmp_path, config)
    for version in range(300):
        ledger.release_eval(f"model-{version}", version, 700.0, 200, 9000, 32)
    noise = [e.released_sum - e.clipped_sum for e in ledger.evals]
    assert statistics.stdev(noise) == pytest.approx(15.0, rel=0.15)
    assert abs(statistics.mean(noise)) < 4 * 15.0 / math.sqrt(300)
    assert len({e.released_sum for e in ledger.evals}) == 300  # a fresh draw each


def test_a_release_over_the_budget_is_refused_and_nothing_is_kept(tmp_path: Path) -> None:
    """The held-out data's budget is max_epsilon of its own: a release that would pass it raises
    PrivacyBudgetSpent and leaves the ledger as it was; the training rounds' epsilon and the noise
    planned for them are those of a ledger that released no eval loss (parallel composition)."""
    tight = dataclasses.replace(DP, max_epsilon=3.0, noise_multiplier=0.0, planned_rounds=4, eval_noise=2.0)
    ledger, plain = PrivacyLedger(tmp_path / "evals", tight), PrivacyLedger(tmp_path / "plain", tight)
    for each in (ledger, plain):
        each.announce(1000, 1000)
        each.record(1, each.plan(1, 1000, 8, 1, 10), 10)
    released = 0
    while released < 50:
        try:
            ledger.release_eval(f"v{released}", released, 300.0, 100, 5000, 32)
        except PrivacyBudgetSpent as exc:
            assert "privacy budget of the held-out data spent" in str(exc)  # noqa: PT017
            break
        released += 1
    assert 0 < released < 50
    again = PrivacyLedger(tmp_path / "evals", tight)
    assert len(again.evals) == released
    assert again.eval_epsilon <= 3.0 < again._eval_epsilon(again.counts, again.evals, 1)
    assert again.epsilon == pytest.approx(plain.epsilon) and plain.epsilon > 0
    assert again.plan(2, 1000, 8, 1, 10) == plain.plan(2, 1000, 8, 1, 10)


def test_a_released_loss_stays_within_zero_and_the_clip(tmp_path: Path) -> None:
    """Post-processing keeps a noisy loss in 0..clip (a huge noise on a few units would give any
    number): it costs nothing and loses nothing a clipped mean could hold."""
    noisy = dataclasses.replace(DP, eval_noise=1000.0)
    ledger = PrivacyLedger(tmp_path, noisy)
    losses = [ledger.release_eval(f"v{v}", v, 20.0, 4, 100, 32)[0] for v in range(20)]
    assert all(0.0 <= loss <= 10.0 for loss in losses)
    assert {0.0, 10.0} <= set(losses)  # the noise (deviation 10,000) pushes most to an end


def test_a_loss_noisier_than_the_configured_deviation_stays_in_the_cloud(tmp_path: Path) -> None:
    """With too few held-out units for eval_max_deviation, only their count is released (the
    deviation is worked out from it, at no further cost): no token count, no loss."""
    strict = dataclasses.replace(DP, eval_max_deviation=0.1)
    ledger = PrivacyLedger(tmp_path, strict)
    with pytest.raises(
        EvalTooNoisy,
        match=r"with \d+ held-out records \(as released\), .* nats, over"
        r" privacy\.dp\.eval_max_deviation \(0\.1\); it stays in this cloud",
    ):
        ledger.release_eval("v0", 0, 10.0, 200, 10_000, 32)  # 20 x 10 / (200 +- 20 x 4)
    assert [c.kind for c in ledger.counts] == [EVAL_UNITS] and ledger.evals == []
    ledger.release_eval("v0", 0, 10.0, 200_000, 100_000, 32)  # 0.001 nats: shared
    assert [c.kind for c in ledger.counts] == [EVAL_UNITS, EVAL_UNITS, EVAL_TOKENS] and len(ledger.evals) == 1
    assert "over eval_max_deviation (0.1): the losses would stay" in eval_preview(
        strict, tmp_path / "new", 1000
    )
    assert "eval_max_deviation" not in eval_preview(strict, tmp_path / "new", 2001)


def test_a_ledger_of_releases_refuses_another_unit(tmp_path: Path) -> None:
    PrivacyLedger(tmp_path, DP).release_eval("v0", 0, 10.0, 5, 100, 32)
    with pytest.raises(ConfigError, match="holds rounds spent protecting a record"):
        PrivacyLedger(tmp_path, dataclasses.replace(DP, unit="user"))


def test_the_preview_counts_the_versions_the_budget_lasts(tmp_path: Path) -> None:
    """`check`'s line: the noise a released loss carries and how many versions fit, the count
    releases it would make included, from what the ledger already spent."""
    ledger = PrivacyLedger(tmp_path, DP)
    ledger.release_eval("v0", 0, 10.0, 2000, 100_000, 32)
    line = eval_preview(DP, tmp_path, 2000)
    lasts = int(line.split("lasts ")[1].split()[0])
    assert line.startswith(
        "2000 held-out records: each version's eval loss released with noise of deviation 0.1 nats"
    )

    def spent(more: int) -> float:
        return ledger._eval_epsilon(ledger.counts, ledger.evals, more)

    assert spent(lasts) <= DP.max_epsilon < spent(lasts + 1)
    assert eval_preview(DP, tmp_path, 2000) == line  # nothing was spent
    assert PrivacyLedger(tmp_path, DP).evals == ledger.evals
    fresh = eval_preview(DP, tmp_path / "fresh", 2000)  # two count releases still to make
    assert int(fresh.split("lasts ")[1].split()[0]) == lasts + 1  # the two counts, not the release
    changed = eval_preview(DP, tmp_path, 2001)  # a new unit count: one more release
    assert int(changed.split("lasts ")[1].split()[0]) == lasts - 1


REFUSED = [
    (field, value)
    for field in ("eval_noise", "eval_loss_clip", "eval_max_deviation")
    for value in (0.0, -1.0, float("nan"), float("inf"))
    if (field, value) != ("eval_max_deviation", float("inf"))  # inf: always share
]


@pytest.mark.parametrize(("field", "value"), REFUSED)
def test_the_config_refuses_eval_settings_that_are_not_positive(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"privacy\.dp\.{field} must be > 0"):
        dataclasses.replace(DP, **{field: value}).validate()
    assert DP.validate().eval_max_deviation == math.inf


def test_the_trainer_clips_each_units_mean_token_loss(tiny: tuple[str, TokenBlocks]) -> None:  # noqa: F811
    """``evaluate_units`` over records grouped into users: the exact loss is ``evaluate``'s, each
    unit's mean token loss is its rows' summed loss over their learned tokens (transformers'
    loss, row by row), clipped, then summed; tokens are capped per unit."""
    path, rows = tiny
    trainer = LoraTrainer(path, LORA)
    start = initial_adapter(path, LORA, seed=3)
    trainer.set_adapter({k: v + 0.02 * torch.randn_like(v) for k, v in start.items()})
    owners = np.arange(len(rows)) % 5  # 5 users of about 5 rows each
    units = PrivacyUnits.grouped(np.arange(len(rows)), owners)
    sums, counts = [], []
    for i in range(len(rows)):
        row = rows[i : i + 1]
        with torch.no_grad():
            logits = trainer.model(input_ids=row.input_ids.long()).logits
        learned = int((row.labels[:, 1:] != -100).sum())
        sums.append(float(per_record_loss(logits, row.labels.long())) * learned)
        counts.append(learned)
    means = [
        sum(s for s, o in zip(sums, owners, strict=True) if o == u)
        / sum(c for c, o in zip(counts, owners, strict=True) if o == u)
        for u in range(5)
    ]
    clip = sorted(means)[2]  # the middle one: two units above it are clipped
    cap = 40
    got = trainer.evaluate_units(rows, units, clip, cap, batch_size=4)
    assert got.units == 5
    assert got.clipped_sum == pytest.approx(sum(min(m, clip) for m in means), rel=1e-5)
    assert got.clipped_sum < sum(means)
    user_tokens = [sum(c for c, o in zip(counts, owners, strict=True) if o == u) for u in range(5)]
    assert got.capped_tokens == sum(min(t, cap) for t in user_tokens) < sum(user_tokens)
    loss, tokens = trainer.evaluate(rows)
    assert (got.loss, got.tokens) == (pytest.approx(loss, rel=1e-6), tokens) and tokens == sum(counts)
    records = trainer.evaluate_units(rows, PrivacyUnits.records(len(rows)), 100.0, 10_000)
    assert records.units == len(rows) and records.capped_tokens == tokens
    assert records.clipped_sum == pytest.approx(
        sum(s / c for s, c in zip(sums, counts, strict=True)), rel=1e-5
    )


def test_a_rank_without_units_adds_nothing(tiny: tuple[str, TokenBlocks]) -> None:  # noqa: F811
    """Held-out users dealt to ranks may leave one with none: its part of the sums is zero."""
    path, rows = tiny
    trainer = LoraTrainer(path, LORA)
    empty = PrivacyUnits.grouped(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))
    got = trainer.evaluate_units(rows, empty, 10.0, 64)
    assert (got.units, got.clipped_sum, got.capped_tokens, got.tokens) == (0, 0.0, 0, 0)


def test_a_ledger_from_before_eval_releases_loads_with_none(tmp_path: Path) -> None:
    """A ledger written before eval releases (no ``evals``) loads with none spent on held-out data."""
    ledger = PrivacyLedger(tmp_path, DP)
    ledger.announce(3000, 3000)
    data = json.loads(ledger.path.read_text())
    del data["evals"]
    ledger.path.write_text(json.dumps(data))
    old = PrivacyLedger(tmp_path, DP)
    assert old.evals == [] and old.eval_epsilon == 0.0 and old.epsilon == ledger.epsilon > 0
