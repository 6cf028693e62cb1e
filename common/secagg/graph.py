"""Who masks with whom: the full graph, or a random k-regular (Harary) graph from a public seed."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from common.errors import ConfigError


def check_parameters(agents: int, neighbours: int, threshold: int, colluders: int = 0) -> None:
    """Refuse graphs that cannot be secure or cannot recover: t above half of the k + 1 agents that
    hold each agent's shares (itself included) plus ``colluders``, and t <= k + 1.

    Each honest holder reveals one kind of share for a peer, as the survivor list it is sent says,
    and an agent colluding with the aggregator reveals both: an aggregator that tells some honest
    holders an agent dropped and the others that it survived gets t shares of both its secrets (so
    its update) unless 2t > k + 1 + colluders (Bonawitz et al. 2017: t > (n + n_C) / 2)."""
    k = share_holders(agents, neighbours) - 1
    if k < 1:
        raise ConfigError("secure aggregation needs at least 2 agents")
    if colluders < 0:
        raise ConfigError(f"secagg colluders must be >= 0, got {colluders}")
    least = majority(k + 1, colluders)
    if threshold < least:
        against = f" and {colluders} colluding with the aggregator" if colluders else ""
        raise ConfigError(
            f"secagg threshold {threshold} must be more than half of the {k + 1} agents holding each"
            f" agent's shares{against} (at least {least}): with fewer, an aggregator that gives holders"
            " different survivor lists can collect both of an agent's secrets"
        )
    if threshold > k + 1:
        raise ConfigError(f"secagg threshold {threshold} exceeds the {k} neighbours plus the agent itself")


def share_holders(agents: int, neighbours: int) -> int:
    """Agents holding each agent's shares, itself included: all n with the full graph (``neighbours``
    0 or >= n - 1), else k + 1."""
    return agents if neighbours <= 0 or neighbours >= agents - 1 else neighbours + 1


def majority(holders: int, colluders: int = 0) -> int:
    """The least safe threshold: more than half of ``holders`` plus ``colluders``."""
    return (holders + colluders) // 2 + 1


def neighbours(ids: Sequence[str], k: int, seed: bytes) -> dict[str, frozenset[str]]:
    """Each agent's neighbours. ``k`` = 0 or >= n - 1: everyone; else a Harary graph H(k, n) over a
    permutation drawn from ``seed`` (odd k with odd n rounds k up to stay regular)."""
    ordered = sorted(ids)
    n = len(ordered)
    if k <= 0 or k >= n - 1:
        return {a: frozenset(b for b in ordered if b != a) for a in ordered}
    if k % 2 == 1 and n % 2 == 1:
        k += 1
    # The permutation: order by a hash of (seed, id), the same in every process and Python version.
    ring = sorted(
        ordered, key=lambda a: hashlib.sha256(b"cloudfed-secagg-graph" + seed + a.encode()).digest()
    )
    adj: dict[str, set[str]] = {a: set() for a in ring}
    for i, a in enumerate(ring):
        for d in range(1, k // 2 + 1):
            b = ring[(i + d) % n]
            adj[a].add(b)
            adj[b].add(a)
        if k % 2 == 1:
            b = ring[(i + n // 2) % n]
            adj[a].add(b)
            adj[b].add(a)
    return {a: frozenset(v) for a, v in adj.items()}
