"""Durable writes: make what was written (a file, or a directory's entries) reach the disk."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path (a directory's fsync makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (readers see the old file or the new one) and
    durably (file and rename fsynced before returning)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # one per writer
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``, and ``root``."""
    for p in [*sorted(root.rglob("*"), reverse=True), root]:
        fsync_path(p)


def build_dir_beside(out: Path) -> Path:
    """A new empty directory next to ``out``, to build it in and then ``put_in_place``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))


def put_in_place(built: Path, out: Path) -> None:
    """Make the fully written directory ``built`` appear as ``out`` at once (an existing ``out`` is
    moved aside first and removed after)."""
    fsync_tree(built)
    old = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / "previous")
    os.replace(built, out)
    fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def refuse_non_empty(out: Path, force: bool, error: type[Exception] = FileExistsError) -> None:
    """Raise ``error`` for an ``out`` that holds something, unless ``force``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise error(f"{out} exists and is not empty; pass --force to replace it")
