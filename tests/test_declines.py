"""Agents that sit a round out: DeclineRound ends the aggregator's wait for them at once, and a
masked round leaves uninvited the agents whose announced privacy policy it would break."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from agent.client import AggregatorClient
from agent.daemon import Agent
from agent.demo import prepare
from agent.privacy import announced
from common.config import AgentConfig, AggregatorConfig, PrivacyConfig, load
from common.errors import InvalidArgument
from common.secagg.agent import AgentRound
from common.secagg_pb import advertise_request, share_request
from common.wire import MAX_DECLINE_DETAIL
from protos.cloudfed.v1 import federation_pb2 as pb
from server.app import build_aggregator
from server.cli import seed
from server.rounds import Phase
from tests.agentsim import Watcher, in_key_phase, in_process, upload_header, write_payload
from tests.conftest import Pki
from tests.test_secagg_service import NUMEL, play_agent, secure_config

LONG_S = 300.0
"""Phase deadlines no test here may reach: the rounds end because nobody is left to wait for."""


def declined(reason: str, agent: str) -> float:
    value = REGISTRY.get_sample_value(
        "cloudfed_rounds_declined_total", {"cloud": "aws", "agent": agent, "reason": reason}
    )
    return value or 0.0


def slow_masked_config(pki: Pki, tmp_path: Path):  # type: ignore[no-untyped-def]
    """3 agents, 2 uploads needed, phase deadlines no test here reaches."""
    config = secure_config(pki, tmp_path / "agg0", min_agents=3, min_uploads=2, upload_deadline_s=LONG_S)
    return dataclasses.replace(config, secagg=dataclasses.replace(config.secagg, key_deadline_s=LONG_S))


@contextlib.asynccontextmanager
async def advertised(run, name: str) -> AsyncIterator[tuple[AggregatorClient, Watcher, pb.RoundEvent]]:  # type: ignore[no-untyped-def]
    """``name`` joins, waits for the key phase and advertises its real keys."""
    async with in_key_phase(run, name) as k:
        await k.client.advertise_keys(advertise_request(k.part.protocol.advertise()))
        yield k.client, k.watcher, k.event


async def test_plain_round_stops_waiting_for_an_agent_that_declines(start_aggregator, tmp_path: Path) -> None:
    """Without masking, 3 agents: one uploads, one declines (its training failed), and the round
    completes as soon as the third uploads, long before the upload deadline. Declining after
    one's upload, with an oversized detail or for another round is refused with the right
    status, and so is an upload after declining."""
    run = await start_aggregator(min_agents=3, min_uploads=2, upload_deadline_s=LONG_S)
    numel = run.agg.rounds.layout.numel
    before = declined("training", "quitter")
    clients = {n: run.client(n) for n in ("first", "quitter", "last")}
    joins = {n: await c.join(num_examples=10) for n, c in clients.items()}
    watchers = [Watcher(c) for c in clients.values()]
    first, quitter, last = clients.values()
    digest = joins["first"].settings.layout.digest

    async def upload(client: AggregatorClient, event: pb.RoundEvent) -> None:
        payload = write_payload(tmp_path / f"{uuid.uuid4().hex}.bin", np.ones(numel, dtype=np.float32), 10.0)
        await client.upload(payload, upload_header(event, digest, 10.0), new=True)

    try:
        event = await watchers[0].until(pb.ROUND_PHASE_UPLOAD)
        began = time.monotonic()
        await upload(first, event)
        with pytest.raises(grpc.aio.AioRpcError) as uploaded:
            await first.decline_round(event.round_id, pb.DECLINE_REASON_TRAINING, "too late")
        assert uploaded.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "stays in the sum" in (uploaded.value.details() or "")
        request = pb.DeclineRoundRequest(round_id=event.round_id, detail="x" * (MAX_DECLINE_DETAIL + 1))
        with pytest.raises(grpc.aio.AioRpcError) as oversized:
            await quitter.stub.DeclineRound(request)
        assert oversized.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as other_round:
            await quitter.decline_round(event.round_id + 1, pb.DECLINE_REASON_TRAINING, "")
        assert other_round.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # the client cuts a long detail to what the aggregator takes, on a character boundary
        await quitter.decline_round(event.round_id, pb.DECLINE_REASON_TRAINING, "loss diverged é" * 100)
        with pytest.raises(grpc.aio.AioRpcError) as after:
            await upload(quitter, event)
        assert after.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "declined round 1" in (after.value.details() or "")
        await upload(last, event)
        done = await watchers[0].until_version(1, timeout=60)
        assert done.phase == pb.ROUND_PHASE_COMPLETED
        assert time.monotonic() - began < LONG_S / 5
    finally:
        for w in watchers:
            await w.close()
        for c in clients.values():
            await c.close()
    participants = [joins[n].agent_id for n in ("first", "last")]
    assert sorted(run.agg.rounds.store.manifest(1).participants) == sorted(participants)
    assert sorted(run.agg.rounds.db.participant_status(1).values()) == ["declined", "uploaded", "uploaded"]
    assert declined("training", "quitter") == before + 1


async def test_masked_round_goes_on_without_an_agent_that_declines_after_advertising(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    """A masked round of 3: one agent advertises its keys, then declines (its roster check failed)
    instead of sharing. The key phase ends as soon as the other two shared, the round completes
    with their sum long before any deadline, the decliner is recorded as declined (not dropped),
    and it can take no further part in the round."""
    run = await start_aggregator(config=slow_masked_config(pki, tmp_path))
    rng = np.random.default_rng(5)
    before = declined("roster", "s2")

    async def decliner() -> None:
        async with advertised(run, "s2") as (client, watcher, event):
            state = await client.secagg_state(event.round_id, pb.ROUND_PHASE_SHARE_KEYS, 60)
            await client.decline_round(event.round_id, pb.DECLINE_REASON_ROSTER, "a signature did not verify")
            roster = [a.agent_id for a in state.roster]
            with pytest.raises(grpc.aio.AioRpcError) as late:  # declined, or the phase is over
                await client.share_keys(share_request(event.round_id, {}, roster))
            assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            await watcher.until(pb.ROUND_PHASE_COMPLETED)

    began = time.monotonic()
    deltas = {n: (rng.standard_normal(NUMEL) * 0.05).astype(np.float32) for n in ("s0", "s1")}
    results = await asyncio.wait_for(
        asyncio.gather(decliner(), *(play_agent(run, n, deltas[n], 10, tmp_path) for n in deltas)), 120
    )
    assert time.monotonic() - began < LONG_S / 5
    store = run.agg.rounds.store
    assert sorted(store.manifest(1).participants) == sorted(agent for agent, _ in results[1:])
    statuses = run.agg.rounds.db.participant_status(1)
    assert sorted(statuses.values()) == ["declined", "uploaded", "uploaded"]
    assert declined("roster", "s2") == before + 1


async def test_an_agent_that_declines_before_the_roster_closes_is_left_out_of_it(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    """A masked round of 3: one agent advertises its keys and declines before the others have
    advertised theirs (its training failed at once). The roster the other two receive names
    only them, so nobody seals a share for the decliner or waits for its reveals, and the round
    completes from their sum with no dropout to recover."""
    run = await start_aggregator(config=slow_masked_config(pki, tmp_path))
    rng = np.random.default_rng(6)
    recovered = REGISTRY.get_sample_value("cloudfed_secagg_dropouts_recovered_total") or 0.0
    declined_first = asyncio.Event()

    async def decliner() -> None:
        async with advertised(run, "s2") as (client, watcher, event):
            await client.decline_round(event.round_id, pb.DECLINE_REASON_TRAINING, "loss diverged")
            declined_first.set()
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await client.secagg_state(event.round_id, pb.ROUND_PHASE_SHARE_KEYS, 60)
            assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "declined round 1" in (late.value.details() or "")
            await watcher.until(pb.ROUND_PHASE_COMPLETED)

    protocols: dict[str, AgentRound] = {}
    deltas = {n: (rng.standard_normal(NUMEL) * 0.05).astype(np.float32) for n in ("s0", "s1")}
    results = await asyncio.wait_for(
        asyncio.gather(
            decliner(),
            *(
                play_agent(run, n, deltas[n], 10, tmp_path, protocols=protocols, ready=declined_first)
                for n in deltas
            ),
        ),
        120,
    )
    honest = sorted(agent for agent, _ in results[1:])
    for name in deltas:
        assert sorted(protocols[name].roster) == honest
    assert sorted(run.agg.rounds.store.manifest(1).participants) == honest
    assert sorted(run.agg.rounds.db.participant_status(1).values()) == ["declined", "uploaded", "uploaded"]
    assert (REGISTRY.get_sample_value("cloudfed_secagg_dropouts_recovered_total") or 0.0) == recovered


async def test_masked_round_leaves_out_an_agent_whose_smallest_sum_it_cannot_meet(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    """3 connected agents, one of which lets the aggregator learn no sum over fewer than 4: the
    round invites the other two, tells it why in its round events, and completes without waiting
    for it; the aggregator counts it (reason privacy_policy)."""
    config = secure_config(pki, tmp_path / "agg0", min_agents=3, min_uploads=2, upload_deadline_s=LONG_S)
    config = dataclasses.replace(config, secagg=dataclasses.replace(config.secagg, key_deadline_s=LONG_S))
    run = await start_aggregator(config=config)
    before = declined("privacy_policy", "wary")
    seen: list[pb.RoundEvent] = []

    async def wary() -> None:
        async with run.client("wary") as client:
            policy = announced(PrivacyConfig(min_agents_per_sum=4))
            await client.join(num_examples=10, privacy=policy)
            watcher = Watcher(client)
            try:
                seen.append(await watcher.until(pb.ROUND_PHASE_ADVERTISE_KEYS))
                await watcher.until(pb.ROUND_PHASE_COMPLETED)
            finally:
                await watcher.close()

    began = time.monotonic()
    deltas = {n: np.full(NUMEL, 0.01, dtype=np.float32) for n in ("s0", "s1")}
    await asyncio.wait_for(
        asyncio.gather(wary(), *(play_agent(run, n, deltas[n], 10, tmp_path) for n in deltas)), 120
    )
    assert time.monotonic() - began < LONG_S / 5
    (event,) = seen
    assert not event.participant
    assert "privacy.min_agents_per_sum (4) is more than the 3 agents" in event.not_invited
    assert len(run.agg.rounds.store.manifest(1).participants) == 2
    assert declined("privacy_policy", "wary") >= before + 1  # and again in each later round


def one_plain_agent(tmp_path: Path) -> tuple[AggregatorConfig, AgentConfig]:
    """The demo's aggregator (plain rounds of 1 agent, no retry for LONG_S) and its aws agent."""
    agg_path, agent_paths, _ = prepare(tmp_path, rounds=1, secagg=False)
    quiet = {"CLOUDFED_ROUNDS_MIN_AGENTS": "1", "CLOUDFED_ROUNDS_RETRY_DELAY_S": str(LONG_S)}
    agg_config = dataclasses.replace(load(AggregatorConfig, agg_path, env=quiet), metrics_listen="")
    assert agg_config.rounds.upload_deadline_s == LONG_S
    return agg_config, dataclasses.replace(load(AgentConfig, agent_paths[0], env={}), metrics_listen="")


