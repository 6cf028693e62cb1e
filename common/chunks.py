"""Chunked byte streams: splitting, validating reassembly, digests, resume offsets.

Plain Python, no gRPC: the servicer and client feed (offset, data) pairs through
these functions. Memory is bounded by one chunk; nothing buffers a whole stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from common.errors import DataLoss, InvalidArgument, ResourceExhausted

KiB = 1024
MiB = 1024 * KiB
MIN_CHUNK_BYTES = 4 * KiB
MAX_CHUNK_BYTES = 1 * MiB
DIGEST_BYTES = 32
_READ_BLOCK = 1 * MiB


def validate_chunk_bytes(value: int, field: str = "max_chunk_bytes") -> int:
    """Return ``value`` if it is a usable chunk size (4 KiB .. 1 MiB), else raise."""
    if not MIN_CHUNK_BYTES <= value <= MAX_CHUNK_BYTES:
        raise InvalidArgument(f"{field} must be between {MIN_CHUNK_BYTES} and {MAX_CHUNK_BYTES}, got {value}")
    return value


def iter_file_chunks(path: Path, chunk_bytes: int, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """(offset, data) pairs of a file from ``start``, each at most ``chunk_bytes``."""
    validate_chunk_bytes(chunk_bytes, "chunk_bytes")
    with open(path, "rb") as f:
        f.seek(start)
        offset = start
        while data := f.read(chunk_bytes):
            yield offset, data
            offset += len(data)


def sha256_file(path: Path, limit: int | None = None) -> hashlib._Hash:
    """A running sha256 over the first ``limit`` bytes of a file (all if None)."""
    h = hashlib.sha256()
    remaining = limit if limit is not None else -1
    with open(path, "rb") as f:
        while remaining != 0:
            n = _READ_BLOCK if remaining < 0 else min(_READ_BLOCK, remaining)
            block = f.read(n)
            if not block:
                break
            h.update(block)
            if remaining > 0:
                remaining -= len(block)
    return h


class ChunkReceiver:
    """Validates a chunk stream and appends it to a file, hashing as it goes.

    The file may already hold a committed prefix (a resumed stream); the
    next chunk must start exactly at the committed offset.
    """

    def __init__(
        self,
        path: Path,
        total_bytes: int,
        sha256: bytes,
        max_chunk_bytes: int,
        validate: Callable[[bytes], None] | None = None,
    ) -> None:
        if len(sha256) != DIGEST_BYTES:
            raise InvalidArgument(f"sha256 must be {DIGEST_BYTES} bytes, got {len(sha256)}")
        self.path = path
        self.total_bytes = total_bytes
        self.expected = sha256
        self.max_chunk_bytes = max_chunk_bytes
        self._validate = validate
        committed = path.stat().st_size if path.exists() else 0
        if committed > total_bytes:
            raise InvalidArgument(f"committed {committed} bytes exceed the declared total {total_bytes}")
        self._hash = hashlib.sha256()
        if committed:  # a resumed stream: re-read the committed prefix once
            for _, block in iter_file_chunks(path, MAX_CHUNK_BYTES):
                self._hash.update(block)
                if validate is not None:
                    validate(block)
        self.committed = committed
        self._file: BinaryIO = open(path, "ab")  # noqa: SIM115 - closed in close()

    def write(self, offset: int, data: bytes) -> int:
        """Append one chunk; return the new committed offset."""
        if offset != self.committed:
            raise InvalidArgument(f"chunk at offset {offset}, expected {self.committed}")
        if not data:
            raise InvalidArgument(f"empty chunk at offset {offset}")
        if len(data) > self.max_chunk_bytes:
            raise ResourceExhausted(f"chunk of {len(data)} bytes exceeds the limit of {self.max_chunk_bytes}")
        if offset + len(data) > self.total_bytes:
            raise InvalidArgument(
                f"chunk ends at {offset + len(data)}, past the declared total {self.total_bytes}"
            )
        if self._validate is not None:
            self._validate(data)
        self._file.write(data)
        self._file.flush()
        self._hash.update(data)
        self.committed += len(data)
        return self.committed

    @property
    def complete(self) -> bool:
        """All declared bytes arrived."""
        return self.committed == self.total_bytes

    def verify(self) -> None:
        """Check the digest of a complete stream; raise DataLoss on mismatch.

        No fsync: a committed prefix survives a process crash in the page cache,
        and a machine crash restarts the round in flight anyway.
        """
        if not self.complete:
            raise InvalidArgument(f"stream incomplete: {self.committed} of {self.total_bytes} bytes")
        self._file.flush()
        if self._hash.digest() != self.expected:
            raise DataLoss(
                f"sha256 mismatch: got {self._hash.hexdigest()}, header said {self.expected.hex()}"
            )

    def close(self) -> None:
        """Close the file, keeping the committed prefix."""
        self._file.close()
