"""Fixed point in Z_2^m (m <= 32): shared clip bound, stochastic rounding, a checked headroom rule.

Arithmetic runs in uint32 (mod 2^32) everywhere; because 2^m divides 2^32, reducing a masked
element mod 2^m keeps the masks uniform and the sums right. So only the low ``ring_bits`` bits of
each masked element go on the wire, and the unmasked sum is read mod 2^m.

A sum of n agents' codes 0 .. L - 1 takes n(L - 1) + 1 values, and a masked coordinate cannot
cost less than log2 of that (each masked value is uniform over at least as many). One code per
ring element rounds that up to whole bits (4 agents at 4 levels: 13 values in 4 bits); so a round
packs ``group`` codes into one element as base-``base`` digits, base = n * max_code + 1, where no
digit's sum can carry into the next: the sum of packed elements is the packing of the summed
codes (4 agents at 4 levels: 7 codes in 26 bits, 3.71 bits each; at 3 levels 5 in 16, 3.2 bits).
``round_layout`` picks the cheapest group that fits 32 bits, then lets the codes fill what the
element holds. The configuration check keeps DESIGN's rule, n (L - 1) < 2^31 for max_agents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from common import bitpack
from common.errors import ConfigError, InvalidArgument

if TYPE_CHECKING:
    from common.secagg.strata import Uniforms

RING_BITS = 32
RING_DTYPE = np.dtype("<u4")
BLOCK = 1 << 20  # elements per step: bounds the float64 temporaries
DECODE_BLOCK = 1 << 16  # decode steps stay small: the aggregator's peak is the sum plus the mean
WEIGHT_BITS = 24  # precision of a masked update's weight, whatever the codes' bits


MAX_GROUP = 32  # codes packed into one element at most (a 2-level code with 1 agent: 32 bits)


def update_weight(num_examples: int, scale: float) -> float:
    """An agent's weight in (0, 1]: its examples over the round's largest count ``scale`` (the
    agent encodes it; with coverage the aggregator weighs elements by it)."""
    return min(1.0, max(num_examples, 1) / scale)


def ring_bits(bits: int, agents: int) -> int:
    """Bits per masked coordinate, one code an element, in which a sum over ``agents`` of codes
    up to 2^bits - 1 cannot wrap: bits + ceil(log2 n)."""
    if not 1 <= bits <= 30:
        raise ConfigError(f"secagg bits must be in 1..30, got {bits}")
    if agents < 1:
        raise ConfigError(f"secagg needs at least one agent, got {agents}")
    return bits + (agents - 1).bit_length()


def coordinate_bits(levels: int, agents: int) -> int:
    """Whole bits one masked coordinate needs alone: n (L - 1) in binary."""
    return (agents * (levels - 1)).bit_length()


def levels_bits(levels: int) -> int:
    """The widest power-of-two code range inside ``levels``: floor(log2 L) (the weight's digits)."""
    return levels.bit_length() - 1


@dataclass(frozen=True)
class RingLayout:
    """How a round's codes sit in ring elements: ``ring_bits`` an element, codes 0 .. ``max_code``,
    ``group`` of them an element as base-``base`` digits (base 0 when group is 1)."""

    ring_bits: int
    max_code: int
    base: int = 0
    group: int = 1


def _root_floor(value: int, k: int) -> int:
    """floor(value ** (1 / k)) for integers."""
    guess = math.floor(math.pow(value, 1.0 / k) + 0.5)
    while guess**k > value:
        guess -= 1
    while (guess + 1) ** k <= value:
        guess += 1
    return guess


def round_layout(levels: int, agents: int, pack: bool = True) -> RingLayout:
    """The cheapest layout for ``agents`` agents' codes of ``levels`` levels: the group of codes
    an element with the fewest bits a code (ties: the smaller group; without ``pack``: one code an
    element), then the largest codes whose sums still fit each digit (at least ``levels - 1``)."""
    check_headroom(levels, agents)
    sums = agents * (levels - 1) + 1  # values one coordinate's sum can take
    best_bits, best_group = (sums - 1).bit_length(), 1
    for group in range(2, MAX_GROUP + 1) if pack else ():
        width = (sums**group - 1).bit_length()
        if width > RING_BITS:
            break
        if width * best_group < best_bits * group:
            best_bits, best_group = width, group
    base = _root_floor(1 << best_bits, best_group)  # sums**group <= 2**bits, so base >= sums
    top = max(levels - 1, (base - 1) // agents)
    if best_group == 1:
        return RingLayout(best_bits, top)
    return RingLayout(best_bits, top, agents * top + 1, best_group)


def check_headroom(levels: int, agents: int) -> None:
    """Refuse settings whose sum over ``agents`` could not fit a 31-bit element: n (L - 1) < 2^31."""
    if levels < 2:
        raise ConfigError(f"secagg needs at least 2 code levels, got {levels}")
    if agents < 1:
        raise ConfigError(f"secagg needs at least one agent, got {agents}")
    need = coordinate_bits(levels, agents) + 1
    if need > RING_BITS:
        raise ConfigError(
            f"secagg headroom: {agents} agents' codes of {levels} levels need {need - 1} bits"
            f" + 1 > {RING_BITS}; lower bits (or levels) or max_agents"
        )


@dataclass(frozen=True)
class FixedPoint:
    """Maps [-clip, clip] onto the integers 0 .. ``levels`` (values outside are clipped); masked
    elements live in Z_2^ring_bits, each ``group`` codes as base-``base`` digits (``RingLayout``).
    ``max_code`` 0 means 2^bits - 1; the weight's digits are base 2^bits always."""

    clip: float
    bits: int
    ring_bits: int = RING_BITS
    max_code: int = 0
    base: int = 0
    group: int = 1
    weight_tail: bool = True
    """Whether an update ends with its weight's digits (not with coverage: ``coverage``)."""

    def __post_init__(self) -> None:
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ConfigError(f"secagg clip must be positive, got {self.clip}")
        if not 1 <= self.bits <= 30:
            raise ConfigError(f"secagg bits must be in 1..30, got {self.bits}")
        if not 1 <= self.ring_bits <= RING_BITS:
            raise ConfigError(f"secagg ring_bits must be in 1..{RING_BITS}, got {self.ring_bits}")
        if self.max_code and not (1 << self.bits) - 1 <= self.max_code < 1 << 31:
            raise ConfigError(
                f"secagg max_code must be in {(1 << self.bits) - 1}..{(1 << 31) - 1}, got {self.max_code}"
            )
        if not 1 <= self.group <= MAX_GROUP:
            raise ConfigError(f"secagg codes per element must be in 1..{MAX_GROUP}, got {self.group}")
        if self.group > 1 and not (self.levels < self.base and self.base**self.group <= 1 << self.ring_bits):
            raise ConfigError(
                f"secagg packing: {self.group} base-{self.base} digits of codes up to {self.levels}"
                f" do not fit a {self.ring_bits}-bit element"
            )
        if self.group == 1 and self.levels >= 1 << self.ring_bits:
            raise ConfigError(f"secagg codes up to {self.levels} do not fit a {self.ring_bits}-bit ring")

    def contributors_fit(self, agents: int) -> bool:
        """Whether a sum of ``agents`` codes cannot wrap its element or carry into the next digit."""
        return agents * self.levels < (self.base if self.group > 1 else 1 << self.ring_bits)

    @property
    def coordinate_bits(self) -> float:
        """Wire bits per code: the element's width over the codes it holds."""
        return self.ring_bits / self.group

    def wire_bytes(self, count: int) -> int:
        """Bytes of ``count`` masked elements on the wire."""
        return bitpack.packed_bytes(count, self.ring_bits)

    def to_wire(self, codes: np.ndarray) -> bytes:
        """Masked elements (uint32) as sent: their low ``ring_bits`` bits, packed."""
        return bitpack.pack(codes, self.ring_bits)

    def from_wire(self, data: bytes | memoryview | np.ndarray, count: int) -> np.ndarray:
        """Elements (uint32) from the wire; InvalidArgument if the size is wrong."""
        return bitpack.unpack(data, self.ring_bits, count)

    @property
    def levels(self) -> int:
        """The largest code: ``max_code``, or 2^bits - 1."""
        return self.max_code or (1 << self.bits) - 1

    @property
    def step(self) -> float:
        """Value of one code step."""
        return 2 * self.clip / self.levels

    def encode(self, values: np.ndarray, rng: Uniforms, out: np.ndarray | None = None) -> np.ndarray:
        """Stochastically rounded codes (unbiased inside the clip range) as uint32, one a value; the
        dithers come from ``rng`` in coordinate order (``strata.StratifiedUniforms``: correlated
        across the round's agents)."""
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
        fixed-point number, so the summed weight is exact to 2^-WEIGHT_BITS even at 1 bit. None
        without a weight tail."""
        return -(-WEIGHT_BITS // self.bits) if self.weight_tail else 0

    def masked_length(self, coordinates: int) -> int:
        """Elements in a masked update of ``coordinates`` values: the values' codes, then the
        weight's digits, ``group`` to an element (the last one padded with zero codes)."""
        return -(-(coordinates + self.weight_digits) // self.group)

    def encode_weighted(
        self, values: np.ndarray, weight: float, rng: Uniforms, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Elements holding the codes of ``weight * values`` (stochastically rounded), then the
        weight (in (0, 1]) as ``weight_digits`` digits; each digit is at most 2^bits - 1 <=
        ``levels``, so digit sums cannot wrap either."""
        if not 0 < weight <= 1:
            raise InvalidArgument(f"a masked update's weight must be in (0, 1], got {weight}")
        count = values.size
        length = self.masked_length(count)
        out = np.empty(length, dtype=RING_DTYPE) if out is None else out
        if out.size != length:
            raise InvalidArgument(f"{out.size} elements for {count} values, expected {length}")
        weighted = np.multiply(values.reshape(-1), weight, dtype=np.float32)
        integer = round(weight * self._weight_scale)
        digit = (1 << self.bits) - 1
        tail = np.array([(integer >> (self.bits * i)) & digit for i in range(self.weight_digits)], RING_DTYPE)
        if self.group == 1:
            self.encode(weighted, rng, out[:count])
            out[count:] = tail
            return out
        span = self.group * (BLOCK // self.group)  # codes per step, whole elements
        codes = np.zeros(span, dtype=RING_DTYPE)
        for first in range(0, length * self.group, span):
            stop = min(first + span, length * self.group)
            block = codes[: stop - first]
            block[:] = 0
            inside = min(stop, count) - first
            if inside > 0:
                self.encode(weighted[first : first + inside], rng, block[:inside])
            for i in range(max(first, count), min(stop, count + tail.size)):
                block[i - first] = tail[i - count]
            out[first // self.group : stop // self.group] = self._pack(block)
        return out

    def _pack(self, codes: np.ndarray) -> np.ndarray:
        """Each ``group`` codes as one element: sum of code_j * base^j (uint32, < 2^ring_bits)."""
        digits = codes.reshape(-1, self.group).astype(np.uint64)
        element = np.zeros(digits.shape[0], dtype=np.uint64)
        for j in range(self.group - 1, -1, -1):
            element *= np.uint64(self.base)
            element += digits[:, j]
        return element.astype(RING_DTYPE)

    def unpack(self, elements: np.ndarray) -> np.ndarray:
        """The digits (summed codes, uint32) of unmasked summed elements, ``group`` an element."""
        if self.ring_bits < RING_BITS:
            elements = elements & np.uint32((1 << self.ring_bits) - 1)
        if self.group == 1:
            return elements
        rest = elements.astype(np.uint64)
        digits = np.empty((elements.size, self.group), dtype=RING_DTYPE)
        base = np.uint64(self.base)
        for j in range(self.group):
            digits[:, j] = rest % base
            rest //= base
        if np.any(rest):
            raise InvalidArgument("a masked sum does not unpack: an element is beyond its digits")
        return digits.reshape(-1)

    def decode_weighted_mean(
        self, total: np.ndarray, contributors: int, coordinates: int | None = None
    ) -> tuple[np.ndarray, float]:
        """(weighted mean as float32, summed weight) from the ring sum of ``encode_weighted``
        elements of ``coordinates`` values (default: as many as fill them without padding)."""
        count = total.size * self.group - self.weight_digits if coordinates is None else coordinates
        if count < 0 or self.masked_length(count) != total.size:
            raise InvalidArgument(
                f"a masked sum of {total.size} elements does not hold {count} values and the weight"
            )
        # the weight's digits sit in the last elements: unpack just those first
        first = count // self.group
        digits = self.unpack(total[first:])[count - first * self.group :][: self.weight_digits]
        weight = sum(int(d) << (self.bits * i) for i, d in enumerate(digits)) / self._weight_scale
        if not weight > 0:
            raise InvalidArgument(f"summed weight must be positive, got {weight}")
        mean = np.empty(count, dtype=np.float32)
        span = self.group * max(1, DECODE_BLOCK // self.group)  # codes per step, whole elements
        for start in range(0, count, span):
            stop = min(start + span, count)
            elements = total[start // self.group : -(-stop // self.group)]
            sums = self.unpack(elements)[: stop - start]
            mean[start:stop] = self.decode_sum(sums, contributors) / weight
        return mean, weight

    @property
    def _weight_scale(self) -> int:
        return max(1, (1 << (self.bits * self.weight_digits)) - 1)

    def decode_sum(self, total: np.ndarray, contributors: int | np.ndarray) -> np.ndarray:
        """The float64 sum of ``contributors`` (a count, or one a coordinate) decoded vectors from
        their summed codes, one a coordinate (unpacked; reduced mod 2^ring_bits when one code is an
        element)."""
        if self.group == 1 and self.ring_bits < RING_BITS:
            total = total & np.uint32((1 << self.ring_bits) - 1)
        out = total.astype(np.float64)
        out *= self.step
        out -= contributors * self.clip
        return out
