"""``quantize``: symmetric stochastic fixed point, 2-16 bits.

Codes are integers in [-L, L], L = 2^(bits-1) - 1; stochastic rounding makes each code an unbiased
estimate of the clipped value. On the wire the codes are bit-packed: ``bits`` bits per parameter.

- ``segment = 0``: one shared clip bound, so code sums decode with one multiplication: linear.
- ``segment = n``: each agent clips every n values at ``clip`` times their own RMS (LoRA's A and B,
  and layers, differ in scale by orders of magnitude) and sends the n-value bounds as float32
  after the codes (32 / n bits a value more). Each payload decodes on its own: not linear, so
  a trusted aggregator only (like topk).
"""

from __future__ import annotations

import numpy as np

from common import bitpack
from common.codecs.base import Codec
from common.errors import ConfigError, InvalidArgument
from common.secagg.clips import SegmentClips, segments

BLOCK = 1 << 20


class Quantize(Codec):
    """Stochastic rounding to ``bits``-bit integer codes of ``clip / L`` steps."""

    name = "quantize"
    linear = True

    def __init__(
        self, clip: float, bits: int, rng: np.random.Generator | None = None, segment: int = 0
    ) -> None:
        if not 2 <= bits <= 16:
            raise ConfigError(f"quantize bits must be in 2..16, got {bits}")
        if not clip > 0:
            raise ConfigError(f"quantize clip must be positive, got {clip}")
        if segment < 0:
            raise ConfigError(f"quantize segment must be >= 0, got {segment}")
        self.segment = segment
        self.linear = segment == 0  # per-segment bounds are each agent's own: decoded one by one
        self.clip, self.bits = (1.0 if segment else float(clip)), bits
        self.multiple = float(clip)
        self.levels = (1 << (bits - 1)) - 1
        self.step = self.clip / self.levels
        self.rng = rng or np.random.default_rng()

    def encode(self, vector: np.ndarray) -> np.ndarray:
        """int32 codes (clipped, stochastically rounded); with segments, the bounds follow as
        float32 bit patterns."""
        flat = vector.reshape(-1)
        if not np.all(np.isfinite(flat)):
            raise InvalidArgument("update contains NaN or infinite values")
        if not self.segment:
            return self._codes(flat)
        if np.any(flat):
            clips = SegmentClips.from_aggregate(flat, self.segment, self.multiple)
        else:
            clips = SegmentClips.uniform(flat.size, self.segment, 1.0)
        codes = self._codes(clips.scale_down(flat))
        return np.concatenate([codes, clips.bounds.astype(np.float32).view(np.int32)])

    def _split(self, payload: np.ndarray) -> tuple[np.ndarray, SegmentClips]:
        """Codes and bounds of a segmented payload (numel + ceil(numel / segment) values)."""
        numel = payload.size - -(-payload.size // (self.segment + 1))
        bounds = np.ascontiguousarray(payload[numel:], dtype=np.int32).view(np.float32)
        clips = SegmentClips(self.segment, bounds)
        clips.check(numel)
        return payload[:numel], clips

    def _codes(self, flat: np.ndarray) -> np.ndarray:
        out = np.empty(flat.size, dtype=np.int32)
        for start in range(0, flat.size, BLOCK):
            x = np.clip(flat[start : start + BLOCK].astype(np.float64), -self.clip, self.clip) / self.step
            x += self.rng.random(x.size)
            out[start : start + x.size] = np.floor(x)
        np.clip(out, -self.levels, self.levels, out=out)
        return out

    def decode(self, payload: np.ndarray) -> np.ndarray:
        """Codes (or, without segments, a sum of codes) back to values."""
        if not self.segment:
            return (payload.astype(np.float64) * self.step).astype(np.float32)
        codes, clips = self._split(payload)
        return clips.scale_up((codes.astype(np.float64) * self.step).astype(np.float32))

    def payload_bytes(self, numel: int) -> int:
        """Bit-packed codes (and float32 bounds, with segments)."""
        bounds = 4 * segments(numel, self.segment) if self.segment else 0
        return bitpack.packed_bytes(numel, self.bits) + bounds

    def to_bytes(self, payload: np.ndarray) -> bytes:
        """Bit-packed codes, then the bounds."""
        if not self.segment:
            return self.pack(payload)
        codes, clips = self._split(payload)
        return self.pack(codes) + clips.bounds.astype("<f4").tobytes()

    def from_bytes(self, data: bytes, numel: int) -> np.ndarray:
        """Codes from their bit-packed form (and the bounds, as float32 bit patterns)."""
        if not self.segment:
            return self.unpack(data, numel)
        if len(data) != self.payload_bytes(numel):
            raise InvalidArgument(
                f"quantized payload of {len(data)} bytes, expected {self.payload_bytes(numel)}"
            )
        packed = bitpack.packed_bytes(numel, self.bits)
        bounds = np.frombuffer(data[packed:], dtype="<f4")
        SegmentClips(self.segment, bounds)  # InvalidArgument unless positive and finite
        return np.concatenate([self.unpack(data[:packed], numel), bounds.view(np.int32)])

    def pack(self, codes: np.ndarray) -> bytes:
        """Codes as ``bits``-bit unsigned fields (code + L), little-endian bit order."""
        return bitpack.pack((codes.astype(np.int64) + self.levels).astype(np.uint32), self.bits)

    def unpack(self, data: bytes, numel: int) -> np.ndarray:
        """Inverse of ``pack``."""
        if len(data) != bitpack.packed_bytes(numel, self.bits):
            raise InvalidArgument(
                f"quantized payload of {len(data)} bytes, expected {self.payload_bytes(numel)}"
            )
        return (bitpack.unpack(data, self.bits, numel).astype(np.int64) - self.levels).astype(np.int32)
