"""Fixed point in Z_2^32: shared clip bound, stochastic rounding, a checked headroom rule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.errors import ConfigError, InvalidArgument

RING_BITS = 32
RING_DTYPE = np.dtype("<u4")
BLOCK = 1 << 20  # elements per step: bounds the float64 temporaries
DECODE_BLOCK = 1 << 16  # decode steps stay small: the aggregator's peak is the sum plus the mean


def check_headroom(bits: int, agents: int) -> None:
    """Refuse settings whose sum over ``agents`` could wrap: bits + ceil(log2 n) + 1 <= 32."""
    if not 2 <= bits <= 30:
        raise ConfigError(f"secagg bits must be in 2..30, got {bits}")
    if agents < 1:
        raise ConfigError(f"secagg needs at least one agent, got {agents}")
    need = bits + math.ceil(math.log2(agents)) + 1 if agents > 1 else bits + 1
    if need > RING_BITS:
        raise ConfigError(
            f"secagg headroom: bits ({bits}) + ceil(log2 {agents} agents) + 1 = {need} > {RING_BITS};"
            " lower bits or max_agents"
        )


@dataclass(frozen=True)
class FixedPoint:
    """Maps [-clip, clip] onto the integers 0 .. 2^bits - 1 (values outside are clipped)."""

    clip: float
    bits: int

    def __post_init__(self) -> None:
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ConfigError(f"secagg clip must be positive, got {self.clip}")
        check_headroom(self.bits, 1)

    @property
    def levels(self) -> int:
        """The largest code, 2^bits - 1."""
        return (1 << self.bits) - 1

    @property
    def step(self) -> float:
        """Value of one code step."""
        return 2 * self.clip / self.levels

    def encode(
        self, values: np.ndarray, rng: np.random.Generator, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Stochastically rounded codes (unbiased inside the clip range) as uint32."""
        flat = values.reshape(-1)
        if not np.all(np.isfinite(flat)):
            raise InvalidArgument("update contains NaN or infinite values")
        out = np.empty(flat.size, dtype=RING_DTYPE) if out is None else out
        scale = self.levels / (2 * self.clip)
        for start in range(0, flat.size, BLOCK):
            x = np.clip(flat[start : start + BLOCK].astype(np.float64), -self.clip, self.clip)
            x += self.clip
            x *= scale
            x += rng.random(x.size)
            np.floor(x, out=x)
            np.minimum(x, self.levels, out=x)
            out[start : start + x.size] = x
        return out

    def encode_weighted(
        self, values: np.ndarray, weight: float, rng: np.random.Generator, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Codes of ``[weight * values, weight * clip]``: the update weighted before encoding, and the
        weight (in (0, 1]) as one more coordinate, scaled into the clip range."""
        if not 0 < weight <= 1:
            raise InvalidArgument(f"a masked update's weight must be in (0, 1], got {weight}")
        payload = np.empty(values.size + 1, dtype=np.float32)
        np.multiply(values.reshape(-1), weight, out=payload[:-1], casting="same_kind")
        payload[-1] = weight * self.clip
        return self.encode(payload, rng, out)

    def decode_weighted_mean(self, total: np.ndarray, contributors: int) -> tuple[np.ndarray, float]:
        """(weighted mean as float32, summed weight) from the ring sum of ``encode_weighted`` codes."""
        weight = float(self.decode_sum(total[-1:], contributors)[0]) / self.clip
        if not weight > 0:
            raise InvalidArgument(f"summed weight must be positive, got {weight}")
        codes = total[:-1]
        mean = np.empty(codes.size, dtype=np.float32)
        for start in range(0, mean.size, DECODE_BLOCK):
            block = slice(start, start + DECODE_BLOCK)
            mean[block] = self.decode_sum(codes[block], contributors) / weight
        return mean, weight

    def decode_sum(self, total: np.ndarray, contributors: int) -> np.ndarray:
        """The float64 sum of ``contributors`` decoded vectors from their summed codes."""
        out = total.astype(np.float64)
        out *= self.step
        out -= contributors * self.clip
        return out
