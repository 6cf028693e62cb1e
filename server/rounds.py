"""The round coordinator: who takes part, which phase, when to aggregate.

Plain asyncio, no gRPC: the servicer translates its states into RoundEvents.
Rounds so far run the identity codec without masking; state is in memory and
global versions are on disk (the durable SQLite store comes with the rounds issue).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from common.codecs import identity
from common.config import RoundsConfig
from common.errors import FailedPrecondition, InvalidArgument
from common.identity import SpiffeId
from common.layout import ParamLayout
from common.metrics import peer_labels
from server import metrics
from server.accumulator import SumAccumulator
from server.checkpoints import CheckpointStore, Manifest
from server.optimizer import FedAvg, ServerOptimizer
from server.spool import UploadMeta, UploadSpool
from server.state import StateDB

log = logging.getLogger(__name__)
WATCH_QUEUE = 64
"""Events buffered per watcher before the oldest is dropped."""


class Phase(enum.IntEnum):
    """Round phases; values equal the wire enum cloudfed.v1.RoundPhase."""

    WAITING = 1
    ADVERTISE_KEYS = 2
    SHARE_KEYS = 3
    UPLOAD = 4
    UNMASK = 5
    AGGREGATE = 6
    COMPLETED = 7
    ABANDONED = 8


@dataclass(frozen=True)
class RoundState:
    """A snapshot of the current round."""

    round_id: int
    phase: Phase
    global_version: int
    participants: frozenset[str] = frozenset()
    deadline: float = 0.0
    reason: str = ""


@dataclass
class AgentInfo:
    """What an agent said when it joined."""

    num_examples: int
    software_version: str
    joined_at: float = field(default_factory=time.time)


class RoundCoordinator:
    """Runs rounds over the agents currently watching, one at a time."""

    def __init__(
        self,
        config: RoundsConfig,
        store: CheckpointStore,
        spool: UploadSpool,
        db: StateDB,
        optimizer: ServerOptimizer | None = None,
        codec: str = identity.NAME,
    ) -> None:
        latest = store.latest()
        if latest is None:
            raise FailedPrecondition(f"no global version in {store.root}; seed version 0 first")
        self.config = config
        self.store = store
        self.spool = spool
        self.db = db
        self.optimizer = optimizer or FedAvg()
        self.codec = codec
        for round_id in db.recover():
            log.warning("round %d was in flight when the aggregator stopped; it is abandoned", round_id)
            metrics.ROUNDS.labels(outcome="abandoned", reason="interrupted").inc()
        metrics.GLOBAL_VERSION.set(latest)
        recorded = {v for v, *_ in db.versions()}
        for version in store.versions():  # versions committed to disk but not yet to the database
            if version not in recorded:
                m = store.manifest(version)
                db.version_committed(version, m.parent, None, m.sha256, len(m.participants))
        self.layout = ParamLayout.from_tensors(store.load(latest))
        self.agents: dict[str, AgentInfo] = {}
        self._watchers: dict[str, int] = {}
        self._state = RoundState(round_id=0, phase=Phase.WAITING, global_version=latest)
        self._subscribers: set[asyncio.Queue[RoundState]] = set()
        self._changed = asyncio.Condition()
        self._claimed: set[str] = set()  # uploaded (verified) this round, being or been added
        self._added: set[str] = set()
        self._pending: set[asyncio.Task[None]] = set()
        self._acc: SumAccumulator | None = None
        self._all_in = asyncio.Event()

    @property
    def state(self) -> RoundState:
        """The current round."""
        return self._state

    @property
    def expected_payload_bytes(self) -> int:
        """Size of one encoded update."""
        return identity.payload_bytes(self.layout.numel)

    async def _publish(self, state: RoundState) -> None:
        self._state = state
        metrics.ROUND.set(state.round_id)
        metrics.GLOBAL_VERSION.set(state.global_version)
        open_round = state.phase in (Phase.UPLOAD, Phase.AGGREGATE)
        metrics.AGENTS.labels(state="participating").set(len(state.participants) if open_round else 0)
        for queue in self._subscribers:
            if queue.full():  # a stuck watcher loses its oldest event, never blocks the round
                queue.get_nowait()
            queue.put_nowait(state)
        log.info(
            "round %d: %s (version %d)%s",
            state.round_id,
            state.phase.name,
            state.global_version,
            f": {state.reason}" if state.reason else "",
        )

    async def _membership_changed(self) -> None:
        metrics.AGENTS.labels(state="connected").set(len(self.connected))
        async with self._changed:
            self._changed.notify_all()

    async def join(self, peer: SpiffeId, info: AgentInfo) -> None:
        """Record an agent's announcement."""
        self.agents[peer.uri] = info
        self.db.agent_joined(peer.uri, peer.cloud, info.software_version, info.num_examples)
        await self._membership_changed()

    def record_eval(self, peer: SpiffeId, version: int, loss: float, tokens: int = 0) -> None:
        """Record an agent's evaluation of a global version."""
        metrics.EVAL_LOSS.labels(**peer_labels(peer)).set(loss)
        metrics.EVAL_VERSION.labels(**peer_labels(peer)).set(version)
        self.db.eval_reported(peer.uri, version, loss, tokens)

    async def watch(self, peer: SpiffeId) -> AsyncIterator[RoundState]:
        """The current state, then every change, while the caller listens."""
        queue: asyncio.Queue[RoundState] = asyncio.Queue(maxsize=WATCH_QUEUE)
        queue.put_nowait(self._state)
        self._subscribers.add(queue)
        self._watchers[peer.uri] = self._watchers.get(peer.uri, 0) + 1
        await self._membership_changed()
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)
            self._watchers[peer.uri] -= 1
            if not self._watchers[peer.uri]:
                del self._watchers[peer.uri]

    @property
    def connected(self) -> list[str]:
        """Agents with an open watch stream that have joined."""
        return sorted(uri for uri in self._watchers if uri in self.agents)

    def check_upload(self, peer: SpiffeId, meta: UploadMeta) -> None:
        """Raise unless ``peer`` may upload ``meta`` into the current round."""
        s = self._state
        if meta.round_id != s.round_id or s.phase is not Phase.UPLOAD:
            raise FailedPrecondition(
                f"round {meta.round_id} is not accepting uploads (current round {s.round_id}, {s.phase.name})"
            )
        if peer.uri not in s.participants:
            raise FailedPrecondition(f"{peer} is not a participant of round {s.round_id}")
        if peer.uri in self._claimed:
            raise FailedPrecondition(f"{peer} already uploaded for round {s.round_id}")
        if meta.codec != self.codec:
            raise InvalidArgument(f"codec {meta.codec!r} does not match the round's codec {self.codec!r}")
        if meta.layout_digest != self.layout.digest:
            raise InvalidArgument("layout digest does not match the federation's parameter layout")
        if meta.base_version != s.global_version:
            raise FailedPrecondition(
                f"update trained from version {meta.base_version}, round is at {s.global_version}"
            )
        if meta.total_bytes != self.expected_payload_bytes:
            raise InvalidArgument(
                f"update of {meta.total_bytes} bytes, expected {self.expected_payload_bytes}"
            )

    def payload_validator(self) -> Callable[[bytes], None]:
        """A per-upload check run on every streamed byte (finite float32 values)."""
        return identity.FiniteChecker()

    async def commit_upload(self, peer: SpiffeId, meta: UploadMeta, path: Path) -> None:
        """Accept a verified upload; it is added to the round's sum in the background, in order."""
        self.check_upload(peer, meta)
        acc = self._acc
        assert acc is not None
        self._claimed.add(peer.uri)
        task = asyncio.create_task(self._accumulate(acc, peer, meta, path))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _accumulate(self, acc: SumAccumulator, peer: SpiffeId, meta: UploadMeta, path: Path) -> None:
        try:
            await asyncio.to_thread(acc.add_file, path)
        except Exception:
            log.exception("round %d: could not add the update from %s; dropping it", meta.round_id, peer)
            self._claimed.discard(peer.uri)
            return
        finally:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        self._added.add(peer.uri)
        self.db.uploaded(meta.round_id, peer.uri, meta.total_bytes, meta.weight)
        log.info(
            "round %d: update from %s added (%d/%d)",
            meta.round_id,
            peer,
            len(self._added),
            len(self._state.participants),
        )
        if self._added >= self._state.participants:
            self._all_in.set()

    async def run(self, stop: asyncio.Event | None = None, max_rounds: int | None = None) -> None:
        """Run rounds until ``stop`` is set or ``max_rounds`` completed."""
        stop = stop or asyncio.Event()
        completed = 0
        round_id = self.db.last_round_id()
        await self._publish(self._state)
        while not stop.is_set() and (max_rounds is None or completed < max_rounds):
            if not await self._wait_for_agents(stop):
                break
            round_id += 1
            if await self._run_round(round_id):
                completed += 1
            else:
                await _sleep_or_stop(stop, self.config.retry_delay_s)

    async def _wait_for_agents(self, stop: asyncio.Event) -> bool:
        while len(self.connected) < self.config.min_agents:
            if stop.is_set():
                return False
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=0.5)
        return True

    async def _run_round(self, round_id: int) -> bool:
        base = self._state.global_version
        participants = frozenset(self.connected[: self.config.max_agents])
        self._claimed, self._added = set(), set()
        self._all_in = asyncio.Event()
        self._acc = SumAccumulator(self.layout.numel + 1)
        self.spool.purge()
        deadline = time.time() + self.config.upload_deadline_s
        self.db.round_started(round_id, base, deadline, sorted(participants))
        await self._publish(RoundState(round_id, Phase.UPLOAD, base, participants, deadline))
        with metrics.PHASE_SECONDS.labels(phase="upload").time():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_in.wait(), timeout=self.config.upload_deadline_s)
            if self._pending:  # uploads verified before the deadline still count
                await asyncio.gather(*self._pending)
        needed = self.config.min_uploads or self.config.min_agents
        uploaded = sorted(self._added)
        if len(uploaded) < needed:
            reason = f"{len(uploaded)} of {len(participants)} uploads by the deadline, {needed} needed"
            self.db.round_ended(
                round_id, Phase.ABANDONED.name, reason, dropped=sorted(participants - set(uploaded))
            )
            metrics.ROUNDS.labels(outcome="abandoned", reason="too_few_uploads").inc()
            await self._publish(replace(self._state, phase=Phase.ABANDONED, reason=reason))
            return False
        dropped = sorted(participants - set(uploaded))
        if dropped:
            log.warning("round %d: dropped stragglers %s", round_id, dropped)
            for uri in dropped:
                metrics.DROPPED.labels(**peer_labels(SpiffeId.parse(uri))).inc()
        self.db.phase(round_id, Phase.AGGREGATE.name)
        await self._publish(replace(self._state, phase=Phase.AGGREGATE))
        acc, self._acc = self._acc, None
        try:
            with metrics.PHASE_SECONDS.labels(phase="aggregate").time():
                manifest = await asyncio.to_thread(self._aggregate, acc, base, uploaded)
        except InvalidArgument as exc:
            self.db.round_ended(round_id, Phase.ABANDONED.name, str(exc), dropped=dropped)
            metrics.ROUNDS.labels(outcome="abandoned", reason="invalid_aggregate").inc()
            await self._publish(replace(self._state, phase=Phase.ABANDONED, reason=str(exc)))
            return False
        self.db.version_committed(manifest.version, base, round_id, manifest.sha256, len(uploaded))
        self.db.round_ended(round_id, Phase.COMPLETED.name, new_version=manifest.version, dropped=dropped)
        metrics.ROUNDS.labels(outcome="completed", reason="").inc()
        await self._publish(replace(self._state, phase=Phase.COMPLETED, global_version=manifest.version))
        return True

    def _aggregate(self, acc: SumAccumulator, base: int, participants: list[str]) -> Manifest:
        """Decode the sum, step the server optimizer, commit the next version; one unit of work."""
        mean, weight = identity.decode_sum(acc.total)
        if not np.all(np.isfinite(mean)):
            raise InvalidArgument("aggregate is not finite")
        current = self.layout.flatten(self.store.load(base))
        version = base + 1
        new = self.layout.unflatten(self.optimizer.step(current, mean, version))
        return self.store.save(
            version,
            new,
            parent=base,
            participants=participants,
            metrics={"total_weight": weight, "update_norm": float(np.linalg.norm(mean))},
        )


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
