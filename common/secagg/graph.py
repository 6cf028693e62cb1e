"""Who masks with whom: the full graph, or a random k-regular (Harary) graph from a public seed."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from common.errors import ConfigError


def check_parameters(agents: int, neighbours: int, threshold: int) -> None:
    """Refuse graphs that cannot be secure or cannot recover: t a majority of the k + 1 agents that
    hold each agent's shares (itself included), and t <= k + 1.

    A majority because each holder reveals one kind of share for a peer, as the survivor list it
    is sent says: an aggregator that tells some holders an agent dropped and the others that it
    survived gets t shares of both its secrets (so its update) unless 2t > k + 1."""
    k = agents - 1 if neighbours == 0 or neighbours >= agents - 1 else neighbours
    if k < 1:
        raise ConfigError("secure aggregation needs at least 2 agents")
    if 2 * threshold <= k + 1:
        raise ConfigError(
            f"secagg threshold {threshold} must be a majority of the {k + 1} agents holding each agent's"
            f" shares (at least {(k + 1) // 2 + 1}): with fewer, an aggregator that gives holders"
            " different survivor lists can collect both of an agent's secrets"
        )
    if threshold > k + 1:
        raise ConfigError(f"secagg threshold {threshold} exceeds the {k} neighbours plus the agent itself")


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
