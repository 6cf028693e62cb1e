"""Sparse coverage: each ring element of a masked update is sent by ``k`` of the round's agents.

With ``secagg.coverage = k`` every element (``group`` packed codes) gets a random permutation of
the round's agents from a keystream all parties derive from the round's public seed; the agents
ranked below ``k`` send that element, the others leave it out. An agent uploads about k/n of the
elements, and each element's sum has k codes, so the codes pack as base-(k L - k + 1) digits
instead of base-(n L - n + 1) (sparsified secure aggregation, Ergun et al. 2021). The rank also
picks the agent's rounding stratum among the element's k senders, so their errors cancel as in
``strata``.

Pairwise masks cover only the elements both agents send, so they still cancel; the aggregator
learns each element's sum over its k senders, never one agent's code: an agent refuses to unmask
if a claimed dropout would leave one of its elements with fewer than ``MIN_SENDERS`` senders.
The mean of each element is its senders' weighted sum over their summed weight (a ratio estimate
of the round's weighted mean; the aggregator knows every agent's example count from Join).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from common.errors import ConfigError, InvalidArgument
from common.secagg.keys import derive
from common.secagg.prg import Where
from common.secagg.ring import FixedPoint

MIN_SENDERS = 2
"""No element's sum may have fewer senders: one sender's sum is its code."""
STEP = 1 << 14  # elements a step: bounds the (step, members) scratch
PAIRWISE_MAX = 12  # up to this many members, ranks by comparing words pairwise (else two sorts)
TABLE_MAX_BYTES = 64 << 20
"""The largest rank table (a byte per element and member) kept from the first pass over a round's
elements; a larger round redraws each step's ranks whenever they are asked for (bounded memory)."""
_BELOW_ONE = float(np.nextafter(1.0, 0.0))


def senders_of(coverage: int, agents: int) -> int:
    """How many of ``agents`` agents send each element with ``coverage`` (0: all of them)."""
    return min(coverage, agents) if coverage else agents


def check_settings(coverage: int, neighbours: int) -> None:
    """ConfigError unless ``coverage`` is 0 or at least MIN_SENDERS, with the full graph."""
    if coverage < 0 or 0 < coverage < MIN_SENDERS:
        raise ConfigError(
            f"secagg coverage must be 0 (every agent) or at least {MIN_SENDERS}, got {coverage}"
            " (one sender's sum would be its update)"
        )
    if coverage and neighbours:
        raise ConfigError(
            "secagg coverage needs the full graph (neighbours = 0): every pair of an element's"
            " senders must mask it"
        )


