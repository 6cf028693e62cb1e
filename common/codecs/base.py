"""The codec interface: what leaves the agent is ``encode(update)``; the aggregator decodes.

A codec is *linear* when decode(sum of payloads) == sum of decodes: such payloads can be summed
(under secure aggregation, without seeing any one of them) and decoded once. Other codecs need
each agent's payload decoded on its own, so they only work with a trusted aggregator.
Parameters shared by every agent (seeds, clip bounds, ratios) come with the round.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Codec(ABC):
    """Encodes a flat float32 update into a payload vector and back."""

    name: str
    linear: bool
    biased: bool = False
    """Whether decode(encode(x)) systematically loses part of x: the agent then keeps that part
    (error feedback, ``common.codecs.feedback``) and sends it in later rounds."""

    @abstractmethod
    def encode(self, vector: np.ndarray) -> np.ndarray:
        """The payload for one update (a numeric vector; summable when ``linear``)."""

    @abstractmethod
    def decode(self, payload: np.ndarray) -> np.ndarray:
        """The float32 update (or, for a linear codec, the sum of updates) a payload stands for."""

    @abstractmethod
    def payload_bytes(self, numel: int) -> int:
        """Bytes on the wire for an update of ``numel`` parameters."""

    def coordinates(self, numel: int) -> int:
        """Values in ``encode``'s output for an update of ``numel`` parameters (linear codecs)."""
        raise NotImplementedError(f"codec {self.name!r} has no fixed coordinate count")

    def to_bytes(self, payload: np.ndarray) -> bytes:
        """The payload on the wire (its raw values unless the codec packs them)."""
        return payload.tobytes()

    def from_bytes(self, data: bytes, numel: int) -> np.ndarray:
        """The payload from the wire (float32 values unless the codec packs them)."""
        return np.frombuffer(data, dtype=np.float32)

    def ratio(self, numel: int) -> float:
        """Compression against float32."""
        return 4 * numel / self.payload_bytes(numel)
