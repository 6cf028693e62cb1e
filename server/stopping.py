"""When a federation is finished: a version budget, or early stopping on the agents' eval losses."""

from __future__ import annotations

import math
from collections.abc import Mapping

from common.config import RoundsConfig
from server.version_ranking import Evals, comparable, describe, loss_stddev, weighted_loss


def finish_reason(global_version: int, evals: Mapping[int, Evals], rounds: RoundsConfig) -> str | None:
    """Why no round should start again, or None. Early stopping looks at the ``comparable``
    versions (over the reference agents), in order: the best is the first whose token-weighted
    loss is lower than every earlier one's by more than ``early_stop_min_delta``, plus
    ``early_stop_noise_sigmas`` times the deviation of the difference's DP noise; the federation
    is finished once ``early_stop_patience`` such versions came after it."""
    if rounds.max_versions and global_version >= rounds.max_versions:
        return f"reached rounds.max_versions = {rounds.max_versions} (version {global_version})"
    if not rounds.early_stop_patience:
        return None
    scored = comparable(evals, range(global_version + 1))
    if not scored:
        return None
    compared = sorted(scored)
    best = compared[0]
    for v in compared[1:]:
        margin = improvement(scored[best], scored[v], rounds)
        if weighted_loss(scored[v]) < weighted_loss(scored[best]) - margin:
            best = v
    since = [v for v in compared if v > best]
    if len(since) < rounds.early_stop_patience:
        return None
    noise = max(loss_stddev(scored[v]) for v in compared)
    noised = f", eval losses noised by differential privacy (deviation up to {noise:.2g})" if noise else ""
    return (
        f"early stopping: no eval loss below {describe(scored[best])} (version {best}) in the {len(since)}"
        f" versions evaluated since (rounds.early_stop_patience = {rounds.early_stop_patience}, "
        f"min_delta {rounds.early_stop_min_delta:g}, noise_sigmas {rounds.early_stop_noise_sigmas:g}{noised})"
    )


def improvement(best: Evals, later: Evals, rounds: RoundsConfig) -> float:
    """How much lower ``later``'s loss must be than ``best``'s to count as an improvement:
    ``early_stop_min_delta`` plus ``early_stop_noise_sigmas`` deviations of the noise in the
    difference of the two (the versions' noise is independent)."""
    noise = math.hypot(loss_stddev(best), loss_stddev(later))
    return rounds.early_stop_min_delta + rounds.early_stop_noise_sigmas * noise
