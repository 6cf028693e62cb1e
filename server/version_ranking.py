"""Global versions ranked by the agents' evaluations (``export --version best``, retention)."""

from __future__ import annotations

import math
from collections.abc import Container, Mapping, Sequence
from typing import NamedTuple


class AgentEval(NamedTuple):
    """One agent's evaluation of one version, as it reported it."""

    loss: float
    """Mean token loss on its held-out text."""
    tokens: int
    """What the loss is weighed by."""
    stddev: float = 0.0
    """Standard deviation of the noise its differential privacy added to ``loss`` (0: exact)."""


Evals = Mapping[str, AgentEval]
"""{agent: evaluation} of one version."""


def _weights(evals: Evals) -> list[tuple[AgentEval, int]]:
    """Each evaluation with its weight: its tokens (at least 1)."""
    return [(e, max(e.tokens, 1)) for e in evals.values()]


def weighted_loss(evals: Evals) -> float:
    """The federation's held-out loss of a version: the agents' losses weighted by their tokens."""
    weighted = _weights(evals)
    return sum(e.loss * w for e, w in weighted) / sum(w for _, w in weighted)


def loss_stddev(evals: Evals) -> float:
    """Standard deviation of the noise in ``weighted_loss``: the agents' noise deviations, each
    weighted as its loss is, added in quadrature (0 when every loss is exact)."""
    weighted = _weights(evals)
    return math.hypot(*(e.stddev * w for e, w in weighted)) / sum(w for _, w in weighted)


def describe(evals: Evals) -> str:
    """``weighted_loss``, with its noise deviation when any loss is noised (``5.1234 ± 0.021``)."""
    noise = loss_stddev(evals)
    return f"{weighted_loss(evals):.4f}" + (f" ± {noise:.2g}" if noise else "")


def evaluated(evals: Mapping[int, Evals], versions: Container[int]) -> dict[int, Evals]:
    """The evaluations of those of ``versions`` that have any."""
    return {v: e for v, e in evals.items() if e and v in versions}


MAX_CANDIDATES = 256
"""The most sets of agents ``reference_agents`` weighs (intersections stop being added past it)."""


def reference_agents(evals: Mapping[int, Evals]) -> frozenset[str]:
    """The agents versions are compared over. Of the sets of agents that evaluated a version,
    and their intersections, the one that compares the most evaluations: its size times the
    versions all of it evaluated; a tie goes to more agents, then to the newer versions. A cloud
    that stops reporting (it left, or its DP budget for eval losses is spent) thus stops holding
    back the newer versions once they outnumber the older ones it evaluated, and one that joins
    late counts once it has evaluated enough versions; versions are never compared over
    different clouds' text (empty for no evaluations)."""
    seen = {frozenset(e) for e in evals.values() if e}
    candidates = set(seen)
    for a in sorted(seen, key=sorted):
        if len(candidates) >= MAX_CANDIDATES:
            break
        candidates.update(a & b for b in list(candidates) if a & b)

    def score(agents: frozenset[str]) -> tuple[int, int, int, tuple[str, ...]]:
        covered = [v for v, e in evals.items() if agents <= e.keys()]
        return (len(agents) * len(covered), len(agents), max(covered), tuple(sorted(agents)))

    return max(candidates, key=score, default=frozenset())


def comparable(evals: Mapping[int, Evals], versions: Container[int]) -> dict[int, Evals]:
    """Those of ``versions`` that every reference agent evaluated, each with those agents'
    evaluations only, so that their losses compare."""
    scored = evaluated(evals, versions)
    agents = reference_agents(scored)
    return {v: {a: e[a] for a in sorted(agents)} for v, e in scored.items() if agents <= e.keys()}


NEIGHBOURS = 2
"""When the compared losses carry DP noise, each version's loss is averaged with those of up to
this many comparable versions on each side (in version order, pruned ones included) before the
versions are ranked: the lowest of many noisy losses is mostly the luckiest draw, and the loss
moves little from one version to the next."""
CONTENDER_SIGMAS = 2.0
"""...and only versions whose own loss is within this many deviations of the noise in its
difference from the lowest can come first, so averaging never overrules a clear lowest loss."""


