"""The secure-aggregation settings every party of a round agrees on."""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError
from common.secagg.coverage import check_settings, senders_of
from common.secagg.graph import check_parameters
from common.secagg.ring import RING_BITS, FixedPoint, check_headroom, levels_bits, ring_bits, round_layout


@dataclass(frozen=True)
class SecAggParams:
    """Threshold t, neighbours k (0 = everyone), the fixed-point clip and bits (the weight's digit
    width), and the round's layout in the ring (``ring.round_layout``): bits an element, the
    largest code, and the codes packed into an element as base-``code_base`` digits (32 bits, codes
    up to 2^bits - 1 and one code an element when unset)."""

    threshold: int
    neighbours: int = 0
    clip: float = 1.0
    bits: int = 16
    ring_bits: int = RING_BITS
    max_code: int = 0
    code_base: int = 0
    group: int = 1
    coverage: int = 0
    """Agents that send each element (``coverage``); 0: every agent sends every element."""

    @classmethod
    def for_round(
        cls,
        threshold: int,
        neighbours: int,
        clip: float,
        bits: int,
        invited: int,
        fill: bool = True,
        levels: int = 0,
        pack: bool = True,
        coverage: int = 0,
    ) -> SecAggParams:
        """Parameters of a round with ``invited`` agents sending codes of ``levels`` levels (0:
        2^bits; otherwise bits is floor(log2 levels)): the cheapest layout (``pack``: several
        codes an element) with codes filling it. Without ``fill``: codes 0 .. 2^bits - 1 in the
        least one-code ring, the layout before wire revision 3. With ``coverage`` k, each element's
        sum has min(k, invited) codes."""
        senders = senders_of(coverage, invited)
        if not fill:
            return cls(threshold, neighbours, clip, bits, ring_bits(bits, senders), coverage=coverage)
        levels = levels or 1 << bits
        layout = round_layout(levels, senders, pack)
        return cls(
            threshold,
            neighbours,
            clip,
            levels_bits(levels),
            layout.ring_bits,
            layout.max_code,
            layout.base,
            layout.group,
            coverage,
        )

    def check(self, agents: int, colluders: int = 0) -> SecAggParams:
        """Refuse settings that cannot work for ``agents`` agents, or are not safe against
        ``colluders`` of them colluding with the aggregator, saying why."""
        if self.threshold < 2:
            raise ConfigError(f"secagg threshold must be at least 2, got {self.threshold}")
        if self.threshold > agents:
            raise ConfigError(f"secagg threshold {self.threshold} is above the number of agents ({agents})")
        check_parameters(agents, self.neighbours, self.threshold, colluders)
        check_settings(self.coverage, self.neighbours)
        senders = self.senders(agents)
        fp = self.fixed_point
        check_headroom(fp.levels + 1, senders)
        if not fp.contributors_fit(senders):
            raise ConfigError(
                f"secagg ring of {self.ring_bits} bits ({self.group} codes an element) can wrap with"
                f" {senders} agents' codes up to {fp.levels}"
            )
        return self

    def senders(self, agents: int) -> int:
        """How many of ``agents`` agents send each element."""
        return senders_of(self.coverage, agents)

    @property
    def fixed_point(self) -> FixedPoint:
        """The shared quantiser."""
        return FixedPoint(
            self.clip, self.bits, self.ring_bits, self.max_code, self.code_base, self.group, not self.coverage
        )
