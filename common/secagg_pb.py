"""Conversions between the secure-aggregation core's values and their wire messages (and the
reasons an agent declines a round or withholds an eval loss).

Shares name their peer by its position in the round's roster (the advertisements sorted by agent
id, as ``GetSecAggStateResponse.roster`` lists them), not by its SPIFFE id: a few bytes instead of
about 45 for each of an agent's neighbours, twice a round (wire revision 7).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from common.errors import InvalidArgument
from common.secagg.agent import MASK_KEY, SELF_SEED
from common.secagg.keys import Advertisement
from protos.cloudfed.v1 import federation_pb2 as pb

KIND_TO_PB = {SELF_SEED: pb.SHARE_KIND_SELF_SEED, MASK_KEY: pb.SHARE_KIND_MASK_KEY}
KIND_FROM_PB = {v: k for k, v in KIND_TO_PB.items()}
DECLINE_REASONS = {
    "privacy_policy": pb.DECLINE_REASON_PRIVACY_POLICY,
    "roster": pb.DECLINE_REASON_ROSTER,
    "protocol": pb.DECLINE_REASON_PROTOCOL,
    "training": pb.DECLINE_REASON_TRAINING,
    "privacy_budget": pb.DECLINE_REASON_PRIVACY_BUDGET,
}
"""Why an agent sits a round out, on the wire, by the ``reason`` label both sides' metrics use."""
EVAL_WITHHELD_REASONS = {
    "not_shared": pb.EVAL_WITHHELD_REASON_NOT_SHARED,
    "too_noisy": pb.EVAL_WITHHELD_REASON_TOO_NOISY,
    "privacy_budget": pb.EVAL_WITHHELD_REASON_PRIVACY_BUDGET,
    "not_finite": pb.EVAL_WITHHELD_REASON_NOT_FINITE,
}
"""Why an agent withholds a version's eval loss, on the wire, by the ``reason`` label of
cloudfed_evals_withheld_total."""

STATE_WAITS = (pb.ROUND_PHASE_SHARE_KEYS, pb.ROUND_PHASE_UPLOAD, pb.ROUND_PHASE_UNMASK)
"""The phases an agent waits for (``GetSecAggState``) in each masked round."""


def advertisement_to_pb(adv: Advertisement) -> pb.KeyAdvertisement:
    """Core advertisement -> wire."""
    return pb.KeyAdvertisement(
        round_id=adv.round_id,
        agent_id=adv.agent_id,
        cipher_public_key=adv.cipher_public,
        mask_public_key=adv.mask_public,
        certificate_pem=adv.certificate_pem,
        signature=adv.signature,
        self_seed_commitment=adv.seed_commitment,
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
        msg.self_seed_commitment,
    )


def advertise_request(adv: Advertisement) -> pb.AdvertiseKeysRequest:
    """What an agent sends in phase 1: its keys and signature. Neither its certificate nor its id:
    the aggregator takes both from the agent's TLS session."""
    return pb.AdvertiseKeysRequest(
        advertisement=advertisement_to_pb(dataclasses.replace(adv, agent_id="", certificate_pem=b""))
    )


def sealed_to_pb(sealed: Mapping[str, bytes], roster: Sequence[str]) -> list[pb.SealedShare]:
    """{agent: ciphertext} -> wire, each agent by its roster position."""
    position = _positions(roster)
    return [pb.SealedShare(peer=position[a], ciphertext=c) for a, c in sorted(sealed.items())]


def sealed_from_pb(shares: Iterable[pb.SealedShare], roster: Sequence[str]) -> dict[str, bytes]:
    """Wire -> {agent: ciphertext}; InvalidArgument for a position outside the roster or named twice."""
    out: dict[str, bytes] = {}
    for share in shares:
        out[_named(share.peer, roster, out, "sealed share")] = share.ciphertext
    return out


def share_request(round_id: int, sealed: Mapping[str, bytes], roster: Sequence[str]) -> pb.ShareKeysRequest:
    """What an agent sends in phase 2: a sealed share for each neighbour."""
    return pb.ShareKeysRequest(round_id=round_id, shares=sealed_to_pb(sealed, roster))


def reveals_to_pb(reveals: Mapping[str, tuple[int, bytes]], roster: Sequence[str]) -> list[pb.RevealedShare]:
    """{owner: (kind, share)} -> wire, each owner by its roster position."""
    position = _positions(roster)
    return [
        pb.RevealedShare(peer=position[a], kind=KIND_TO_PB[k], share=s)
        for a, (k, s) in sorted(reveals.items())
    ]


def reveals_from_pb(
    shares: Iterable[pb.RevealedShare], roster: Sequence[str]
) -> dict[str, tuple[int, bytes]]:
    """Wire -> {owner: (kind, share)}; unknown kinds map to -1 and are refused by the server round;
    InvalidArgument for a position outside the roster or named twice."""
    out: dict[str, tuple[int, bytes]] = {}
    for share in shares:
        out[_named(share.peer, roster, out, "revealed share")] = (
            KIND_FROM_PB.get(share.kind, -1),
            share.share,
        )
    return out


def reveal_request(
    round_id: int, reveals: Mapping[str, tuple[int, bytes]], roster: Sequence[str]
) -> pb.RevealSharesRequest:
    """What a survivor sends in phase 4: the shares the unmask request asked for."""
    return pb.RevealSharesRequest(round_id=round_id, shares=reveals_to_pb(reveals, roster))


def state_request(round_id: int, phase: int) -> pb.GetSecAggStateRequest:
    """An agent's wait for a phase of a masked round."""
    return pb.GetSecAggStateRequest(round_id=round_id, phase=phase)  # type: ignore[arg-type]


def _positions(roster: Sequence[str]) -> dict[str, int]:
    return {agent: i for i, agent in enumerate(roster)}


def _named(peer: int, roster: Sequence[str], seen: Mapping[str, object], what: str) -> str:
    if peer >= len(roster):
        raise InvalidArgument(
            f"{what} for roster position {peer}; the round's roster has {len(roster)} agents"
        )
    agent = roster[peer]
    if agent in seen:
        raise InvalidArgument(f"two {what}s for {agent}")
    return agent
