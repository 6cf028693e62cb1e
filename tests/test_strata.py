"""Correlated stochastic rounding (common/secagg/strata): shared strata, uniform dithers, tighter sums."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import FailedPrecondition
from common.secagg.local import Federation, run_round
from common.secagg.params import SecAggParams
from common.secagg.ring import FixedPoint
from common.secagg.strata import STRATA_MAX, StratifiedUniforms

SEED = b"public round seed"


def fleet(agents: int, round_id: int = 3, seed: bytes = SEED) -> list[StratifiedUniforms]:
    return [
        StratifiedUniforms(seed, round_id, i, agents, np.random.default_rng([round_id, i]))
        for i in range(agents)
    ]


@pytest.mark.parametrize("agents", [1, 2, 3, 4, 7, STRATA_MAX, STRATA_MAX + 1, 70])
def test_each_coordinate_deals_the_strata_out_as_a_permutation(agents: int) -> None:
    size = 5000
    dithers = np.stack([u.random(size) for u in fleet(agents)])
    assert dithers.min() >= 0 and dithers.max() < 1
    for first in range(0, agents, STRATA_MAX):
        group = dithers[first : first + STRATA_MAX]
        m = group.shape[0]
        strata = np.sort(np.floor(group * m).astype(np.int64), axis=0)
        np.testing.assert_array_equal(strata, np.arange(m)[:, None].repeat(size, axis=1))


def test_one_agents_dithers_are_uniform_and_its_strata_random() -> None:
    size, agents = 200_000, 5
    u = fleet(agents)[2].random(size)
    assert abs(u.mean() - 0.5) < 4 * np.sqrt(1 / 12 / size)
    counts = np.histogram(u, bins=20, range=(0, 1))[0]
    chi2 = float(((counts - size / 20) ** 2 / (size / 20)).sum())
    assert chi2 < 60  # 19 degrees of freedom: p < 1e-5 beyond this
    strata = np.floor(u * agents).astype(int)
    assert np.all(np.abs(np.bincount(strata) / size - 1 / agents) < 0.01)
    assert abs(np.corrcoef(strata[:-1], strata[1:])[0, 1]) < 0.01  # no pattern along the coordinates


def test_seed_and_round_decide_the_strata_and_the_private_draw_the_rest() -> None:
    a = StratifiedUniforms(SEED, 3, 1, 4, np.random.default_rng(1))
    b = StratifiedUniforms(SEED, 3, 1, 4, np.random.default_rng(2))
    np.testing.assert_array_equal(a.strata(1000), b.strata(1000))  # and both continue in step
    first, second = a.random(1000), b.random(1000)
    np.testing.assert_array_equal(np.floor(first * 4), np.floor(second * 4))
    assert not np.array_equal(first, second)
    other_round = StratifiedUniforms(SEED, 4, 1, 4, np.random.default_rng(1)).strata(1000)
    other_seed = StratifiedUniforms(b"another seed", 3, 1, 4, np.random.default_rng(1)).strata(1000)
    fresh = StratifiedUniforms(SEED, 3, 1, 4, np.random.default_rng(1)).strata(1000)
    assert np.mean(other_round != fresh) > 0.5 and np.mean(other_seed != fresh) > 0.5
    chunked = StratifiedUniforms(SEED, 3, 1, 4, np.random.default_rng(1))
    np.testing.assert_array_equal(np.concatenate([chunked.strata(300), chunked.strata(700)]), fresh)


def test_place_in_the_roster_is_checked() -> None:
    roster = ["spiffe://t/cloud/b/agent/x", "spiffe://t/cloud/a/agent/y"]
    u = StratifiedUniforms.for_agent(SEED, 1, roster, roster[0], np.random.default_rng())
    assert (u.member, u.size) == (1, 2)  # sorted: a/agent/y first
    with pytest.raises(ValueError, match="not in the round's roster"):
        StratifiedUniforms.for_agent(SEED, 1, roster, "spiffe://t/cloud/c/agent/z", np.random.default_rng())
    with pytest.raises(ValueError, match="outside"):
        StratifiedUniforms(SEED, 1, 4, 4, np.random.default_rng())


def summed_codes(fp: FixedPoint, values: np.ndarray, stratified: bool, round_id: int) -> np.ndarray:
    """The summed codes of each agent's row of ``values`` (one round)."""
    agents = values.shape[0]
    shared = np.random.default_rng(round_id)
    total = np.zeros(values.shape[1], dtype=np.int64)
    for i, u in enumerate(fleet(agents, round_id)):
        total += fp.encode(values[i], u if stratified else shared).astype(np.int64)
    return total


@pytest.mark.parametrize(("bits", "max_code"), [(1, 2), (2, 0), (1, 1)], ids=["ternary", "2-bit", "binary"])
@pytest.mark.parametrize("agents", [3, 4, 7])
def test_agents_rounding_the_same_values_sum_within_one_step(bits: int, max_code: int, agents: int) -> None:
    fp = FixedPoint(1.0, bits, max_code=max_code)
    y = np.random.default_rng(5).uniform(-1, 1, 20_000)
    ideal = agents * (y + fp.clip) / fp.step  # the exact sum in code steps
    stratified = summed_codes(fp, np.tile(y, (agents, 1)), True, round_id=1) - ideal
    independent = summed_codes(fp, np.tile(y, (agents, 1)), False, round_id=1) - ideal
    assert np.abs(stratified).max() < 1
    assert np.mean(np.abs(independent) >= 1) > 0.05  # what independent dithers do
    assert abs(stratified.mean()) < 0.01


def test_stratified_sums_are_unbiased_and_tighter_for_different_values() -> None:
    fp, agents, size = FixedPoint(1.0, 1, max_code=2), 4, 4000
    rng = np.random.default_rng(11)
    common = rng.uniform(-0.8, 0.8, size)
    values = np.clip(common + rng.normal(0, 0.3, (agents, size)), -1, 1)  # non-IID around a mean
    ideal = ((values + fp.clip) / fp.step).sum(axis=0)
    trials = 40
    errors = {
        kind: np.stack([summed_codes(fp, values, kind, round_id=r) - ideal for r in range(trials)])
        for kind in (True, False)
    }
    bias = errors[True].mean(axis=0)  # per coordinate, over rounds: sd 1 / sqrt(40) at most
    assert np.abs(bias).mean() < 0.12 and abs(errors[True].mean()) < 0.01
    mse = {kind: float((e**2).mean()) for kind, e in errors.items()}
    assert mse[True] < 0.6 * mse[False], mse


def test_protocol_agents_stratify_over_the_verified_roster() -> None:
    federation = Federation.create(5)
    params = SecAggParams.for_round(3, 0, 1.0, 1, 5, levels=3).check(5)
    codes = {a: np.zeros(params.fixed_point.masked_length(100), np.uint32) for a in federation.agents}
    agent = federation.agent_round(next(iter(federation.agents)), 1, params, SEED)
    with pytest.raises(FailedPrecondition, match="roster"):
        agent.rounding()
    result = run_round(federation, codes, params, round_id=1, seed=SEED)
    strata = np.stack([result.agents[a].rounding().strata(3000) for a in sorted(result.agents)])
    np.testing.assert_array_equal(np.sort(strata, axis=0), np.arange(5)[:, None].repeat(3000, axis=1))
    np.testing.assert_array_equal(strata[0], fleet(5, round_id=1)[0].strata(3000))
