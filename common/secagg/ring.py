"""Fixed point in Z_2^m (m <= 32): shared clip bound, stochastic rounding, a checked headroom rule.

Arithmetic runs in uint32 (mod 2^32) everywhere; because 2^m divides 2^32, reducing a masked code
mod 2^m keeps the masks uniform and the sums right. So only the low ``ring_bits`` bits of each
masked code go on the wire, and the unmasked sum is read mod 2^m. A round's ring is the least
width no sum of its n invited agents can wrap, bits + ceil(log2 n), and the codes use all of it:
each agent's codes run 0 .. floor((2^m - 1) / n) (``max_code``), at least 2^bits - 1, so when n is
not a power of two the same bytes carry finer steps. The configuration check keeps DESIGN's rule,
bits + ceil(log2 max_agents) + 1 <= 32.
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
WEIGHT_BITS = 24  # precision of a masked update's weight, whatever the codes' bits


def ring_bits(bits: int, agents: int) -> int:
    """The least bits per masked coordinate in which a sum over ``agents`` cannot wrap: n codes of
    at most 2^bits - 1 sum to less than 2^(bits + ceil(log2 n))."""
    if not 2 <= bits <= 30:
        raise ConfigError(f"secagg bits must be in 2..30, got {bits}")
    if agents < 1:
        raise ConfigError(f"secagg needs at least one agent, got {agents}")
    return bits + (agents - 1).bit_length()


def round_ring(bits: int, agents: int) -> tuple[int, int]:
    """(ring_bits, max_code) of a round with ``agents`` invited agents: the least ring, and the
    largest code each may send so that their sum stays below 2^ring_bits (at least 2^bits - 1)."""
    ring = ring_bits(bits, agents)
    return ring, max((1 << bits) - 1, ((1 << ring) - 1) // agents)


def check_headroom(bits: int, agents: int) -> None:
    """Refuse settings whose sum over ``agents`` could wrap: bits + ceil(log2 n) + 1 <= 32."""
    need = ring_bits(bits, agents) + 1
    if need > RING_BITS:
        raise ConfigError(
            f"secagg headroom: bits ({bits}) + ceil(log2 {agents} agents) + 1 = {need} > {RING_BITS};"
            " lower bits or max_agents"
        )


@dataclass(frozen=True)
class FixedPoint:
    """Maps [-clip, clip] onto the integers 0 .. ``levels`` (values outside are clipped); sums live
    in Z_2^ring_bits. ``max_code`` 0 means 2^bits - 1; the weight's digits are base 2^bits always."""

    clip: float
    bits: int
    ring_bits: int = RING_BITS
    max_code: int = 0

    def __post_init__(self) -> None:
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ConfigError(f"secagg clip must be positive, got {self.clip}")
        check_headroom(self.bits, 1)
        if not self.bits <= self.ring_bits <= RING_BITS:
            raise ConfigError(f"secagg ring_bits must be in {self.bits}..{RING_BITS}, got {self.ring_bits}")
        if self.max_code and not (1 << self.bits) - 1 <= self.max_code < 1 << self.ring_bits:
            raise ConfigError(
                f"secagg max_code must be in {(1 << self.bits) - 1}..{(1 << self.ring_bits) - 1}, "
                f"got {self.max_code}"
            )

    def contributors_fit(self, agents: int) -> bool:
        """Whether a sum of ``agents`` codes stays below 2^ring_bits (cannot wrap)."""
        return agents * self.levels < 1 << self.ring_bits

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
        """The largest code: ``max_code``, or 2^bits - 1."""
        return self.max_code or (1 << self.bits) - 1

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

    @property
    def weight_digits(self) -> int:
        """Coordinates that carry an update's weight: the base-2^bits digits of a WEIGHT_BITS-bit
        fixed-point number, so the summed weight is exact to 2^-WEIGHT_BITS even at 2 bits."""
        return -(-WEIGHT_BITS // self.bits)

    def masked_length(self, coordinates: int) -> int:
        """Codes in a masked update of ``coordinates`` values: the values, then the weight's digits."""
        return coordinates + self.weight_digits

    def encode_weighted(
        self, values: np.ndarray, weight: float, rng: np.random.Generator, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Codes of ``weight * values`` (stochastically rounded), then the weight (in (0, 1]) as
        ``weight_digits`` digits; each digit is at most 2^bits - 1 <= ``levels``, so digit sums
        cannot wrap."""
        if not 0 < weight <= 1:
            raise InvalidArgument(f"a masked update's weight must be in (0, 1], got {weight}")
        count = values.size
        length = self.masked_length(count)
        out = np.empty(length, dtype=RING_DTYPE) if out is None else out
        if out.size != length:
            raise InvalidArgument(f"{out.size} codes for {count} values, expected {length}")
        weighted = np.multiply(values.reshape(-1), weight, dtype=np.float32)
        self.encode(weighted, rng, out[:count])
        integer = round(weight * self._weight_scale)
        digit = (1 << self.bits) - 1
        out[count:] = [(integer >> (self.bits * i)) & digit for i in range(self.weight_digits)]
        return out

    def decode_weighted_mean(self, total: np.ndarray, contributors: int) -> tuple[np.ndarray, float]:
        """(weighted mean as float32, summed weight) from the ring sum of ``encode_weighted`` codes."""
        count = total.size - self.weight_digits
        if count < 0:
            raise InvalidArgument(f"a masked sum of {total.size} codes has no room for the weight")
        digits = total[count:] & np.uint32((1 << self.ring_bits) - 1)
        weight = sum(int(d) << (self.bits * i) for i, d in enumerate(digits)) / self._weight_scale
        if not weight > 0:
            raise InvalidArgument(f"summed weight must be positive, got {weight}")
        codes = total[:count]
        mean = np.empty(count, dtype=np.float32)
        for start in range(0, mean.size, DECODE_BLOCK):
            block = slice(start, start + DECODE_BLOCK)
            mean[block] = self.decode_sum(codes[block], contributors) / weight
        return mean, weight

    @property
    def _weight_scale(self) -> int:
        return (1 << (self.bits * self.weight_digits)) - 1

    def decode_sum(self, total: np.ndarray, contributors: int) -> np.ndarray:
        """The float64 sum of ``contributors`` decoded vectors from their summed codes (mod 2^ring_bits)."""
        if self.ring_bits < RING_BITS:
            total = total & np.uint32((1 << self.ring_bits) - 1)
        out = total.astype(np.float64)
        out *= self.step
        out -= contributors * self.clip
        return out
