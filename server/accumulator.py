"""Running sum of encoded update files: memory O(model), whatever the number of agents."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from common.codecs.identity import WIRE_DTYPE
from common.errors import InvalidArgument

BLOCK_ELEMS = 1 << 18  # 1 MiB of float32 per step


class SumAccumulator:
    """Adds float32 payload files into one float64 vector, block by block, one file at a time."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.total = np.full(length, 0.0, dtype=np.float64)  # touched now, not during an upload
        self.count = 0
        self._lock = threading.Lock()

    def add_file(self, path: Path) -> None:
        """Add a payload file (already validated while it streamed in)."""
        size = path.stat().st_size
        if size != self.length * WIRE_DTYPE.itemsize:
            raise InvalidArgument(f"payload of {size} bytes, expected {self.length * WIRE_DTYPE.itemsize}")
        data = np.memmap(path, dtype=WIRE_DTYPE, mode="r", shape=(self.length,))
        with self._lock:
            for start in range(0, self.length, BLOCK_ELEMS):
                block = slice(start, start + BLOCK_ELEMS)
                np.add(self.total[block], data[block], out=self.total[block])
            self.count += 1
        del data

    def add_vector(self, weighted: np.ndarray, weight: float) -> None:
        """Add one decoded update ``weight * delta`` and its weight."""
        if weighted.size != self.length - 1:
            raise InvalidArgument(f"update of {weighted.size} values, expected {self.length - 1}")
        with self._lock:
            np.add(self.total[:-1], weighted, out=self.total[:-1])
            self.total[-1] += weight
            self.count += 1
