"""Sparse coverage (common/secagg/coverage.py): k of n agents send each element, sums stay exact,
no element is ever summed over fewer than two agents, and the decoded mean is the ratio estimate."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import ConfigError, InvalidArgument
from common.secagg import coverage
from common.secagg.agent import AgentRound
from common.secagg.coverage import STEP, Coverage, CoveredUniforms
from common.secagg.local import Federation, run_round
from common.secagg.params import SecAggParams

N = 6
COUNT = 40_001  # values: several coverage steps of packed elements, and a ragged end


@pytest.fixture(scope="module")
def federation() -> Federation:
    return Federation.create(N)


def _params(k: int, agents: int = N, levels: int = 4) -> SecAggParams:
    return SecAggParams.for_round(agents // 2 + 1, 0, 1.0, 2, agents, levels=levels, coverage=k).check(agents)


def _encoders(
    fed: Federation, params: SecAggParams, values: dict[str, np.ndarray], weights: dict[str, float]
) -> tuple[dict, dict[str, np.ndarray], int]:
    """Encoders for run_round, and each agent's (unmasked) elements as it encoded them."""
    fp = params.fixed_point
    length = fp.masked_length(COUNT)
    encoded: dict[str, np.ndarray] = {}

    def encoder(agent: str):
        def encode(protocol: AgentRound) -> np.ndarray:
            private = np.random.default_rng(sorted(values).index(agent))
            codes = fp.encode_weighted(values[agent], weights[agent], protocol.rounding(private, length))
            encoded[agent] = codes.copy()
            return codes

        return encode

    return {a: encoder(a) for a in values}, encoded, length


def _ring(values: np.ndarray, params: SecAggParams) -> np.ndarray:
    """Elements mod 2^ring_bits: all the sum means (the high bits of uint32 are mask residue)."""
    return values & np.uint32((1 << params.ring_bits) - 1)


