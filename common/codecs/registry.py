"""From the federation's codec settings to a codec for one round, and the update payload framing.

Without secure aggregation every agent's payload is decoded on its own at the aggregator:
``[float32 weight][codec bytes of delta]``, so any codec works, linear or not. With secure
aggregation only linear codecs fit: the agent sends ``[w * encode(delta), w * clip]`` through the
fixed-point ring and the aggregator decodes the unmasked sum once.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np

from common.codecs import identity
from common.codecs.base import Codec
from common.codecs.countsketch import CountSketch
from common.codecs.projection import Projection
from common.codecs.quantize import Quantize
from common.codecs.topk import TopK
from common.errors import FailedPrecondition, InvalidArgument

KNOWN = ("identity", "quantize", "projection", "topk", "eigen", "autoencoder", "countsketch")
SECURE = ("identity", "projection", "eigen", "autoencoder", "countsketch")
"""Codecs usable under secure aggregation (linear, and not a second quantiser on top of the ring's);
the autoencoder only with its linear decoder (``Codec.linear``)."""


@dataclass(frozen=True)
class CodecSettings:
    """What the aggregator broadcasts: the codec, its compression ratio, bits and clip, a base seed."""

    name: str = "identity"
    ratio: float = 16.0
    bits: int = 8
    clip: float = 0.1
    seed: int = 0
    state_sha256: str = ""
    """Digest of the codec's shared state file (``eigen``: the bases), served by the aggregator."""
    segment: int = 0
    """``quantize``: 0 = one shared clip; n = each agent's own bound per n values (``clip`` x RMS)."""

    def params(self) -> dict[str, float | str]:
        """The parameters that travel in CodecSpec.params (and must match in every upload)."""
        if self.name == "identity":
            return {}
        if self.name == "quantize":
            return {"bits": float(self.bits), "clip": self.clip, "segment": float(self.segment)}
        if self.name == "eigen":
            return {"state_sha256": self.state_sha256}
        if self.name == "autoencoder":
            return {"ratio": self.ratio, "state_sha256": self.state_sha256}
        return {"ratio": self.ratio}


def settings_from(name: str, params: dict[str, object], seed: int) -> CodecSettings:
    """Rebuild the settings from a CodecSpec's name and params (the agent's side)."""
    defaults = CodecSettings()
    return CodecSettings(
        name,
        float(params.get("ratio", defaults.ratio)),  # type: ignore[arg-type]
        int(params.get("bits", defaults.bits)),  # type: ignore[call-overload]
        float(params.get("clip", defaults.clip)),  # type: ignore[arg-type]
        seed,
        str(params.get("state_sha256", "")),
        int(params.get("segment", 0)),  # type: ignore[call-overload]
    )


def round_seed(base: int, round_id: int) -> int:
    """A fresh public seed per round (random projections must change between rounds)."""
    digest = hashlib.sha256(struct.pack(">QQ", base & (2**64 - 1), round_id)).digest()
    return int.from_bytes(digest[:8], "big")


def make(settings: CodecSettings, numel: int, round_id: int, shared: Codec | None = None) -> Codec | None:
    """The round's codec; None for ``identity`` (the float32 baseline handled by common.codecs.identity).
    ``shared``: the codec built from the state file, for codecs that have one (``eigen``)."""
    if settings.name == "identity":
        return None
    if settings.name in ("eigen", "autoencoder"):
        if shared is None or shared.name != settings.name:
            raise FailedPrecondition(f"codec {settings.name!r} needs its state (bases, network) loaded first")
        return shared
    if settings.name == "quantize":
        return Quantize(settings.clip, settings.bits, segment=settings.segment)
    if settings.name == "projection":
        return Projection.seeded(numel, settings.ratio, round_seed(settings.seed, round_id))
    if settings.name == "topk":
        return TopK(numel, settings.ratio)
    if settings.name == "countsketch":  # the same hashes every round: FetchSGD accumulates sketches
        return CountSketch(numel, settings.ratio, settings.seed)
    raise InvalidArgument(f"unknown codec {settings.name!r}")


def payload_bytes(codec: Codec | None, numel: int) -> int:
    """Size of one plain (unmasked) payload."""
    return identity.payload_bytes(numel) if codec is None else 4 + codec.payload_bytes(numel)


def encode_plain(
    codec: Codec | None, delta: np.ndarray, weight: float, encoded: np.ndarray | None = None
) -> bytes:
    """A plain payload; ``encoded`` is ``codec.encode(delta)`` when the caller already has it."""
    if codec is None:
        return identity.encode(delta, weight)
    if not (weight > 0 and np.isfinite(weight)):
        raise InvalidArgument(f"weight must be positive and finite, got {weight}")
    payload = codec.encode(delta) if encoded is None else encoded
    return struct.pack("<f", weight) + codec.to_bytes(payload)


def decode_plain(codec: Codec | None, data: bytes, numel: int) -> tuple[np.ndarray, float]:
    """(weight * decoded delta, weight) from one plain payload; InvalidArgument if malformed."""
    if len(data) != payload_bytes(codec, numel):
        raise InvalidArgument(f"payload of {len(data)} bytes, expected {payload_bytes(codec, numel)}")
    if codec is None:
        vector = np.frombuffer(data, dtype=identity.WIRE_DTYPE)
        return vector[:-1].astype(np.float32), float(vector[-1])
    weight = _weight(data)
    decoded = codec.decode(codec.from_bytes(data[4:], numel))
    if not np.all(np.isfinite(decoded)):
        raise InvalidArgument("update contains NaN or infinite values")
    return decoded * np.float32(weight), float(weight)


def _weight(data: bytes) -> float:
    """The float32 weight that leads a plain encoded payload; InvalidArgument unless positive."""
    (weight,) = struct.unpack("<f", data[:4])
    if not (weight > 0 and np.isfinite(weight)):
        raise InvalidArgument(f"weight must be positive and finite, got {weight}")
    return float(weight)


def weighted_payload(codec: Codec, data: bytes, numel: int) -> tuple[np.ndarray, float]:
    """(weight * payload, weight) from one plain payload, not decoded: for codecs whose round sum is
    decoded once by a server loop (``countsketch``, FetchSGD). InvalidArgument if malformed."""
    if len(data) != payload_bytes(codec, numel):
        raise InvalidArgument(f"payload of {len(data)} bytes, expected {payload_bytes(codec, numel)}")
    weight = _weight(data)
    payload = codec.from_bytes(data[4:], numel)
    if not np.all(np.isfinite(payload)):
        raise InvalidArgument("update contains NaN or infinite values")
    return payload * np.float32(weight), float(weight)


def secure_coordinates(codec: Codec | None, numel: int) -> int:
    """Values a masked update carries before its weight: the update, or its linear encoding."""
    if codec is None:
        return numel
    if codec.name not in SECURE or not codec.linear:
        raise InvalidArgument(f"codec {codec.name!r} cannot run under secure aggregation")
    return codec.coordinates(numel)
