"""Evaluations: ReportEval through the real aggregator over mTLS (kept in SQLite and the gauge,
bad reports refused with a status and nothing stored), and what the agent daemon reports."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from agent.client import AggregatorClient
from agent.daemon import Agent, Worker
from agent.demo import prepare
from agent.dp_budget import PrivacyBudgetSpent
from common.config import AgentConfig, AggregatorConfig, load
from protos.cloudfed.v1 import federation_pb2 as pb
from server.app import build_aggregator
from server.cli import seed
from server.metrics import WITHHELD_REASONS
from tests.agentsim import Watcher, in_process, upload_header, write_payload
from tests.test_faults import query


def gauge(agent: str) -> float | None:
    return REGISTRY.get_sample_value("cloudfed_eval_loss", {"cloud": "aws", "agent": agent})


async def test_reports_are_kept_and_bad_ones_refused_with_their_status(start_aggregator) -> None:
    run = await start_aggregator(min_agents=3)
    async with run.client("evaluator") as client:
        join = await client.join(num_examples=10)
        await client.report_eval(0, 5.25, 1000, 0.03)
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        cases = {
            "nan": (0, math.nan, 10, 0.0, invalid, "eval_loss must be a finite"),
            "inf": (0, math.inf, 10, 0.0, invalid, "eval_loss must be a finite"),
            "negative": (0, -0.5, 10, 0.0, invalid, "eval_loss must be a finite"),
            "no tokens": (0, 4.0, 0, 0.0, invalid, "tokens"),
            "nan noise": (0, 4.0, 10, math.nan, invalid, "eval_loss_stddev must be a finite"),
            "infinite noise": (0, 4.0, 10, math.inf, invalid, "eval_loss_stddev must be a finite"),
            "negative noise": (0, 4.0, 10, -0.1, invalid, "eval_loss_stddev must be a finite"),
            "future version": (7, 4.0, 10, 0.0, grpc.StatusCode.NOT_FOUND, "no global version 7"),
        }
        for name, (version, loss, tokens, stddev, code, words) in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.report_eval(version, loss, tokens, stddev)
            assert refused.value.code() == code, name
            assert words in (refused.value.details() or ""), name
    db = run.agg.config.state_dir / "cloudfed.db"
    assert query(db, "SELECT agent, version, eval_loss, tokens, loss_stddev FROM evals") == [
        (join.agent_id, 0, 5.25, 1000, 0.03)
    ]
    assert gauge("evaluator") == 5.25
    labels = {"cloud": "aws", "agent": "evaluator"}
    assert REGISTRY.get_sample_value("cloudfed_eval_loss_stddev", labels) == 0.03


async def test_a_withheld_report_is_kept_with_its_reason_and_ranks_nothing(
    start_aggregator, capsys: pytest.CaptureFixture[str]
) -> None:
    """An agent that does not report a version's eval loss says why: the aggregator keeps the
    reason beside the agent (its status prints it), counts it, and stores no evaluation; a withheld
    report that also carries a loss, a reason over 1024 bytes or a version not committed is
    refused with its status. The reason's word labels the count; an agent of an earlier release
    sends none ("unspecified"), and a word without words is refused."""
    from server.cli import status

    run = await start_aggregator(min_agents=3)
    async with run.client("evaluator") as client:
        join = await client.join(num_examples=10)
        await client.report_withheld(0, "not_shared", "kept in its cloud: privacy.share_eval_losses is false")
        await client.stub.ReportEval(pb.ReportEvalRequest(withheld="an earlier release's report"))
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        cases = {
            "a word without words": (
                pb.ReportEvalRequest(withheld_reason=pb.EVAL_WITHHELD_REASON_TOO_NOISY),
                invalid,
            ),
            "with a loss": (pb.ReportEvalRequest(eval_loss=5.0, eval_tokens=9, withheld="x"), invalid),
            "with noise": (pb.ReportEvalRequest(eval_loss_stddev=0.1, withheld="x"), invalid),
            "too long": (pb.ReportEvalRequest(withheld="é" * 513), invalid),
            "future version": (
                pb.ReportEvalRequest(global_version=7, withheld="x"),
                grpc.StatusCode.NOT_FOUND,
            ),
        }
        for name, (request, code) in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.stub.ReportEval(request)
            assert refused.value.code() == code, name
    db = run.agg.config.state_dir / "cloudfed.db"
    assert query(db, "SELECT * FROM evals") == []
    withheld = "SELECT eval_withheld_version, eval_withheld_reason, eval_withheld_words FROM agents"
    assert query(db, withheld) == [(0, "unspecified", "an earlier release's report")]
    for reason, count in {"not_shared": 1, "unspecified": 1, "too_noisy": None}.items():
        labels = {"cloud": "aws", "agent": "evaluator", "reason": reason}
        assert REGISTRY.get_sample_value("cloudfed_evals_withheld_total", labels) == count
        assert REGISTRY.get_sample_value("cloudfed_eval_withheld", labels) == int(reason == "unspecified")
    assert status(run.agg.config) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if join.agent_id in line)
    assert "no eval yet; withheld its eval loss of v0 (unspecified): an earlier release's report" in line
    async with run.client("evaluator") as client:  # a loss again: it withholds nothing now
        await client.join(num_examples=10)
        await client.report_eval(0, 5.25, 1000, 0.0)
    for reason in WITHHELD_REASONS:
        labels = {"cloud": "aws", "agent": "evaluator", "reason": reason}
        assert REGISTRY.get_sample_value("cloudfed_eval_withheld", labels) == 0


async def _evaluate_version_0(
    agg_config: AggregatorConfig, agent_config: AgentConfig, linger_s: float = 0.0
) -> None:
    """The real aggregator (seeded) and agent daemon in this process, until the agent has
    evaluated version 0 and the aggregator holds what it said of it (a loss, or why it withheld
    one), and ``linger_s`` more."""
    seed(agg_config, None)
    agg = build_aggregator(agg_config)
    await agg.start()
    stop = asyncio.Event()
    agent = Agent(agent_config)
    task = asyncio.create_task(agent.run(stop))
    try:
        async with asyncio.timeout(120):
            while not _heard_of_version_0(agg_config):  # noqa: ASYNC110 (a watch would count)
                await asyncio.sleep(0.1)
            assert 0 in agent.progress.versions_evaluated
            await asyncio.sleep(linger_s)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await agg.stop(0)


def _withheld_counts(reason: str) -> tuple[float, float]:
    """Eval losses withheld for ``reason``, all agents: as the agents count them, and as the
    aggregator does."""
    counts = {"cloudfed_agent_evals_withheld_total": 0.0, "cloudfed_evals_withheld_total": 0.0}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name in counts and sample.labels["reason"] == reason:
                counts[sample.name] += sample.value
    return counts["cloudfed_agent_evals_withheld_total"], counts["cloudfed_evals_withheld_total"]


def _heard_of_version_0(agg_config: AggregatorConfig) -> bool:
    """Whether the aggregator's database holds an agent's loss of version 0, or its reason for
    withholding it."""
    db = agg_config.state_dir / "cloudfed.db"
    told = (
        "SELECT (SELECT COUNT(*) FROM evals) + (SELECT COUNT(*) FROM agents WHERE eval_withheld_version = 0)"
    )
    return query(db, told)[0][0] > 0


async def test_agent_keeps_a_loss_that_is_not_finite_to_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The real agent daemon against the real aggregator (the demo's tiny model, one process): the
    global adapter evaluates to NaN on this cloud's text. The agent logs it and keeps it in its
    own evals.jsonl, but sends nothing the aggregator would refuse, so it stays connected."""
    agg_path, agent_paths, _ = prepare(tmp_path, rounds=1, secagg=False)
    quiet = {"CLOUDFED_ROUNDS_MIN_AGENTS": "2"}  # no round starts: only the evaluation of version 0
    agg_config = dataclasses.replace(load(AggregatorConfig, agg_path, env=quiet), metrics_listen="")
    agent_config = dataclasses.replace(load(AgentConfig, agent_paths[0], env={}), metrics_listen="")
    honest = Worker.execute

    def broken_eval(self: Worker, command: dict[str, Any]) -> Any:
        result = honest(self, command)
        return (math.nan, result[1]) if command["op"] == "eval" else result

    monkeypatch.setattr(Worker, "execute", broken_eval)
    before = _withheld_counts("not_finite")
    await _evaluate_version_0(agg_config, agent_config, linger_s=1.0)  # a refused report would drop it
    assert _withheld_counts("not_finite") == (before[0] + 1, before[1] + 1)  # the agent's, the aggregator's
    assert "global version 0: eval loss nan on this cloud's held-out text; not reported" in caplog.text
    assert "aggregator unavailable" not in caplog.text
    assert query(agg_config.state_dir / "cloudfed.db", "SELECT * FROM evals") == []
    said = query(
        agg_config.state_dir / "cloudfed.db",
        "SELECT eval_withheld_version, eval_withheld_reason, eval_withheld_words FROM agents",
    )
    assert said == [(0, "not_finite", "the eval loss is nan on this cloud's held-out text")]
    kept = json.loads((agent_config.state_dir / "evals.jsonl").read_text().splitlines()[0])
    assert kept["version"] == 0 and math.isnan(kept["eval_loss"])


