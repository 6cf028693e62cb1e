"""Mask expansion: AES-256-CTR keystreams added into uint32 buffers chunk by chunk (never numpy's RNG)."""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from common.secagg.ring import RING_DTYPE

CHUNK_BYTES = 1 << 20  # keystream produced per step into one reused scratch buffer
_ZEROS = bytes(CHUNK_BYTES)
_NONCE = bytes(16)  # every key is derived for one round and one purpose, so a fixed nonce is safe


def apply_mask(buf: np.ndarray, key: bytes, sign: int) -> None:
    """``buf += sign * AES-256-CTR(key)`` elementwise in Z_2^32, in place (sign is +1 or -1)."""
    if buf.dtype != RING_DTYPE or not buf.flags.c_contiguous:
        raise ValueError("mask target must be a contiguous little-endian uint32 array")
    if len(key) != 32:
        raise ValueError("mask key must be 32 bytes")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_NONCE)).encryptor()
    scratch = bytearray(CHUNK_BYTES + 15)  # update_into wants room for one more block
    stream = np.frombuffer(scratch, dtype=RING_DTYPE, count=CHUNK_BYTES // 4)
    op = np.add if sign > 0 else np.subtract
    step = CHUNK_BYTES // 4
    for start in range(0, buf.size, step):
        n = min(step, buf.size - start)
        encryptor.update_into(_ZEROS[: n * 4], scratch)
        target = buf[start : start + n]
        op(target, stream[:n], out=target)


def expand(key: bytes, length: int) -> np.ndarray:
    """The mask itself: ``length`` uint32 values of keystream."""
    out = np.zeros(length, dtype=RING_DTYPE)
    apply_mask(out, key, +1)
    return out
