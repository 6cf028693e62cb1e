"""The secure-aggregation settings every party of a round agrees on."""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError
from common.secagg.graph import check_parameters
from common.secagg.ring import FixedPoint, check_headroom


@dataclass(frozen=True)
class SecAggParams:
    """Threshold t, neighbours k (0 = everyone), and the fixed-point clip and bits."""

    threshold: int
    neighbours: int = 0
    clip: float = 1.0
    bits: int = 16

    def check(self, agents: int) -> SecAggParams:
        """Refuse settings that cannot work for ``agents`` agents, saying why."""
        if self.threshold < 2:
            raise ConfigError(f"secagg threshold must be at least 2, got {self.threshold}")
        if self.threshold > agents:
            raise ConfigError(f"secagg threshold {self.threshold} is above the number of agents ({agents})")
        check_parameters(agents, self.neighbours, self.threshold)
        check_headroom(self.bits, agents)
        return self

    @property
    def fixed_point(self) -> FixedPoint:
        """The shared quantiser."""
        return FixedPoint(self.clip, self.bits)
