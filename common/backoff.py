"""Exponential backoff with full jitter (AWS architecture blog), bounded in count."""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff_delays(
    initial_s: float = 0.5, maximum_s: float = 30.0, factor: float = 2.0, rng: random.Random | None = None
) -> Iterator[float]:
    """Endless delays: uniform in [0, min(maximum, initial * factor**n)]."""
    rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
    ceiling = initial_s
    while True:
        yield rng.uniform(0, ceiling)
        ceiling = min(maximum_s, ceiling * factor)
