"""Running sum of encoded update files: memory O(model), whatever the number of agents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.codecs.identity import WIRE_DTYPE
from common.errors import InvalidArgument

BLOCK_ELEMS = 1 << 18  # 1 MiB of float32 per read


class SumAccumulator:
    """Adds float32 payload files into one float64 vector, block by block."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.total = np.zeros(length, dtype=np.float64)
        self.count = 0

    def _blocks(self, path: Path) -> np.memmap[Any, np.dtype[np.float32]]:
        size = path.stat().st_size
        if size != self.length * WIRE_DTYPE.itemsize:
            raise InvalidArgument(f"payload of {size} bytes, expected {self.length * WIRE_DTYPE.itemsize}")
        return np.memmap(path, dtype=WIRE_DTYPE, mode="r", shape=(self.length,))

    def add_file(self, path: Path) -> None:
        """Validate (finite values) then add a payload file; nothing is added if invalid."""
        data = self._blocks(path)
        for start in range(0, self.length, BLOCK_ELEMS):
            if not np.all(np.isfinite(data[start : start + BLOCK_ELEMS])):
                raise InvalidArgument("update contains NaN or infinite values")
        for start in range(0, self.length, BLOCK_ELEMS):
            self.total[start : start + BLOCK_ELEMS] += data[start : start + BLOCK_ELEMS]
        self.count += 1
        del data
