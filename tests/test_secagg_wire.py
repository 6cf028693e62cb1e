"""Secure-aggregation messages on the wire: shares name peers by roster position (wire revision 7)."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import InvalidArgument
from common.secagg.agent import MASK_KEY, SELF_SEED
from common.secagg.local import Federation, ids_of, run_round
from common.secagg.params import SecAggParams
from common.secagg_pb import (
    advertise_request,
    reveal_request,
    reveals_from_pb,
    sealed_from_pb,
    share_request,
)
from protos.cloudfed.v1 import federation_pb2 as pb


def test_shares_round_trip_by_roster_position_in_a_few_bytes_each() -> None:
    federation = Federation.create(4)
    roster = list(ids_of(federation))
    codes = {a: np.zeros(64, dtype=np.uint32) for a in roster}
    result = run_round(federation, codes, SecAggParams(threshold=3, bits=8), drop={"upload": {roster[3]}})
    assert result.roster == roster
    for agent, sent in result.keys.items():
        request = share_request(1, sent.sealed, roster)
        assert sealed_from_pb(request.shares, roster) == sent.sealed
        assert {s.peer for s in request.shares} == {roster.index(a) for a in sent.sealed}
        # A position costs at most 2 bytes where the SPIFFE id cost len(id) + 2.
        by_id = sum(len(peer.encode()) + 2 + len(c) + 3 for peer, c in sent.sealed.items())
        assert request.ByteSize() < by_id - 3 * 35
        advertise = advertise_request(sent.advertisement)
        assert advertise.advertisement.agent_id == "" and advertise.advertisement.certificate_pem == b""
        assert advertise.advertisement.signature == sent.advertisement.signature
        if agent in result.survivors:
            reveal = reveal_request(1, sent.reveals, roster)
            assert reveals_from_pb(reveal.shares, roster) == sent.reveals
            kinds = {kind for kind, _ in sent.reveals.values()}
            assert kinds == {SELF_SEED, MASK_KEY}  # the dropped agent's mask key, survivors' seeds


def test_a_position_outside_the_roster_or_named_twice_is_invalid() -> None:
    roster = ["spiffe://t/cloud/a/agent/a", "spiffe://t/cloud/b/agent/b"]
    with pytest.raises(InvalidArgument, match="roster position 2; the round's roster has 2 agents"):
        sealed_from_pb([pb.SealedShare(peer=2, ciphertext=b"x")], roster)
    with pytest.raises(InvalidArgument, match="two sealed shares for spiffe://t/cloud/b/agent/b"):
        sealed_from_pb([pb.SealedShare(peer=1, ciphertext=b"x"), pb.SealedShare(peer=1)], roster)
    with pytest.raises(InvalidArgument, match="two revealed shares"):
        reveals_from_pb([pb.RevealedShare(peer=0), pb.RevealedShare(peer=0)], roster)
    unknown = reveals_from_pb([pb.RevealedShare(peer=0, kind=pb.SHARE_KIND_UNSPECIFIED, share=b"s")], roster)
    assert unknown == {roster[0]: (-1, b"s")}  # refused by the server round, which knows the kinds
