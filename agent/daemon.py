"""The agent daemon: join, follow rounds, train locally, upload, evaluate each new version."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import math
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from google.protobuf import json_format
from safetensors.torch import load_file, save_file

from agent import metrics
from agent.client import AggregatorClient
from agent.data import TokenBlocks
from agent.distributed import DistContext
from agent.dp_budget import EvalTooNoisy, PrivacyBudgetSpent, PrivacyLedger, SharedEval
from agent.dp_sgd import DpStep
from agent.dp_units import PrivacyUnits, user_units
from agent.privacy import announced, check_federation, describe
from agent.revocations import AgentRevocations
from agent.secure import SecureParticipation, Signer
from agent.token_store import TokenStore, open_entry
from agent.trainer import HeldOutLosses, LocalTraining, LoraSpec, LoraTrainer, pick_device, pick_dtype
from agent.uplink import upload_header
from common.backoff import backoff_delays
from common.codecs import registry
from common.codecs.autoencoder import Autoencoder, load_autoencoder
from common.codecs.base import Codec
from common.codecs.eigen import Eigen
from common.codecs.feedback import ErrorFeedback
from common.codecs.state import CodecState
from common.config import AgentConfig
from common.errors import CloudfedError, ConfigError, DataLoss, PolicyRefused, TrainingFailed
from common.layout import ParamLayout
from common.metrics import publish_validity
from common.revocation import RevocationList
from common.secagg.keys import RosterError
from common.secagg_pb import DECLINE_REASONS
from protos.cloudfed.v1 import federation_pb2 as pb

log = logging.getLogger(__name__)
FATAL = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
"""Statuses no retry can fix: the operator must act."""
KEEP_VERSIONS = 2
SECAGG_WAIT_S = 4 * 3600.0
"""Longest wait for a secure-aggregation phase (the aggregator's deadlines end phases sooner)."""


@dataclass
class Progress:
    """What this agent did in this process's lifetime."""

    rounds_trained: set[int] = field(default_factory=set)
    versions_evaluated: dict[int, float] = field(default_factory=dict)


class Worker:
    """What every rank does: hold the model and its shard of the data, run commands from rank 0."""

    def __init__(self, config: AgentConfig, ctx: DistContext) -> None:
        self.config = config
        self.ctx = ctx
        self.store = TokenStore(config.state_dir / "tokens")
        dp = config.privacy.dp
        self.corpus = (
            self.store.corpus(config.data, config.eval_fraction, user_field=dp.users)
            if ctx.is_leader
            else None
        )
        """The records, split and counted (rank 0: it alone tokenizes them into the store)."""
        self.trainer: LoraTrainer | None = None
        self.train_blocks = self.eval_blocks = TokenBlocks.empty()
        self.train_records = 0
        """Training examples over all ranks (with DP-SGD: records, one a row)."""
        self.units: PrivacyUnits | None = None
        """This rank's DP-SGD units (records or users) and their rows in ``train_blocks``."""
        self.eval_units: PrivacyUnits | None = None
        """With DP: this rank's held-out units and their rows in ``eval_blocks``."""
        self.block = 0
        """The token blocks' length (the federation's ``sequence_length``)."""
        self.train_units = 0
        """DP-SGD units over all ranks: records, or users with user-level privacy."""

    def execute(self, command: dict[str, Any]) -> Any:
        """Run one command (the same on every rank)."""
        op = command["op"]
        if op == "init":
            if self.trainer is None:
                device = self.ctx.device(pick_device(self.config.device))
                dtype = pick_dtype(self.config.precision, device)
                checkpointing = self.config.activation_checkpointing
                private = self.config.privacy.dp.enabled
                nf4 = self.config.precision == "nf4"
                self.trainer = LoraTrainer(
                    command["model"],
                    command["lora"],
                    device,
                    self.ctx,
                    dtype,
                    checkpointing,
                    private,
                    self.config.loss_chunk_logits,
                    nf4,
                )
                log.info(
                    "rank %d: training on %s, base weights %s%s, %s",
                    self.ctx.rank,
                    device,
                    f"4-bit NF4 computed in {dtype}" if nf4 else dtype,
                    ", activation checkpointing" if checkpointing else "",
                    self.trainer.losses.describe(),
                )
                self._open_blocks(self.trainer.tokenizer, command["sequence_length"])
            return ParamLayout.from_tensors(self.trainer.adapter()).digest
        if op == "release":  # the federation is finished: give the memory back until it resumes
            self.trainer = None
            self.train_blocks = self.eval_blocks = TokenBlocks.empty()
            self.units = self.eval_units = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None
        assert self.trainer is not None
        if op == "train":
            self.trainer.set_adapter(command["adapter"])
            delta, loss = self.trainer.train(
                self.train_blocks, command["training"], command["round_id"], command.get("dp"), self.units
            )
            log.info(
                "rank %d/%d: round %d trained on %d local blocks (loss %.4f)",
                self.ctx.rank,
                self.ctx.world_size,
                command["round_id"],
                len(self.train_blocks) if self.units is None else self.units.rows,
                loss,
            )
            return delta, loss
        if op == "eval":
            self.trainer.set_adapter(command["adapter"])
            if self.eval_units is None:
                return self.trainer.evaluate(self.eval_blocks)
            dp = self.config.privacy.dp
            return self.trainer.evaluate_units(
                self.eval_blocks, self.eval_units, dp.eval_loss_clip, self.eval_token_cap
            )
        raise ValueError(f"unknown command {op!r}")

    def _open_blocks(self, tokenizer: Any, length: int) -> None:
        """Map this rank's shard of the token blocks: packed, or with DP-SGD one row a record (a
        record is then one example; with user-level privacy the rank's shard is whole users).
        Rank 0 tokenizes the corpus into the store if it is not there yet and tells the other
        ranks where it is, or why it failed."""
        dp = self.config.privacy.dp
        per_record = dp.enabled
        if self.corpus is not None:
            try:
                where = {"entry": str(self.store.prepare(self.corpus, tokenizer, length, per_record))}
            except ConfigError as exc:
                self.ctx.broadcast({"error": str(exc)})
                raise
            self.ctx.broadcast(where)
        else:
            where = self.ctx.broadcast(None)
            if "error" in where:
                raise ConfigError(where["error"])
        blocks = open_entry(Path(where["entry"]), length)
        self.block = length
        rank, world = self.ctx.rank, self.ctx.world_size
        if dp.users:
            if blocks.train_users is None:
                raise ConfigError(f"token store entry {where['entry']} holds no users")
            self.train_blocks = blocks.train  # the units index this rank's users' rows in it
            self.units = user_units(np.asarray(blocks.train_users), rank, world, dp.records_per_user)
            log.info("rank %d: %d users holding %d training rows", rank, len(self.units), self.units.rows)
        else:
            self.train_blocks = _shard(blocks.train, rank, world)
            self.units = PrivacyUnits.records(len(self.train_blocks)) if per_record else None
        if dp.users:
            if blocks.eval_users is None:
                raise ConfigError(f"token store entry {where['entry']} holds no users")
            self.eval_blocks = blocks.eval
            self.eval_units = user_units(np.asarray(blocks.eval_users), rank, world, allow_empty=True)
        else:
            self.eval_blocks = _shard(blocks.eval, rank, world)
            self.eval_units = PrivacyUnits.records(len(self.eval_blocks)) if per_record else None
        rows = len(self.train_blocks) if self.units is None else self.units.rows
        units = rows if self.units is None else len(self.units)
        self.train_records, self.train_units = (
            round(n) for n in self.ctx.all_sum([float(rows), float(units)])
        )
        if dp.users and self.ctx.is_leader:
            log.info(
                "user-level DP-SGD: %d training records of %d users (at most %d records of a user a step)",
                self.train_records,
                self.train_units,
                dp.records_per_user,
            )
        if per_record and blocks.cut and self.ctx.is_leader:
            log.warning(
                "DP-SGD: %d of %d training records are longer than sequence_length (%d tokens) and were"
                " cut to it; split long documents into records to train on all of them",
                blocks.cut,
                self.corpus.train_records if self.corpus else 0,
                length,
            )

    @property
    def eval_token_cap(self) -> int:
        """The most learned tokens of one held-out unit a shared eval loss is weighed by: a
        row's, or with user-level privacy ``records_per_user`` rows'."""
        dp = self.config.privacy.dp
        return self.block * (dp.records_per_user if dp.unit == "user" else 1)

    def follow(self) -> None:
        """Ranks > 0: run rank 0's commands until it says stop. A failed training (the ranks decide
        it together, so rank 0 failed too and sits the round out) leaves this rank waiting for
        the next command; any other error ends it, and torchrun stops the job."""
        while (command := self.ctx.broadcast(None))["op"] != "stop":
            try:
                self.execute(command)
            except TrainingFailed as exc:
                log.warning("rank %d: %s", self.ctx.rank, exc)


def sat_out_reason(exc: CloudfedError) -> str:
    """The ``reason`` label of a round this agent refused: its privacy policy, a roster that did
    not verify, or any other protocol check."""
    if isinstance(exc, PrivacyBudgetSpent):
        return "privacy_budget"
    if isinstance(exc, PolicyRefused):
        return "privacy_policy"
    if isinstance(exc, RosterError):
        return "roster"
    if isinstance(exc, TrainingFailed):
        return "training"
    return "protocol"


async def _decline(client: AggregatorClient, round_id: int, reason: str, detail: str) -> None:
    """Best effort: tell the aggregator we sit ``round_id`` out, so that it stops waiting for us
    (an older aggregator, or a round that moved on, is logged and otherwise ignored)."""
    try:
        await client.decline_round(round_id, DECLINE_REASONS[reason], detail)
    except grpc.aio.AioRpcError as exc:
        log.info("round %d: could not decline: %s %s", round_id, exc.code().name, exc.details())


async def _keys_while_training(keys: Coroutine[Any, Any, None], training: asyncio.Future[Any]) -> None:
    """Run the key phases while the model trains. A training that fails first stops them: the
    agent declines at once, before the roster closes or it shares keys where it can, so that
    the round neither counts on it nor has its masks to recover."""
    task = asyncio.ensure_future(keys)
    await asyncio.wait({task, training}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done() and not training.cancelled() and training.exception() is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return  # the caller awaits the training and raises its error
    await task


def _shard(blocks: TokenBlocks, rank: int, world: int) -> TokenBlocks:
    shard = blocks[rank::world]
    if len(shard) == 0:
        raise ConfigError(f"data: {len(blocks)} token blocks cannot be shared by {world} ranks")
    return shard


class Agent:
    """Rank 0: the connection loop, driving the Worker on every rank."""

    def __init__(self, config: AgentConfig, ctx: DistContext | None = None) -> None:
        self.config = config
        self.ctx = ctx or DistContext()
        self.worker = Worker(config, self.ctx)
        assert self.worker.corpus is not None
        self.corpus = self.worker.corpus
        self.state = config.state_dir
        (self.state / "models").mkdir(parents=True, exist_ok=True)
        (self.state / "uploads").mkdir(parents=True, exist_ok=True)
        self.progress = Progress()
        dp = config.privacy.dp
        self.ledger = PrivacyLedger(self.state, dp) if dp.enabled else None
        self.announced_units = self.announced_weight = 0
        """The training units this agent's sample rate is over, and its FedAvg weight, as they
        may leave the cloud (``_announce``)."""
        self.uncounted = ""
        """Why the counts could not be released (the budget): the agent then trains no round."""
        self.revocations = AgentRevocations(self.state, config.tls)
        self._shared: tuple[str, Codec] | None = None  # (state digest, codec built from that state)
        log.info(
            "%d training and %d evaluation documents from %s",
            self.corpus.train_records,
            self.corpus.eval_records,
            config.data,
        )

    async def everywhere(self, **command: Any) -> Any:
        """Broadcast a command to every rank and run it here too (off the event loop)."""
        return await asyncio.to_thread(lambda: self.worker.execute(self.ctx.broadcast(command)))

    def stop_followers(self) -> None:
        """Release ranks > 0 (rank 0 is leaving)."""
        if self.ctx.enabled:
            self.ctx.broadcast({"op": "stop"})

    async def run(self, stop: asyncio.Event) -> None:
        """Stay in the federation until ``stop`` or ``max_rounds``; reconnect with backoff."""
        delays = backoff_delays(initial_s=1.0, maximum_s=30.0)
        while not stop.is_set():
            files = self.config.tls.files()
            with contextlib.suppress(ConfigError):  # unreadable files: the client says so next
                publish_validity(files)  # an expired certificate fails the handshake as UNAVAILABLE
            try:
                async with AggregatorClient(
                    self.config.aggregator,
                    files,
                    server_name=self.config.server_name,
                    chunk_bytes=self.config.chunk_bytes,
                ) as client:
                    if await self._until_stopped(self._session(client, stop), stop):
                        return
                    delays = backoff_delays(initial_s=1.0, maximum_s=30.0)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in FATAL:
                    raise
                delay = next(delays)
                log.warning(
                    "aggregator unavailable (%s: %s); reconnecting in %.1fs",
                    exc.code().name,
                    exc.details(),
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    @staticmethod
    async def _until_stopped(work: Coroutine[Any, Any, bool], stop: asyncio.Event) -> bool:
        """Run ``work``; cancel it as soon as ``stop`` is set (then True: we are done)."""
        task = asyncio.ensure_future(work)
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            stopper.cancel()
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("stopped")
        return True

    async def _session(self, client: AggregatorClient, stop: asyncio.Event) -> bool:
        """One connection's life; True once max_rounds is reached."""
        try:
            self.announced_units, self.announced_weight = await asyncio.to_thread(self._announce)
            self.uncounted = ""
        except PrivacyBudgetSpent as exc:  # its rounds are over: it still evaluates new versions
            log.warning("%s; joining to evaluate new versions only, with no count", exc)
            self.announced_units = self.announced_weight = 0
            self.uncounted = str(exc)
        spent = self.uncounted or (
            self.ledger.exhausted.refusal if self.ledger and self.ledger.exhausted else ""
        )
        join = await client.join(
            num_examples=self.announced_weight,
            device=self._device_info(),
            privacy=announced(self.config.privacy, spent, self.ledger.epsilon if self.ledger else 0.0),
        )
        settings = join.settings
        check_federation(self.config.privacy, settings)  # PolicyRefused: nothing is sent, we exit
        log.info(
            "joined %s as %s at global version %d; %s",
            settings.federation_id,
            join.agent_id,
            join.global_version,
            describe(self.config.privacy, settings),
        )
        await self._prepare(settings)
        if self.ledger is not None:  # ConfigError (the daemon exits) for a delta too large for the data
            self.ledger.check_delta(self.worker.train_units)
            self._publish_privacy(client)
            if (
                spent
                and not self.uncounted
                and not self.ledger.still_exhausted(
                    self.ledger.settings(*self._spend_inputs(settings.training))
                )
            ):
                log.info(
                    "the federation's settings or this agent's changed since its privacy budget was"
                    " found spent; joining again to be invited (the next round's plan decides)"
                )
                return False
        if join.global_version not in self.progress.versions_evaluated:
            await self._evaluate(client, join.global_version)
        not_invited = 0  # the last round we were left out of by our policy (counted once)
        async for event in client.watch_rounds():
            if stop.is_set():
                return True
            if event.not_invited and event.round_id != not_invited:
                not_invited = event.round_id
                metrics.ROUNDS_SAT_OUT.labels(**client.labels, reason="privacy_policy").inc()
                log.warning("round %d: not invited: %s", event.round_id, event.not_invited)
            starts = pb.ROUND_PHASE_ADVERTISE_KEYS if settings.secagg.enabled else pb.ROUND_PHASE_UPLOAD
            if (
                event.phase == starts
                and event.participant
                and event.round_id not in self.progress.rounds_trained
            ):
                try:
                    await self._take_part(client, settings, event, join.agent_id)
                except CloudfedError as exc:  # e.g. a roster that does not verify: sit this round out
                    reason = sat_out_reason(exc)
                    metrics.ROUNDS_SAT_OUT.labels(**client.labels, reason=reason).inc()
                    log.error("round %d: not taking part: %s", event.round_id, exc)
                    await _decline(client, event.round_id, reason, str(exc))
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or not settings.secagg.enabled:
                        raise
                    metrics.ROUNDS_SAT_OUT.labels(**client.labels, reason="aggregator").inc()
                    log.warning("round %d: the aggregator ended our part: %s", event.round_id, exc.details())
                except Exception as exc:  # a crash (out of memory, a lost rank): decline, then exit
                    metrics.ROUNDS_SAT_OUT.labels(**client.labels, reason="training").inc()
                    log.error(
                        "round %d: the agent failed (%s: %s); declining it",
                        event.round_id,
                        type(exc).__name__,
                        exc,
                    )
                    detail = f"agent error: {type(exc).__name__}: {exc}"
                    await _decline(client, event.round_id, "training", detail)
                    raise  # the round does not wait for its deadline; the supervisor restarts us
            if event.global_version not in self.progress.versions_evaluated:
                # Not only at a round's completion: versions committed between Join and the watch
                # (while this agent loaded its model) are first seen as the base of a later round,
                # and evaluated, each of them, once that round's part is done.
                await self._evaluate_since(client, join.global_version, event.global_version)
                done = len(self.progress.versions_evaluated) - 1
                if self.config.max_rounds and done >= self.config.max_rounds:
                    log.info("evaluated %d new versions; stopping (max_rounds)", done)
                    return True
            if event.phase == pb.ROUND_PHASE_ABANDONED:
                log.warning("round %d abandoned: %s", event.round_id, event.reason)
            elif event.phase == pb.ROUND_PHASE_FINISHED:
                then = "stopping" if self.config.exit_when_finished else "idle until it resumes"
                log.info(
                    "the federation is finished at version %d (%s); %s",
                    event.global_version,
                    event.reason,
                    then,
                )
                if self.config.exit_when_finished:
                    return True
                await self.everywhere(op="release")  # a resumed federation reconnects and reloads it
        return False

    def _device_info(self) -> pb.DeviceInfo:
        device = pick_device(self.config.device)
        info = pb.DeviceInfo(
            accelerator=device.split(":")[0],
            device_count=self.ctx.world_size,
            torch_version=torch.__version__,
        )
        if device.startswith("cuda"):
            props = torch.cuda.get_device_properties(torch.device(device))
            info.device_name, info.memory_bytes = props.name, props.total_memory
        return info

    async def _prepare(self, settings: pb.FederationSettings) -> None:
        """Load the model and tokenize the data once (every rank); check the adapter layout matches."""
        model = self.config.model or settings.model_id
        if not model:
            raise ConfigError("model: the federation names no model_id; set 'model' in the agent config")
        lora = LoraSpec(
            settings.lora.rank,
            settings.lora.alpha,
            tuple(settings.lora.target_modules),
            settings.lora.dropout,
        )
        if self.worker.trainer is None:
            log.info(
                "loading %s with LoRA r=%d on %s (%d ranks)",
                model,
                lora.rank,
                list(lora.target_modules),
                self.ctx.world_size,
            )
        digest = await self.everywhere(
            op="init", model=model, lora=lora, sequence_length=settings.training.sequence_length
        )
        if digest != settings.layout.digest:
            raise ConfigError(
                "the local model's adapter layout differs from the federation's "
                "(another model, LoRA settings or peft version?)"
            )

    async def _global(self, client: AggregatorClient, version: int) -> dict[str, torch.Tensor]:
        path = self.state / "models" / f"v{version:08d}.safetensors"
        if not path.exists():
            with metrics.step("download"):
                await client.download_model(path, version)
            for old in sorted((self.state / "models").glob("v*.safetensors"))[:-KEEP_VERSIONS]:
                old.unlink(missing_ok=True)
        return load_file(path)

    async def _train(
        self, base: dict[str, torch.Tensor], training: LocalTraining, round_id: int, dp: DpStep | None
    ) -> tuple[dict[str, torch.Tensor], float]:
        with metrics.step("train"):
            result: tuple[dict[str, torch.Tensor], float] = await self.everywhere(
                op="train", adapter=base, training=training, round_id=round_id, dp=dp
            )
        return result

    async def _plan_privacy(self, round_id: int, t: pb.TrainingSettings) -> DpStep | None:
        """The round's DP-SGD settings (None without ``privacy.dp``); PrivacyBudgetSpent when the
        round does not fit in the budget."""
        if self.ledger is None:
            return None
        if self.uncounted:  # invited all the same (the aggregator should not have): decline
            raise PrivacyBudgetSpent(self.uncounted)
        return await asyncio.to_thread(self.ledger.plan, round_id, *self._spend_inputs(t))

    def _spend_inputs(self, t: pb.TrainingSettings) -> tuple[int, int, int, int]:
        """What a round's privacy spend depends on besides the DP config: units (records or
        users, as announced), batch, ranks, steps (``PrivacyLedger.plan`` and ``settings``)."""
        return self.announced_units, t.batch_size, self.ctx.world_size, t.local_steps

    def _announce(self) -> tuple[int, int]:
        """The training units (records or users) and the FedAvg weight (records) this agent
        announces: the true records without DP; with DP-SGD the ledger's noisy releases, which the
        guarantee covers, the user-level weight counting each user's records up to
        ``records_per_user`` (ConfigError for a delta too large for the units, PrivacyBudgetSpent
        if a new count does not fit in the budget)."""
        if self.ledger is None:
            return self.corpus.train_records, self.corpus.train_records
        capped = self.corpus.capped_records(self.config.privacy.dp.records_per_user)
        return self.ledger.announce(self.corpus.train_units, capped)

    async def _revocations(self, client: AggregatorClient) -> RevocationList | None:
        """The revocations to check this round's roster against (``agent.revocations``)."""
        served = await client.revocation_list() if self.config.tls.crl_from_aggregator else None
        return await asyncio.to_thread(self.revocations.for_round, served)

    def _publish_privacy(self, client: AggregatorClient) -> None:
        """The privacy spent and the budget, as gauges (with DP-SGD only)."""
        if self.ledger is not None:
            unit = self.ledger.config.unit
            metrics.DP_EPSILON_BUDGET.labels(**client.labels, unit=unit).set(self.ledger.config.max_epsilon)
            metrics.DP_EPSILON.labels(**client.labels, unit=unit).set(self.ledger.epsilon)
            metrics.DP_EVAL_EPSILON.labels(**client.labels, unit=unit).set(self.ledger.eval_epsilon)

    async def _take_part(
        self, client: AggregatorClient, settings: pb.FederationSettings, event: pb.RoundEvent, agent_id: str
    ) -> None:
        t = settings.training
        dp = await self._plan_privacy(event.round_id, t)  # PrivacyBudgetSpent: declined
        base = await self._global(client, event.global_version)
        training = LocalTraining(t.local_steps, t.learning_rate, t.batch_size, t.sequence_length, t.seed)
        began = time.monotonic()
        if settings.secagg.enabled:  # round keys are single-use: a masked round is never retried
            self.progress.rounds_trained.add(event.round_id)
        training_task = asyncio.ensure_future(self._train(base, training, event.round_id, dp))
        secure = None
        try:
            if settings.secagg.enabled:  # key phases run while the model trains
                secure = SecureParticipation(
                    client,
                    Signer.load(self.config.tls.files(), await self._revocations(client)),
                    agent_id,
                    settings.secagg,
                    event.round_id,
                    wait_s=SECAGG_WAIT_S,
                    policy=self.config.privacy,
                )
                await _keys_while_training(secure.keys(), training_task)
            try:
                delta, train_loss = await training_task
            except CloudfedError as exc:  # e.g. the loss diverged
                raise TrainingFailed(f"local training failed: {exc}") from exc
        finally:
            if not training_task.done():  # a key phase failed: let the ranks finish before leaving
                with contextlib.suppress(Exception):
                    await training_task
        if dp is not None:  # before anything of this training leaves the cloud
            assert self.ledger is not None
            await asyncio.to_thread(self.ledger.record, event.round_id, dp, t.local_steps)
            self._publish_privacy(client)
        with metrics.step("encode"):
            layout = ParamLayout.from_tensors(base)
            payload = self.state / "uploads" / f"round-{event.round_id}.bin"
            vector = layout.flatten(delta)
            spec = event.codec if event.HasField("codec") else settings.codec  # the round's, e.g. full
            codec_settings = registry.settings_from(
                spec.name, json_format.MessageToDict(spec.params), settings.training.seed
            )
            shared = await self._shared_codec(client, codec_settings, layout)
            codec = registry.make(codec_settings, vector.size, event.round_id, shared)
            coords = await asyncio.to_thread(self._encode_coords, codec, vector)
            if secure is None:
                weight = float(self.announced_weight)
                encoded = registry.encode_plain(codec, vector, weight, encoded=coords)
            else:
                weight = secure.weight(self.announced_weight)
                encoded = await asyncio.to_thread(secure.mask, coords, weight)
            await asyncio.to_thread(payload.write_bytes, encoded)
        labels = client.labels
        metrics.UPDATE_RAW_BYTES.labels(**labels).inc(vector.nbytes)
        metrics.UPDATE_ENCODED_BYTES.labels(**labels).inc(len(encoded))
        spent = self.ledger.epsilon if self.ledger is not None else 0.0
        header = upload_header(
            event.round_id, spec, layout.digest, event.global_version, weight, encoded, spent
        )
        if self.config.audit_dir is not None:
            self._audit(event, header, delta, train_loss)
        with metrics.step("upload"):
            receipt = await client.upload(payload, header, new=True)  # a fresh upload id
        payload.unlink(missing_ok=True)
        self.progress.rounds_trained.add(event.round_id)
        metrics.ROUNDS_TRAINED.labels(**labels).inc()
        metrics.EGRESS_COST.labels(cloud=labels["cloud"]).inc(
            len(encoded) / 1e9 * self.config.egress_price_per_gb
        )
        log.info(
            "round %d: trained %d steps (loss %.4f) in %.1fs, uploaded %d bytes (update norm %.4g)",
            event.round_id,
            t.local_steps,
            train_loss,
            time.monotonic() - began,
            receipt.committed_bytes,
            float(np.linalg.norm(vector)),
        )
        if secure is not None:
            await secure.unmask()

    async def _shared_codec(
        self, client: AggregatorClient, settings: registry.CodecSettings, layout: ParamLayout
    ) -> Codec | None:
        """The codec built from the aggregator's codec state (``eigen`` bases, the ``autoencoder``
        network): downloaded once by digest into the state dir, checked, and kept; None for codecs
        without state."""
        if settings.name not in ("eigen", "autoencoder"):
            return None
        digest = settings.state_sha256
        if self._shared is not None and self._shared[0] == digest:
            return self._shared[1]
        path = self.state / "codec" / f"state-{digest}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            await client.download_codec_state(digest, path)
            log.info("codec state %s downloaded (%d bytes)", digest[:16], path.stat().st_size)
        state = await asyncio.to_thread(CodecState.of, path)
        if state.sha256 != digest:  # a file damaged on disk: fetched again next round
            path.unlink()
            raise DataLoss(f"codec state {path} does not match its digest {digest}")
        codec: Codec
        if settings.name == "eigen":
            codec = Eigen(layout, await asyncio.to_thread(state.tensors))
        else:
            codec = Autoencoder(layout.numel, await asyncio.to_thread(load_autoencoder, path))
        self._shared = (digest, codec)
        return codec

    def _encode_coords(self, codec: Codec | None, vector: np.ndarray) -> np.ndarray:
        """The codec's coordinates of the update; biased codecs go through error feedback (the
        residual is kept in the state dir, so it survives restarts)."""
        if codec is None:
            return vector
        if not codec.biased:
            return codec.encode(vector)
        residual = self.state / "codec" / f"residual-{codec.name}.npy"
        return ErrorFeedback(codec, vector.size, residual).encode(vector)

    def _audit(
        self, event: pb.RoundEvent, header: pb.UploadHeader, delta: dict[str, torch.Tensor], train_loss: float
    ) -> None:
        """Write exactly what left the cloud this round: the update (unmasked) and its metadata."""
        assert self.config.audit_dir is not None
        audit = self.config.audit_dir
        audit.mkdir(parents=True, exist_ok=True)
        stem = audit / f"round-{event.round_id:06d}"
        save_file(delta, str(stem) + ".safetensors")
        meta = {
            "round_id": event.round_id,
            "base_version": event.global_version,
            "upload_id": header.upload_id,
            "codec": header.codec.name,
            "layout_digest": header.layout_sha256.hex(),
            "weight": header.weight,
            "payload_sha256": header.sha256.hex(),
            "train_loss": train_loss,
            "time": time.time(),
        }
        Path(str(stem) + ".json").write_text(json.dumps(meta, indent=2))

    async def _evaluate_since(self, client: AggregatorClient, joined: int, version: int) -> None:
        """Evaluate ``version`` and every version after ``joined`` (this session's Join) before it
        not evaluated yet, oldest first; one the aggregator no longer keeps is skipped."""
        for missed in range(joined + 1, version):
            if missed in self.progress.versions_evaluated:
                continue
            try:
                await self._evaluate(client, missed)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                log.warning("global version %d: not evaluated, the aggregator no longer has it", missed)
        await self._evaluate(client, version)

    async def _evaluate(self, client: AggregatorClient, version: int) -> None:
        tensors = await self._global(client, version)
        with metrics.step("eval"):
            result = await self.everywhere(op="eval", adapter=tensors)
        held_out = result if isinstance(result, HeldOutLosses) else None
        loss, tokens = (held_out.loss, held_out.tokens) if held_out else result
        self.progress.versions_evaluated[version] = loss
        record: dict[str, Any] = {
            "version": version,
            "eval_loss": loss,
            "tokens": tokens,
            "time": time.time(),
        }
        if not math.isfinite(loss):  # the aggregator refuses it: say it here instead
            self._log_eval(record)
            log.error(
                "global version %d: eval loss %s on this cloud's held-out text; not reported", version, loss
            )
            await self._withhold(
                client, version, "not_finite", f"the eval loss is {loss} on this cloud's held-out text"
            )
            return
        metrics.EVAL_LOSS.labels(**client.labels).set(loss)
        if not self.config.privacy.share_eval_losses:
            self._log_eval(record)
            log.info(
                "global version %d: eval loss %.4f on %d local tokens, kept in this cloud"
                " (privacy.share_eval_losses is false)",
                version,
                loss,
                tokens,
            )
            await self._withhold(
                client, version, "not_shared", "kept in its cloud: privacy.share_eval_losses is false"
            )
            return
        shared = SharedEval(loss, tokens, 0.0)
        if held_out is not None:
            assert self.ledger is not None
            unit = self.ledger.config.unit
            try:
                shared = await asyncio.to_thread(self._release_eval, version, held_out)
            except (PrivacyBudgetSpent, EvalTooNoisy) as exc:
                self._log_eval(record | {"kept": str(exc)})
                log.warning("global version %d: eval loss %.4f kept in this cloud: %s", version, loss, exc)
                why = "privacy_budget" if isinstance(exc, PrivacyBudgetSpent) else "too_noisy"
                await self._withhold(client, version, why, f"kept in its cloud: {exc}")
                return
            finally:
                metrics.DP_EVAL_EPSILON.labels(**client.labels, unit=unit).set(self.ledger.eval_epsilon)
            record |= {
                "released_loss": shared.loss,
                "released_tokens": shared.tokens,
                "released_stddev": shared.stddev,
            }
        self._log_eval(record)
        await client.report_eval(version, shared.loss, shared.tokens, shared.stddev)
        if held_out is None:
            log.info("global version %d: eval loss %.4f on %d local tokens", version, loss, tokens)
        else:
            log.info(
                "global version %d: eval loss %.4f on %d local tokens; released with differential privacy"
                " as %.4f (noise of deviation %.3g) on %d tokens",
                version,
                loss,
                tokens,
                shared.loss,
                shared.stddev,
                shared.tokens,
            )

    async def _withhold(self, client: AggregatorClient, version: int, reason: str, words: str) -> None:
        """Tell the aggregator why a version's eval loss is not reported (a ``reason`` of
        ``EVAL_WITHHELD_REASONS``, in ``words``; an aggregator of an earlier release refuses such
        a report: then it is only logged here)."""
        metrics.EVALS_WITHHELD.labels(**client.labels, reason=reason).inc()
        try:
            await client.report_withheld(version, reason, words)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            log.info(
                "global version %d: the aggregator takes no withheld eval report (%s)", version, exc.details()
            )

    def _log_eval(self, record: dict[str, Any]) -> None:
        """Append a version's evaluation to ``evals.jsonl`` (in this cloud's state dir)."""
        with open(self.state / "evals.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _release_eval(self, version: int, held_out: HeldOutLosses) -> SharedEval:
        """The version's eval loss and weight as the ledger releases them, noised and accounted
        (the same model and held-out data get the same release back)."""
        assert self.ledger is not None
        model = self.state / "models" / f"v{version:08d}.safetensors"
        digest = hashlib.sha256(model.read_bytes()).hexdigest()
        subject = f"{digest}:{self.corpus.fingerprint}:{self.worker.block}"
        return self.ledger.release_eval(
            subject,
            version,
            held_out.clipped_sum,
            held_out.units,
            held_out.capped_tokens,
            self.worker.eval_token_cap,
        )
