"""Server optimizers: apply the round's mean update to the global model.

FedAvg: x <- x + lr * mean_delta. FedAdam (Reddi et al., ICLR 2021, "Adaptive
Federated Optimization"): the mean delta is a pseudo-gradient,
m <- b1 m + (1 - b1) d;  v <- b2 v + (1 - b2) d^2;  x <- x + lr * m / (sqrt(v) + tau).
FedAdam's moments are saved beside the latest two versions, so a restart resumes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from safetensors.numpy import load_file, save_file

from common.errors import ConfigError


class ServerOptimizer(Protocol):
    """Steps the flat global vector with the round's weighted-mean delta."""

    def step(self, current: np.ndarray, mean_delta: np.ndarray, version: int) -> np.ndarray:
        """The new global vector; may persist its own state as of ``version``."""
        ...


@dataclass
class FedAvg:
    """Plain federated averaging with a server learning rate."""

    lr: float = 1.0

    def step(self, current: np.ndarray, mean_delta: np.ndarray, version: int) -> np.ndarray:
        """x + lr * mean_delta."""
        return (current + self.lr * mean_delta).astype(np.float32)


@dataclass
class FedAdam:
    """Adam on the server over pseudo-gradients, moments checkpointed per version in ``state_dir``."""

    state_dir: Path
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def _path(self, version: int) -> Path:
        return self.state_dir / f"fedadam-v{version:08d}.safetensors"

    def step(self, current: np.ndarray, mean_delta: np.ndarray, version: int) -> np.ndarray:
        """One Adam step; moments of the parent version (zeros at the start) are loaded from disk."""
        parent = self._path(version - 1)
        if parent.exists():
            state = load_file(parent)
            m, v = state["m"].astype(np.float64), state["v"].astype(np.float64)
        else:
            m = np.zeros_like(current, dtype=np.float64)
            v = np.zeros_like(current, dtype=np.float64)
        d = mean_delta.astype(np.float64)
        m = self.beta1 * m + (1 - self.beta1) * d
        v = self.beta2 * v + (1 - self.beta2) * d * d
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._path(version).with_suffix(".tmp")
        save_file({"m": m.astype(np.float32), "v": v.astype(np.float32)}, str(tmp))
        tmp.replace(self._path(version))
        for old in self.state_dir.glob("fedadam-v*.safetensors"):  # a rerun of this round needs the parent's
            if old.stem[len("fedadam-v") :].isdigit() and int(old.stem[len("fedadam-v") :]) < version - 1:
                old.unlink(missing_ok=True)
        return (current + self.lr * m / (np.sqrt(v) + self.tau)).astype(np.float32)


def make_optimizer(name: str, lr: float, state_dir: Path) -> ServerOptimizer:
    """The configured server optimizer."""
    if name == "fedavg":
        return FedAvg(lr)
    if name == "fedadam":
        return FedAdam(state_dir, lr)
    raise ConfigError(f"federation.server_optimizer: unknown {name!r}; known: fedavg, fedadam")
