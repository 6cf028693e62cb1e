"""``topk``: the k largest-magnitude values and their indices. Not linear: each agent's payload is
decoded on its own, so it needs a trusted aggregator (secure aggregation off). Biased: use it with
error feedback (``common.codecs.feedback``)."""

from __future__ import annotations

import numpy as np

from common.codecs.base import Codec
from common.errors import ConfigError, InvalidArgument


class TopK(Codec):
    """Payload: k uint32 indices then k float32 values, as one uint8 vector."""

    name = "topk"
    linear = False
    biased = True

    def __init__(self, numel: int, ratio: float) -> None:
        if not ratio >= 1:
            raise ConfigError(f"topk ratio must be >= 1, got {ratio}")
        self.numel = numel
        self.k = max(1, min(numel, round(numel / ratio / 2)))  # index + value: 8 bytes per kept entry

    def encode(self, vector: np.ndarray) -> np.ndarray:
        """Indices and values of the k largest magnitudes."""
        flat = vector.reshape(-1).astype(np.float32)
        if flat.size != self.numel:
            raise InvalidArgument(f"{flat.size} values given; the codec was built for {self.numel}")
        idx = np.argpartition(np.abs(flat), self.numel - self.k)[self.numel - self.k :].astype(np.uint32)
        idx.sort()
        return np.concatenate([idx.view(np.uint8), flat[idx].view(np.uint8)])

    def decode(self, payload: np.ndarray) -> np.ndarray:
        """A dense vector with the kept entries."""
        raw = np.ascontiguousarray(payload, dtype=np.uint8)
        if raw.size != 8 * self.k:
            raise InvalidArgument(f"topk payload of {raw.size} bytes, expected {8 * self.k}")
        idx = raw[: 4 * self.k].view(np.uint32)
        if self.k and int(idx.max()) >= self.numel:
            raise InvalidArgument("topk index out of range")
        out = np.zeros(self.numel, dtype=np.float32)
        out[idx] = raw[4 * self.k :].view(np.float32)
        return out

    def from_bytes(self, data: bytes, numel: int) -> np.ndarray:
        """The index and value bytes as they are."""
        return np.frombuffer(data, dtype=np.uint8)

    def payload_bytes(self, numel: int) -> int:
        """8 bytes per kept entry."""
        return 8 * self.k
