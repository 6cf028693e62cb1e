"""Shamir secret sharing of 16- and 32-byte secrets, each over a prime field 9 bytes wider.

A share is the secret's length plus 9 bytes: 25 for a 16-byte self-mask seed, 41 for a 32-byte
X25519 key (before wire revision 5 both were 66, in GF(2^521 - 1)). The 72 bits of headroom are a
checksum: shares that do not belong together interpolate to a value past the secret's range, which
``reconstruct`` refuses, except with probability about 2^-72.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from common.errors import InvalidArgument

CHECK_BYTES = 9
PRIMES = {16: (1 << 200) - 75, 32: (1 << 328) - 155}
"""Secret bytes -> the largest prime below 2^(8 (bytes + CHECK_BYTES))."""


def share_bytes(secret_bytes: int) -> int:
    """Bytes of one share of a ``secret_bytes``-byte secret."""
    if secret_bytes not in PRIMES:
        raise ValueError(f"secrets are {sorted(PRIMES)} bytes, not {secret_bytes}")
    return secret_bytes + CHECK_BYTES


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, bytes]:
    """Shares of ``secret`` at the points ``xs`` (distinct, 1 .. 2^32); any ``threshold`` recover it."""
    size = share_bytes(len(secret))
    prime = PRIMES[len(secret)]
    if len(set(xs)) != len(xs) or any(not 0 < x < 1 << 32 for x in xs):
        raise ValueError("share points must be distinct and in 1 .. 2^32 - 1")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} impossible with {len(xs)} shares")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(prime) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % prime
        shares[x] = y.to_bytes(size, "big")
    return shares


def reconstruct(shares: Mapping[int, bytes], threshold: int, secret_bytes: int) -> bytes:
    """The ``secret_bytes``-byte secret from at least ``threshold`` shares (Lagrange interpolation
    at 0); InvalidArgument for too few shares, shares of the wrong size or inconsistent ones."""
    size = share_bytes(secret_bytes)
    prime = PRIMES[secret_bytes]
    if len(shares) < threshold:
        raise InvalidArgument(f"{len(shares)} shares, {threshold} needed")
    if any(len(y) != size for y in shares.values()):
        raise InvalidArgument(f"a share of a {secret_bytes}-byte secret must be {size} bytes")
    points = [(x, int.from_bytes(y, "big")) for x, y in list(shares.items())[:threshold]]
    if any(y >= prime for _x, y in points):
        raise InvalidArgument("a share is outside the field")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * -xj % prime
                den = den * (xi - xj) % prime
        secret = (secret + yi * num * pow(den, -1, prime)) % prime
    if secret >= 1 << (8 * secret_bytes):
        raise InvalidArgument("shares are inconsistent: the interpolated secret is out of range")
    return secret.to_bytes(secret_bytes, "big")
