"""The round coordinator: who takes part, which phase, when to aggregate.

Plain asyncio, no gRPC: the servicer translates its states into RoundEvents.
Without secure aggregation a round is UPLOAD -> AGGREGATE; with it, ADVERTISE_KEYS ->
SHARE_KEYS -> UPLOAD (masked) -> UNMASK -> AGGREGATE, each key phase bounded by
``secagg.key_deadline_s`` and aborted cleanly when fewer than t agents remain. What a round's
sum becomes (codecs, decoding, the server optimizer, the commit) is ``server.aggregation``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from common.codecs import identity
from common.codecs.registry import CodecSettings
from common.codecs.state import CodecState
from common.config import CheckpointsConfig, RoundsConfig, SecAggConfig
from common.errors import (
    Aborted,
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
)
from common.identity import SpiffeId
from common.layout import ParamLayout
from common.metrics import peer_labels
from common.secagg.clips import SegmentClips
from common.secagg.graph import majority, share_holders
from common.secagg.keys import Advertisement, check_posted_advertisement
from common.secagg.params import SecAggParams
from common.secagg.ring import update_weight
from common.secagg.server import ServerRound
from common.wire import check_detail, clipped_detail
from server import metrics, retention, stopping
from server.accumulator import BLOCK_ELEMS, SumAccumulator
from server.admission import describe_dp
from server.aggregation import Aggregation
from server.autoencoder import AutoencoderPlan
from server.checkpoints import CheckpointStore, Manifest
from server.eval_reports import EvalReports
from server.fetchsgd import FetchSGDPlan
from server.invitations import AgentInfo, invite
from server.optimizer import FedAvg, ServerOptimizer
from server.spool import UploadMeta, UploadSpool
from server.state import AgentCertificate, StateDB

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
    FINISHED = 9


SECAGG_VIEWS = frozenset({Phase.SHARE_KEYS, Phase.UPLOAD, Phase.UNMASK})
"""Phases whose secure-aggregation state an agent may ask for (GetSecAggState)."""

DECLINABLE = frozenset({Phase.ADVERTISE_KEYS, Phase.SHARE_KEYS, Phase.UPLOAD, Phase.UNMASK})
"""Phases in which a participant may decline the round."""


@dataclass(frozen=True)
class RoundState:
    """A snapshot of the current round."""

    round_id: int
    phase: Phase
    global_version: int
    participants: frozenset[str] = frozenset()
    deadline: float = 0.0
    reason: str = ""
    codec: CodecSettings | None = None
    """The codec this round's uploads use (None: the federation's, from Join)."""
    left_out: Mapping[str, str] = field(default_factory=dict)
    """Connected agents this round does not invite because it would break their privacy policy,
    with why."""


@dataclass(frozen=True)
class SecAggView:
    """What one agent needs from the aggregator in a secure-aggregation phase."""

    phase: Phase
    roster: list[Advertisement]
    graph_seed: bytes
    threshold: int
    ring_bits: int
    max_code: int
    code_base: int
    group: int
    weight_scale: float
    coverage: int = 0
    shares: dict[str, bytes] = field(default_factory=dict)
    survivors: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    clips: SegmentClips | None = None
    """Adaptive clipping: the round's bound per segment of encoded coordinates."""