class Coverage:
    """Who sends which element of one round: ``members`` (sorted ids; positions are ranks), ``k``
    senders an element (all when k >= members), ``elements`` elements."""

    def __init__(self, seed: bytes, round_id: int, members: Iterable[str], k: int, elements: int) -> None:
        self.members = sorted(set(members))
        if not self.members:
            raise InvalidArgument("coverage needs at least one member")
        self.k = min(k, len(self.members))
        self.elements = elements
        self._key = derive(seed, "coverage", round_id)
        self._prefix: np.ndarray | None = None  # (steps + 1, members): elements sent before each step
        self._table: np.ndarray | None = None  # (elements, members) ranks, read-only, if it fits

    def position(self, member: str) -> int:
        """``member``'s place in the sorted members."""
        try:
            return self.members.index(member)
        except ValueError:
            raise InvalidArgument(f"{member} is not among the round's senders") from None

    def ranks(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, members) uint8, not to be written to: each element's random permutation of
        the members (from the rank table when the round's fits TABLE_MAX_BYTES: drawn once, then
        read by every pass)."""
        if not 0 <= start <= stop <= self.elements:
            raise InvalidArgument(f"elements {start}..{stop} outside 0..{self.elements}")
        self._counts()
        return self._draw(start, stop) if self._table is None else self._table[start:stop]

    def _draw(self, start: int, stop: int) -> np.ndarray:
        """Ranks drawn from the keystream: a member's is the rank of its keystream word (ties to
        the lower position); element e's words are the e-th n of it, so any span (checked by the
        caller) draws alone."""
        n, count = len(self.members), stop - start
        offset = start * n * 4
        skip = offset % 16
        counter = (offset // 16).to_bytes(16, "big")
        stream = Cipher(algorithms.AES(self._key), modes.CTR(counter)).encryptor()
        raw = stream.update(bytes(skip + count * n * 4))[skip:]
        words = np.frombuffer(raw, dtype="<u4").reshape(count, n)
        if n > PAIRWISE_MAX:
            order = np.argsort(words, axis=1, kind="stable")
            return np.argsort(order, axis=1, kind="stable").astype(np.uint8)
        ranks = np.zeros((count, n), dtype=np.uint8)
        below = np.empty(count, dtype=bool)
        for i in range(n):  # rank of i: the words below it, ties to the lower position
            mine, rank = words[:, i], ranks[:, i]
            for j in range(n):
                if j != i:
                    (np.less_equal if j < i else np.less)(words[:, j], mine, out=below)
                    rank += below
        return ranks

    def senders(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, members) bool: who sends each element."""
        return self.ranks(start, stop) < self.k

    def steps(self) -> Iterable[tuple[int, int]]:
        """(start, stop) of the element steps."""
        for start in range(0, self.elements, STEP):
            yield start, min(start + STEP, self.elements)

    def _counts(self) -> np.ndarray:
        """Elements each member sends before each step; the first call draws every step once and
        keeps the rank table if it fits."""
        if self._prefix is None:
            shape = (self.elements, len(self.members))
            table = np.empty(shape, np.uint8) if shape[0] * shape[1] <= TABLE_MAX_BYTES else None
            per_step = []
            for a, b in self.steps():
                ranks = self._draw(a, b)
                per_step.append((ranks < self.k).sum(axis=0))
                if table is not None:
                    table[a:b] = ranks
            if table is not None:
                table.flags.writeable = False  # ranks() hands out views of it
            prefix = np.zeros((len(per_step) + 1, len(self.members)), dtype=np.int64)
            if per_step:
                np.cumsum(np.stack(per_step), axis=0, out=prefix[1:])
            self._prefix, self._table = prefix, table
        return self._prefix

    def sent(self, member: str) -> int:
        """How many elements ``member`` sends: the length of its upload."""
        return int(self._counts()[-1, self.position(member)])

    def positions(self, member: str, first: int, stop: int) -> np.ndarray:
        """The element indices of ``member``'s uploaded elements ``first .. stop - 1``."""
        prefix = self._counts()[:, self.position(member)]
        if not 0 <= first <= stop <= prefix[-1]:
            raise InvalidArgument(f"upload elements {first}..{stop} outside 0..{prefix[-1]}")
        out = np.empty(stop - first, dtype=np.int64)
        step = int(np.searchsorted(prefix, first, side="right")) - 1
        done, column = 0, self.position(member)
        while done < out.size:
            start = step * STEP
            mine = np.flatnonzero(self.senders(start, min(start + STEP, self.elements))[:, column]) + start
            skip = first + done - int(prefix[step])
            taken = mine[skip : skip + out.size - done]
            out[done : done + taken.size] = taken
            done += taken.size
            step += 1
        return out

    def compact(self, elements: np.ndarray, member: str) -> np.ndarray:
        """The elements ``member`` sends, in order: its upload."""
        column = self.position(member)
        return np.concatenate(
            [elements[a:b][self.senders(a, b)[:, column]] for a, b in self.steps()] or [elements[:0]]
        )

    def selector(self, columns: Sequence[Sequence[int] | None]) -> Where:
        """For ``prg.apply_masks``: mask j adds only where every member at the positions
        ``columns[j]`` sends the element (None: everywhere)."""

        def where(start: int, stop: int) -> list[np.ndarray | None]:
            sends = self.senders(start, stop)
            return [None if c is None else np.logical_and.reduce(sends[:, list(c)], axis=1) for c in columns]

        return where

    def check_survivors(self, member: str, survivors: Iterable[str], least: int = MIN_SENDERS) -> None:
        """InvalidArgument if some element ``member`` sends would be summed over fewer than
        ``least`` (at least MIN_SENDERS) of ``survivors``."""
        least = max(least, MIN_SENDERS)
        alive = [self.position(m) for m in set(survivors) if m in self.members]
        mine = self.position(member)
        for start, stop in self.steps():
            sends = self.senders(start, stop)
            left = sends[:, alive].sum(axis=1)
            if np.any(sends[:, mine] & (left < least)):
                raise InvalidArgument(
                    f"unmask request would leave an element of {member} summed over fewer than {least} agents"
                )

    def mean(self, total: np.ndarray, fp: FixedPoint, weights: Mapping[str, float], count: int) -> np.ndarray:
        """The weighted mean (float32, ``count`` values) from the unmasked sum ``total`` of ``fp``
        elements: each element's decoded sum over the summed weight of its senders among
        ``weights``' agents (the survivors); 0 where none survived."""
        group = fp.group
        alive = np.zeros(len(self.members), dtype=np.float64)
        weight = np.zeros(len(self.members), dtype=np.float64)
        for agent, w in weights.items():
            alive[self.position(agent)] = 1.0
            weight[self.position(agent)] = w
        out = np.zeros(count, dtype=np.float32)
        for start, stop in self.steps():
            sends = self.senders(start, stop).astype(np.float64)  # matrix-vector products beat bool sums
            summed = sends @ weight  # weight is 0 where an agent dropped
            scale = np.divide(1.0, summed, out=np.zeros_like(summed), where=summed > 0)  # 0: none left
            codes = fp.unpack(total[start:stop]).reshape(stop - start, group)  # an element a row
            values = fp.decode_sum(codes, (sends @ alive)[:, None])
            values *= scale[:, None]
            first, last = start * group, min(stop * group, count)
            out[first:last] = values.reshape(-1)[: last - first]
        return out


class CoveredUniforms:
    """One agent's dithers with coverage: for each code, its rank among its element's senders (the
    stratum, of ``k``) plus its own uniform, over k. Successive calls continue along the codes."""

    def __init__(self, coverage: Coverage, member: str, group: int, private: np.random.Generator) -> None:
        self.coverage, self.column, self.group = coverage, coverage.position(member), group
        self._private = private
        self._at = 0  # codes handed out so far

    def random(self, size: int) -> np.ndarray:
        """Uniform on [0, 1) code by code, stratified across each element's senders."""
        first, stop = self._at // self.group, -(-(self._at + size) // self.group)
        stop = min(stop, self.coverage.elements)
        ranks = np.zeros(0, dtype=np.float64)
        if stop > first:
            ranks = self.coverage.ranks(first, stop)[:, self.column].astype(np.float64)
        strata = np.repeat(np.minimum(ranks, self.coverage.k - 1), self.group)
        skip = self._at - first * self.group
        u = np.zeros(size, dtype=np.float64)
        inside = strata[skip : skip + size]
        u[: inside.size] = inside
        u += self._private.random(size)
        u /= self.coverage.k
        np.minimum(u, _BELOW_ONE, out=u)
        self._at += size
        return u
