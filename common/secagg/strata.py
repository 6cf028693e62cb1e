"""Correlated stochastic rounding: the agents of a round draw their dithers from shared random strata.

Each agent rounds ``y`` to ``floor(y + u)`` with ``u`` uniform on [0, 1), which is unbiased. Drawn
independently, the n agents' rounding errors add up: the summed codes of n equal values are off by
up to sqrt(n) / 2 steps. Here every coordinate gets a random permutation ``pi`` of the roster
positions, from a keystream all agents derive from the round's public seed, and the agent at
position ``i`` draws its ``u`` uniformly inside stratum ``pi(i)`` of ``n`` equal parts of [0, 1).
Each ``u`` is still uniform, so each code stays unbiased, but the strata are distinct, so the
errors cancel: the summed codes of n equal values are off by less than one step, and for any values
the variance of the sum is no larger than with independent dithers (Suresh et al., "Correlated
quantization for distributed mean estimation and optimization", ICML 2022).

Nothing secret goes into the permutations; each agent's position inside its stratum is its own
private randomness, and the aggregator still sees only the masked sum. Rosters beyond
``STRATA_MAX`` agents are stratified in groups of that many consecutive positions, so an agent's cost
stays bounded (``min(n, STRATA_MAX)`` keystream words a coordinate).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from common.secagg.keys import derive

STRATA_MAX = 32
"""Agents stratified together; a larger roster is split into groups of consecutive positions."""
STRATIFIED_MAX_CODE = 255
"""Codes of up to 8 bits round with stratified dithers. Finer codes' rounding error is below 1/256
of their clip, too little to measure, and the strata's keystream would cost the agent a third of its
masking speed at 20 bits."""
_STEP = 1 << 15  # coordinates a keystream step: bounds the (step, group) scratch
_BELOW_ONE = float(np.nextafter(1.0, 0.0))


def stratifies(levels: int) -> bool:
    """Whether codes of top code ``levels`` round with stratified dithers (the agents and bench alike)."""
    return levels <= STRATIFIED_MAX_CODE


class Uniforms(Protocol):
    """Where dithers come from: ``numpy.random.Generator`` or :class:`StratifiedUniforms`."""

    def random(self, size: int) -> np.ndarray:
        """``size`` float64 values uniform on [0, 1)."""
        ...


class StratifiedUniforms:
    """One agent's dithers for one round: its stratum per coordinate from the shared permutations, its
    place inside the stratum from ``private``. Successive calls continue along the coordinates."""

    def __init__(self, seed: bytes, round_id: int, position: int, agents: int, private: np.random.Generator):
        if not 0 <= position < agents:
            raise ValueError(f"roster position {position} outside 0..{agents - 1}")
        group, self.member = divmod(position, STRATA_MAX)
        self.size = min(STRATA_MAX, agents - group * STRATA_MAX)
        key = derive(seed, "rounding-strata", round_id, str(group))
        self._stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._zeros = memoryview(bytes(4 * self.size * _STEP))
        self._scratch = bytearray(4 * self.size * _STEP + 15)  # update_into wants a block spare
        self._step = np.empty(_STEP, dtype=np.uint8)  # strata of the current step's coordinates
        self._below = np.empty(_STEP, dtype=bool)  # scratch: one member's words below this agent's
        self._used = _STEP
        self._private = private

    @classmethod
    def for_agent(
        cls,
        seed: bytes,
        round_id: int,
        roster: Sequence[str],
        agent_id: str,
        private: np.random.Generator,
    ) -> StratifiedUniforms:
        """The dithers of ``agent_id``, placed by its rank in the sorted roster."""
        ids = sorted(set(roster))
        if agent_id not in ids:
            raise ValueError(f"{agent_id} is not in the round's roster")
        return cls(seed, round_id, ids.index(agent_id), len(ids), private)

    def strata(self, size: int) -> np.ndarray:
        """This agent's stratum (0 .. size - 1 of its group) for the next ``size`` coordinates, as
        float64. Coordinate j's stratum depends on j alone, not on how calls split the coordinates."""
        out = np.empty(size, dtype=np.float64)
        done = 0
        while done < size:
            if self._used == _STEP:
                self._next_step()
            n = min(size - done, _STEP - self._used)
            out[done : done + n] = self._step[self._used : self._used + n]
            self._used += n
            done += n
        return out

    def _next_step(self) -> None:
        """The strata of the next ``_STEP`` coordinates: one keystream word per group member and
        coordinate, member by member, and the rank of this agent's word among them (ties to the lower
        position): the ranks of i.i.d. words are a uniformly random permutation of the group."""
        m = self.size
        self._stream.update_into(self._zeros, self._scratch)
        words = np.frombuffer(self._scratch, dtype="<u4", count=m * _STEP).reshape(m, _STEP)
        mine, rank, below = words[self.member], self._step, self._below
        rank[:] = 0
        for k in range(m):
            if k != self.member:
                (np.less_equal if k < self.member else np.less)(words[k], mine, out=below)
                rank += below.view(np.uint8)
        self._used = 0

    def random(self, size: int) -> np.ndarray:
        """Uniform on [0, 1) coordinate by coordinate, stratified across the group."""
        u = self.strata(size)
        u += self._private.random(size)
        u /= self.size
        np.minimum(u, _BELOW_ONE, out=u)  # (m - 1 + (1 - 2^-53)) / m can round up to 1
        return u
