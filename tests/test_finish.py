"""A federation that ends: rounds.max_versions and early stopping on the agents' eval losses. The
aggregator announces FINISHED, starts no round again (also after a restart) and goes on serving;
the real agent daemon stops when it hears it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from agent.daemon import Agent
from agent.demo import prepare
from common.config import AgentConfig, AggregatorConfig, RoundsConfig, load
from common.errors import ConfigError
from protos.cloudfed.v1 import federation_pb2 as pb
from server.app import build_aggregator
from server.rounds import Phase
from server.stopping import finish_reason
from server.version_ranking import AgentEval
from tests.agentsim import Watcher, in_process, upload_next_round
from tests.conftest import Pki, aggregator_config

PATIENT = RoundsConfig(early_stop_patience=2)


def evals_of(losses: dict[int, float], agents: str = "a") -> dict[int, dict[str, AgentEval]]:
    return {v: {a: AgentEval(loss, 100) for a in agents} for v, loss in losses.items()}


def test_the_version_budget_ends_the_federation() -> None:
    assert finish_reason(2, {}, RoundsConfig(max_versions=3)) is None
    assert finish_reason(3, {}, RoundsConfig(max_versions=3)) == "reached rounds.max_versions = 3 (version 3)"
    assert finish_reason(10**6, {}, RoundsConfig()) is None  # no limit, no early stopping: never


def test_early_stopping_counts_the_versions_evaluated_since_the_best() -> None:
    losses = {0: 6.0, 1: 5.0, 2: 5.1}
    assert finish_reason(3, evals_of(losses), PATIENT) is None  # one version since the best
    reason = finish_reason(3, evals_of({**losses, 3: 5.2}), PATIENT)
    assert reason is not None and "no eval loss below 5.0000 (version 1) in the 2 versions" in reason
    assert finish_reason(3, evals_of({**losses, 3: 4.9}), PATIENT) is None  # 3 is the new best
    # an improvement of less than min_delta is no improvement
    careful = dataclasses.replace(PATIENT, early_stop_min_delta=0.2)
    assert finish_reason(3, evals_of({**losses, 3: 4.9}), careful) is not None
    # versions evaluated by fewer agents than the most are not compared (a partial view)
    partial = {**evals_of(losses, "ab"), 3: {"a": AgentEval(5.2, 100)}}
    assert finish_reason(3, partial, PATIENT) is None
    # evaluations of versions past the one given are ignored; none at all decides nothing
    assert finish_reason(2, evals_of({**losses, 3: 5.2}), PATIENT) is None
    assert finish_reason(5, {}, PATIENT) is None


def test_with_noise_sigmas_only_an_improvement_beyond_the_dp_noise_counts() -> None:
    """Two clouds, one exact and one whose losses carry DP noise of deviation 0.1 nats; both
    weigh alike, so the federation's loss carries 0.05 and the difference of two versions'
    0.05 x sqrt(2) = 0.0707. With noise_sigmas 2, version 3's drop of 0.1 from version 1 is within
    the noise (0.1414 needed, plus min_delta), so version 1 stays the best; a drop of 0.15 counts.
    Noise_sigmas 0 (the default) counts any drop, and exact losses need no margin."""

    def noisy(losses: dict[int, float]) -> dict[int, dict[str, AgentEval]]:
        return {
            v: {"exact": AgentEval(loss, 100), "dp": AgentEval(loss, 100, 0.1)} for v, loss in losses.items()
        }

    sigmas = dataclasses.replace(PATIENT, early_stop_noise_sigmas=2.0)
    losses = {0: 6.0, 1: 5.0, 2: 5.1, 3: 4.9}
    reason = finish_reason(3, noisy(losses), sigmas)
    assert reason is not None and "no eval loss below 5.0000 ± 0.05 (version 1)" in reason
    assert "noise_sigmas 2, eval losses noised by differential privacy (deviation up to 0.05)" in reason
    assert finish_reason(3, noisy({**losses, 3: 4.85}), sigmas) is None  # 0.15 > 0.1414: the new best
    assert finish_reason(3, noisy(losses), PATIENT) is None  # no margin: version 3 is the best
    with_delta = dataclasses.replace(sigmas, early_stop_min_delta=0.01)  # 0.1514 needed
    assert finish_reason(3, noisy({**losses, 3: 4.85}), with_delta) is not None
    assert finish_reason(3, evals_of(losses), sigmas) is None  # exact losses: any drop counts
    assert "noised" not in (finish_reason(3, evals_of({**losses, 3: 5.2}), sigmas) or "noised")


def test_noise_sigmas_must_be_finite_and_not_negative(pki: Pki, tmp_path: Path) -> None:
    config = aggregator_config(pki, tmp_path)
    config.validate()
    for bad in (-1.0, math.inf, math.nan):
        rounds = dataclasses.replace(config.rounds, early_stop_noise_sigmas=bad)
        with pytest.raises(
            ConfigError, match=r"rounds\.early_stop_noise_sigmas must be a finite number >= 0"
        ):
            dataclasses.replace(config, rounds=rounds).validate()


async def test_early_stopping_finishes_the_federation_and_it_stays_finished(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    """Patience 2 over real rounds: version 1 evaluates best, versions 2 and 3 worse. The round
    running when version 3's evaluation arrives completes (version 4), then the aggregator
    announces FINISHED naming version 1 and starts no round; restarted, it is finished at once."""
    base = aggregator_config(pki, tmp_path / "agg0", min_agents=1)
    config = dataclasses.replace(base, rounds=dataclasses.replace(base.rounds, early_stop_patience=2))
    run = await start_aggregator(config=config)
    losses = {0: 6.0, 1: 5.0, 2: 5.1, 3: 5.2}
    async with run.client("a1") as client:
        join = await client.join(num_examples=10)
        watcher = Watcher(client)
        try:
            await client.report_eval(0, losses[0], 100)
            for version in range(1, 5):
                event = await upload_next_round(run, client, watcher, join, version, tmp_path)
                assert event.round_id == version
                if version in losses:
                    await client.report_eval(version, losses[version], 100)
            finished = await watcher.until(pb.ROUND_PHASE_FINISHED, timeout=10)
            assert finished.global_version == 4
            assert "no eval loss below 5.0000 (version 1) in the 2 versions" in finished.reason
            await asyncio.wait_for(run.task, 5)  # the round loop ended; the servers did not
            header = await client.download_model(tmp_path / "v4.safetensors", 4)
            assert header.version == 4
        finally:
            await watcher.close()
    assert [r.round_id for r in run.agg.rounds.db.rounds()] == [4, 3, 2, 1]
    assert REGISTRY.get_sample_value("cloudfed_federation_finished") == 1

    await run.agg.stop(0)
    again = build_aggregator(config)  # a restart: finished at once, from the database
    await again.start()
    rounds = asyncio.create_task(again.rounds.run())
    try:
        await asyncio.wait_for(rounds, 10)
        assert again.rounds.state.phase is Phase.FINISHED and "version 1" in again.rounds.state.reason
    finally:
        await again.stop(0)
    assert [r.round_id for r in again.rounds.db.rounds()] == [4, 3, 2, 1]


async def test_the_agent_daemon_stops_when_the_federation_finishes(tmp_path: Path) -> None:
    """The real agent daemon (no max_rounds of its own) and aggregator, rounds.max_versions = 1:
    after one round and its evaluation the aggregator announces FINISHED and the agent's run
    returns by itself."""
    agg_path, agent_paths, _ = prepare(tmp_path, rounds=1, secagg=False)
    env = {"CLOUDFED_ROUNDS_MIN_AGENTS": "1", "CLOUDFED_ROUNDS_MAX_VERSIONS": "1"}
    agg_config = dataclasses.replace(load(AggregatorConfig, agg_path, env=env), metrics_listen="")
    agent_config = dataclasses.replace(
        load(AgentConfig, agent_paths[0], env={}), metrics_listen="", max_rounds=0
    )
    async with in_process(agg_config, Agent(agent_config)) as run:
        async with asyncio.timeout(120):
            await run.agents[0]  # returns once FINISHED is heard; stop is never set
            await run.rounds
    agg = run.agg
    assert agg.rounds.state.phase is Phase.FINISHED
    assert agg.rounds.state.reason == "reached rounds.max_versions = 1 (version 1)"
    evaluated = (agent_config.state_dir / "evals.jsonl").read_text().splitlines()
    assert len(evaluated) == 2  # versions 0 and 1: the last version is evaluated before stopping


async def test_an_idle_agent_trains_again_when_the_federation_resumes(tmp_path: Path) -> None:
    """exit_when_finished = false (the Kubernetes setting): the real agent daemon stays connected
    when the federation finishes at max_versions = 1, and releases its model. The operator raises
    the budget to 2 and restarts the aggregator; the agent reconnects by itself, loads the model
    again, trains round 2 and evaluates it."""
    agg_path, agent_paths, _ = prepare(tmp_path, rounds=1, secagg=False)
    env = {"CLOUDFED_ROUNDS_MIN_AGENTS": "1", "CLOUDFED_ROUNDS_MAX_VERSIONS": "1"}
    agg_config = dataclasses.replace(load(AggregatorConfig, agg_path, env=env), metrics_listen="")
    agent_config = dataclasses.replace(
        load(AgentConfig, agent_paths[0], env={}), metrics_listen="", max_rounds=0, exit_when_finished=False
    )
    history = agent_config.state_dir / "evals.jsonl"
    agent = Agent(agent_config)
    async with in_process(agg_config, agent) as run, asyncio.timeout(180):
        await run.rounds  # finished at version 1
        while not history.exists() or len(history.read_text().splitlines()) < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        assert not run.agents[0].done()  # idle, not gone
        assert agent.worker.trainer is None  # the model's memory was given back
        await run.agg.stop(0)
        resumed = dataclasses.replace(
            agg_config, rounds=dataclasses.replace(agg_config.rounds, max_versions=2)
        )
        again = build_aggregator(resumed)
        await again.start()
        try:
            await again.rounds.run()  # round 2 with the agent that came back, then finished again
            while len(history.read_text().splitlines()) < 3:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        finally:
            await again.stop(0)
        assert not run.agents[0].done() and agent.worker.trainer is None  # reloaded, trained, released
    assert again.rounds.state.reason == "reached rounds.max_versions = 2 (version 2)"
    assert [json.loads(line)["version"] for line in history.read_text().splitlines()] == [0, 1, 2]
