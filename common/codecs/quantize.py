"""``quantize``: symmetric stochastic fixed point, 2-16 bits, with a shared clip bound. Linear.

Codes are integers in [-L, L], L = 2^(bits-1) - 1, so code sums decode with one multiplication
and no offset; stochastic rounding makes each code an unbiased estimate of the clipped value.
On the wire the codes are bit-packed: ``bits`` bits per parameter.
"""

from __future__ import annotations

import numpy as np

from common import bitpack
from common.codecs.base import Codec
from common.errors import ConfigError, InvalidArgument

BLOCK = 1 << 20


class Quantize(Codec):
    """Stochastic rounding to ``bits``-bit integer codes of ``clip / L`` steps."""

    name = "quantize"
    linear = True

    def __init__(self, clip: float, bits: int, rng: np.random.Generator | None = None) -> None:
        if not 2 <= bits <= 16:
            raise ConfigError(f"quantize bits must be in 2..16, got {bits}")
        if not clip > 0:
            raise ConfigError(f"quantize clip must be positive, got {clip}")
        self.clip, self.bits = float(clip), bits
        self.levels = (1 << (bits - 1)) - 1
        self.step = self.clip / self.levels
        self.rng = rng or np.random.default_rng()

    def encode(self, vector: np.ndarray) -> np.ndarray:
        """int32 codes (clipped, stochastically rounded)."""
        flat = vector.reshape(-1)
        if not np.all(np.isfinite(flat)):
            raise InvalidArgument("update contains NaN or infinite values")
        out = np.empty(flat.size, dtype=np.int32)
        for start in range(0, flat.size, BLOCK):
            x = np.clip(flat[start : start + BLOCK].astype(np.float64), -self.clip, self.clip) / self.step
            x += self.rng.random(x.size)
            out[start : start + x.size] = np.floor(x)
        np.clip(out, -self.levels, self.levels, out=out)
        return out

    def decode(self, payload: np.ndarray) -> np.ndarray:
        """Codes (or a sum of codes) back to values."""
        return (payload.astype(np.float64) * self.step).astype(np.float32)

    def payload_bytes(self, numel: int) -> int:
        """Bit-packed codes."""
        return bitpack.packed_bytes(numel, self.bits)

    def to_bytes(self, payload: np.ndarray) -> bytes:
        """Bit-packed codes."""
        return self.pack(payload)

    def from_bytes(self, data: bytes, numel: int) -> np.ndarray:
        """Codes from their bit-packed form."""
        return self.unpack(data, numel)

    def pack(self, codes: np.ndarray) -> bytes:
        """Codes as ``bits``-bit unsigned fields (code + L), little-endian bit order."""
        return bitpack.pack((codes.astype(np.int64) + self.levels).astype(np.uint32), self.bits)

    def unpack(self, data: bytes, numel: int) -> np.ndarray:
        """Inverse of ``pack``."""
        if len(data) != self.payload_bytes(numel):
            raise InvalidArgument(
                f"quantized payload of {len(data)} bytes, expected {self.payload_bytes(numel)}"
            )
        return (bitpack.unpack(data, self.bits, numel).astype(np.int64) - self.levels).astype(np.int32)
