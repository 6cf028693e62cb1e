"""When a federation is finished: a version budget, or early stopping on the agents' eval losses."""

from __future__ import annotations

from collections.abc import Mapping

from common.config import RoundsConfig
from server.version_ranking import Evals, evaluated, weighted_loss


def finish_reason(global_version: int, evals: Mapping[int, Evals], rounds: RoundsConfig) -> str | None:
    """Why no round should start again, or None. Early stopping looks at the versions evaluated
    by the most agents, in order: the best is the first whose token-weighted loss is lower than
    every earlier one's by more than ``early_stop_min_delta``; the federation is finished once
    ``early_stop_patience`` such versions came after it."""
    if rounds.max_versions and global_version >= rounds.max_versions:
        return f"reached rounds.max_versions = {rounds.max_versions} (version {global_version})"
    if not rounds.early_stop_patience:
        return None
    scored = evaluated(evals, range(global_version + 1))
    if not scored:
        return None
    most = max(len(e) for e in scored.values())
    compared = sorted(v for v, e in scored.items() if len(e) == most)
    best, best_loss = compared[0], weighted_loss(scored[compared[0]])
    for v in compared[1:]:
        if weighted_loss(scored[v]) < best_loss - rounds.early_stop_min_delta:
            best, best_loss = v, weighted_loss(scored[v])
    since = [v for v in compared if v > best]
    if len(since) < rounds.early_stop_patience:
        return None
    return (
        f"early stopping: no eval loss below {best_loss:.4f} (version {best}) in the {len(since)} versions "
        f"evaluated since (rounds.early_stop_patience = {rounds.early_stop_patience}, "
        f"min_delta {rounds.early_stop_min_delta:g})"
    )
