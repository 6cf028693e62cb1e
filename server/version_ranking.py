"""Global versions ranked by the agents' evaluations (``export --version best``, retention)."""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence

Evals = Mapping[str, tuple[float, int]]
"""{agent: (eval loss, tokens)} of one version."""


def weighted_loss(evals: Evals) -> float:
    """The federation's held-out loss of a version: the agents' losses weighted by their tokens."""
    weights = {agent: max(tokens, 1) for agent, (_, tokens) in evals.items()}
    return sum(loss * weights[a] for a, (loss, _) in evals.items()) / sum(weights.values())


def evaluated(evals: Mapping[int, Evals], versions: Container[int]) -> dict[int, Evals]:
    """The evaluations of those of ``versions`` that have any."""
    return {v: e for v, e in evals.items() if e and v in versions}


def ranked(committed: Sequence[int], evals: Mapping[int, Evals]) -> list[int]:
    """The committed versions that have evaluations, best first: those evaluated by more agents
    first (a version only the agents with the easiest text evaluated cannot win), then by the
    lowest token-weighted eval loss, then the older."""
    scored = evaluated(evals, set(committed))
    return sorted(scored, key=lambda v: (-len(scored[v]), weighted_loss(scored[v]), v))
