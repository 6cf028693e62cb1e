"""The agent under torchrun: 2 CPU ranks (gloo), DDP training, only rank 0 talks to the aggregator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.demo import prepare
from tests.daemons import start, stop, wait_serving
from tests.test_faults import query

pytestmark = pytest.mark.slow


def test_two_ranks_train_with_ddp_and_only_rank_0_joins(tmp_path: Path) -> None:
    # One agent alone: secure aggregation needs at least two (the config refuses it), so plain updates.
    agg_config, agent_configs, health = prepare(tmp_path, rounds=2, secagg=False)
    agg_config.write_text(agg_config.read_text().replace("min_agents = 3", "min_agents = 1"))
    aggregator = start("server.cli", "--config", str(agg_config), log=tmp_path / "aggregator.log")
    try:
        wait_serving(health, timeout=120)
        agent = agent_configs[1]  # gcp
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                "-m",
                "agent.cli",
                "--config",
                str(agent),
                "run",
                "--audit-dir",
                str(tmp_path / "audit-flag"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            # DDP with activation checkpointing (non-reentrant): gradients still reach every rank's LoRA.
            env={
                **os.environ,
                "CLOUDFED_AGENT_LOG_LEVEL": "INFO",
                "CLOUDFED_AGENT_ACTIVATION_CHECKPOINTING": "1",
            },
        )
    finally:
        stop(aggregator)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
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
