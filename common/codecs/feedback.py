"""Error feedback: the part of an update a biased codec dropped is kept on the agent and added to
the next update, so nothing is lost for good. The residual is saved after every round (atomically),
so it survives restarts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from common.codecs.base import Codec


class ErrorFeedback:
    """Wraps a codec: encode(x) sends codec(x + r) and keeps r = (x + r) - decode(payload)."""

    def __init__(self, codec: Codec, numel: int, path: Path | None = None) -> None:
        self.codec, self.path = codec, path
        self.residual = np.zeros(numel, dtype=np.float32)
        if path is not None and path.exists():
            saved = np.load(path)
            if saved.shape == self.residual.shape:
                self.residual = saved.astype(np.float32)

    def encode(self, vector: np.ndarray) -> np.ndarray:
        """The payload for ``vector`` plus what earlier rounds left out; updates the residual."""
        corrected = vector.reshape(-1).astype(np.float32) + self.residual
        payload = self.codec.encode(corrected)
        self.residual = corrected - self.codec.decode(payload)
        self._save()
        return payload

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.npy")
        np.save(tmp, self.residual)
        os.replace(tmp, self.path)
