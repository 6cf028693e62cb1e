"""The last rounds' mean updates on disk, for what the next round derives from them (adaptive
clip bounds). Written before the version they produced is committed, so a crash leaves at worst
a file for a version that never was; only the newest two are kept."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

KEEP = 2


class AggregateStore:
    """``mean-v<version>.npy``: the decoded mean update that produced ``version``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, version: int) -> Path:
        return self.root / f"mean-v{version:08d}.npy"

    def save(self, version: int, mean: np.ndarray) -> None:
        """Write atomically, then drop all but the newest ``KEEP``."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".mean-v{version:08d}.tmp.npy"
        np.save(tmp, np.asarray(mean, dtype=np.float32))
        os.replace(tmp, self._path(version))
        for old in sorted(self.root.glob("mean-v*.npy"))[:-KEEP]:
            old.unlink(missing_ok=True)

    def load(self, version: int, numel: int) -> np.ndarray | None:
        """The mean that produced ``version``; None if absent or of another size."""
        path = self._path(version)
        if not path.exists():
            return None
        mean = np.load(path)
        return mean if mean.shape == (numel,) and np.all(np.isfinite(mean)) else None
