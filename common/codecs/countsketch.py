"""``countsketch``: a count sketch with hashes shared by every agent (FetchSGD, Rothchild et al. 2020).
Linear: the sketch of a sum is the sum of sketches, so it works under secure aggregation.

The hashes of each block of ``BLOCK`` coordinates are drawn from the federation's seed and the
block's index when needed, so memory stays O(block) whatever the model size. ``decode`` is the
median-of-rows unsketch, good for heavy hitters; the aggregator does not decode a round's sum
directly but runs FetchSGD's loop over it (``server.fetchsgd``: momentum and error accumulation
in sketch space, top-k of the unsketched error).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from common.codecs.base import Codec
from common.errors import ConfigError, InvalidArgument

BLOCK = 1 << 18


class CountSketch(Codec):
    """``rows`` x ``cols`` sketch; ``cols`` chosen so that the sketch is ``ratio`` times smaller."""

    name = "countsketch"
    linear = True

    def __init__(self, numel: int, ratio: float, seed: int, rows: int = 5) -> None:
        if not ratio >= 1:
            raise ConfigError(f"countsketch ratio must be >= 1, got {ratio}")
        if rows < 1:
            raise ConfigError("countsketch needs at least one row")
        self.numel, self.rows, self.seed = numel, rows, seed
        self.cols = max(1, round(numel / ratio / rows))

    def _hashes(self) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
        """(block, flat cell index per row and coordinate, sign per row and coordinate), block by block."""
        offsets = (np.arange(self.rows, dtype=np.int64) * self.cols)[:, None]
        for index, start in enumerate(range(0, self.numel, BLOCK)):
            size = min(BLOCK, self.numel - start)
            key = [self.seed, self.numel, self.rows, self.cols, index]
            rng = np.random.default_rng(np.random.SeedSequence(key))
            cells = rng.integers(0, self.cols, size=(self.rows, size), dtype=np.int64) + offsets
            signs = rng.integers(0, 2, size=(self.rows, size), dtype=np.int8).astype(np.float32) * 2 - 1
            yield slice(start, start + size), cells, signs

    def encode(self, vector: np.ndarray) -> np.ndarray:
        """The sketch, flattened (rows * cols float32)."""
        flat = vector.reshape(-1).astype(np.float32)
        if flat.size != self.numel:
            raise InvalidArgument(f"{flat.size} values given; the codec was built for {self.numel}")
        sketch = np.zeros(self.rows * self.cols, dtype=np.float64)
        for block, cells, signs in self._hashes():
            sketch += np.bincount(
                cells.reshape(-1), weights=(signs * flat[block]).reshape(-1), minlength=sketch.size
            )
        return sketch.astype(np.float32)

    def decode(self, payload: np.ndarray) -> np.ndarray:
        """Median-of-rows estimate of every coordinate (unsketch)."""
        sketch = np.asarray(payload, dtype=np.float32).reshape(-1)
        if sketch.size != self.rows * self.cols:
            raise InvalidArgument(f"sketch of {sketch.size} values, expected {self.rows * self.cols}")
        out = np.empty(self.numel, dtype=np.float32)
        for block, cells, signs in self._hashes():
            out[block] = np.median(sketch[cells] * signs, axis=0)
        return out

    def payload_bytes(self, numel: int) -> int:
        """float32 sketch cells."""
        return 4 * self.rows * self.cols

    def coordinates(self, numel: int) -> int:
        """Sketch cells."""
        return self.rows * self.cols
