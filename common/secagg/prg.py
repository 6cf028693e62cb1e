"""Mask expansion: AES-256-CTR keystreams added into uint32 buffers chunk by chunk (never numpy's RNG).

Many masks are applied in one pass: for each chunk of the target, every key's keystream for that
chunk is generated into one reused scratch buffer and added while the chunk is still in cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from common.secagg.ring import RING_DTYPE

CHUNK_BYTES = 1 << 18  # keystream per key per step: the target chunk stays in L2
_ZEROS = bytes(CHUNK_BYTES)
_NONCE = bytes(16)  # every key is derived for one round and one purpose, so a fixed nonce is safe


Where = Callable[[int, int], Sequence["np.ndarray | None"]]
"""For elements start..stop, one boolean selector a mask (None: all): where each mask applies."""


def apply_masks(buf: np.ndarray, masks: Sequence[tuple[bytes, int]], where: Where | None = None) -> None:
    """``buf += sum(sign * AES-256-CTR(key))`` elementwise in Z_2^32, in place; signs are +1 or -1.
    With ``where``, mask j is added only at the elements its selector marks (the keystream stays
    indexed by element, so parties that select different elements still agree on each one)."""
    if buf.dtype != RING_DTYPE or not buf.flags.c_contiguous:
        raise ValueError("mask target must be a contiguous little-endian uint32 array")
    if any(len(key) != 32 for key, _ in masks):
        raise ValueError("mask keys must be 32 bytes")
    streams = [(Cipher(algorithms.AES(key), modes.CTR(_NONCE)).encryptor(), sign) for key, sign in masks]
    scratch = bytearray(CHUNK_BYTES + 15)  # update_into wants room for one more block
    stream = np.frombuffer(scratch, dtype=RING_DTYPE, count=CHUNK_BYTES // 4)
    step = CHUNK_BYTES // 4
    for start in range(0, buf.size, step):
        n = min(step, buf.size - start)
        target = buf[start : start + n]
        selected = where(start, start + n) if where is not None else [None] * len(streams)
        for (encryptor, sign), chosen in zip(streams, selected, strict=True):
            encryptor.update_into(_ZEROS[: n * 4], scratch)
            if chosen is not None:
                np.multiply(stream[:n], chosen, out=stream[:n], casting="unsafe")
            if sign > 0:
                np.add(target, stream[:n], out=target)
            else:
                np.subtract(target, stream[:n], out=target)


def apply_mask(buf: np.ndarray, key: bytes, sign: int) -> None:
    """One mask: ``buf += sign * AES-256-CTR(key)``."""
    apply_masks(buf, [(key, sign)])


def expand(key: bytes, length: int) -> np.ndarray:
    """The mask itself: ``length`` uint32 values of keystream."""
    out = np.zeros(length, dtype=RING_DTYPE)
    apply_mask(out, key, +1)
    return out
