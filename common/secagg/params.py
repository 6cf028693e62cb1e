"""The secure-aggregation settings every party of a round agrees on."""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError
from common.secagg.graph import check_parameters
from common.secagg.ring import RING_BITS, FixedPoint, check_headroom, ring_bits, round_ring


@dataclass(frozen=True)
class SecAggParams:
    """Threshold t, neighbours k (0 = everyone), the fixed-point clip and bits, the ring width on
    the wire and the largest code (``ring.round_ring(bits, invited agents)``; 32 bits and
    2^bits - 1 when unset)."""

    threshold: int
    neighbours: int = 0
    clip: float = 1.0
    bits: int = 16
    ring_bits: int = RING_BITS
    max_code: int = 0

    @classmethod
    def for_round(
        cls, threshold: int, neighbours: int, clip: float, bits: int, invited: int, fill: bool = True
    ) -> SecAggParams:
        """Parameters of a round with ``invited`` agents: the least ring and, with ``fill``, its
        codes' full range (without: 0 .. 2^bits - 1, the layout before wire revision 3)."""
        ring, top = round_ring(bits, invited)
        return cls(threshold, neighbours, clip, bits, ring, top if fill else 0)

    def check(self, agents: int) -> SecAggParams:
        """Refuse settings that cannot work for ``agents`` agents, saying why."""
        if self.threshold < 2:
            raise ConfigError(f"secagg threshold must be at least 2, got {self.threshold}")
        if self.threshold > agents:
            raise ConfigError(f"secagg threshold {self.threshold} is above the number of agents ({agents})")
        check_parameters(agents, self.neighbours, self.threshold)
        check_headroom(self.bits, agents)
        if self.ring_bits < ring_bits(self.bits, agents) or not self.fixed_point.contributors_fit(agents):
            raise ConfigError(
                f"secagg ring of {self.ring_bits} bits can wrap with {agents} agents at {self.bits} bits"
                f" (codes up to {self.fixed_point.levels})"
            )
        return self

    @property
    def fixed_point(self) -> FixedPoint:
        """The shared quantiser."""
        return FixedPoint(self.clip, self.bits, self.ring_bits, self.max_code)
