"""Backups of a live aggregator: taken while a round is open, restored by pointing state_dir at
them, the restored aggregator commits exactly the version the original did (FedAdam's moments
included); refusals leave nothing behind."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
from pathlib import Path

import pytest
import torch

from common.config import AggregatorConfig
from protos.cloudfed.v1 import federation_pb2 as pb
from server.backup import REPORT, BackupError, backup, backup_into
from server.checkpoints import CheckpointStore
from server.state import StateDB
from tests.agentsim import Watcher, round_update, upload_header, upload_next_round, write_payload
from tests.conftest import Pki, aggregator_config, seed_store, small_adapter
from tests.daemons import run_cli


def fedadam_config(pki: Pki, state: Path) -> AggregatorConfig:
    base = aggregator_config(pki, state, min_agents=1)
    return dataclasses.replace(
        base, federation=dataclasses.replace(base.federation, server_optimizer="fedadam", server_lr=0.05)
    )


async def test_a_backup_taken_mid_round_restores_to_the_same_next_version(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    config = fedadam_config(pki, tmp_path / "agg0")
    run = await start_aggregator(config=config)
    out = tmp_path / "backup"
    async with run.client("a1") as client:
        join = await client.join(num_examples=10)
        watcher = Watcher(client)
        try:
            for version in (1, 2):
                await upload_next_round(run, client, watcher, join, version, tmp_path)
            open_round = await watcher.until(pb.ROUND_PHASE_UPLOAD)  # round 3 is open: back up now
            report = await asyncio.to_thread(backup, config.state_dir, out)
            payload = write_payload(tmp_path / "u3.bin", round_update(run, 3), 10.0)
            await client.upload(payload, upload_header(open_round, join.settings.layout.digest, 10.0))
            await watcher.until_version(3)
        finally:
            await watcher.close()
    original = run.agg.rounds.store.load(3)
    assert report.versions == [0, 1, 2] and report.latest_recorded == 2
    assert json.loads((out / REPORT).read_text())["versions"] == [0, 1, 2]
    assert not (out / "uploads").exists()
    assert sorted(p.name for p in (out / "optimizer").iterdir()) == [
        "fedadam-v00000001.safetensors",
        "fedadam-v00000002.safetensors",
    ]
    db = sqlite3.connect(out / "cloudfed.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT phase FROM rounds WHERE round_id = 3").fetchone() == ("UPLOAD",)
    db.close()

    restored = await start_aggregator(config=dataclasses.replace(config, state_dir=out))
    assert restored.agg.rounds.state.global_version == 2
    async with restored.client("a1") as client:
        join = await client.join(num_examples=10)
        watcher = Watcher(client)
        try:
            event = await upload_next_round(restored, client, watcher, join, 3, tmp_path)
            assert event.round_id == 4  # round 3 was in flight in the backup: it was interrupted
        finally:
            await watcher.close()
    again = restored.agg.rounds.store.load(3)
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k], original[k]) for k in original)  # FedAdam's moments came along
    previous = CheckpointStore(out / "checkpoints").load(2)
    assert any(not torch.equal(original[k], previous[k]) for k in original)


def test_refusals_leave_nothing_behind(pki: Pki, tmp_path: Path) -> None:
    state = tmp_path / "state"
    seed_store(state, small_adapter())
    with pytest.raises(BackupError, match="no aggregator state"):
        backup(state, tmp_path / "b1")
    StateDB(state / "cloudfed.db").close()
    taken = tmp_path / "taken"
    (taken / "x").mkdir(parents=True)
    with pytest.raises(BackupError, match="exists and is not empty; pass --force"):
        backup(state, taken)
    assert [p.name for p in taken.iterdir()] == ["x"]
    assert backup(state, taken, force=True).versions == [0]
    damaged = CheckpointStore(state / "checkpoints").path(0)
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(BackupError, match="version 0 does not match its manifest"):
        backup(state, tmp_path / "b2")
    assert not (tmp_path / "b2").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_the_command_backs_up_and_exits_2_on_a_refusal(pki: Pki, tmp_path: Path) -> None:
    state = tmp_path / "state"
    seed_store(state, small_adapter())
    StateDB(state / "cloudfed.db").close()
    d = pki.dir
    toml = tmp_path / "aggregator.toml"
    toml.write_text(
        f'state_dir = "{state}"\n'
        f'[tls]\ncert = "{d.cert("aggregator")}"\nkey = "{d.key("aggregator")}"\nca = "{d.ca_cert}"\n'
    )
    done = run_cli("server.cli", "--config", str(toml), "backup", "--out", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    assert f"backed up {state} to {tmp_path / 'b'}: 1 versions on disk (latest 0)" in done.stdout
    refused = run_cli("server.cli", "--config", str(toml), "backup", "--out", str(tmp_path / "b"))
    assert refused.returncode == 2 and "exists and is not empty" in refused.stderr
    # what the systemd timer runs
    into = run_cli(
        "server.cli", "--config", str(toml), "backup", "--into", str(tmp_path / "all"), "--keep", "7"
    )
    assert into.returncode == 0, into.stderr
    assert [p.name[:7] for p in (tmp_path / "all").iterdir()] == ["backup-"]


def test_backups_into_a_folder_keep_the_newest(tmp_path: Path) -> None:
    """``--into DIR --keep 2`` (what the timer runs): each backup gets its own time-stamped
    directory, and only the 2 newest finished ones stay; other files there are left alone."""
    state = tmp_path / "state"
    seed_store(state, small_adapter())
    StateDB(state / "cloudfed.db").close()
    folder = tmp_path / "backups"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    made = []
    for _ in range(3):
        out, report, removed = backup_into(state, folder, keep=2)
        assert report.versions == [0] and (out / REPORT).is_file()
        made.append((out, removed))
    assert made[2][1] == [made[0][0]]  # the third removed the first
    assert sorted(p.name for p in folder.iterdir()) == sorted([made[1][0].name, made[2][0].name, "notes.txt"])
    assert made[0][0].name < made[1][0].name < made[2][0].name
    with pytest.raises(BackupError, match="--keep must be at least 1"):
        backup_into(state, folder, keep=0)
