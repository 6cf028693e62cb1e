"""The secure-aggregation settings every party of a round agrees on."""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError
from common.secagg.graph import check_parameters
from common.secagg.ring import RING_BITS, FixedPoint, check_headroom, ring_bits


@dataclass(frozen=True)
class SecAggParams:
    """Threshold t, neighbours k (0 = everyone), the fixed-point clip and bits, and the ring width
    on the wire (``ring.ring_bits(bits, max_agents)``; 32 when unset)."""

    threshold: int
    neighbours: int = 0
    clip: float = 1.0
    bits: int = 16
    ring_bits: int = RING_BITS

    def check(self, agents: int) -> SecAggParams:
        """Refuse settings that cannot work for ``agents`` agents, saying why."""
        if self.threshold < 2:
            raise ConfigError(f"secagg threshold must be at least 2, got {self.threshold}")
        if self.threshold > agents:
            raise ConfigError(f"secagg threshold {self.threshold} is above the number of agents ({agents})")
        check_parameters(agents, self.neighbours, self.threshold)
        check_headroom(self.bits, agents)
        if self.ring_bits < ring_bits(self.bits, agents):
            raise ConfigError(
                f"secagg ring of {self.ring_bits} bits can wrap with {agents} agents at {self.bits} bits"
            )
        _ = self.fixed_point  # validates ring_bits against bits
        return self

    @property
    def fixed_point(self) -> FixedPoint:
        """The shared quantiser."""
        return FixedPoint(self.clip, self.bits, self.ring_bits)
