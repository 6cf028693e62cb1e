"""Test helpers that play an agent through the real client: watch, encode, upload."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from agent.client import AggregatorClient
from agent.daemon import Agent
from agent.secure import SecureParticipation, Signer
from common.codecs import identity
from common.config import AggregatorConfig
from protos.cloudfed.v1 import federation_pb2 as pb
from server.app import Aggregator, build_aggregator
from server.cli import seed


class Watcher:
    """Keeps a WatchRounds stream open (that is what makes an agent 'connected')."""

    def __init__(self, client: AggregatorClient) -> None:
        self.events: asyncio.Queue[pb.RoundEvent] = asyncio.Queue()
        self._task = asyncio.create_task(self._run(client))

    async def _run(self, client: AggregatorClient) -> None:
        for _ in range(50):  # re-watch after a broken connection, as the agent daemon does
            try:
                async for event in client.watch_rounds():
                    await self.events.put(event)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)

    async def until_version(self, version: int, timeout: float = 60.0) -> pb.RoundEvent:
        """The first event at or past global ``version``."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.events.get()
                if event.global_version >= version:
                    return event

    async def until(self, phase: int, timeout: float = 60.0) -> pb.RoundEvent:
        """The next event in ``phase``."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.events.get()
                if event.phase == phase:
                    return event

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


def write_payload(path: Path, delta: np.ndarray, weight: float) -> Path:
    """Encode an update with the identity codec into ``path``."""
    path.write_bytes(identity.encode(delta, weight))
    return path


def upload_header(event: pb.RoundEvent, layout_digest: str, weight: float, **kw: object) -> pb.UploadHeader:
    """A header for the round in ``event``."""
    fields: dict[str, object] = dict(
        round_id=event.round_id,
        upload_id=uuid.uuid4().hex,
        codec=pb.CodecSpec(name=identity.NAME),
        layout_sha256=bytes.fromhex(layout_digest),
        base_version=event.global_version,
        weight=weight,
    )
    fields.update(kw)
    return pb.UploadHeader(**fields)  # type: ignore[arg-type]


def round_update(run, version: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """A small update, the same for a version in every run (``run``: the tests' running aggregator)."""
    return np.random.default_rng(version).normal(size=run.agg.rounds.layout.numel) * 0.01


async def upload_next_round(  # type: ignore[no-untyped-def]
    run, client: AggregatorClient, watcher: Watcher, join: pb.JoinResponse, version: int, tmp: Path
) -> pb.RoundEvent:
    """Upload ``round_update(version)`` (weight 10) in the next round to open and wait for
    ``version`` to commit; return the round's event."""
    event = await watcher.until(pb.ROUND_PHASE_UPLOAD)
    payload = write_payload(tmp / f"u{version}-{event.round_id}.bin", round_update(run, version), 10.0)
    await client.upload(payload, upload_header(event, join.settings.layout.digest, 10.0))
    await watcher.until_version(version)
    return event


@dataclass
class KeyPhase:
    """An agent at the start of a masked round: its client, Join reply, watcher, the round's
    event and its secure participation (keys not yet advertised)."""

    client: AggregatorClient
    join: pb.JoinResponse
    watcher: Watcher
    event: pb.RoundEvent
    part: SecureParticipation


@contextlib.asynccontextmanager
async def in_key_phase(run, name: str) -> AsyncIterator[KeyPhase]:  # type: ignore[no-untyped-def]
    """``name`` joins, watches and waits for a masked round's key phase (``run``: a running
    aggregator of the tests' fixture)."""
    files = run.pki.agent(name)  # the client reissues these: load the signer after it
    async with run.client(name) as client:
        join = await client.join(num_examples=10)
        watcher = Watcher(client)
        try:
            event = await watcher.until(pb.ROUND_PHASE_ADVERTISE_KEYS)
            part = SecureParticipation(
                client, Signer.load(files), join.agent_id, join.settings.secagg, event.round_id, 60
            )
            yield KeyPhase(client, join, watcher, event, part)
        finally:
            await watcher.close()


@dataclass
class InProcess:
    """The real aggregator (servers and round loop) and agent daemons running in this process."""

    agg: Aggregator
    rounds: asyncio.Task[None]
    agents: list[asyncio.Task[bool]]
    stop: asyncio.Event


@contextlib.asynccontextmanager
async def in_process(agg_config: AggregatorConfig, *agents: Agent) -> AsyncIterator[InProcess]:
    """Seed and start the aggregator, then run each agent daemon; afterwards stop them all (the
    round loop is cancelled: a round may be open, waiting for agents that have left)."""
    seed(agg_config, None)
    agg = build_aggregator(agg_config)
    await agg.start()
    stop = asyncio.Event()
    rounds = asyncio.create_task(agg.rounds.run(stop))
    tasks = [asyncio.create_task(agent.run(stop)) for agent in agents]
    try:
        yield InProcess(agg, rounds, tasks, stop)
    finally:
        stop.set()
        await agg.stop(0)
        rounds.cancel()
        await asyncio.wait_for(asyncio.gather(rounds, *tasks, return_exceptions=True), 60)
