"""FetchSGD's server loop (Rothchild et al., ICML 2020) for the ``countsketch`` codec.

Agents send count sketches of their updates and only the (weighted mean) sketch of the round
reaches the aggregator, masked or not. With S that sketch, each round:

    S_u <- rho * S_u + S                  momentum, in sketch space
    S_e <- S_e + S_u                      error accumulation
    delta <- top-k of unsketch(S_e)       median-of-rows estimates of the k heaviest coordinates
    S_e <- S_e - sketch(delta)            what was applied leaves the error ...
    S_u[cells of sketch(delta)] <- 0      ... and its momentum stops (momentum stopping)

and ``delta`` is the round's update. What the top-k leaves out, including the sketch's own
estimation error, stays in S_e and reaches the model in later rounds. Both accumulators are saved
beside each version (as FedAdam's moments are), so a restart resumes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from common.codecs.countsketch import CountSketch
from common.errors import ConfigError, InvalidArgument

KEEP = 2


@dataclass(frozen=True)
class FetchSGDPlan:
    """The federation's FetchSGD settings."""

    topk: float = 0.1
    """Coordinates updated each round, as a fraction of the sketch's width (columns a row)."""
    momentum: float = 0.0
    """Momentum rho of the sketch-space accumulator (a steady update is applied 1/(1-rho) times)."""


class FetchSGD:
    """Turns the round's mean sketch into a k-sparse update; state per version in ``state_dir``."""

    def __init__(self, sketch: CountSketch, k: int, momentum: float, state_dir: Path) -> None:
        if not 1 <= k <= sketch.numel:
            raise ConfigError(f"fetchsgd: k must be in 1..{sketch.numel}, got {k}")
        if not 0 <= momentum < 1:
            raise ConfigError(f"fetchsgd: momentum must be in [0, 1), got {momentum}")
        self.sketch, self.k, self.momentum, self.state_dir = sketch, k, momentum, state_dir

    def _path(self, version: int) -> Path:
        return self.state_dir / f"fetchsgd-v{version:08d}.safetensors"

    def _load(self, version: int) -> tuple[np.ndarray, np.ndarray]:
        cells = self.sketch.coordinates(self.sketch.numel)
        path = self._path(version)
        if path.exists():
            state = load_file(path)
            if state["momentum"].shape == (cells,):
                return state["momentum"].astype(np.float64), state["error"].astype(np.float64)
        return np.zeros(cells), np.zeros(cells)

    def step(self, mean_sketch: np.ndarray, version: int) -> np.ndarray:
        """The update (float32, k nonzeros at most) that produces ``version`` from its parent;
        the accumulators of the parent version are loaded, the new ones saved."""
        s = np.asarray(mean_sketch, dtype=np.float64).reshape(-1)
        u, e = self._load(version - 1)
        if s.shape != u.shape:
            raise InvalidArgument(f"sketch of {s.size} cells, expected {u.size}")
        if not np.all(np.isfinite(s)):
            raise InvalidArgument("aggregate sketch is not finite")
        u = self.momentum * u + s
        e = e + u
        estimate = self.sketch.decode(e.astype(np.float32))
        heavy = np.argpartition(np.abs(estimate), -self.k)[-self.k :]
        delta = np.zeros(self.sketch.numel, dtype=np.float32)
        delta[heavy] = estimate[heavy]
        applied = self.sketch.encode(delta).astype(np.float64)
        e -= applied
        u[applied != 0] = 0.0
        self._save(version, u, e)
        return delta

    def _save(self, version: int, momentum: np.ndarray, error: np.ndarray) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / f".fetchsgd-v{version:08d}.tmp"
        save_file({"momentum": momentum.astype(np.float32), "error": error.astype(np.float32)}, str(tmp))
        os.replace(tmp, self._path(version))
        for old in sorted(self.state_dir.glob("fetchsgd-v*.safetensors"))[:-KEEP]:
            old.unlink(missing_ok=True)
