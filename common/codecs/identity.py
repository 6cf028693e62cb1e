"""The identity codec: a weighted float32 vector with the weight as a last coordinate.

The agent sends ``[w * delta, w]`` (little-endian float32), so the sum over
agents is ``[sum w_i delta_i, sum w_i]`` and the weighted mean is one division.
The same shape works under secure aggregation, where only the sum is seen.
"""

from __future__ import annotations

import numpy as np

from common.errors import InvalidArgument

NAME = "identity"
WIRE_DTYPE = np.dtype("<f4")


def payload_bytes(numel: int) -> int:
    """Size of an encoded update of ``numel`` parameters."""
    return (numel + 1) * WIRE_DTYPE.itemsize


def encode(delta: np.ndarray, weight: float) -> bytes:
    """Encode a flat update with its FedAvg weight."""
    if weight <= 0 or not np.isfinite(weight):
        raise InvalidArgument(f"weight must be positive and finite, got {weight}")
    if not np.all(np.isfinite(delta)):
        raise InvalidArgument("update contains NaN or infinite values")
    out = np.empty(delta.size + 1, dtype=WIRE_DTYPE)
    np.multiply(delta.reshape(-1), weight, out=out[:-1], casting="same_kind")
    out[-1] = weight
    return out.tobytes()


def decode_sum(total: np.ndarray) -> tuple[np.ndarray, float]:
    """(weighted mean update, total weight) from the summed payload vector."""
    weight = float(total[-1])
    if not weight > 0:
        raise InvalidArgument(f"summed weight must be positive, got {weight}")
    return (total[:-1] / weight).astype(np.float32), weight


class FiniteChecker:
    """Checks streamed payload bytes for NaN/inf float32 values, across chunk boundaries."""

    def __init__(self) -> None:
        self._carry = b""

    def __call__(self, data: bytes) -> None:
        """Raise InvalidArgument if the float32 values completed by ``data`` are not all finite."""
        buf = self._carry + data if self._carry else data
        whole = len(buf) - len(buf) % WIRE_DTYPE.itemsize
        self._carry = bytes(buf[whole:])
        if not np.all(np.isfinite(np.frombuffer(buf, dtype=WIRE_DTYPE, count=whole // WIRE_DTYPE.itemsize))):
            raise InvalidArgument("update contains NaN or infinite values")
