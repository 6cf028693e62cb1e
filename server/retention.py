"""Checkpoint retention: which global versions keep their tensors on disk (``[checkpoints]``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from common.config import CheckpointsConfig
from server.checkpoints import CheckpointStore
from server.version_ranking import Evals, ranked


def to_prune(committed: Sequence[int], evals: Mapping[int, Evals], policy: CheckpointsConfig) -> list[int]:
    """The versions no rule keeps: not version 0, not the ``keep_last`` newest, not a multiple of
    ``keep_every``, not among the ``keep_best`` best evaluated. Nothing when ``keep_last`` is 0."""
    if not policy.keep_last or not committed:
        return []
    versions = sorted(committed)
    keep = {0, *versions[-policy.keep_last :]}
    if policy.keep_every:
        keep.update(v for v in versions if v % policy.keep_every == 0)
    keep.update(ranked(versions, evals)[: policy.keep_best])
    return [v for v in versions if v not in keep]


def prune(store: CheckpointStore, evals: Mapping[int, Evals], policy: CheckpointsConfig) -> list[int]:
    """Prune what ``to_prune`` names (and finish any prune a crash interrupted); return the versions."""
    victims = to_prune(store.versions(), evals, policy)
    for version in [*victims, *store.half_pruned()]:
        store.prune(version)
    return victims