async def abandoned_at_once(agg) -> None:  # type: ignore[no-untyped-def]
    """Wait until the round is abandoned, far sooner than its upload deadline."""
    began = time.monotonic()
    async with asyncio.timeout(120):
        while agg.rounds.state.phase is not Phase.ABANDONED:  # noqa: ASYNC110 (a watch would count)
            await asyncio.sleep(0.1)
    assert time.monotonic() - began < LONG_S / 5


async def test_agent_daemon_declines_a_round_its_training_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real agent daemon against the real aggregator (the demo's tiny model, in one process):
    its local training diverges, so it declines the round (reason training) and counts it; the
    aggregator, with nobody else to wait for, abandons the round at once instead of at its
    5-minute upload deadline, saying that the agent declined."""
    agg_config, agent_config = one_plain_agent(tmp_path)

    async def diverges(*_args: object, **_kw: object) -> None:
        raise InvalidArgument("training diverged: loss nan at step 0")

    monkeypatch.setattr(Agent, "_train", diverges)
    before = REGISTRY.get_sample_value(
        "cloudfed_agent_rounds_sat_out_total", {"cloud": "aws", "agent": "agent-1", "reason": "training"}
    )
    async with in_process(agg_config, Agent(agent_config)) as run:
        agg = run.agg
        await abandoned_at_once(agg)
    assert "0 of 1 uploads, 1 declined" in agg.rounds.state.reason
    assert list(agg.rounds.db.participant_status(1).values()) == ["declined"]
    after = REGISTRY.get_sample_value(
        "cloudfed_agent_rounds_sat_out_total", {"cloud": "aws", "agent": "agent-1", "reason": "training"}
    )
    assert (after or 0) == (before or 0) + 1


async def test_agent_daemon_that_crashes_in_a_round_declines_it_before_it_exits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The real agent daemon against the real aggregator: its training crashes with an error that
    is no protocol refusal (here a simulated out-of-memory). It declines the round, naming the
    error, and then exits with it (its supervisor restarts it); the aggregator abandons the round
    at once instead of waiting for the agent until its upload deadline."""
    agg_config, agent_config = one_plain_agent(tmp_path)

    async def out_of_memory(*_args: object, **_kw: object) -> None:
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(Agent, "_train", out_of_memory)
    caplog.set_level(logging.WARNING)
    async with in_process(agg_config, Agent(agent_config)) as run:
        agg = run.agg
        await abandoned_at_once(agg)
        with pytest.raises(RuntimeError, match="out of memory"):
            await asyncio.wait_for(run.agents[0], 30)
    assert "0 of 1 uploads, 1 declined" in agg.rounds.state.reason
    assert list(agg.rounds.db.participant_status(1).values()) == ["declined"]
    said = [r.getMessage() for r in caplog.records if "declined in" in r.getMessage()]
    assert said and said[0].endswith(
        "(training): agent error: RuntimeError: CUDA out of memory (simulated)"
    ), said


async def test_masked_agent_whose_training_fails_declines_before_it_shares_keys(tmp_path: Path) -> None:
    """Three real agent daemons and the real aggregator (the demo's tiny model, masked rounds, in
    one process). One agent's training fails at once, while its key phases run: it stops them and
    declines in the key phases, so the round completes from the other two with no dropout's
    masks to recover (an agent that shared its keys first would have been one)."""
    agg_path, agent_paths, _ = prepare(tmp_path, rounds=1, secagg=True)
    quiet = {"CLOUDFED_ROUNDS_MIN_UPLOADS": "2", "CLOUDFED_ROUNDS_RETRY_DELAY_S": str(LONG_S)}
    agg_config = dataclasses.replace(load(AggregatorConfig, agg_path, env=quiet), metrics_listen="")
    agents = [
        Agent(dataclasses.replace(load(AgentConfig, path, env={}), metrics_listen="")) for path in agent_paths
    ]

    async def diverges(*_args: object, **_kw: object) -> None:
        raise InvalidArgument("training diverged: loss nan at step 0")

    agents[0]._train = diverges  # type: ignore[method-assign]
    recovered = REGISTRY.get_sample_value("cloudfed_secagg_dropouts_recovered_total") or 0.0
    seed(agg_config, None)
    agg = build_aggregator(agg_config)
    await agg.start()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(agg.rounds.run(stop))]
    try:
        async with asyncio.timeout(120):
            for agent in agents:  # one at a time: transformers cannot load models in parallel threads
                tasks.append(asyncio.create_task(agent.run(stop)))
                while agent.worker.trainer is None:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
            while agg.rounds.state.global_version < 1:
                assert agg.rounds.state.phase is not Phase.ABANDONED, agg.rounds.state.reason
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        await agg.stop(0)
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    statuses = agg.rounds.db.participant_status(1)
    assert sorted(statuses.values()) == ["declined", "uploaded", "uploaded"]
    assert [a for a, status in statuses.items() if status == "declined"] == [
        "spiffe://demo.cloudfed/cloud/aws/agent/agent-1"
    ]
    assert len(agg.rounds.store.manifest(1).participants) == 2
    assert (REGISTRY.get_sample_value("cloudfed_secagg_dropouts_recovered_total") or 0.0) == recovered
