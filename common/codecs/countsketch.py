"""``countsketch``: a count sketch with hashes shared by every agent (FetchSGD, Rothchild et al. 2020).
Linear: the sketch of a sum is the sum of sketches, so it works under secure aggregation.

Decoding here is the median-of-rows unsketch, good for heavy hitters. The FetchSGD server loop
(momentum and error accumulation in sketch space, top-k of the unsketched error) is not here
yet: a first version diverged on dense updates when it applied the sketch's estimates, so it
needs FetchSGD's second pass that fetches exact values of the chosen coordinates.
"""

from __future__ import annotations

import numpy as np

from common.codecs.base import Codec
from common.errors import ConfigError, InvalidArgument


class CountSketch(Codec):
    """``rows`` x ``cols`` sketch; ``cols`` chosen so that the sketch is ``ratio`` times smaller."""

    name = "countsketch"
    linear = True

    def __init__(self, numel: int, ratio: float, seed: int, rows: int = 5) -> None:
        if not ratio >= 1:
            raise ConfigError(f"countsketch ratio must be >= 1, got {ratio}")
        if rows < 1:
            raise ConfigError("countsketch needs at least one row")
        self.numel, self.rows = numel, rows
        self.cols = max(1, round(numel / ratio / rows))
        rng = np.random.default_rng(np.random.SeedSequence([seed, numel, rows, self.cols]))  # public hashes
        self.buckets = rng.integers(0, self.cols, size=(rows, numel), dtype=np.int64)
        self.signs = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(rows, numel))
        self._flat = self.buckets + (np.arange(rows)[:, None] * self.cols)

    def encode(self, vector: np.ndarray) -> np.ndarray:
        """The sketch, flattened (rows * cols float32)."""
        flat = vector.reshape(-1).astype(np.float32)
        if flat.size != self.numel:
            raise InvalidArgument(f"{flat.size} values given; the codec was built for {self.numel}")
        weights = (self.signs * flat).reshape(-1)
        return np.bincount(self._flat.reshape(-1), weights=weights, minlength=self.rows * self.cols).astype(
            np.float32
        )

    def decode(self, payload: np.ndarray) -> np.ndarray:
        """Median-of-rows estimate of every coordinate (unsketch)."""
        sketch = np.asarray(payload, dtype=np.float32).reshape(-1)
        if sketch.size != self.rows * self.cols:
            raise InvalidArgument(f"sketch of {sketch.size} values, expected {self.rows * self.cols}")
        estimates = sketch[self._flat] * self.signs
        median: np.ndarray = np.median(estimates, axis=0).astype(np.float32)
        return median

    def payload_bytes(self, numel: int) -> int:
        """float32 sketch cells."""
        return 4 * self.rows * self.cols