class RoundCoordinator:
    """Runs rounds over the agents currently watching, one at a time."""

    def __init__(
        self,
        config: RoundsConfig,
        store: CheckpointStore,
        spool: UploadSpool,
        db: StateDB,
        optimizer: ServerOptimizer | None = None,
        codec: CodecSettings | None = None,
        secagg: SecAggConfig | None = None,
        codec_state: CodecState | None = None,
        autoencoder: AutoencoderPlan | None = None,
        fetchsgd: FetchSGDPlan | None = None,
        keep: CheckpointsConfig | None = None,
    ) -> None:
        latest = store.latest()
        if latest is None:
            raise FailedPrecondition(f"no global version in {store.root}; seed version 0 first")
        self.config = config
        self.store = store
        self.spool = spool
        self.db = db
        self.keep = keep or CheckpointsConfig()
        self.secagg = secagg if secagg is not None and secagg.enabled else None
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
        self.aggregation = Aggregation(
            store,
            self.layout,
            optimizer or FedAvg(),
            codec or CodecSettings(),
            codec_state,
            autoencoder,
            fetchsgd,
            keep_aggregates=self.secagg is not None and self.secagg.adaptive_clip > 0,
        )
        self._clips: SegmentClips | None = None
        self.agents: dict[str, AgentInfo] = {}
        self.evals = EvalReports(db, lambda: self._state.global_version, lambda uri: uri in self.agents)
        self._watchers: dict[str, int] = {}
        self._state = RoundState(round_id=0, phase=Phase.WAITING, global_version=latest)
        self._subscribers: set[asyncio.Queue[RoundState]] = set()
        self._changed = asyncio.Condition()
        self._claimed: set[str] = set()  # uploaded (verified) this round, being or been added
        self._added: set[str] = set()
        self._declined: dict[str, str] = {}  # sat this round out (DeclineRound), with the reason label
        self._left_out: Mapping[str, str] = {}  # not invited by their own policy, with why
        self._pending: set[asyncio.Task[None]] = set()
        self._acc: SumAccumulator | None = None
        self._all_in = asyncio.Event()
        self._decoded: dict[str, tuple[np.ndarray, float]] = {}
        self._secure: ServerRound | None = None
        self._secure_lock = threading.Lock()  # the masked sum is added to from worker threads
        self._weight_scale = 1.0
        self._progress = asyncio.Condition()  # a key phase or the round state moved on

    @property
    def state(self) -> RoundState:
        """The current round."""
        return self._state

    @property
    def codec(self) -> CodecSettings:
        """The federation's codec settings (what Join announces)."""
        return self.aggregation.settings

    def codec_state(self, sha256: str) -> CodecState | None:
        """A codec state file agents may download, by digest (eigen bases, autoencoder networks)."""
        return self.aggregation.codec_state(sha256)

    def expected_payload_bytes(self, sender: str) -> int:
        """Size of ``sender``'s encoded update (a masked one: the round's ``ring_bits`` an element,
        with coverage only the elements it sends)."""
        if self.secagg is not None:
            secure = self._secure
            if secure is not None:
                return secure.params.fixed_point.wire_bytes(secure.upload_length(sender))
            fp = self._secagg_params(self.secagg, 2, self.config.max_agents).fixed_point
            return fp.wire_bytes(fp.masked_length(self.aggregation.secure_coordinates))
        return self.aggregation.payload_bytes

    async def _publish(self, state: RoundState) -> None:
        self._state = state
        await self._moved_on()
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
        metrics.AGENTS.labels(state="budget_spent").set(len(self.connected) - len(self.trainable))
        async with self._changed:
            self._changed.notify_all()

    async def join(
        self, peer: SpiffeId, info: AgentInfo, certificate: AgentCertificate | None = None
    ) -> None:
        """Record an agent's announcement (and the certificate it joined with): INVALID_ARGUMENT
        for a spent-budget reason of over MAX_DECLINE_DETAIL bytes."""
        check_detail(info.budget_spent, "privacy.budget_spent")
        if info.budget_spent:
            log.info("%s joined with its differential-privacy budget spent: %s", peer, info.budget_spent)
        self.agents[peer.uri] = info
        self.db.agent_joined(
            peer.uri,
            peer.cloud,
            info.software_version,
            info.num_examples,
            certificate,
            info.differential_privacy,
        )
        if certificate is not None and certificate.not_after is not None:
            metrics.AGENT_CERT_EXPIRY.labels(**peer_labels(peer)).set(certificate.not_after)
        await self._membership_changed()

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

    @property
    def trainable(self) -> list[str]:
        """Connected agents that may be invited: not those whose privacy budget is spent."""
        return [uri for uri in self.connected if not self.agents[uri].budget_spent]

    def _spent(self) -> dict[str, str]:
        """Connected agents left out of rounds because their privacy budget is spent, with why."""
        return {
            uri: f"its differential-privacy budget is spent ({self.agents[uri].budget_spent})"
            for uri in self.connected
            if self.agents[uri].budget_spent
        }

    def _restate_privacy(self, peer: SpiffeId, meta: UploadMeta) -> None:
        """Keep the DP guarantee shown for ``peer`` current with the spend its upload carries."""
        info = self.agents.get(peer.uri)
        if info is None or info.announced_dp is None or not meta.epsilon_spent:
            return
        info.differential_privacy = describe_dp(
            info.announced_dp, meta.epsilon_spent, f"after round {meta.round_id}"
        )
        self.db.agent_privacy(peer.uri, info.differential_privacy)

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
        if peer.uri in self._declined:
            raise FailedPrecondition(f"{peer} declined round {s.round_id}")
        expected = self.aggregation.round_settings
        if meta.codec != expected.name:
            raise InvalidArgument(f"codec {meta.codec!r} does not match the round's codec {expected.name!r}")
        if meta.codec_params != json.dumps(expected.params(), sort_keys=True):
            raise InvalidArgument(
                f"codec parameters {meta.codec_params} do not match the round's {expected.params()}"
            )
        if meta.layout_digest != self.layout.digest:
            raise InvalidArgument("layout digest does not match the federation's parameter layout")
        if meta.base_version != s.global_version:
            raise FailedPrecondition(
                f"update trained from version {meta.base_version}, round is at {s.global_version}"
            )
        expected_bytes = self.expected_payload_bytes(peer.uri)
        if meta.total_bytes != expected_bytes:
            raise InvalidArgument(f"update of {meta.total_bytes} bytes, expected {expected_bytes}")

    def payload_validator(self) -> Callable[[bytes], None]:
        """A per-upload check run on every streamed byte (finite float32 values; masked uint32 codes are
        uniform, so anything goes there)."""
        if self.secagg is not None or self.aggregation.round_codec is not None:
            return lambda _data: None  # masked codes are uniform; other codecs are checked once decoded
        return identity.FiniteChecker()

    async def commit_upload(self, peer: SpiffeId, meta: UploadMeta, path: Path) -> None:
        """Accept a verified upload; it is added to the round's sum in the background, in order."""
        self.check_upload(peer, meta)
        acc = self._acc
        if acc is None and self._secure is None:
            raise FailedPrecondition(f"round {meta.round_id} is not collecting updates")
        if self._secure is None and self.aggregation.round_codec is not None:  # refused now if bad
            data = await asyncio.to_thread(path.read_bytes)
            decoded = await asyncio.to_thread(self.aggregation.decode_upload, data)
            if decoded is not None:
                self._decoded[peer.uri] = decoded
        self._claimed.add(peer.uri)
        task = asyncio.create_task(self._accumulate(acc, peer, meta, path))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _accumulate(
        self, acc: SumAccumulator | None, peer: SpiffeId, meta: UploadMeta, path: Path
    ) -> None:
        try:
            if self._secure is not None:
                await asyncio.to_thread(self._add_masked_file, self._secure, peer.uri, path)
            elif peer.uri in self._decoded and acc is not None:
                weighted, weight = self._decoded.pop(peer.uri)
                await asyncio.to_thread(acc.add_vector, weighted, weight)
            elif acc is not None:
                await asyncio.to_thread(acc.add_file, path)
                await asyncio.to_thread(self.aggregation.keep_full_update, peer.uri, path)
        except Exception:
            log.exception("round %d: could not add the update from %s; dropping it", meta.round_id, peer)
            self._claimed.discard(peer.uri)
            return
        finally:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        self._added.add(peer.uri)
        self.db.uploaded(meta.round_id, peer.uri, meta.total_bytes, meta.weight)
        self._restate_privacy(peer, meta)
        log.info(
            "round %d: update from %s added (%d/%d)",
            meta.round_id,
            peer,
            len(self._added),
            len(self._state.participants),
        )
        self._check_all_in()
        await self._moved_on()

    def _check_all_in(self) -> None:
        """Set ``_all_in`` once every upload participant has been added or has declined."""
        if self._added | self._declined.keys() >= self._state.participants:
            self._all_in.set()

    def _add_masked_file(self, secure: ServerRound, sender: str, path: Path) -> None:
        """Add a masked upload into the ring sum block by block (it is never unmasked on its own)."""
        fp = secure.params.fixed_point
        data = np.memmap(path, dtype=np.uint8, mode="r")
        length = secure.upload_length(sender)
        if data.size != fp.wire_bytes(length):
            raise InvalidArgument(f"masked update of {data.size} bytes, expected {fp.wire_bytes(length)}")
        with self._secure_lock:
            for start in range(0, length, BLOCK_ELEMS):  # BLOCK_ELEMS elements end on a byte boundary
                count = min(BLOCK_ELEMS, length - start)
                first = start * fp.ring_bits // 8
                block = data[first : first + fp.wire_bytes(count)]
                secure.add_masked(sender, fp.from_wire(np.asarray(block), count), start)
            secure.finish_upload(sender)
        del data

    # Secure aggregation: the phases agents drive through the servicer.

    def _secure_round(self, peer: SpiffeId, round_id: int, phase: Phase) -> ServerRound:
        s, secure = self._state, self._secure
        if secure is None or s.round_id != round_id or s.phase is not phase:
            raise FailedPrecondition(
                f"round {round_id} is not in {phase.name} (current round {s.round_id}, {s.phase.name})"
            )
        if peer.uri not in s.participants:
            raise FailedPrecondition(f"{peer} is not a participant of round {round_id} in {phase.name}")
        if peer.uri in self._declined:
            raise FailedPrecondition(f"{peer} declined round {round_id}")
        return secure

    async def decline(self, peer: SpiffeId, round_id: int, reason: str, detail: str) -> None:
        """``peer`` sits round ``round_id`` out (``reason``: a metric label): the phase in progress,
        and the rest of the round, no longer wait for it. Only a participant of the current phase
        that has not uploaded may decline; an upload already taken stays in the sum."""
        check_detail(detail, "decline detail")
        s = self._state
        if s.round_id != round_id or s.phase not in DECLINABLE:
            raise FailedPrecondition(
                f"round {round_id} is not running (current round {s.round_id}, {s.phase.name})"
            )
        if peer.uri not in s.participants:
            raise FailedPrecondition(f"{peer} is not a participant of round {round_id} in {s.phase.name}")
        if peer.uri in self._claimed and s.phase is Phase.UPLOAD:
            raise FailedPrecondition(f"{peer} already uploaded for round {round_id}; it stays in the sum")
        if peer.uri in self._declined:
            return  # a retried call
        self._declined[peer.uri] = reason
        if reason == "privacy_budget" and peer.uri in self.agents:  # until it joins again
            self.agents[peer.uri].budget_spent = detail or "declined a round for its privacy budget"
        if s.phase is Phase.ADVERTISE_KEYS and self._secure is not None:
            self._secure.withdraw(peer.uri)  # not in the roster: nobody shares with it
        self.db.declined(round_id, peer.uri)
        metrics.DECLINED.labels(**peer_labels(peer), reason=reason).inc()
        log.warning("round %d: %s declined in %s (%s): %s", round_id, peer, s.phase.name, reason, detail)
        if s.phase is Phase.UPLOAD:
            self._check_all_in()
        await self._moved_on()
        if reason == "privacy_budget":
            await self._membership_changed()

    async def expel(self, peer: SpiffeId, detail: str) -> None:
        """``peer`` may take no further part (its certificate was revoked): it sits the round in
        progress out where it still can, so that round waits for it no longer. An upload already
        taken stays in the sum, as with a decline."""
        s = self._state
        if s.phase not in DECLINABLE or peer.uri not in s.participants or peer.uri in self._declined:
            return
        if peer.uri in self._claimed and s.phase is Phase.UPLOAD:
            log.warning("round %d: %s was revoked after its upload, which stays in the sum", s.round_id, peer)
            return
        await self.decline(peer, s.round_id, "revoked", clipped_detail(detail))

    async def advertise_keys(self, peer: SpiffeId, adv: Advertisement, ca_pem: bytes | None = None) -> None:
        """Phase 1: keep ``peer``'s signed keys (the identity inside must be the caller's own; agents
        leave it empty, and it is set to theirs), checked as every peer will check them against
        the federation CA (``ca_pem``), so that a bad one is refused alone."""
        if not adv.agent_id:
            adv = replace(adv, agent_id=peer.uri)
        if adv.agent_id != peer.uri:
            raise PermissionDenied(f"{peer} cannot advertise keys for {adv.agent_id}")
        secure = self._secure_round(peer, adv.round_id, Phase.ADVERTISE_KEYS)
        if ca_pem is not None:
            check_posted_advertisement(adv, ca_pem)
        secure.add_advertisement(adv)
        await self._moved_on()

    def roster_ids(self, peer: SpiffeId, round_id: int, phase: Phase) -> list[str]:
        """The round's roster (agent ids in the order shares name them), for ``peer`` in ``phase``."""
        return self._secure_round(peer, round_id, phase).roster_ids

    async def share_keys(self, peer: SpiffeId, round_id: int, sealed: dict[str, bytes]) -> None:
        """Phase 2: relay ``peer``'s sealed shares (opaque here)."""
        self._secure_round(peer, round_id, Phase.SHARE_KEYS).add_shares(peer.uri, sealed)
        await self._moved_on()

    async def reveal_shares(
        self, peer: SpiffeId, round_id: int, shares: dict[str, tuple[int, bytes]]
    ) -> None:
        """Phase 4: a survivor's answer to the unmask request."""
        self._secure_round(peer, round_id, Phase.UNMASK).add_reveal(peer.uri, shares)
        await self._moved_on()

    async def secagg_state(self, peer: SpiffeId, round_id: int, phase: int) -> SecAggView:
        """Wait until round ``round_id`` (the current one or an earlier) reaches ``phase`` (a wire
        RoundPhase), then what ``peer`` needs in it."""
        if phase not in SECAGG_VIEWS:
            names = ", ".join(p.name for p in sorted(SECAGG_VIEWS))
            raise InvalidArgument(f"no secure-aggregation state for phase {phase}; ask for one of {names}")
        if round_id > self._state.round_id:
            raise FailedPrecondition(
                f"round {round_id} has not started (current round {self._state.round_id})"
            )
        async with self._progress:
            await self._progress.wait_for(
                lambda: (
                    self._state.round_id > round_id
                    or (self._state.round_id == round_id and self._state.phase >= phase)
                )
            )
        s, secure = self._state, self._secure
        if s.round_id != round_id or s.phase in (Phase.ABANDONED, Phase.COMPLETED) or secure is None:
            raise FailedPrecondition(f"round {round_id} is over ({s.reason or s.phase.name})")
        if peer.uri in self._declined:
            raise FailedPrecondition(f"{peer} declined round {round_id}")
        if peer.uri not in secure.advertisements:
            raise FailedPrecondition(f"{peer} did not advertise keys in round {round_id}")
        survivors, dropped = secure.unmask_request() if phase >= Phase.UNMASK else ([], [])
        return SecAggView(
            phase=s.phase,
            roster=[secure.advertisements[a] for a in secure.roster_ids],
            graph_seed=secure.graph_seed,
            threshold=secure.params.threshold,
            ring_bits=secure.params.ring_bits,
            max_code=secure.params.fixed_point.levels,
            code_base=secure.params.code_base,
            group=secure.params.group,
            weight_scale=self._weight_scale,
            coverage=secure.params.coverage,
            shares=secure.shares_for(peer.uri) if phase >= Phase.UPLOAD else {},
            survivors=survivors,
            dropped=dropped,
            clips=self._clips if phase == Phase.SHARE_KEYS else None,  # asked for once a round
        )

    async def _moved_on(self) -> None:
        async with self._progress:
            self._progress.notify_all()

    async def _phase_until(self, done: Callable[[], bool], seconds: float) -> None:
        """Wait until ``done()`` or ``seconds`` passed."""
        async with self._progress:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait_for(done), seconds)

    async def run(self, stop: asyncio.Event | None = None, max_rounds: int | None = None) -> None:
        """Run rounds until ``stop`` is set or ``max_rounds`` completed."""
        stop = stop or asyncio.Event()
        completed = 0
        round_id = self.db.last_round_id()
        await self._publish(self._state)
        await self.retain()  # a changed policy applies at start; the gauges are set
        while not stop.is_set() and (max_rounds is None or completed < max_rounds):
            if await self._federation_finished():
                return
            if not await self._wait_for_agents(stop):
                break
            round_id += 1
            if await self._run_round(round_id):
                completed += 1
            else:
                await _sleep_or_stop(stop, self.config.retry_delay_s)

    async def _federation_finished(self) -> bool:
        """Announce FINISHED and return True if the federation is done (``rounds.max_versions``,
        early stopping). Checked before each round, so the round running when the last
        evaluation that decides it arrives still completes."""
        r = self.config
        if not (r.max_versions or r.early_stop_patience):
            return False
        evals = self.db.version_evals() if r.early_stop_patience else {}
        reason = stopping.finish_reason(self._state.global_version, evals, r)
        if reason is None:
            return False
        log.info("the federation is finished: %s; the aggregator goes on serving versions", reason)
        metrics.FINISHED.set(1)
        await self._publish(
            RoundState(self._state.round_id, Phase.FINISHED, self._state.global_version, reason=reason)
        )
        return True

    async def _wait_for_agents(self, stop: asyncio.Event) -> bool:
        while len(self.trainable) < self.config.min_agents:
            if stop.is_set():
                return False
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=0.5)
        return True

    async def _run_round(self, round_id: int) -> bool:
        if self.secagg is not None:
            return await self._run_secure_round(round_id, self.secagg)
        base = self._state.global_version
        participants = frozenset(self.trainable[: self.config.max_agents])
        self._claimed, self._added, self._declined, self._left_out = set(), set(), {}, self._spent()
        self._all_in = asyncio.Event()
        self.aggregation.start_round(round_id)
        self._decoded = {}
        self._acc = SumAccumulator(self.aggregation.plain_sum_length)
        self.spool.purge()
        deadline = time.time() + self.config.upload_deadline_s
        self.db.round_started(round_id, base, deadline, sorted(participants))
        await self._publish(
            RoundState(
                round_id,
                Phase.UPLOAD,
                base,
                participants,
                deadline,
                codec=self.aggregation.round_settings,
                left_out=self._left_out,
            )
        )
        with metrics.PHASE_SECONDS.labels(phase="upload").time():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_in.wait(), timeout=self.config.upload_deadline_s)
            if self._pending:  # uploads verified before the deadline still count
                await asyncio.gather(*self._pending)
        needed = self._uploads_needed
        uploaded = sorted(self._added)
        dropped = sorted(participants - set(uploaded) - self._declined.keys())
        if len(uploaded) < needed:
            reason = f"{len(uploaded)} of {len(participants)} uploads{self._declines_said()}, {needed} needed"
            await self._abandon(round_id, reason, "too_few_uploads", dropped)
            return False
        if dropped:
            log.warning("round %d: dropped stragglers %s", round_id, dropped)
        acc, self._acc = self._acc, None
        assert acc is not None
        return await self._finish(
            round_id,
            base,
            lambda: self.aggregation.commit_plain(acc.total, base, uploaded),
            uploaded,
            dropped,
        )

    def _secagg_params(self, sa: SecAggConfig, auto: int, invited: int) -> SecAggParams:
        """The round's secure-aggregation parameters (``auto``: the threshold when not configured);
        the ring is sized for the ``invited`` agents, not for ``max_agents``."""
        clip = 1.0 if sa.adaptive_clip > 0 else sa.clip  # adaptive: values come over their bounds
        return SecAggParams.for_round(
            sa.threshold or auto,
            sa.neighbours,
            clip,
            sa.bits,
            invited,
            levels=sa.code_levels,
            coverage=sa.coverage,
        )

    @property
    def _uploads_needed(self) -> int:
        """Uploads a round needs to complete (``min_uploads``, else ``min_agents``)."""
        return self.config.min_uploads or self.config.min_agents

    def _declines_said(self) -> str:
        """ ", N declined" when agents declined the round, for its abandon reason."""
        return f", {len(self._declined)} declined" if self._declined else ""

    def _invite(self, sa: SecAggConfig) -> tuple[frozenset[str], int, Mapping[str, str]]:
        """A masked round's invited agents, the colluders its threshold allows for (the configured
        ones, or the most any invited agent's policy names) and the agents left out by theirs."""
        invitation = invite(self.trainable, self.config.max_agents, self.agents, sa.neighbours, sa.threshold)
        for agent, why in invitation.left_out.items():
            log.warning("round %d: not inviting %s: %s", self._state.round_id + 1, agent, why)
            metrics.DECLINED.labels(**peer_labels(SpiffeId.parse(agent)), reason="privacy_policy").inc()
        colluders = max([sa.colluders, *(self.agents[a].colluders for a in invitation.invited)])
        return invitation.invited, colluders, {**self._spent(), **invitation.left_out}

    async def _run_secure_round(self, round_id: int, sa: SecAggConfig) -> bool:
        """advertise -> share -> masked upload -> unmask -> aggregate; abandoned below t at any phase."""
        base = self._state.global_version
        invited, colluders, self._left_out = self._invite(sa)
        needed = self._uploads_needed
        if len(invited) < needed:  # the round could never complete: say why now
            self.db.round_started(round_id, base, time.time(), sorted(invited))
            reason = (
                f"{len(invited)} agents can be invited ({len(self._left_out)} left out by their privacy"
                f" policy or budget), {needed} uploads needed"
            )
            await self._abandon(round_id, reason, "too_few_agents", [])
            return False
        k = sa.neighbours
        params = self._secagg_params(sa, auto_threshold(len(invited), k, colluders), len(invited))
        self.aggregation.start_round(round_id)
        coordinates = self.aggregation.secure_coordinates
        clips = self._clips = await asyncio.to_thread(self.aggregation.round_clips, sa, base, coordinates)
        length = params.fixed_point.masked_length(coordinates)
        secure = ServerRound(round_id, params, length, os.urandom(16))
        self._secure, self._acc = secure, None
        self._claimed, self._added, self._declined = set(), set(), {}
        self._all_in = asyncio.Event()
        self._weight_scale = float(max(self.agents[a].num_examples for a in invited) or 1)
        self.spool.purge()
        self.db.round_started(round_id, base, time.time() + self.config.upload_deadline_s, sorted(invited))
        try:
            try:
                params.check(len(invited), colluders)
            except ConfigError as exc:
                raise _Abandon(str(exc), "secagg_settings") from exc
            total, uploaded, dropped = await self._secure_phases(round_id, base, invited, secure, sa)
        except _Abandon as stop:
            self._secure = None
            await self._abandon(round_id, stop.reason, stop.label, sorted(invited - self._declined.keys()))
            return False
        try:
            return await self._finish(
                round_id,
                base,
                lambda: self._aggregate_masked(total, secure, base, uploaded, clips),
                uploaded,
                dropped,
                participants=frozenset(uploaded),
            )
        finally:
            self._secure = None

    async def _abandon(self, round_id: int, reason: str, label: str, dropped: list[str]) -> None:
        """End the round without a new version, saying why (also before its first phase)."""
        self.db.round_ended(round_id, Phase.ABANDONED.name, reason, dropped=dropped)
        metrics.ROUNDS.labels(outcome="abandoned", reason=label).inc()
        state = self._state
        if state.round_id != round_id:  # abandoned before any phase was announced
            state = RoundState(round_id, Phase.WAITING, state.global_version, left_out=self._left_out)
        await self._publish(replace(state, phase=Phase.ABANDONED, reason=reason))

    async def _finish(
        self,
        round_id: int,
        base: int,
        aggregate: Callable[[], Manifest],
        uploaded: list[str],
        dropped: list[str],
        participants: frozenset[str] | None = None,
    ) -> bool:
        """AGGREGATE (``aggregate`` off the event loop), then commit the version or abandon the round."""
        for uri in dropped:
            metrics.DROPPED.labels(**peer_labels(SpiffeId.parse(uri))).inc()
        self.db.phase(round_id, Phase.AGGREGATE.name)
        aggregating = replace(self._state, phase=Phase.AGGREGATE)
        await self._publish(
            aggregating if participants is None else replace(aggregating, participants=participants)
        )
        try:
            with metrics.PHASE_SECONDS.labels(phase="aggregate").time():
                manifest = await asyncio.to_thread(aggregate)
        except InvalidArgument as exc:
            await self._abandon(round_id, str(exc), "invalid_aggregate", dropped)
            return False
        self.db.version_committed(manifest.version, base, round_id, manifest.sha256, len(uploaded))
        self.db.round_ended(round_id, Phase.COMPLETED.name, new_version=manifest.version, dropped=dropped)
        metrics.ROUNDS.labels(outcome="completed", reason="").inc()
        await self.retain()  # before the announcement: agents see the disk as it stays
        await self._publish(replace(self._state, phase=Phase.COMPLETED, global_version=manifest.version))
        return True

    async def retain(self) -> None:
        """Prune the checkpoints no retention rule keeps (best effort: a failure is logged and the
        next commit tries again) and export what is left on disk."""
        ranking = self.keep.keep_last and self.keep.keep_best
        evals = self.db.version_evals() if ranking else {}

        def prune() -> tuple[list[int], int, int]:
            victims = retention.prune(self.store, evals, self.keep)
            return victims, len(self.store.versions()), self.store.disk_bytes()

        try:
            pruned, kept, on_disk = await asyncio.to_thread(prune)
        except Exception:
            log.exception("checkpoint retention failed; the checkpoints stay until the next version")
            return
        if pruned:
            log.info("pruned the checkpoints of versions %s ([checkpoints] retention)", pruned)
            metrics.CHECKPOINTS_PRUNED.inc(len(pruned))
        metrics.CHECKPOINTS_KEPT.set(kept)
        metrics.CHECKPOINT_BYTES.set(on_disk)

    async def _secure_phases(
        self, round_id: int, base: int, invited: frozenset[str], secure: ServerRound, sa: SecAggConfig
    ) -> tuple[np.ndarray, list[str], list[str]]:
        """The four key/masking phases; the unmasked ring sum, who is in it and who dropped."""
        t = secure.params.threshold

        async def phase(
            name: Phase, members: frozenset[str], answered: Callable[[], AbstractSet[str]], seconds: float
        ) -> None:
            """Announce phase ``name`` to ``members`` and wait until each has answered (or
            declined), or ``seconds`` passed."""
            self.db.phase(round_id, name.name)
            state = RoundState(
                round_id,
                name,
                base,
                members,
                time.time() + seconds,
                codec=self.aggregation.round_settings,
                left_out=self._left_out,
            )
            await self._publish(state)
            with metrics.PHASE_SECONDS.labels(phase=name.name.lower()).time():
                await self._phase_until(lambda: answered() | self._declined.keys() >= members, seconds)

        await phase(Phase.ADVERTISE_KEYS, invited, lambda: set(secure.advertisements), sa.key_deadline_s)
        try:
            roster = frozenset(a.agent_id for a in secure.roster())
        except Aborted as exc:
            raise _Abandon(str(exc), "too_few_keys") from exc
        await phase(Phase.SHARE_KEYS, roster, secure.shared, sa.key_deadline_s)
        shared = frozenset(secure.shared())
        if len(shared) < t:
            raise _Abandon(
                f"{len(shared)} agents shared keys{self._declines_said()}, threshold {t}", "too_few_keys"
            )
        secure.start_sum()
        await phase(Phase.UPLOAD, shared, lambda: self._added, self.config.upload_deadline_s)
        if self._pending:
            await asyncio.gather(*self._pending)
        needed = max(t, self._uploads_needed)
        uploaded = sorted(self._added)
        if len(uploaded) < needed:
            raise _Abandon(
                f"{len(uploaded)} of {len(shared)} masked uploads{self._declines_said()}, {needed} needed",
                "too_few_uploads",
            )
        survivors = frozenset(uploaded)
        await phase(Phase.UNMASK, survivors, lambda: set(secure.reveals), sa.key_deadline_s)
        try:
            total = await asyncio.to_thread(secure.unmasked_sum)
        except Aborted as exc:
            raise _Abandon(str(exc), "unmask_failed") from exc
        finally:
            self._count_wrong_shares(round_id, secure.wrong_reveals)
        dropped = sorted(invited - survivors - self._declined.keys())
        recovered = sorted(shared - survivors)
        if recovered:
            metrics.SECAGG_DROPOUTS_RECOVERED.inc(len(recovered))
        if dropped:
            log.warning("round %d: dropped %s (masks of %d recovered)", round_id, dropped, len(recovered))
        return total, uploaded, dropped

    @staticmethod
    def _count_wrong_shares(round_id: int, wrong_reveals: Mapping[str, AbstractSet[str]]) -> None:
        """Count each wrong share for its holder and its owner: the holder lied, or the owner dealt
        it a share off its polynomial, and the aggregator cannot tell which."""
        for holder, owners in wrong_reveals.items():
            log.warning(
                "round %d: shares revealed by %s of %s disagree with their owners' keys (it lied, or"
                " they dealt it wrong ones)",
                round_id,
                holder,
                sorted(owners),
            )
            labels = peer_labels(SpiffeId.parse(holder))
            metrics.SECAGG_WRONG_SHARES.labels(**labels, role="revealed").inc(len(owners))
            for owner in owners:
                metrics.SECAGG_WRONG_SHARES.labels(**peer_labels(SpiffeId.parse(owner)), role="dealt").inc()

    def _aggregate_masked(
        self,
        total: np.ndarray,
        secure: ServerRound,
        base: int,
        participants: list[str],
        clips: SegmentClips | None,
    ) -> Manifest:
        """The unmasked ring sum as a weighted mean (each element over its senders' weights with
        coverage), decoded and committed."""
        coordinates = self.aggregation.secure_coordinates
        if secure.coverage is not None:  # each element over its senders' weights (as the agents' own)
            weights = {
                a: update_weight(self.agents[a].num_examples, self._weight_scale) for a in participants
            }
            mean, weight = secure.covered_mean(total, weights, coordinates), sum(weights.values())
        else:
            mean, weight = secure.params.fixed_point.decode_weighted_mean(
                total, len(participants), coordinates
            )
        return self.aggregation.commit_masked(mean, weight, base, participants, clips)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


class _Abandon(Exception):
    """Ends a secure round early with a reason and a metric label."""

    def __init__(self, reason: str, label: str) -> None:
        super().__init__(reason)
        self.reason, self.label = reason, label


def auto_threshold(agents: int, neighbours: int, colluders: int = 0) -> int:
    """The least safe threshold (``graph.majority``): more than half of the agents holding each
    agent's shares (all n with the full graph, else k neighbours and the agent itself) plus the
    agents that may collude with the aggregator; at most the holders (then no dropout is tolerated)."""
    holders = share_holders(agents, neighbours)
    return min(majority(holders, colluders), holders)
