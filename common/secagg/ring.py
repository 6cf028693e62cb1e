"""Fixed point in Z_2^m (m <= 32): shared clip bound, stochastic rounding, a checked headroom rule.

Arithmetic runs in uint32 (mod 2^32) everywhere; because 2^m divides 2^32, reducing a masked code
mod 2^m keeps the masks uniform and the sums right. So only the low ``ring_bits`` bits of each
masked code go on the wire, and the unmasked sum is read mod 2^m. ``ring_bits`` is the least
width no sum can wrap: bits + ceil(log2 max_agents) + 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common import bitpack
from common.errors import ConfigError, InvalidArgument

RING_BITS = 32
RING_DTYPE = np.dtype("<u4")
BLOCK = 1 << 20  # elements per step: bounds the float64 temporaries
DECODE_BLOCK = 1 << 16  # decode steps stay small: the aggregator's peak is the sum plus the mean


def ring_bits(bits: int, agents: int) -> int:
    """Bits per masked coordinate so that a sum over ``agents`` cannot wrap."""
    if not 2 <= bits <= 30:
        raise ConfigError(f"secagg bits must be in 2..30, got {bits}")
    if agents < 1:
        raise ConfigError(f"secagg needs at least one agent, got {agents}")
    return bits + math.ceil(math.log2(agents)) + 1 if agents > 1 else bits + 1


def check_headroom(bits: int, agents: int) -> None:
    """Refuse settings whose sum over ``agents`` could wrap: bits + ceil(log2 n) + 1 <= 32."""
    need = ring_bits(bits, agents)
    if need > RING_BITS:
        raise ConfigError(
            f"secagg headroom: bits ({bits}) + ceil(log2 {agents} agents) + 1 = {need} > {RING_BITS};"
            " lower bits or max_agents"
        )


@dataclass(frozen=True)
class FixedPoint:
    """Maps [-clip, clip] onto the integers 0 .. 2^bits - 1 (values outside are clipped); sums live
    in Z_2^ring_bits."""

    clip: float
    bits: int
    ring_bits: int = RING_BITS

    def __post_init__(self) -> None:
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ConfigError(f"secagg clip must be positive, got {self.clip}")
        check_headroom(self.bits, 1)
        if not self.bits < self.ring_bits <= RING_BITS:
            raise ConfigError(
                f"secagg ring_bits must be in {self.bits + 1}..{RING_BITS}, got {self.ring_bits}"
            )

    def wire_bytes(self, count: int) -> int:
        """Bytes of ``count`` masked codes on the wire."""
        return bitpack.packed_bytes(count, self.ring_bits)

    def to_wire(self, codes: np.ndarray) -> bytes:
        """Masked codes (uint32) as sent: their low ``ring_bits`` bits, packed."""
        return bitpack.pack(codes, self.ring_bits)

    def from_wire(self, data: bytes | memoryview | np.ndarray, count: int) -> np.ndarray:
        """Codes (uint32) from the wire; InvalidArgument if the size is wrong."""
        return bitpack.unpack(data, self.ring_bits, count)

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
        """The float64 sum of ``contributors`` decoded vectors from their summed codes (mod 2^ring_bits)."""
        if self.ring_bits < RING_BITS:
            total = total & np.uint32((1 << self.ring_bits) - 1)
        out = total.astype(np.float64)
        out *= self.step
        out -= contributors * self.clip
        return out
