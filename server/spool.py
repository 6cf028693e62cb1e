"""On-disk spool of uploads in progress: resumable, one file per upload.

Each upload lives under ``<root>/<agent>/<upload_id>`` as ``.part`` (bytes
committed so far), ``.json`` (its header) and, once verified, ``.done``. Memory
is one chunk per stream; nothing holds a whole update.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from common.chunks import ChunkReceiver
from common.errors import Aborted, InvalidArgument, NotFound, ResourceExhausted
from common.identity import SpiffeId

_UPLOAD_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class UploadMeta:
    """The header of an upload, as first received."""

    agent: str
    round_id: int
    upload_id: str
    codec: str
    layout_digest: str
    total_bytes: int
    sha256: str
    base_version: int
    weight: float
    codec_params: str = ""
    epsilon_spent: float = 0.0
    """The agent's DP spend, this round included (0: no DP, or an agent older than the field)."""


class SpoolWriter:
    """One open upload stream; closes on exit and keeps the committed prefix."""

    def __init__(
        self,
        spool: UploadSpool,
        key: tuple[str, str],
        meta: UploadMeta,
        base: Path,
        max_chunk: int,
        validate: Callable[[bytes], None] | None,
    ) -> None:
        self.meta = meta
        self.path = base.with_suffix(".part")
        self._done = base.with_suffix(".done")
        self._spool, self._key = spool, key
        self.receiver = ChunkReceiver(
            self.path, meta.total_bytes, bytes.fromhex(meta.sha256), max_chunk, validate
        )

    @property
    def committed(self) -> int:
        """Bytes committed so far."""
        return self.receiver.committed

    def write(self, offset: int, data: bytes) -> int:
        """Append a chunk (see ChunkReceiver.write)."""
        return self.receiver.write(offset, data)

    def finish(self) -> bool:
        """Verify the digest if all bytes arrived; True when complete and verified."""
        if not self.receiver.complete:
            return False
        self.receiver.verify()
        self._done.touch()
        return True

    def close(self) -> None:
        """Release the stream."""
        self.receiver.close()
        self._spool._release(self._key)


class UploadSpool:
    """Resumable upload files, keyed by (agent, upload_id)."""

    def __init__(self, root: Path, max_update_bytes: int, max_chunk_bytes: int) -> None:
        self.root = root
        self.max_update_bytes = max_update_bytes
        self.max_chunk_bytes = max_chunk_bytes
        root.mkdir(parents=True, exist_ok=True)
        self._active: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def _base(self, agent: SpiffeId, upload_id: str) -> Path:
        if not _UPLOAD_ID.match(upload_id):
            raise InvalidArgument(f"upload_id must match {_UPLOAD_ID.pattern}")
        return self.root / f"{agent.cloud}.{agent.name}" / upload_id

    def check_limits(self, meta: UploadMeta) -> None:
        """Raise unless the declared size, id and weight are acceptable."""
        if not (math.isfinite(meta.weight) and meta.weight >= 0):
            raise InvalidArgument(f"weight must be a finite number >= 0, not {meta.weight}")
        if meta.total_bytes <= 0:
            raise InvalidArgument("total_bytes must be positive")
        if meta.total_bytes > self.max_update_bytes:
            raise ResourceExhausted(
                f"update of {meta.total_bytes} bytes exceeds the limit of {self.max_update_bytes}"
            )
        if not _UPLOAD_ID.match(meta.upload_id):
            raise InvalidArgument(f"upload_id must match {_UPLOAD_ID.pattern}")

    def open(
        self, agent: SpiffeId, meta: UploadMeta, validate: Callable[[bytes], None] | None = None
    ) -> SpoolWriter:
        """Open (or resume) an upload; the header must match the original on resume.

        ``validate`` sees every byte of the payload in order and raises to reject it.
        """
        self.check_limits(meta)
        base = self._base(agent, meta.upload_id)
        meta_path = base.with_suffix(".json")
        if meta_path.exists():
            previous = UploadMeta(**json.loads(meta_path.read_text()))
            if previous != meta:
                raise InvalidArgument(f"upload {meta.upload_id} resumed with a different header")
        key = (agent.uri, meta.upload_id)
        with self._lock:
            if key in self._active:
                raise Aborted(f"upload {meta.upload_id} is already being received; retry later")
            self._active.add(key)
        try:
            base.parent.mkdir(parents=True, exist_ok=True)
            if not meta_path.exists():
                meta_path.write_text(json.dumps(asdict(meta)))
            return SpoolWriter(self, key, meta, base, self.max_chunk_bytes, validate)
        except BaseException:
            self._release(key)
            raise

    def _release(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._active.discard(key)

    def status(self, agent: SpiffeId, upload_id: str) -> tuple[int, bool]:
        """(committed bytes, verified) of an upload."""
        base = self._base(agent, upload_id)
        if not base.with_suffix(".json").exists():
            raise NotFound(f"no upload {upload_id}")
        part = base.with_suffix(".part")
        committed = part.stat().st_size if part.exists() else 0
        return committed, base.with_suffix(".done").exists()

    def discard(self, agent: SpiffeId, upload_id: str) -> None:
        """Forget an upload entirely (bad input leaves no trace)."""
        base = self._base(agent, upload_id)
        for suffix in (".part", ".json", ".done"):
            base.with_suffix(suffix).unlink(missing_ok=True)

    def purge(self) -> None:
        """Delete every spooled upload (between rounds)."""
        for child in self.root.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
