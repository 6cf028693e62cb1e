"""Checkpoint retention ([checkpoints]): which versions keep their tensors, pruning that keeps the
lineage and survives a crash half-way, and a real aggregator pruning as rounds commit."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from agent.export import ExportError
from common.config import CheckpointsConfig
from common.errors import ConfigError, NotFound
from server import retention
from server.checkpoints import CheckpointStore
from server.export import choose_version
from server.version_ranking import AgentEval, ranked
from tests.agentsim import Watcher, upload_next_round
from tests.conftest import Pki, aggregator_config
from tests.daemons import run_cli

LOSSES = {0: 6.0, 1: 5.0, 2: 5.5, 3: 5.4, 4: 5.3}  # version 1 is the best evaluated


def evals_of(losses: dict[int, float]) -> dict[int, dict[str, AgentEval]]:
    return {v: {"a": AgentEval(loss, 100)} for v, loss in losses.items()}


def test_the_rules_keep_version_0_the_newest_the_milestones_and_the_best() -> None:
    committed = list(range(11))
    evals = evals_of({3: 4.0, 5: 4.5, 9: 5.0})
    policy = CheckpointsConfig(keep_last=2, keep_every=4, keep_best=2)
    assert retention.to_prune(committed, evals, policy) == [1, 2, 6, 7]  # kept: 0, 3, 4, 5, 8, 9, 10
    assert retention.to_prune(committed, evals, CheckpointsConfig(keep_last=0)) == []  # the default
    assert retention.to_prune(committed, evals, CheckpointsConfig(keep_last=3, keep_best=0)) == list(
        range(1, 8)
    )
    assert retention.to_prune([0], evals, CheckpointsConfig(keep_last=2)) == []


@given(
    committed=st.sets(st.integers(0, 60), min_size=1, max_size=40),
    losses=st.dictionaries(st.integers(0, 60), st.floats(0, 10), max_size=20),
    keep_last=st.integers(2, 10),
    keep_every=st.integers(0, 7),
    keep_best=st.integers(0, 3),
)
@settings(max_examples=200, deadline=None)
def test_every_version_is_either_kept_by_a_rule_or_pruned(
    committed: set[int], losses: dict[int, float], keep_last: int, keep_every: int, keep_best: int
) -> None:
    versions = sorted(committed | {0})
    evals = evals_of(losses)
    policy = CheckpointsConfig(keep_last, keep_every, keep_best)
    pruned = set(retention.to_prune(versions, evals, policy))
    kept = set(versions) - pruned
    assert pruned <= set(versions)
    assert {0, *versions[-keep_last:]} <= kept
    milestones = {v for v in versions if keep_every and v % keep_every == 0}
    assert milestones <= kept
    assert set(ranked(versions, evals)[:keep_best]) <= kept
    assert len(kept) <= 1 + keep_last + len(milestones) + keep_best


def test_a_pruned_version_keeps_its_manifest_and_is_named_as_pruned(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for v in range(4):
        store.save(v, {"x.lora_A.weight": torch.full((2, 2), float(v))}, parent=v - 1 if v else None)
    sha = store.manifest(1).sha256
    store.prune(1)
    store.prune(1)  # idempotent
    assert store.versions() == [0, 2, 3] and store.pruned() == [1]
    assert not store.path(1).exists() and sha in (tmp_path / "pruned" / "v00000001.json").read_text()
    with pytest.raises(NotFound, match=r"global version 1 was pruned .* the latest is 3"):
        store.load(1)
    with pytest.raises(NotFound, match=r"^no global version 9$"):
        store.manifest(9)
    # a crash after the manifest moved but before the tensors went: the next pass finishes it
    (tmp_path / "pruned" / "v00000002.json").write_bytes(store._manifest_path(2).read_bytes())
    store._manifest_path(2).unlink()
    assert store.half_pruned() == [2]
    assert retention.prune(store, {}, CheckpointsConfig(keep_last=2)) == []
    assert store.half_pruned() == [] and not store.path(2).exists()
    assert store.disk_bytes() == store.path(0).stat().st_size + store.path(3).stat().st_size
    assert choose_version(store.versions(), {}, "3").version == 3
    with pytest.raises(ExportError, match=r"global version 1 was pruned .* versions on disk: 0, 3"):
        choose_version(store.versions(), {}, "1", store.pruned())


@pytest.mark.parametrize(
    ("field", "value"), [("keep_last", 1), ("keep_last", -2), ("keep_every", -1), ("keep_best", -1)]
)
def test_a_policy_that_cannot_work_is_a_config_error(
    pki: Pki, tmp_path: Path, field: str, value: int
) -> None:
    config = aggregator_config(pki, tmp_path)
    bad = dataclasses.replace(config, checkpoints=CheckpointsConfig(**{field: value}))
    with pytest.raises(ConfigError, match=f"checkpoints.{field}"):
        bad.validate()


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_the_aggregator_prunes_as_versions_commit(start_aggregator, pki: Pki, tmp_path: Path) -> None:
    """keep_last = 2, keep_best = 1 over 4 real rounds in which version 1 evaluates best: version 2
    is pruned when version 4 commits, and downloading it then is NOT_FOUND, naming the pruning."""
    config = dataclasses.replace(
        aggregator_config(pki, tmp_path / "agg0", min_agents=1),
        checkpoints=CheckpointsConfig(keep_last=2, keep_best=1),
    )
    pruned_before = sample("cloudfed_checkpoints_pruned_total")
    run = await start_aggregator(config=config)
    store = run.agg.rounds.store
    on_disk: dict[int, list[int]] = {}
    async with run.client("a1") as client:
        join = await client.join(num_examples=10)
        watcher = Watcher(client)
        try:
            await client.report_eval(0, LOSSES[0], 100)
            for version in range(1, 5):
                await upload_next_round(run, client, watcher, join, version, tmp_path)
                on_disk[version] = store.versions()
                await client.report_eval(version, LOSSES[version], 100)
            assert on_disk == {1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3], 4: [0, 1, 3, 4]}
            assert store.pruned() == [2]
            assert sample("cloudfed_checkpoints_kept") == 4
            assert sample("cloudfed_checkpoints_pruned_total") == pruned_before + 1
            assert sample("cloudfed_checkpoint_bytes") == store.disk_bytes() > 0
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.download_model(tmp_path / "v2.safetensors", 2)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            assert "global version 2 was pruned" in (refused.value.details() or "")
            header = await client.download_model(tmp_path / "v1.safetensors", 1)
            assert header.version == 1
        finally:
            await watcher.close()
    d = pki.dir
    toml = tmp_path / "aggregator.toml"
    toml.write_text(
        f'state_dir = "{tmp_path / "agg0"}"\n'
        f'[tls]\ncert = "{d.cert("aggregator")}"\nkey = "{d.key("aggregator")}"\nca = "{d.ca_cert}"\n'
        "[checkpoints]\nkeep_last = 2\nkeep_best = 1\n"
    )
    status = await asyncio.to_thread(run_cli, "server.cli", "--config", str(toml), "status")
    assert status.returncode == 0, status.stderr
    mb = store.disk_bytes() / 1e6
    assert f"checkpoints     4 on disk ({mb:.1f} MB), 1 pruned (keep_last 2, keep_every 0, keep_best 1)" in (
        status.stdout
    )
    assert (
        f"best            version 1: the lowest token-weighted eval loss ({LOSSES[1]:.4f}) of the 4"
        " version(s) compared over the 1 agent(s) that evaluated them all (what export --version best takes)"
    ) in status.stdout  # version 2 was pruned: not a candidate
