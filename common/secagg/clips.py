"""Adaptive clipping for the fixed-point ring: one clip bound per segment of coordinates.

A single clip for every coordinate wastes the few bits a narrow ring has: LoRA's A and B
matrices, layers and codec coordinates differ in scale by orders of magnitude, so a clip that
spares the largest leaves the smallest a fraction of one step. Here each segment of ``segment``
consecutive coordinates gets ``multiple`` times the RMS of that segment in the previous round's
aggregate (public: every participant receives the model it produced). Agents divide by the
bound before fixed point (a unit clip) and the aggregator multiplies the decoded mean back:
a shared diagonal scaling, so sums still decode. ``bench/quality.py`` measures the gain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.errors import ConfigError, InvalidArgument

FLOOR = 1e-3
"""A segment's bound is at least this fraction of the largest one (an all-zero segment must not
divide by zero, and its coordinates may move next round)."""


@dataclass(frozen=True)
class SegmentClips:
    """Clip bounds: coordinate i is clipped at ``bounds[i // segment]``."""

    segment: int
    bounds: np.ndarray

    def __post_init__(self) -> None:
        if self.segment < 1:
            raise ConfigError(f"clip segment must be >= 1, got {self.segment}")
        bounds = np.asarray(self.bounds)
        if bounds.ndim != 1 or bounds.size == 0:
            raise InvalidArgument("segment clips must be a non-empty vector")
        if not (np.all(np.isfinite(bounds)) and np.all(bounds > 0)):
            raise InvalidArgument("segment clips must be positive and finite")

    @classmethod
    def uniform(cls, count: int, segment: int, clip: float) -> SegmentClips:
        """The same bound everywhere (the first round, before any aggregate exists)."""
        return cls(segment, np.full(segments(count, segment), clip, dtype=np.float32))

    @classmethod
    def from_aggregate(cls, aggregate: np.ndarray, segment: int, multiple: float) -> SegmentClips:
        """``multiple`` x the RMS of each segment of ``aggregate`` (floored, see ``FLOOR``)."""
        if not (multiple > 0 and np.isfinite(multiple)):
            raise ConfigError(f"adaptive clip multiple must be positive, got {multiple}")
        flat = np.asarray(aggregate, dtype=np.float64).reshape(-1)
        if flat.size == 0 or not np.all(np.isfinite(flat)):
            raise InvalidArgument("the aggregate to derive clips from must be finite and non-empty")
        count = segments(flat.size, segment)
        padded = np.zeros(count * segment)
        padded[: flat.size] = flat
        sizes = np.full(count, segment, dtype=np.float64)
        sizes[-1] = flat.size - (count - 1) * segment
        rms = np.sqrt((padded.reshape(count, segment) ** 2).sum(axis=1) / sizes)
        top = float(rms.max())
        if not top > 0:
            raise InvalidArgument("the aggregate is all zeros: no scale to clip at")
        return cls(segment, (multiple * np.maximum(rms, FLOOR * top)).astype(np.float32))

    def check(self, count: int) -> None:
        """InvalidArgument unless these bounds cover exactly ``count`` coordinates."""
        if self.bounds.size != segments(count, self.segment):
            raise InvalidArgument(
                f"{self.bounds.size} segment clips of {self.segment} do not cover {count} coordinates"
            )

    def per_coordinate(self, count: int) -> np.ndarray:
        """The bound of every coordinate (float32, ``count`` values)."""
        self.check(count)
        return np.repeat(self.bounds.astype(np.float32), self.segment)[:count]

    def scale_down(self, values: np.ndarray) -> np.ndarray:
        """Values over their bounds (what the unit-clip fixed point encodes)."""
        scaled: np.ndarray = values.reshape(-1) / self.per_coordinate(values.size)
        return scaled.astype(np.float32)

    def scale_up(self, values: np.ndarray) -> np.ndarray:
        """Decoded (summed or mean) scaled values back to update units."""
        scaled: np.ndarray = values.reshape(-1) * self.per_coordinate(values.size)
        return scaled.astype(np.float32)


def segments(count: int, segment: int) -> int:
    """Segments covering ``count`` coordinates."""
    if count < 1:
        raise InvalidArgument(f"no coordinates to clip ({count})")
    return -(-count // segment)
