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
from agent.secure import SecureParticipation, Signer
from common.codecs import identity
from protos.cloudfed.v1 import federation_pb2 as pb


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
