"""The agent under torchrun: 2 CPU ranks (gloo), DDP training, only rank 0 talks to the aggregator."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.demo import prepare
from tests.daemons import start, stop, torchrun, wait_serving
from tests.test_faults import query

pytestmark = pytest.mark.slow


def _torchrun(module: str, agent: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``module`` as an agent CLI under torchrun with 2 CPU ranks; (exit status, output)."""
    run = torchrun(
        "-m",
        module,
        "--config",
        str(agent),
        "run",
        *args,
        env={"CLOUDFED_AGENT_LOG_LEVEL": "INFO", **(env or {})},
    )
    return run.returncode, run.stdout + run.stderr


def _alone(tmp_path: Path) -> tuple[Path, list[Path], int]:
    """The demo's files for an aggregator that runs rounds with one agent. Secure aggregation
    needs at least two (the config refuses it), so plain updates."""
    agg_config, agent_configs, health = prepare(tmp_path, rounds=2, secagg=False)
    agg_config.write_text(agg_config.read_text().replace("min_agents = 3", "min_agents = 1"))
    return agg_config, agent_configs, health


def test_two_ranks_train_with_ddp_and_only_rank_0_joins(tmp_path: Path) -> None:
    agg_config, agent_configs, health = _alone(tmp_path)
    aggregator = start("server.cli", "--config", str(agg_config), log=tmp_path / "aggregator.log")
    try:
        wait_serving(health, timeout=120)
        agent = agent_configs[1]  # gcp
        # DDP with activation checkpointing (non-reentrant): gradients still reach every rank's LoRA.
        code, log = _torchrun(
            "agent.cli",
            agent,
            "--audit-dir",
            str(tmp_path / "audit-flag"),
            env={"CLOUDFED_AGENT_ACTIVATION_CHECKPOINTING": "1"},
        )
    finally:
        stop(aggregator)
    assert code == 0, log[-3000:]
    assert "rank 0 of 2 (gloo)" in log
    assert "rank 1 of 2 (gloo)" in log
    for rank in (0, 1):
        assert f"rank {rank}: training on cpu, base weights torch.float32, activation checkpointing" in log
    for round_id in (1, 2):
        assert f"rank 0/2: round {round_id} trained" in log
        assert f"rank 1/2: round {round_id} trained" in log
    evals = [json.loads(line) for line in (agent.parent / "state" / "evals.jsonl").read_text().splitlines()]
    assert [e["version"] for e in evals] == [0, 1, 2]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    audited = sorted(p.name for p in (tmp_path / "audit-flag").iterdir())
    assert audited == [
        "round-000001.json",
        "round-000001.safetensors",
        "round-000002.json",
        "round-000002.safetensors",
    ]
    db = tmp_path / "aggregator-state" / "cloudfed.db"
    assert query(db, "SELECT agent FROM agents") == [("spiffe://demo.cloudfed/cloud/gcp/agent/agent-1",)]


def test_more_ranks_than_gpus_stop_with_one_config_error(tmp_path: Path) -> None:
    """device = "cuda" with more ranks than GPUs (none on CI machines): a config error, not a CUDA trace."""
    import torch

    _, agent_configs, _ = prepare(tmp_path, rounds=1, secagg=False, device="cuda")
    gpus = torch.cuda.device_count()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={gpus + 1}",
            "-m",
            "agent.cli",
            "--config",
            str(agent_configs[0]),
            "run",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = run.stdout + run.stderr
    assert run.returncode != 0, log[-3000:]
    expected = "sees no GPU" if gpus == 0 else f"only {gpus} GPU(s) are visible: --nproc_per_node must be"
    assert any(line.startswith("cloudfed-agent: ") and expected in line for line in log.splitlines()), log[
        -3000:
    ]


