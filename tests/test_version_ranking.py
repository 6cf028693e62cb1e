"""Which versions compare, and over which agents: clouds that leave, join late or report only
some versions must neither freeze the ranking on old versions nor mix different clouds' text."""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import RoundsConfig
from server.export import choose_version
from server.stopping import finish_reason
from server.version_ranking import (
    AgentEval,
    Evals,
    best,
    comparable,
    ranked,
    reference_agents,
    weighted_loss,
)

PATIENT = RoundsConfig(early_stop_patience=3)


def table(
    spans: dict[str, range], loss: dict[str, float], step: float = 0.1
) -> dict[int, dict[str, AgentEval]]:
    """Each agent's evaluations of the versions in its span: its base loss, lower by ``step`` a
    version (so every agent sees the versions improve)."""
    evals: dict[int, dict[str, AgentEval]] = {}
    for agent, versions in spans.items():
        for v in versions:
            evals.setdefault(v, {})[agent] = AgentEval(loss[agent] - step * v, 100)
    return evals


BASE = {"a": 6.0, "b": 6.5, "c": 3.0, "d": 2.0}  # c's and d's text is much easier


def test_a_cloud_that_stops_reporting_no_longer_freezes_the_ranking_once_outnumbered() -> None:
    """c evaluates versions 0..4 and stops (it left, or its eval budget is spent); a and b go on
    to version 14. Comparing only versions every agent evaluated would keep the best at version
    4 forever, and early stopping would never see a newer version; comparing over a and b takes
    all 15 (2 x 15 = 30 evaluations against 3 x 5 = 15)."""
    evals = table({"a": range(15), "b": range(15), "c": range(5)}, BASE)
    assert reference_agents(evals) == {"a", "b"}
    assert sorted(comparable(evals, range(15))) == list(range(15))
    assert ranked(list(range(15)), evals)[0] == 14
    best = choose_version(list(range(15)), evals, "best")
    assert best.version == 14
    assert "of the 15 version(s) compared over the 2 agent(s) that evaluated them all" in best.reason
    # earlier, while c's versions still outnumber the rest, they are the ones compared
    early = {v: e for v, e in evals.items() if v < 7}  # {a,b,c}: 3 x 5 = 15 > {a,b}: 2 x 7 = 14
    assert reference_agents(early) == {"a", "b", "c"}
    order = ranked(list(range(7)), early)
    assert order[:5] == [4, 3, 2, 1, 0] and sorted(order[5:]) == [5, 6]  # never compared over c's text


def test_early_stopping_sees_the_versions_after_a_cloud_left() -> None:
    """a and b improve until version 9, then stay flat; c left after version 4. Patience 3 finishes
    at version 12 on a and b's losses (before, nothing after version 4 was compared)."""
    evals = table({"a": range(13), "b": range(13), "c": range(5)}, BASE)
    for v in range(10, 13):
        evals[v] = {agent: AgentEval(e.loss + 0.1 * (v - 9), e.tokens) for agent, e in evals[v].items()}
    assert finish_reason(11, evals, PATIENT) is None  # 2 versions since version 9
    reason = finish_reason(12, evals, PATIENT)
    assert reason is not None and "(version 9) in the 3 versions evaluated since" in reason


def test_versions_are_never_compared_over_different_clouds() -> None:
    """Versions 0..2 evaluated by a and b, version 3 by a and d (as many agents, but d's text is
    far easier): version 3 would win on d's text alone. It is left out of the comparison and
    ranked after the comparable versions."""
    evals = table({"a": range(4), "b": range(3), "d": [3]}, BASE)
    assert weighted_loss(evals[3]) < min(weighted_loss(evals[v]) for v in range(3))
    assert reference_agents(evals) == {"a", "b"}
    assert ranked([0, 1, 2, 3], evals) == [2, 1, 0, 3]
    assert choose_version([0, 1, 2, 3], evals, "best").version == 2


def test_a_cloud_that_joins_late_counts_once_it_has_evaluated_enough() -> None:
    """d joins at version 10. Until its evaluations weigh as much as the rest, versions compare
    over a and b, all of them; once d has evaluated 20 of 30 versions (3 x 20 = 2 x 30, and the
    tie goes to more agents), over a, b and d."""
    late = table({"a": range(15), "b": range(15), "d": range(10, 15)}, BASE)
    assert reference_agents(late) == {"a", "b"}  # 2 x 15 = 30 > 3 x 5 = 15
    later = table({"a": range(30), "b": range(30), "d": range(10, 30)}, BASE)
    assert reference_agents(later) == {"a", "b", "d"}  # 3 x 20 = 60 = 2 x 30: more agents
    assert sorted(comparable(later, range(30))) == list(range(10, 30))


