"""``cloudfed-aggregator backup``: a consistent copy of a live aggregator's state directory.

The database is copied with SQLite's online backup (a snapshot, while the daemon writes);
then the files: each checkpoint's tensors before its manifest, their sha256 checked against
the manifest, and the optimizer's, codec's and aggregates' files, each replaced only by
atomic renames so a copy is of one whole file. Files are copied after the database, so the
backup holds every version the database records, perhaps a newer one too (the aggregator
records it at start). The upload spool is not copied: a restored aggregator reruns the round
that was in flight, as after a crash. To restore, point ``state_dir`` at the copy.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common.chunks import sha256_file
from common.durable import build_dir_beside, put_in_place, refuse_non_empty
from common.errors import CloudfedError
from server.checkpoints import CheckpointStore

DB = "cloudfed.db"
SKIPPED = frozenset({"uploads", DB, f"{DB}-wal", f"{DB}-shm"})
"""The spool (in-flight uploads) and the live database files (copied by SQLite's backup)."""
REPORT = "backup.json"
PREFIX = "backup-"


class BackupError(CloudfedError):
    """The backup could not be made; nothing was written at ``--out``."""


@dataclass(frozen=True)
class BackupReport:
    """What a backup holds."""

    made_at: str
    versions: list[int]
    pruned: list[int]
    latest_recorded: int | None
    files: int
    bytes: int


def backup(state_dir: Path, out: Path, force: bool = False) -> BackupReport:
    """Copy ``state_dir`` to ``out`` (module docstring); the directory appears whole or not at all."""
    if not (state_dir / DB).is_file():
        raise BackupError(f"no aggregator state at {state_dir} (no {DB})")
    refuse_non_empty(out, force, BackupError)
    tmp = build_dir_beside(out)
    try:
        latest = _copy_database(state_dir / DB, tmp / DB)
        versions, pruned = _copy_checkpoints(CheckpointStore(state_dir / "checkpoints"), tmp / "checkpoints")
        for entry in sorted(state_dir.iterdir()):
            if entry.is_dir() and entry.name not in SKIPPED and entry.name != "checkpoints":
                _copy_files(entry, tmp / entry.name)
        if latest is not None and latest not in versions and latest not in pruned:
            raise BackupError(f"the database records version {latest} but its checkpoint is gone")
        copied = [p for p in tmp.rglob("*") if p.is_file()]
        report = BackupReport(
            made_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            versions=versions,
            pruned=pruned,
            latest_recorded=latest,
            files=len(copied),
            bytes=sum(p.stat().st_size for p in copied),
        )
        (tmp / REPORT).write_text(json.dumps(asdict(report), indent=2) + "\n")
        put_in_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _copy_database(source: Path, dest: Path) -> int | None:
    """SQLite's online backup of the live database, checked; return the latest version it records."""
    live = sqlite3.connect(source)  # only read: the backup API copies pages under a read lock
    copy = sqlite3.connect(dest)
    try:
        live.backup(copy)
        (verdict,) = copy.execute("PRAGMA integrity_check").fetchone()
        if verdict != "ok":
            raise BackupError(f"the database copy fails its integrity check: {verdict}")
        (latest,) = copy.execute("SELECT MAX(version) FROM versions").fetchone()
    finally:
        copy.close()
        live.close()
    return None if latest is None else int(latest)


def _copy_checkpoints(store: CheckpointStore, dest: Path) -> tuple[list[int], list[int]]:
    """Each version's tensors, checked against its manifest, then the manifest; pruned manifests.
    A version pruned while this runs is left out."""
    copy = CheckpointStore(dest)
    versions = []
    for version in store.versions():
        name = f"v{version:08d}.json"
        try:
            manifest = store.manifest(version)
            shutil.copy2(store.path(version), copy.path(version))
            shutil.copy2(store.root / name, dest / name)  # the manifest last: it makes the version
        except (FileNotFoundError, CloudfedError):  # pruned meanwhile
            copy.path(version).unlink(missing_ok=True)
            continue
        if sha256_file(copy.path(version)).hexdigest() != manifest.sha256:
            raise BackupError(f"checkpoint of version {version} does not match its manifest: it is damaged")
        versions.append(version)
    if (store.root / "pruned").is_dir():
        _copy_files(store.root / "pruned", dest / "pruned")
    return versions, copy.pruned()


def _copy_files(source: Path, dest: Path) -> None:
    """Every finished file under ``source`` (temporary ``.tmp`` files are not)."""
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.suffix != ".tmp":
            target = dest / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copy2(path, target)
            except FileNotFoundError:
                continue  # replaced or removed meanwhile (FedAdam keeps two versions)


def backup_into(state_dir: Path, folder: Path, keep: int) -> tuple[Path, BackupReport, list[Path]]:
    """A new ``backup-<UTC time>`` in ``folder``; then only the ``keep`` newest backups there stay.
    Return the new backup, its report and the backups removed (timers, cron jobs)."""
    if keep < 1:
        raise BackupError("--keep must be at least 1")
    out = folder / f"{PREFIX}{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S.%fZ}"  # sorts as it was made
    report = backup(state_dir, out)
    finished = sorted(p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / REPORT).is_file())
    removed = finished[:-keep]
    for old in removed:
        shutil.rmtree(old)
    return out, report, removed