class Standing(NamedTuple):
    """A comparable version's place in the ranking."""

    evals: Evals
    """The reference agents' evaluations of it."""
    loss: float
    """Their token-weighted loss (``weighted_loss``)."""
    score: float
    """Its loss averaged with its neighbours' (``NEIGHBOURS``; its own loss when no loss is noised)."""
    neighbours: int
    """How many other versions' losses ``score`` averages in."""
    contender: bool
    """Whether its loss is within ``CONTENDER_SIGMAS`` noise deviations of the lowest."""


def standings(committed: Sequence[int], evals: Mapping[int, Evals]) -> dict[int, Standing]:
    """The ``comparable`` ones of the ``committed`` versions, each with its score."""
    compared = comparable(evals, set(committed))
    if not compared:
        return {}
    agents = next(iter(compared.values())).keys()
    trajectory = sorted(v for v, e in evals.items() if agents <= e.keys())
    position = {v: at for at, v in enumerate(trajectory)}
    loss = {v: weighted_loss({a: evals[v][a] for a in agents}) for v in trajectory}
    noised = any(loss_stddev(e) for e in compared.values())
    lowest = min(compared, key=lambda v: (loss[v], v))
    result = {}
    for v, e in compared.items():
        at = position[v]
        window = trajectory[max(0, at - NEIGHBOURS) : at + NEIGHBOURS + 1] if noised else [v]
        margin = CONTENDER_SIGMAS * math.hypot(loss_stddev(e), loss_stddev(compared[lowest]))
        score = sum(loss[w] for w in window) / len(window)
        result[v] = Standing(e, loss[v], score, len(window) - 1, loss[v] <= loss[lowest] + margin)
    return result


def _order(standing: Standing, version: int) -> tuple[bool, float, int]:
    """Contenders first, then by score, then the older."""
    return (not standing.contender, standing.score, version)


def best(committed: Sequence[int], evals: Mapping[int, Evals]) -> tuple[int, str] | None:
    """The best of the ``committed`` versions (``ranked`` first) and why, or None when none of
    them has evaluations."""
    ranking = standings(committed, evals)
    if not ranking:
        return None
    version = min(ranking, key=lambda v: _order(ranking[v], v))
    chosen = ranking[version]
    over = f"compared over the {len(chosen.evals)} agent(s) that evaluated them all"
    lowest = min(ranking, key=lambda v: (ranking[v].loss, v))
    if version == lowest:  # averaging changed nothing
        return version, (
            f"the lowest token-weighted eval loss ({describe(chosen.evals)}) of the {len(ranking)}"
            f" version(s) {over}"
        )
    contenders = sum(s.contender for s in ranking.values())
    return version, (
        f"the mean of its eval loss ({describe(chosen.evals)}) and those of {chosen.neighbours}"
        f" neighbouring version(s), {chosen.score:.4f}, is the lowest of the {contenders} version(s)"
        f" within {CONTENDER_SIGMAS:g} noise deviations of the lowest loss, of {len(ranking)} {over}"
    )


def ranked(committed: Sequence[int], evals: Mapping[int, Evals]) -> list[int]:
    """The committed versions that have evaluations, best first: those ``comparable`` by the
    reference agents in ``standings`` order (by the lowest token-weighted eval loss, averaged
    over neighbouring versions when noised, contenders first), then the older; then the others
    (a version only the agents with the easiest text evaluated cannot win), by the agents that
    evaluated them, most first, then by their loss."""
    scored = evaluated(evals, set(committed))
    ranking = standings(committed, evals)
    leading = sorted(ranking, key=lambda v: _order(ranking[v], v))
    rest = sorted(set(scored) - set(ranking), key=lambda v: (-len(scored[v]), weighted_loss(scored[v]), v))
    return leading + rest
