"""Conversions between the secure-aggregation core's values and their wire messages."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from common.secagg.agent import MASK_KEY, SELF_SEED
from common.secagg.keys import Advertisement
from protos.cloudfed.v1 import federation_pb2 as pb

KIND_TO_PB = {SELF_SEED: pb.SHARE_KIND_SELF_SEED, MASK_KEY: pb.SHARE_KIND_MASK_KEY}
KIND_FROM_PB = {v: k for k, v in KIND_TO_PB.items()}


def advertisement_to_pb(adv: Advertisement) -> pb.KeyAdvertisement:
    """Core advertisement -> wire."""
    return pb.KeyAdvertisement(
        round_id=adv.round_id,
        agent_id=adv.agent_id,
        cipher_public_key=adv.cipher_public,
        mask_public_key=adv.mask_public,
        certificate_pem=adv.certificate_pem,
        signature=adv.signature,
    )


def advertisement_from_pb(msg: pb.KeyAdvertisement) -> Advertisement:
    """Wire -> core advertisement (verified later by whoever uses it)."""
    return Advertisement(
        msg.round_id,
        msg.agent_id,
        msg.cipher_public_key,
        msg.mask_public_key,
        msg.certificate_pem,
        msg.signature,
    )


def sealed_to_pb(sealed: Mapping[str, bytes]) -> list[pb.SealedShare]:
    """{agent: ciphertext} -> wire."""
    return [pb.SealedShare(agent_id=a, ciphertext=c) for a, c in sorted(sealed.items())]


def sealed_from_pb(shares: Iterable[pb.SealedShare]) -> dict[str, bytes]:
    """Wire -> {agent: ciphertext}; an agent named twice is refused by the caller's checks."""
    return {s.agent_id: s.ciphertext for s in shares}


def reveals_to_pb(reveals: Mapping[str, tuple[int, bytes]]) -> list[pb.RevealedShare]:
    """{owner: (kind, share)} -> wire."""
    return [
        pb.RevealedShare(agent_id=a, kind=KIND_TO_PB[k], share=s) for a, (k, s) in sorted(reveals.items())
    ]


def reveals_from_pb(shares: Iterable[pb.RevealedShare]) -> dict[str, tuple[int, bytes]]:
    """Wire -> {owner: (kind, share)}; unknown kinds map to -1 and are refused by the server round."""
    return {s.agent_id: (KIND_FROM_PB.get(s.kind, -1), s.share) for s in shares}