def test_a_version_not_every_reference_agent_has_evaluated_yet_waits() -> None:
    """The newest version, evaluated so far by a only, is not compared until b reports it."""
    evals = table({"a": range(6), "b": range(5)}, BASE)
    assert reference_agents(evals) == {"a", "b"} and 5 not in comparable(evals, range(6))
    assert ranked(list(range(6)), evals)[-1] == 5


@given(
    st.dictionaries(
        st.integers(0, 30),
        st.dictionaries(st.sampled_from("abcde"), st.floats(0, 10), min_size=1, max_size=5),
        max_size=25,
    ),
    st.randoms(use_true_random=False),
)
@settings(max_examples=200, deadline=None)
def test_the_reference_agents_compare_the_most_evaluations_of_any_set_of_agents(
    losses: dict[int, dict[str, float]], shuffle: random.Random
) -> None:
    """Against brute force over every set of agents: none compares more evaluations (size x
    versions it all evaluated). The answer does not depend on the order evaluations came in, and
    every version is ranked once, the comparable ones first."""
    evals: dict[int, Evals] = {v: {a: AgentEval(x, 10) for a, x in e.items()} for v, e in losses.items()}
    chosen = reference_agents(evals)

    def score(agents: frozenset[str]) -> int:
        return len(agents) * sum(agents <= e.keys() for e in evals.values())

    agents = sorted({a for e in evals.values() for a in e})
    subsets = [frozenset(c) for n in range(1, len(agents) + 1) for c in itertools.combinations(agents, n)]
    assert score(chosen) == max(map(score, subsets), default=0)
    items = list(evals.items())
    shuffle.shuffle(items)
    assert reference_agents(dict(items)) == chosen
    order = ranked(sorted(evals), evals)
    compared = comparable(evals, set(evals))
    assert sorted(order) == sorted(evals)
    assert set(order[: len(compared)]) == set(compared)
    assert all(e.keys() == chosen for e in compared.values())
    chosen_version = best(sorted(evals), evals)  # exact losses: plainly the lowest, the older on ties
    lowest = min(compared, key=lambda v: (weighted_loss(compared[v]), v)) if compared else None
    assert (chosen_version and chosen_version[0]) == lowest and order[:1] == ([lowest] if compared else [])


PLATEAU = [5.0, 4.95, 4.9, 4.85, 4.8, 4.75, 4.7, 4.64, 4.62, 4.61, 4.63, 4.62]
"""A federation's loss by version: down, then flat from version 7 (within a DP noise's reach)."""


def noised(losses: list[float], stddev: float) -> dict[int, dict[str, AgentEval]]:
    """Two agents reporting ``losses`` with DP noise of ``stddev`` each (the federation's loss
    then has 0.035 at 0.05: two lowest-draw contenders are 0.1 apart at 2 deviations)."""
    return {v: {a: AgentEval(x, 100, stddev) for a in "ab"} for v, x in enumerate(losses)}


def test_with_noised_losses_a_lucky_draw_does_not_win_against_a_low_plateau() -> None:
    """Version 3's noised loss (4.58) is the lowest, but its neighbours' are 0.2-0.3 higher: it
    was the luckiest draw. Within 2 noise deviations of it the plateau's versions contend, and
    one with a low loss averaged over its neighbours wins. With exact losses, or when version 3
    is lower than the noise can explain, version 3 wins as before."""
    lucky = [*PLATEAU[:3], 4.58, *PLATEAU[4:]]
    chosen = best(list(range(12)), noised(lucky, 0.05))
    assert chosen is not None and chosen[0] in range(7, 12), chosen
    assert "and those of 3 neighbouring version(s), 4.6200, is the lowest" in chosen[1]
    assert "lowest of the 6 version(s) within 2 noise deviations of the lowest loss, of 12" in chosen[1]
    assert ranked(list(range(12)), noised(lucky, 0.05))[0] == chosen[0]  # retention keeps it first
    assert best(list(range(12)), noised(lucky, 0.0)) == (
        3,
        "the lowest token-weighted eval loss (4.5800) of the 12 version(s) compared over the 2 agent(s)"
        " that evaluated them all",
    )
    clear = [*PLATEAU[:3], 4.45, *PLATEAU[4:]]  # 0.16 under the plateau: over 4 deviations
    assert best(list(range(12)), noised(clear, 0.05))[0] == 3  # type: ignore[index]


def test_pruned_versions_still_inform_their_neighbours_scores() -> None:
    """Only versions 3 and 9 are kept; the evaluations of the pruned ones around them still tell
    a lucky draw (3) from a low plateau (9)."""
    lucky = [*PLATEAU[:3], 4.58, *PLATEAU[4:]]
    chosen = best([3, 9], noised(lucky, 0.05))
    assert chosen is not None and chosen[0] == 9 and "of 2 compared over the 2 agent(s)" in chosen[1]