def _updates(fed: Federation, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    rng = np.random.default_rng(seed)
    agents = sorted(fed.agents)
    values = {a: rng.uniform(-1, 1, COUNT).astype(np.float32) for a in agents}
    weights = {a: (i + 1) / len(agents) for i, a in enumerate(agents)}
    return values, weights


def test_each_element_has_k_senders_each_agent_about_k_over_n() -> None:
    """The ranks are a permutation of the members per element; k of them send; an agent's share of
    elements is k/n within binomial noise; any span of elements draws the same ranks alone."""
    members = [f"m{i}" for i in range(7)]
    cov = Coverage(b"seed", 3, members, 3, 50_000)
    ranks = cov.ranks(0, cov.elements)
    assert np.all(np.sort(ranks, axis=1) == np.arange(7))
    senders = ranks < 3
    assert np.all(senders.sum(axis=1) == 3)
    expected = cov.elements * 3 / 7
    for m in members:
        assert cov.sent(m) == senders[:, cov.position(m)].sum()
        assert abs(cov.sent(m) - expected) < 5 * np.sqrt(expected)
    np.testing.assert_array_equal(cov.ranks(12_345, 12_350), ranks[12_345:12_350])
    other = Coverage(b"seed", 4, members, 3, 1000).ranks(0, 1000)
    assert not np.array_equal(other, ranks[:1000])  # a fresh draw each round
    pos = cov.positions("m2", 1000, 1000 + STEP)  # an upload slice across steps
    np.testing.assert_array_equal(pos, np.flatnonzero(senders[:, 2])[1000 : 1000 + STEP])
    with pytest.raises(InvalidArgument):
        cov.positions("m2", 0, cov.sent("m2") + 1)


def test_ranks_by_pairwise_comparison_and_by_sorting_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small rosters rank by comparing words pairwise, large ones by sorting: the same ranks."""
    for n in (2, 5, 12):
        cov = Coverage(b"x", 2, [f"m{i:02d}" for i in range(n)], 2, 3000)
        pairwise = cov.ranks(0, 3000)
        with monkeypatch.context() as patch:
            patch.setattr(coverage, "PAIRWISE_MAX", 0)
            np.testing.assert_array_equal(cov.ranks(0, 3000), pairwise)
    wide = Coverage(b"x", 2, [f"m{i:02d}" for i in range(40)], 5, 2000).ranks(0, 2000)
    assert np.all(np.sort(wide, axis=1) == np.arange(40))


def test_rank_table_is_the_keystreams_draw_and_rounds_past_its_budget_redraw_the_same(
    federation: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranks are drawn once into a read-only table when it fits TABLE_MAX_BYTES; past the budget
    every pass redraws them: the same ranks, uploads, positions and masked sum either way."""
    members = [f"m{i}" for i in range(5)]
    kept = Coverage(b"t", 7, members, 2, 3 * STEP + 11)
    ranks = kept.ranks(0, kept.elements)
    with pytest.raises(ValueError, match="read-only"):
        ranks[0, 0] = 9  # a caller cannot corrupt later passes
    elements = np.arange(kept.elements, dtype=np.uint32)
    params = _params(2)
    values, weights = _updates(federation, 6)
    with monkeypatch.context() as patch:
        patch.setattr(coverage, "TABLE_MAX_BYTES", 1000)  # below both rounds here
        drawn = Coverage(b"t", 7, members, 2, kept.elements)
        np.testing.assert_array_equal(drawn.ranks(0, drawn.elements), ranks)
        assert drawn._table is None
        for m in members:
            assert drawn.sent(m) == kept.sent(m)
            np.testing.assert_array_equal(drawn.compact(elements, m), kept.compact(elements, m))
            np.testing.assert_array_equal(drawn.positions(m, 5, STEP + 9), kept.positions(m, 5, STEP + 9))
        encoders, encoded, length = _encoders(federation, params, values, weights)
        result = run_round(federation, encoders, params, length=length, seed=b"budget")
    cov = result.server.coverage if result.server is not None else None
    assert cov is not None and cov._table is None
    senders = Coverage(b"budget", 1, cov.members, 2, length).senders(0, length)  # a tabled draw
    expected = np.zeros(length, np.uint32)
    for a, codes in encoded.items():
        expected += np.where(senders[:, cov.position(a)], codes, 0).astype(np.uint32)
    np.testing.assert_array_equal(_ring(result.total, params), _ring(expected, params))


@pytest.mark.parametrize("k", [2, 3])
def test_masked_sum_is_each_elements_senders_codes_exactly(federation: Federation, k: int) -> None:
    """Through the whole protocol, each element of the unmasked sum is the sum of the codes of the
    agents that sent it, and an agent uploads only those elements (k/n of the bytes)."""
    params = _params(k)
    values, weights = _updates(federation)
    encoders, encoded, length = _encoders(federation, params, values, weights)
    result = run_round(federation, encoders, params, length=length, seed=b"round-seed")
    assert result.server is not None and result.server.coverage is not None
    senders = result.server.coverage.senders(0, length)
    cov = result.server.coverage
    expected = np.zeros(length, np.uint32)
    for a, codes in encoded.items():
        expected += np.where(senders[:, cov.position(a)], codes, 0).astype(np.uint32)
    np.testing.assert_array_equal(_ring(result.total, params), _ring(expected, params))
    fp = params.fixed_point
    for a in encoded:
        assert result.upload_bytes[a] == fp.wire_bytes(cov.sent(a))
        assert abs(cov.sent(a) / length - k / N) < 0.03
    assert fp.base == k * fp.levels + 1  # digits sized for k codes, not n


def test_covered_mean_is_the_ratio_estimate_and_tracks_the_true_mean(federation: Federation) -> None:
    """The decoded mean is each element's senders' weighted sum over their summed weight; with 3 of
    6 agents it follows the true weighted mean of correlated updates closely."""
    params = _params(3, levels=256)  # fine codes: the subsampling is what is left
    fed = federation
    rng = np.random.default_rng(1)
    common = rng.normal(0, 0.3, COUNT)
    agents = sorted(fed.agents)
    values = {a: np.clip(common + rng.normal(0, 0.05, COUNT), -1, 1).astype(np.float32) for a in agents}
    weights = {a: (i + 1) / N for i, a in enumerate(agents)}
    encoders, encoded, length = _encoders(fed, params, values, weights)
    result = run_round(fed, encoders, params, length=length, seed=b"mean")
    assert result.server is not None and result.server.coverage is not None
    mean = result.server.covered_mean(result.total, weights, COUNT)
    fp, cov = params.fixed_point, result.server.coverage
    senders = np.repeat(cov.senders(0, length), fp.group, axis=0)[:COUNT]
    decoded = {a: fp.decode_sum(fp.unpack(encoded[a])[:COUNT], 1) for a in agents}
    num = sum(np.where(senders[:, cov.position(a)], decoded[a], 0) for a in agents)
    den = sum(np.where(senders[:, cov.position(a)], weights[a], 0) for a in agents)
    np.testing.assert_allclose(mean, num / den, rtol=1e-5, atol=1e-6)
    true = sum(weights[a] * values[a].astype(np.float64) for a in agents) / sum(weights.values())
    assert np.corrcoef(mean, true)[0, 1] > 0.98
    assert abs(float(np.mean(mean - true))) < 2e-3  # no bias to speak of


def test_senders_round_in_distinct_strata(federation: Federation) -> None:
    """k senders of equal values get distinct strata, so their summed codes are within one step
    of k times the value; each agent's dither is still uniform."""
    agents = sorted(federation.agents)
    cov = Coverage(b"s", 1, agents, 3, 2000)
    group = 4
    draws = {
        a: CoveredUniforms(cov, a, group, np.random.default_rng(i)).random(8000) for i, a in enumerate(agents)
    }
    senders = np.repeat(cov.senders(0, 2000), group, axis=0)
    x = 0.37 * 3  # a value between codes, at a scale of 3 steps
    summed = sum(np.where(senders[:, cov.position(a)], np.floor(x / 3 + draws[a]), 0) for a in agents)
    assert np.all(np.abs(summed - x) < 1.0)
    u = draws[agents[0]][senders[:, 0]]
    assert abs(u.mean() - 0.5) < 0.02 and u.min() >= 0 and u.max() < 1


def test_dropout_keeps_two_senders_or_the_agents_refuse(federation: Federation) -> None:
    """With k = 3 one agent may drop after sharing: every element keeps two senders and the sum of
    the survivors' codes is exact. With k = 2 the same dropout would leave elements summed over one
    agent, and the survivors refuse to unmask."""
    values, weights = _updates(federation, 2)
    gone = sorted(federation.agents)[1]
    params = _params(3)
    encoders, encoded, length = _encoders(federation, params, values, weights)
    result = run_round(federation, encoders, params, drop={"upload": {gone}}, length=length, seed=b"d")
    assert result.dropped == [gone] and result.server is not None and result.server.coverage is not None
    cov = result.server.coverage
    senders = cov.senders(0, length)
    expected = np.zeros(length, np.uint32)
    for a in result.survivors:
        expected += np.where(senders[:, cov.position(a)], encoded[a], 0).astype(np.uint32)
    np.testing.assert_array_equal(_ring(result.total, params), _ring(expected, params))
    survivor = result.survivors[0]
    cov.check_survivors(survivor, result.survivors)  # two senders left: the protocol's floor
    with pytest.raises(InvalidArgument, match="fewer than 3 agents"):  # privacy.min_agents_per_sum = 3
        cov.check_survivors(survivor, result.survivors, least=3)
    params = _params(2)
    encoders, _, length = _encoders(federation, params, values, weights)
    with pytest.raises(InvalidArgument, match="fewer than 2 agents"):
        run_round(federation, encoders, params, drop={"upload": {gone}}, length=length, seed=b"d")


def test_agent_dropping_before_sharing_is_left_out_of_coverage(federation: Federation) -> None:
    """Senders are drawn among the agents that shared keys, so an agent gone before sharing costs
    nothing: every element still has k senders."""
    values, weights = _updates(federation, 3)
    gone = sorted(federation.agents)[4]
    params = _params(2)
    encoders, _, length = _encoders(federation, params, values, weights)
    result = run_round(federation, encoders, params, drop={"advertise": {gone}}, length=length, seed=b"e")
    assert result.server is not None and result.server.coverage is not None
    assert gone not in result.server.coverage.members
    assert np.all(result.server.coverage.senders(0, length).sum(axis=1) == 2)


def test_chunked_upload_lands_where_the_whole_one_does(federation: Federation) -> None:
    """The aggregator maps each slice of an agent's upload (as the daemon adds a file block by
    block) to the elements it stands for; a slice past the upload is refused."""
    params = _params(2)
    values, weights = _updates(federation, 4)
    encoders, _, length = _encoders(federation, params, values, weights)
    whole = run_round(federation, encoders, params, length=length, seed=b"c")
    assert whole.server is not None
    server, rng = whole.server, np.random.default_rng(0)
    assert server.coverage is not None
    for a in sorted(whole.survivors):
        server.start_sum()  # a fresh sum for each agent's slices
        upload = rng.integers(1, 1 << 31, server.upload_length(a), dtype=np.uint32)
        cuts = sorted(int(c) for c in rng.integers(0, upload.size, 5))
        for start, stop in zip([0, *cuts], [*cuts, upload.size], strict=True):
            server.add_masked(a, upload[start:stop], start)
        expected = np.zeros(length, np.uint32)
        expected[np.flatnonzero(server.coverage.senders(0, length)[:, server.coverage.position(a)])] = upload
        np.testing.assert_array_equal(server.total, expected)
        with pytest.raises(InvalidArgument):
            server.add_masked(a, upload[:2], upload.size - 1)


def test_coverage_settings_are_checked() -> None:
    """Coverage below two agents, or with a sparse neighbour graph, is refused with the reason;
    coverage at or above the roster is every agent."""
    with pytest.raises(ConfigError, match="at least 2"):
        _params(1)
    with pytest.raises(ConfigError, match="full graph"):
        SecAggParams.for_round(3, 4, 1.0, 2, N, coverage=2).check(N)
    assert _params(N + 3).fixed_point.base == _params(0).fixed_point.base
    assert _params(2).fixed_point.coordinate_bits < _params(0).fixed_point.coordinate_bits
