"""Wire compatibility between an agent and the aggregator, checked at Join.

``WIRE_REVISION`` names the layout of everything the two sides must encode
and decode alike: encoded payloads, masked vectors, codec parameters. Bump it
whenever one of them changes, so a mixed fleet is refused at Join with a clear
message instead of at upload time as a size or digest error.

Revisions:
  1. (implicit; agents before the field send 0) masked weight as one
     fixed-point coordinate, ring one bit wider than ``bits + ceil(log2 n)``.
  2. masked weight as ``ceil(24 / bits)`` base-2^bits digits, ring exactly
     ``bits + ceil(log2 n)`` bits; ``quantize`` with per-segment bounds.
  3. each masked round's ring sized for its invited agents, not ``max_agents``, and codes over
     its full range (0 .. floor((2^ring_bits - 1) / invited)), both sent with the roster.
  4. masked codes packed several to a ring element as base-``code_base`` digits (sent with the
     roster as ``code_base``, ``codes_per_element``); code levels need not be a power of two.
  5. Shamir shares sized to their secrets (``shamir``): a 16-byte self-mask seed in 25-byte
     shares, the 32-byte mask key in 41-byte ones (both were 66 bytes).
  6. ``secagg.coverage``: an agent may upload only the elements it sends (``coverage``), with
     ``coverage`` sent at Join and with the roster; such updates carry no weight digits.
  7. sealed and revealed shares name their peer by roster position (``peer``), not SPIFFE id;
     agents leave their id out of their key advertisement (the aggregator sets their session's).
  8. upload headers carry the layout digest as 32 raw bytes (``layout_sha256``); advertisement
     signatures are raw ECDSA r || s; shares are sealed with AES-256-GCM-SIV under a fixed nonce
     (not sent).
  9. key advertisements carry ``self_seed_commitment`` (SHA-256 of the self-mask seed, round
     and identity), covered by their signature; agents refuse an advertisement without one.
 10. codec state files store a tensor equal to another once, naming the repeats in their
     metadata (``aliases``); ``eigen`` bases may be float16.
"""

from __future__ import annotations

from collections.abc import Iterable

from common.errors import FailedPrecondition, InvalidArgument

WIRE_REVISION = 10

MAX_DECLINE_DETAIL = 1024
"""The longest free text the aggregator takes from an agent (a decline's detail, a spent
budget's reason, a withheld eval's reason), in UTF-8 bytes."""


def clipped_detail(text: str) -> str:
    """``text`` cut to ``MAX_DECLINE_DETAIL`` UTF-8 bytes, never inside a character."""
    return text.encode()[:MAX_DECLINE_DETAIL].decode(errors="ignore")


def check_detail(text: str, what: str) -> None:
    """InvalidArgument naming ``what`` if ``text`` is over ``MAX_DECLINE_DETAIL`` UTF-8 bytes."""
    if len(text.encode()) > MAX_DECLINE_DETAIL:
        raise InvalidArgument(f"{what} of over {MAX_DECLINE_DETAIL} bytes")


def codecs_needed(codec: str) -> tuple[str, ...]:
    """Codecs an agent must encode to take part in a federation running ``codec``."""
    if codec == "autoencoder":  # warm-up and refresh rounds are full (identity)
        return ("identity", "autoencoder")
    return (codec,)


def check_joiner(revision: int, supported_codecs: Iterable[str], codec: str, software: str) -> None:
    """Raise FailedPrecondition unless an agent with these capabilities can take part."""
    if revision != WIRE_REVISION:
        told = f"wire revision {revision}" if revision else "no wire revision (older than 0.1.0 wire checks)"
        raise FailedPrecondition(
            f"the agent (software {software or '?'}) speaks {told}; this aggregator speaks "
            f"wire revision {WIRE_REVISION}: run the same cloudfed release on both"
        )
    missing = [name for name in codecs_needed(codec) if name not in set(supported_codecs)]
    if missing:
        raise FailedPrecondition(
            f"the federation's codec needs {', '.join(missing)}, which the agent "
            f"(software {software or '?'}) cannot encode"
        )


def check_aggregator(revision: int) -> None:
    """Raise FailedPrecondition unless the aggregator decodes this agent's wire revision."""
    if revision != WIRE_REVISION:
        told = f"wire revision {revision}" if revision else "no wire revision (an older release)"
        raise FailedPrecondition(
            f"the aggregator speaks {told}; this agent speaks wire revision {WIRE_REVISION}: "
            "run the same cloudfed release on both"
        )