async def test_a_dp_agent_whose_eval_budget_is_spent_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DP cloud (the demo's aws) whose held-out data's budget refuses the release: the real agent
    daemon tells the real aggregator ``privacy_budget``, in its words."""
    agg_path, agent_paths, _ = prepare(tmp_path, rounds=1, secagg=False, dp_clouds=("aws",))
    quiet = {"CLOUDFED_ROUNDS_MIN_AGENTS": "2"}  # no round starts: only the evaluation of version 0
    agg_config = dataclasses.replace(load(AggregatorConfig, agg_path, env=quiet), metrics_listen="")
    aws = next(p for p in agent_paths if "aws" in str(p))
    agent_config = dataclasses.replace(load(AgentConfig, aws, env={}), metrics_listen="")
    assert agent_config.privacy.dp.enabled

    def spent(self: Agent, version: int, held_out: object) -> object:
        raise PrivacyBudgetSpent(f"releasing version {version}'s eval loss would exceed the budget")

    monkeypatch.setattr(Agent, "_release_eval", spent)
    before = _withheld_counts("privacy_budget")
    await _evaluate_version_0(agg_config, agent_config)
    assert _withheld_counts("privacy_budget") == (before[0] + 1, before[1] + 1)
    said = query(
        agg_config.state_dir / "cloudfed.db",
        "SELECT eval_withheld_version, eval_withheld_reason, eval_withheld_words FROM agents",
    )
    assert said == [
        (0, "privacy_budget", "kept in its cloud: releasing version 0's eval loss would exceed the budget")
    ]


async def test_an_agent_that_shares_no_eval_loss_keeps_them_in_its_cloud(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``privacy.share_eval_losses = false``: the real agent daemon evaluates the global version
    and keeps the loss in its log and evals.jsonl; the aggregator stores none, and the Join's
    line says it learns no eval loss."""
    agg_path, agent_paths, _ = prepare(tmp_path, rounds=1, secagg=False)
    quiet = {"CLOUDFED_ROUNDS_MIN_AGENTS": "2"}  # no round starts: only the evaluation of version 0
    agg_config = dataclasses.replace(load(AggregatorConfig, agg_path, env=quiet), metrics_listen="")
    env = {"CLOUDFED_AGENT_PRIVACY_SHARE_EVAL_LOSSES": "false"}
    agent_config = dataclasses.replace(load(AgentConfig, agent_paths[0], env=env), metrics_listen="")
    caplog.set_level(logging.INFO)
    before = _withheld_counts("not_shared")
    await _evaluate_version_0(agg_config, agent_config)
    assert _withheld_counts("not_shared") == (before[0] + 1, before[1] + 1)
    kept = json.loads((agent_config.state_dir / "evals.jsonl").read_text().splitlines()[0])
    assert kept["version"] == 0 and math.isfinite(kept["eval_loss"]) and kept["tokens"] > 0
    assert (
        f"eval loss {kept['eval_loss']:.4f} on {kept['tokens']} local tokens, kept in this cloud"
        in caplog.text
    )
    assert "aggregator learns each agent's update (no secure aggregation), and no eval loss;" in caplog.text
    assert query(agg_config.state_dir / "cloudfed.db", "SELECT * FROM evals") == []
    said = query(
        agg_config.state_dir / "cloudfed.db",
        "SELECT eval_withheld_version, eval_withheld_reason, eval_withheld_words FROM agents",
    )
    assert said == [(0, "not_shared", "kept in its cloud: privacy.share_eval_losses is false")]
    exported = [
        sample.value
        for family in REGISTRY.collect()
        if family.name == "cloudfed_agent_eval_loss"
        for sample in family.samples
        if sample.labels["cloud"] == "aws"
    ]
    assert kept["eval_loss"] in exported  # the cloud's own dashboard still has it


@pytest.mark.parametrize(
    ("meanwhile", "keep_last", "evaluated"), [(1, 0, [0, 1]), (2, 0, [0, 1, 2]), (3, 2, [0, 2, 3])]
)
async def test_versions_committed_before_the_agent_watches_are_still_evaluated(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    meanwhile: int,
    keep_last: int,
    evaluated: list[int],
) -> None:
    """The real agent daemon joins at version 0 and loads its model; meanwhile another agent
    completes ``meanwhile`` rounds alone. The agent first sees the last of those versions in the
    next round's event, never in a completion, and must still evaluate and report each of them, in
    order (it evaluated only completions before, then only the version in the event). One the
    aggregator has pruned by then (``checkpoints.keep_last``) is skipped with a warning."""
    agg_path, agent_paths, _ = prepare(tmp_path, rounds=1, secagg=False)
    env = {"CLOUDFED_ROUNDS_MIN_AGENTS": "1", "CLOUDFED_CHECKPOINTS_KEEP_LAST": str(keep_last)}
    env["CLOUDFED_CHECKPOINTS_KEEP_BEST"] = "0"
    agg_config = dataclasses.replace(load(AggregatorConfig, agg_path, env=env), metrics_listen="")
    agent_config = dataclasses.replace(load(AgentConfig, agent_paths[0], env={}), metrics_listen="")
    other = load(AgentConfig, agent_paths[1], env={})
    loaded = Agent._prepare
    committed: list[int] = []

    async def prepare_while_a_round_completes(self: Agent, settings: Any) -> None:
        await loaded(self, settings)
        if committed:
            return
        async with AggregatorClient(
            other.aggregator, other.tls.files(), server_name=other.server_name
        ) as client:
            join = await client.join(num_examples=10)
            watcher = Watcher(client)
            try:
                for version in range(1, meanwhile + 1):
                    event = await watcher.until(pb.ROUND_PHASE_UPLOAD)
                    update = np.random.default_rng(version).normal(size=numel(join))
                    payload = write_payload(tmp_path / "other.bin", update * 1e-3, 10.0)
                    await client.upload(payload, upload_header(event, join.settings.layout.digest, 10.0))
                    committed.append((await watcher.until_version(version)).global_version)
            finally:
                await watcher.close()

    monkeypatch.setattr(Agent, "_prepare", prepare_while_a_round_completes)
    # max_rounds: it stops once it has evaluated that many new versions
    agent = Agent(dataclasses.replace(agent_config, max_rounds=len(evaluated) - 1))
    async with in_process(agg_config, agent) as running:
        done, _ = await asyncio.wait(running.agents, timeout=90)
    assert done, "the agent did not stop after the new versions"
    assert all(task.exception() is None for task in done)
    assert committed == list(range(1, meanwhile + 1))
    assert list(agent.progress.versions_evaluated) == evaluated  # in order
    reported = query(
        agg_config.state_dir / "cloudfed.db", "SELECT agent, version FROM evals ORDER BY version"
    )
    assert [(a.split("/")[-3], v) for a, v in reported] == [("aws", v) for v in evaluated]
    pruned = sorted(set(range(meanwhile + 1)) - set(evaluated))
    for version in pruned:
        assert f"global version {version}: not evaluated, the aggregator no longer has it" in caplog.text


def numel(join: Any) -> int:
    """Parameters in the federation's adapter layout."""
    return sum(math.prod(p.shape) for p in join.settings.layout.params)