def test_a_loss_that_diverges_on_one_rank_makes_the_agent_decline_and_every_rank_go_on(
    tmp_path: Path,
) -> None:
    """Under torchrun, rank 1's loss is NaN in round 1 while rank 0's is finite
    (tests/torchrun_diverging_rank.py). The ranks decide together: the agent declines round 1
    (the aggregator abandons it at once, not at its 300 s deadline), and both ranks train
    round 2, which completes. A rank that stopped alone used to leave the other waiting in DDP's
    all-reduce until torchrun took the whole agent down."""
    agg_config, agent_configs, health = _alone(tmp_path)
    aggregator = start("server.cli", "--config", str(agg_config), log=tmp_path / "aggregator.log")
    try:
        wait_serving(health, timeout=120)
        agent = agent_configs[0]
        began = time.monotonic()
        code, log = _torchrun("tests.torchrun_diverging_rank", agent, env={"CLOUDFED_AGENT_MAX_ROUNDS": "1"})
        took = time.monotonic() - began
    finally:
        stop(aggregator)
    assert code == 0, log[-3000:]
    assert took < 200, log[-3000:]
    assert "training diverged at step 0: the loss is not finite on 1 of 2 rank(s)" in log
    assert "round 1: not taking part: local training failed: training diverged" in log
    assert "rank 1: training diverged at step 0" in log  # the follower went on to the next command
    for rank in (0, 1):
        assert f"rank {rank}/2: round 1 trained" not in log
        assert f"rank {rank}/2: round 2 trained" in log
    db = tmp_path / "aggregator-state" / "cloudfed.db"
    rounds = query(db, "SELECT round_id, phase, reason FROM rounds WHERE round_id <= 2 ORDER BY round_id")
    assert [(r, phase) for r, phase, _ in rounds] == [(1, "ABANDONED"), (2, "COMPLETED")]
    assert "0 of 1 uploads, 1 declined" in rounds[0][2]
    assert query(db, "SELECT round_id, status FROM participants WHERE round_id <= 2 ORDER BY round_id") == [
        (1, "declined"),
        (2, "uploaded"),
    ]


def test_two_ranks_train_user_level_dp_each_on_whole_users(tmp_path: Path) -> None:
    """User-level DP-SGD under torchrun: the ranks split the users, not the records (each rank
    trains on its users' rows, together every training record), and the ledger's sample rate is
    over users, with each rank drawing batch_size of them on average; the eval losses released sum
    each version over the held-out users of both ranks."""
    agg_config, agent_configs, health = _alone(tmp_path)
    agent = agent_configs[1]  # gcp
    data = agent.parent / "data.jsonl"
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({"text": t, "user": i % 40}) + "\n" for i, t in enumerate(texts)))
    env = {
        "CLOUDFED_AGENT_PRIVACY_DP_ENABLED": "true",
        "CLOUDFED_AGENT_PRIVACY_DP_UNIT": "user",
        "CLOUDFED_AGENT_PRIVACY_DP_NOISE_MULTIPLIER": "1.0",
        "CLOUDFED_AGENT_PRIVACY_DP_MAX_EPSILON": "100",
        "CLOUDFED_AGENT_PRIVACY_DP_DELTA": "1e-3",
        "CLOUDFED_AGENT_PRIVACY_DP_COUNT_NOISE": "2",
        "CLOUDFED_AGENT_PRIVACY_DP_EVAL_MAX_DEVIATION": "inf",  # a few held-out users: share all the same
    }
    aggregator = start("server.cli", "--config", str(agg_config), log=tmp_path / "aggregator.log")
    try:
        wait_serving(health, timeout=120)
        code, log = _torchrun("agent.cli", agent, env=env)
    finally:
        stop(aggregator)
    assert code == 0, log[-3000:]
    found = re.search(r"user-level DP-SGD: (\d+) training records of (\d+) users", log)
    assert found, log[-3000:]
    records, users = int(found[1]), int(found[2])
    assert 30 <= users < 40 and records > users
    for round_id in (1, 2):
        rows = [
            int(re.search(rf"rank {rank}/2: round {round_id} trained on (\d+) local blocks", log)[1])  # type: ignore[index]
            for rank in (0, 1)
        ]
        assert sum(rows) == records and all(r < records for r in rows), rows
    held = [re.search(rf"rank {rank}: (\d+) users holding (\d+) training rows", log) for rank in (0, 1)]
    assert all(held), log[-3000:]
    assert sum(int(h[1]) for h in held) == users and sum(int(h[2]) for h in held) == records  # type: ignore[index]
    ledger = json.loads((agent.parent / "state" / "privacy" / "dp-ledger.json").read_text())
    assert [s["unit"] for s in ledger["spends"]] == ["user", "user"]
    release, weight, held_users, _ = ledger["counts"]  # every user of both ranks, counted once, noised
    assert (release["kind"], release["units"], weight["kind"]) == ("units", users, "records")
    # the eval losses released: each version's sum over the held-out users of both ranks
    assert (held_users["kind"], held_users["units"]) == ("eval_units", 40 - users)
    assert [e["version"] for e in ledger["evals"]] == [0, 1, 2]
    assert all(0 < e["clipped_sum"] <= 10 * (40 - users) for e in ledger["evals"])
    assert weight["units"] == records  # records, each user's up to 8: no user here holds more
    assert ledger["spends"][0]["sample_rate"] == pytest.approx(min(1.0, 2 * 8 / release["released"]))
