"""Shamir secret sharing of 32-byte secrets over GF(p), p = 2^521 - 1 (a Mersenne prime > 2^256)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from common.errors import InvalidArgument

PRIME = (1 << 521) - 1
SECRET_BYTES = 32
SHARE_BYTES = 66  # ceil(521 / 8)


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, bytes]:
    """Shares of ``secret`` at the points ``xs`` (distinct, 1 .. 2^32); any ``threshold`` recover it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes")
    if len(set(xs)) != len(xs) or any(not 0 < x < 1 << 32 for x in xs):
        raise ValueError("share points must be distinct and in 1 .. 2^32 - 1")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} impossible with {len(xs)} shares")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def reconstruct(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (Lagrange interpolation at 0)."""
    if len(shares) < threshold:
        raise InvalidArgument(f"{len(shares)} shares, {threshold} needed")
    points = [(x, int.from_bytes(y, "big")) for x, y in list(shares.items())[:threshold]]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * -xj % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise InvalidArgument("shares are inconsistent: the interpolated secret is out of range")
    return secret.to_bytes(SECRET_BYTES, "big")
