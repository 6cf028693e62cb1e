"""Secure aggregation core (common/secagg): exact sums, dropouts at every phase, forged keys, refusals."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import random

import numpy as np
import pytest
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import Aborted, ConfigError, FailedPrecondition, InvalidArgument, PolicyRefused
from common.identity import SpiffeId
from common.pki import Issued, build_crl, create_ca, issue_agent, revoked_entry
from common.revocation import RevocationList
from common.secagg import keys, shamir
from common.secagg.agent import MASK_KEY, SELF_SEED, AgentRound, share_aad
from common.secagg.graph import neighbours
from common.secagg.keys import RosterError, open_sealed, sign_advertisement, verify_advertisement
from common.secagg.local import Federation, run_round
from common.secagg.params import SecAggParams
from common.secagg.prg import apply_mask, expand
from common.secagg.ring import FixedPoint, check_headroom, ring_bits
from common.secagg.server import ServerRound

N = 10
LENGTH = 3000


@pytest.fixture(scope="module")
def federation() -> Federation:
    return Federation.create(N)


@pytest.fixture(scope="module")
def codes(federation: Federation) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {a: rng.integers(0, 1 << 16, LENGTH, dtype=np.uint32) for a in sorted(federation.agents)}


def ring_sum(codes: dict[str, np.ndarray], agents: list[str]) -> np.ndarray:
    total = np.zeros(codes[agents[0]].size, dtype=np.uint32)
    for a in agents:
        total += codes[a]
    return total


FULL = SecAggParams(threshold=6, neighbours=0, clip=1.0, bits=16)
SPARSE = SecAggParams(threshold=3, neighbours=4, clip=1.0, bits=16)


@pytest.mark.parametrize("params", [FULL, SPARSE], ids=["full-graph", "k=4"])
def test_unmasked_sum_is_exact_in_the_ring(
    federation: Federation, codes: dict[str, np.ndarray], params: SecAggParams
) -> None:
    result = run_round(federation, codes, params.check(N))
    assert result.dropped == []
    np.testing.assert_array_equal(result.total, ring_sum(codes, sorted(codes)))


@pytest.mark.parametrize("phase", ["advertise", "share", "upload", "unmask"])
@pytest.mark.parametrize(("params", "tolerated"), [(FULL, 4), (SPARSE, 1)], ids=["full-graph", "k=4"])
def test_dropouts_up_to_the_tolerated_number_at_every_phase(
    federation: Federation, codes: dict[str, np.ndarray], phase: str, params: SecAggParams, tolerated: int
) -> None:
    ids = sorted(codes)
    gone = set(ids[:tolerated]) if params is FULL else {ids[3]}
    result = run_round(federation, codes, params, drop={phase: gone})
    expected_in = [a for a in ids if a not in gone or phase == "unmask"]
    assert result.survivors == expected_in
    np.testing.assert_array_equal(result.total, ring_sum(codes, expected_in))


NARROW = dataclasses.replace(FULL, ring_bits=ring_bits(16, N))  # 16 + 4 = 20 bits a coordinate


@pytest.mark.parametrize("phase", [None, "upload", "unmask"])
def test_narrow_ring_sends_fewer_bits_and_still_sums_exactly(
    federation: Federation, codes: dict[str, np.ndarray], phase: str | None
) -> None:
    ids = sorted(codes)
    gone = set(ids[:2]) if phase else set()
    result = run_round(federation, codes, NARROW.check(N), drop={phase: gone} if phase else None)
    assert NARROW.ring_bits == 20
    assert set(result.upload_bytes.values()) == {(LENGTH * 20 + 7) // 8}  # not 4 bytes a code
    expected_in = [a for a in ids if a not in gone or phase == "unmask"]
    mask = np.uint32((1 << 20) - 1)
    np.testing.assert_array_equal(result.total & mask, ring_sum(codes, expected_in) & mask)
    fp = NARROW.fixed_point  # decoding reads the sum mod 2^20
    np.testing.assert_allclose(
        fp.decode_sum(result.total, len(expected_in)),
        fp.decode_sum(ring_sum(codes, expected_in), len(expected_in)),
    )
    with pytest.raises(ConfigError, match="can wrap"):
        dataclasses.replace(FULL, ring_bits=19).check(N)


@pytest.mark.parametrize(("bits", "agents"), [(2, 4), (3, 5), (8, 8), (4, 9), (2, 3)])
def test_ring_is_the_least_width_extreme_sums_do_not_wrap(bits: int, agents: int) -> None:
    width = ring_bits(bits, agents)
    assert width == bits + int(np.ceil(np.log2(agents)))
    fed = Federation.create(agents)
    params = SecAggParams.for_round(agents // 2 + 1, 0, 1.0, bits, agents, pack=False).check(agents)
    assert params.ring_bits == width
    fp, rng = params.fixed_point, np.random.default_rng(0)
    # The codes fill the ring: one more level and the top sum of all agents would wrap.
    assert agents * fp.levels < 2**width <= agents * (fp.levels + 1)
    assert fp.levels >= 2**bits - 1
    values = np.array([1.0, -1.0, 0.0, 1.0], np.float32)  # every agent at both ends of the clip
    codes = {a: fp.encode(values, rng) for a in sorted(fed.agents)}
    assert all(int(c[0]) == fp.levels for c in codes.values())
    result = run_round(fed, codes, params)
    decoded = fp.decode_sum(result.total, agents)
    np.testing.assert_allclose(decoded[[0, 1, 3]], [agents, -agents, agents], atol=1e-9)
    narrower = FixedPoint(1.0, bits, width - 1, min(fp.levels, 2 ** (width - 1) - 1))  # one bit less:
    assert narrower.decode_sum(ring_sum(codes, sorted(codes)), agents)[0] < agents - 1  # the top wraps
    with pytest.raises(ConfigError, match="can wrap"):  # a code range the ring cannot hold
        dataclasses.replace(params, max_code=fp.levels + 1).check(agents)


@pytest.mark.parametrize(
    ("bits", "agents", "finer"), [(2, 3, 5 / 3), (2, 6, 5 / 3), (2, 12, 5 / 3), (8, 10, 1.6)]
)
def test_codes_over_the_whole_ring_round_finer_at_the_same_wire_size(
    bits: int, agents: int, finer: float
) -> None:
    """Fleets that are not a power of two: the same ring carries more levels per agent, so the
    decoded mean's rounding error shrinks by the ratio of the steps. (Where n (2^bits - 1) needs
    fewer bits than bits + ceil(log2 n), 5 agents at 2 bits, the ring itself is a bit narrower.)"""
    narrower = SecAggParams.for_round(3, 0, 1.0, 2, 5, pack=False)
    assert (narrower.ring_bits, narrower.max_code) == (4, 3) and ring_bits(2, 5) == 5
    fed = Federation.create(agents)
    fixed = SecAggParams(agents // 2 + 1, 0, 1.0, bits, ring_bits(bits, agents)).check(agents)
    full = SecAggParams.for_round(agents // 2 + 1, 0, 1.0, bits, agents, pack=False).check(agents)
    assert full.fixed_point.wire_bytes(4096) == fixed.fixed_point.wire_bytes(4096)
    assert full.fixed_point.levels / fixed.fixed_point.levels == pytest.approx(finer, rel=0.01)
    rng = np.random.default_rng(7)
    values = {a: rng.uniform(-1, 1, 4096).astype(np.float32) for a in sorted(fed.agents)}
    truth = np.mean(list(values.values()), axis=0)
    errors = []
    for params in (fixed, full):
        fp = params.fixed_point
        codes = {a: fp.encode(v, rng) for a, v in values.items()}
        mean = fp.decode_sum(run_round(fed, codes, params).total, agents) / agents
        errors.append(float(np.sqrt(np.mean((mean - truth) ** 2))))
    assert errors[1] < errors[0] / finer * 1.15, errors


@pytest.mark.parametrize(("levels", "agents"), [(4, 4), (3, 4), (2, 4), (4, 3), (2, 2), (16, 5), (3, 10)])
def test_packed_codes_cost_the_secure_sum_bound_and_sum_exactly_through_the_protocol(
    levels: int, agents: int
) -> None:
    """n agents' codes of L levels sum to one of n (L - 1) + 1 values, so no masking can send a
    coordinate in fewer than log2 of that bits; packed, a round comes within 1% of it (one code
    an element rounds it up to whole bits), and the extreme sums, with a dropout recovered, still
    unpack exactly: no digit carries into the next."""
    bound = float(np.log2(agents * (levels - 1) + 1))
    packed = SecAggParams.for_round(agents // 2 + 1, 0, 1.0, 1, agents, levels=levels).check(agents)
    single = SecAggParams.for_round(agents // 2 + 1, 0, 1.0, 1, agents, levels=levels, pack=False)
    fp = packed.fixed_point
    assert bound <= fp.coordinate_bits <= bound * 1.01
    assert fp.coordinate_bits < single.ring_bits == int(np.ceil(bound))
    assert fp.levels >= levels - 1 and fp.contributors_fit(agents) and not fp.contributors_fit(agents + 1)
    fed, rng = Federation.create(agents), np.random.default_rng(levels)
    values = np.concatenate([np.ones(40, np.float32), -np.ones(3, np.float32), rng.uniform(-1, 1, 500)])
    codes = {a: fp.encode(values, rng) for a in sorted(fed.agents)}
    assert all(int(c[0]) == fp.levels for c in codes.values())  # every agent at the top code
    count = values.size
    elements = {}
    for a, c in codes.items():
        padded = np.zeros(fp.masked_length(count - fp.weight_digits) * fp.group, np.uint32)
        padded[:count] = c
        elements[a] = fp._pack(padded)
    gone = sorted(codes)[-1] if agents > 2 else None
    result = run_round(fed, elements, packed, drop={"share": {gone}} if gone else None)
    kept = [a for a in sorted(codes) if a != gone]
    assert result.survivors == kept
    assert set(result.upload_bytes.values()) == {fp.wire_bytes(len(elements[kept[0]]))}
    sums = fp.unpack(result.total)[:count]
    np.testing.assert_array_equal(sums, np.sum([codes[a] for a in kept], axis=0, dtype=np.uint32))
    decoded = fp.decode_sum(sums, len(kept))
    np.testing.assert_allclose(decoded[:43], [len(kept)] * 40 + [-len(kept)] * 3, atol=1e-9)
    with pytest.raises(ConfigError, match="can wrap"):  # one code level more and the top sum carries
        dataclasses.replace(packed, max_code=fp.levels + 1).check(agents)


def test_packed_and_one_code_layouts_decode_the_same_weighted_mean() -> None:
    """Packing changes the bytes, not the numbers: the same codes (same rounding draws) decode to
    the same weighted mean from either layout's masked sum, at 7 codes in 26 bits against 4 bits
    a code (4 agents at 4 levels)."""
    agents, count = 4, 10_001
    fed = Federation.create(agents)
    rng = np.random.default_rng(3)
    updates = {a: rng.normal(0, 0.4, count).astype(np.float32) for a in sorted(fed.agents)}
    weights = dict(zip(sorted(updates), (1.0, 0.5, 0.25, 0.8), strict=True))
    means, sizes = [], []
    for pack in (False, True):
        params = SecAggParams.for_round(3, 0, 1.0, 2, agents, pack=pack).check(agents)
        fp = params.fixed_point
        draws = np.random.default_rng(11)
        masked = {a: fp.encode_weighted(u, weights[a], draws) for a, u in updates.items()}
        result = run_round(fed, masked, params)
        means.append(fp.decode_weighted_mean(result.total, agents, count)[0])
        sizes.append(next(iter(result.upload_bytes.values())))
    np.testing.assert_array_equal(means[0], means[1])
    assert sizes[0] == (count + 12) * 4 // 8 + 1 and sizes[1] == (-(-(count + 12) // 7) * 26 + 7) // 8
    assert sizes[1] / sizes[0] == pytest.approx(26 / 28, abs=0.002)
    true = sum(weights[a] * u for a, u in updates.items()) / sum(weights.values())
    assert np.sqrt(np.mean((means[1] - true) ** 2)) < 0.25  # clipped at 1, 4 levels: coarse but right


def test_one_dropout_too_many_aborts_the_round(federation: Federation, codes: dict[str, np.ndarray]) -> None:
    ids = sorted(codes)
    # Full graph, t = 6 of 10: five agents gone after sharing leaves 5 uploads < t.
    with pytest.raises(Aborted, match="threshold 6"):
        run_round(federation, codes, FULL, drop={"share": set(ids[:5])})
    # Survivors that do not answer the unmask request: too few shares to rebuild the self masks.
    with pytest.raises(Aborted, match="shares of"):
        run_round(federation, codes, FULL, drop={"unmask": set(ids[:5])})


def test_sparse_graph_survives_drops_spread_across_neighbourhoods(
    federation: Federation, codes: dict[str, np.ndarray]
) -> None:
    ids = sorted(codes)
    graph = neighbours(ids, 4, b"public-round-seed")
    first = ids[0]
    far = next(a for a in ids if a != first and a not in graph[first])
    result = run_round(federation, codes, SPARSE, drop={"upload": {first, far}})
    np.testing.assert_array_equal(result.total, ring_sum(codes, result.survivors))


def test_forged_or_unsigned_advertisement_is_rejected(
    federation: Federation, codes: dict[str, np.ndarray]
) -> None:
    ids = sorted(codes)
    victim = ids[4]

    def substitute_key(roster: list) -> None:  # a curious aggregator swaps in its own mask key
        i = next(i for i, adv in enumerate(roster) if adv.agent_id == victim)
        roster[i] = dataclasses.replace(roster[i], mask_public=bytes(range(32)))

    with pytest.raises(RosterError, match="signature"):
        run_round(federation, codes, FULL, tamper=substitute_key)

    def substitute_commitment(roster: list) -> None:  # so a seed of its choosing would pass
        roster[2] = dataclasses.replace(roster[2], seed_commitment=bytes(32))

    with pytest.raises(RosterError, match="signature"):
        run_round(federation, codes, FULL, tamper=substitute_commitment)

    def strip_commitment(roster: list) -> None:
        roster[3] = dataclasses.replace(roster[3], seed_commitment=b"")

    with pytest.raises(RosterError, match="no 32-byte seed commitment"):
        run_round(federation, codes, FULL, tamper=strip_commitment)

    def strip_signature(roster: list) -> None:
        roster[0] = dataclasses.replace(roster[0], signature=b"")

    with pytest.raises(RosterError, match="signature"):
        run_round(federation, codes, FULL, tamper=strip_signature)

    outsider_ca = create_ca("another CA")
    outsider = issue_agent(outsider_ca, SpiffeId.parse(victim))

    def foreign_certificate(roster: list) -> None:  # a well-signed advertisement from another CA
        agent = federation.agent_round(victim, 1, FULL, b"s")
        adv = sign_advertisement(
            1, victim, agent.cipher, agent.mask, outsider.cert_pem(), outsider.key, bytes(32)
        )
        roster[ids.index(victim)] = adv

    with pytest.raises(RosterError, match="not issued by the federation CA"):
        run_round(federation, codes, FULL, tamper=foreign_certificate)

    def borrowed_identity(roster: list) -> None:  # agent 0's certificate used to claim agent 1's id
        roster[1] = dataclasses.replace(roster[1], certificate_pem=roster[0].certificate_pem)

    with pytest.raises(RosterError):
        run_round(federation, codes, FULL, tamper=borrowed_identity)


def test_advertisement_signatures_are_raw_r_s_and_nothing_else_verifies(
    federation: Federation, codes: dict[str, np.ndarray]
) -> None:
    ids = sorted(codes)
    agent = federation.agent_round(ids[0], 1, FULL, b"s")
    adv = agent.advertise()
    assert len(adv.signature) == 64  # P-256: 32-byte r and s, no DER framing
    r, s = int.from_bytes(adv.signature[:32], "big"), int.from_bytes(adv.signature[32:], "big")
    der = encode_dss_signature(r, s)  # what cryptography signs: valid, in the wrong form
    for signature in (der, adv.signature[:-1], adv.signature[32:] + adv.signature[:32]):
        tampered = dataclasses.replace(adv, signature=signature)
        with pytest.raises(RosterError, match="signature"):
            verify_advertisement(tampered, (federation.ca.cert,), 1, dt.datetime.now(dt.UTC))
    verify_advertisement(adv, (federation.ca.cert,), 1, dt.datetime.now(dt.UTC))


def test_sealed_shares_open_only_unaltered_for_their_round_and_recipient(
    federation: Federation, codes: dict[str, np.ndarray]
) -> None:
    ids = sorted(codes)
    rounds = {a: federation.agent_round(a, 3, FULL, b"s") for a in ids}
    roster = [r.advertise() for r in rounds.values()]
    sealed = {a: r.share_keys(roster) for a, r in rounds.items()}
    sender, recipient, other = ids[0], ids[1], ids[2]
    blob = sealed[sender][recipient]
    plain = shamir.share_bytes(16) + shamir.share_bytes(32)
    assert len(blob) == plain + 16  # ciphertext and tag: the nonce is fixed, not sent
    flipped = bytes([blob[0] ^ 1]) + blob[1:]
    for bad in (flipped, blob[:-1], sealed[sender][other]):
        with pytest.raises(RosterError, match="authenticate"):
            rounds[recipient].receive_shares({sender: bad})
    key = rounds[recipient]._share_key(sender)
    with pytest.raises(RosterError, match="authenticate"):  # replayed into another round
        open_sealed(key, blob, share_aad(4, sender, recipient))
    rounds[recipient].receive_shares({s: sealed[s][recipient] for s in ids if s != recipient})
    assert set(rounds[recipient].held) == set(ids)


def test_sealing_without_aes_gcm_siv_fails_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cryptography build on an OpenSSL older than 3.2 has no AES-GCM-SIV: say so, not a bare
    UnsupportedAlgorithm from deep inside a round."""

    def unsupported(key: bytes) -> None:
        raise UnsupportedAlgorithm("AES-GCM-SIV is not supported by this version of OpenSSL")

    monkeypatch.setattr(keys, "AESGCMSIV", unsupported)
    with pytest.raises(FailedPrecondition, match="OpenSSL"):
        keys.seal(bytes(32), b"share", b"aad")


def test_equivocating_aggregator_gets_both_secrets_only_below_a_majority_threshold(
    federation: Federation,
) -> None:
    """Each holder reveals one kind of share for a peer, as the survivor list it is sent says. An
    aggregator telling u and one holder that u survived and the two others that u dropped gets two
    shares of u's self-mask seed and two of its mask key: both secrets (so u's update) at t = 2 of
    4 holders, neither at t = 3. So thresholds must be a majority (check_parameters, and agents
    check the round's)."""
    u, v1, v2, v3 = sorted(federation.agents)[:4]

    def equivocate(threshold: int) -> tuple[dict[int, bytes], dict[int, bytes], AgentRound]:
        params = SecAggParams(threshold=threshold)  # unchecked, as a malicious aggregator would send
        rounds = {a: federation.agent_round(a, 9, params, b"eq") for a in (u, v1, v2, v3)}
        roster = [r.advertise() for r in rounds.values()]
        sealed = {a: r.share_keys(roster) for a, r in rounds.items()}
        for a, r in rounds.items():
            r.receive_shares({s: sealed[s][a] for s in rounds if s != a})
        seed = {rounds[x].points[x]: rounds[x].unmask([u, v1, v2, v3], [])[u][1] for x in (u, v1)}
        key = {rounds[x].points[x]: rounds[x].unmask([v1, v2, v3], [u])[u][1] for x in (v2, v3)}
        return seed, key, rounds[u]

    seed, key, victim = equivocate(2)
    assert shamir.reconstruct(seed, 2, 16) == victim.self_seed
    assert shamir.reconstruct(key, 2, 32) == victim.mask.private_bytes()
    with pytest.raises(ConfigError, match="must be more than half"):
        SecAggParams(threshold=2).check(4)
    seed, key, victim = equivocate(3)
    for shares, size in ((seed, 16), (key, 32)):
        with pytest.raises(InvalidArgument, match="3 needed"):
            shamir.reconstruct(shares, 3, size)
    SecAggParams(threshold=3).check(4)


@pytest.mark.parametrize(("threshold", "leaks"), [(3, True), (4, False)])
def test_a_colluding_agent_needs_the_threshold_raised_by_one(
    federation: Federation, threshold: int, leaks: bool
) -> None:
    """With 5 holders, t = 3 is safe against the aggregator alone, but a holder colluding with it
    reveals both kinds of share for the victim u: u and v1 told that u survived and v2, v3 that it
    dropped then give 3 shares of each secret. So check_parameters wants 2t > k + 1 + colluders
    (t = 4), as agents with ``privacy.colluders = 1`` do."""
    u, v1, v2, v3, colluder = sorted(federation.agents)[:5]
    params = SecAggParams(threshold=threshold)  # as a malicious aggregator would send it
    rounds = {a: federation.agent_round(a, 11, params, b"co") for a in (u, v1, v2, v3, colluder)}
    roster = [r.advertise() for r in rounds.values()]
    sealed = {a: r.share_keys(roster) for a, r in rounds.items()}
    for a, r in rounds.items():
        r.receive_shares({s: sealed[s][a] for s in rounds if s != a})
    everyone = list(rounds)
    seed = {rounds[x].points[x]: rounds[x].unmask(everyone, [])[u][1] for x in (u, v1)}
    key = {rounds[x].points[x]: rounds[x].unmask([v1, v2, v3, colluder], [u])[u][1] for x in (v2, v3)}
    b_share, sk_share = rounds[colluder].held[u]  # the colluder hands over both
    seed[rounds[colluder].points[colluder]] = b_share
    key[rounds[colluder].points[colluder]] = sk_share
    victim = rounds[u]
    if leaks:
        assert shamir.reconstruct(seed, threshold, 16) == victim.self_seed
        assert shamir.reconstruct(key, threshold, 32) == victim.mask.private_bytes()
        SecAggParams(threshold=threshold).check(5)  # safe against the aggregator alone
        with pytest.raises(ConfigError, match="and 1 colluding with the aggregator"):
            SecAggParams(threshold=threshold).check(5, colluders=1)
    else:
        for shares, size in ((seed, 16), (key, 32)):
            with pytest.raises(InvalidArgument, match=f"{threshold} needed"):
                shamir.reconstruct(shares, threshold, size)
        SecAggParams(threshold=threshold).check(5, colluders=1)


def test_an_agent_refuses_to_unmask_a_sum_smaller_than_its_policy_allows(
    federation: Federation, codes: dict[str, np.ndarray]
) -> None:
    """``privacy.min_agents_per_sum``: an unmask request leaving fewer survivors is refused, even
    above the threshold, and nothing is revealed; a request it allows is answered."""
    ids = sorted(codes)
    agent = federation.agent_round(ids[0], 4, FULL, b"seed")
    agent.min_sum = 8
    others = [federation.agent_round(a, 4, FULL, b"seed").advertise() for a in ids[1:]]
    agent.share_keys([agent.advertise(), *others])
    with pytest.raises(PolicyRefused, match="no fewer than 8 agents"):
        agent.unmask(ids[:7], ids[7:])  # 7 survivors: above t = 6, below the policy
    assert not agent.unmasked
    assert len(agent.unmask(ids[:8], ids[8:])) == 1  # its own self-seed share (it received none)


def test_unmask_request_naming_a_peer_alive_and_dropped_is_refused(
    federation: Federation, codes: dict[str, np.ndarray]
) -> None:
    ids = sorted(codes)
    agent = federation.agent_round(ids[0], 2, FULL, b"seed")
    others = {a: federation.agent_round(a, 2, FULL, b"seed") for a in ids[1:]}
    roster = [agent.advertise()] + [o.advertise() for o in others.values()]
    agent.share_keys(roster)
    with pytest.raises(InvalidArgument, match="both surviving and dropped"):
        agent.unmask(ids, [ids[3]])
    with pytest.raises(InvalidArgument, match="threshold"):
        agent.unmask(ids[:5], ids[5:])
    agent.unmask(ids[:6], ids[6:])  # a well-formed request is answered once
    with pytest.raises(FailedPrecondition, match="already answered"):
        agent.unmask(ids[:6], ids[6:])


def _to_unmask(
    federation: Federation, codes: dict[str, np.ndarray], gone: str = ""
) -> tuple[ServerRound, list[str], dict[str, dict[str, tuple[int, bytes]]]]:
    """A FULL round up to its unmask answers, ``gone`` (if named) having shared keys but never
    uploaded: the aggregator, the survivors and what each of them reveals."""
    ids = sorted(codes)
    params = FULL.check(N)
    server = ServerRound(4, params, LENGTH, b"seed")
    agents = {a: federation.agent_round(a, 4, params, b"seed") for a in ids}
    for agent in agents.values():
        server.add_advertisement(agent.advertise())
    for a, agent in agents.items():
        server.add_shares(a, agent.share_keys(server.roster()))
    server.start_sum()
    for a, agent in agents.items():
        if a != gone:
            agent.receive_shares(server.shares_for(a))
            server.add_masked(a, agent.mask_codes(codes[a].copy()))
            server.finish_upload(a)
    survivors, dropped = server.unmask_request()
    assert dropped == ([gone] if gone else [])
    return server, survivors, {a: agents[a].unmask(survivors, dropped) for a in survivors}


def test_aggregator_refuses_revealed_shares_of_the_wrong_kind_or_size_and_keeps_none(
    federation: Federation, codes: dict[str, np.ndarray]
) -> None:
    ids = sorted(codes)
    server, survivors, revealed = _to_unmask(federation, codes)
    first, (kind, share) = ids[0], revealed[ids[0]][ids[1]]
    assert kind == SELF_SEED and len(share) == shamir.share_bytes(16)
    with pytest.raises(InvalidArgument, match="of 26 bytes"):
        server.add_reveal(first, revealed[first] | {ids[1]: (SELF_SEED, share + b"\0")})
    with pytest.raises(InvalidArgument, match="wrong kind"):
        server.add_reveal(first, revealed[first] | {ids[1]: (MASK_KEY, share)})
    assert server.reveals == {}
    for a in survivors:
        server.add_reveal(a, revealed[a])
    np.testing.assert_array_equal(server.unmasked_sum(), ring_sum(codes, ids))


def _shifting_share(share: bytes, holder: int, points: list[int]) -> bytes:
    """A share that moves the secret interpolated from ``points`` (holder's among them) by +1:
    in range, so only the owner's advertisement can tell it is wrong."""
    prime = shamir.PRIMES[len(share) - shamir.CHECK_BYTES]
    weight = 1
    for x in points:
        if x != holder:
            weight = weight * -x * pow(holder - x, -1, prime) % prime
    shifted = (int.from_bytes(share, "big") + pow(weight, -1, prime)) % prime
    return shifted.to_bytes(len(share), "big")


def test_a_wrong_share_is_found_and_left_out_and_its_holder_named(
    federation: Federation, codes: dict[str, np.ndarray]
) -> None:
    """A holder reveals a share crafted so that the first t shares give the victim's self-mask
    seed plus 1 (in range: Shamir's check bytes cannot see it), and a garbage share of a dropped
    agent's mask key. The aggregator checks each secret against the owner's signed
    advertisement (seed commitment, mask public key), recovers both from t right shares, names
    the holder, and the sum is exact."""
    ids = sorted(codes)
    liar, victim, gone = ids[0], ids[1], ids[9]
    server, survivors, revealed = _to_unmask(federation, codes, gone)
    points = {a: i + 1 for i, a in enumerate(server.roster_ids)}
    holders = sorted(points[a] for a in survivors if victim in revealed[a])
    kind, share = revealed[liar][victim]
    assert kind == SELF_SEED and points[liar] in holders[: FULL.threshold]
    crafted = _shifting_share(share, points[liar], holders[: FULL.threshold])
    kind, key_share = revealed[liar][gone]
    assert kind == MASK_KEY
    genuine = {points[a]: revealed[a][victim][1] for a in survivors if points[a] in holders[: FULL.threshold]}
    right = shamir.reconstruct(genuine, FULL.threshold, 16)
    wrong = shamir.reconstruct(genuine | {points[liar]: crafted}, FULL.threshold, 16)  # trusting the first t
    assert int.from_bytes(wrong, "big") == int.from_bytes(right, "big") + 1
    assert keys.seed_commitment(right, 4, victim) == server.advertisements[victim].seed_commitment
    garbage = bytes(len(key_share) - 1) + b"\x01"
    revealed[liar] = revealed[liar] | {victim: (SELF_SEED, crafted), gone: (MASK_KEY, garbage)}
    for a in survivors:
        server.add_reveal(a, revealed[a])
    np.testing.assert_array_equal(server.unmasked_sum(), ring_sum(codes, survivors))
    assert server.wrong_reveals == {liar: {victim, gone}}


def test_aggregator_refuses_an_advertisement_without_a_seed_commitment(federation: Federation) -> None:
    """Every peer would refuse such a roster: the aggregator refuses the advertisement instead."""
    agent = federation.agent_round(sorted(federation.agents)[0], 5, FULL, b"s")
    server = ServerRound(5, FULL.check(N), LENGTH, b"s")
    with pytest.raises(InvalidArgument, match="seed commitment"):
        server.add_advertisement(dataclasses.replace(agent.advertise(), seed_commitment=b""))
    server.add_advertisement(agent.advertise())
    assert list(server.advertisements) == [agent.agent_id]


def test_too_few_right_shares_abort_the_round_naming_the_secret(
    federation: Federation, codes: dict[str, np.ndarray]
) -> None:
    """With fewer than t right shares of a secret (here 5 of 9 holders lie about one seed, t = 6),
    no set of t gives the advertised seed: the round is aborted, naming whose secret, instead of
    unmasking a corrupted sum or failing with a bare interpolation error."""
    ids = sorted(codes)
    server, survivors, revealed = _to_unmask(federation, codes, ids[9])
    victim = ids[1]
    liars = [a for a in survivors if a != victim][:5]
    for a in liars:
        kind, share = revealed[a][victim]
        revealed[a] = revealed[a] | {victim: (kind, bytes(len(share) - 1) + bytes([len(a)]))}
    for a in survivors:
        server.add_reveal(a, revealed[a])
    with pytest.raises(Aborted, match=f"of {victim}'s self-mask seed give the one it advertised"):
        server.unmasked_sum()


def test_single_masked_upload_looks_uniform(federation: Federation) -> None:
    """Chi-square on byte values of one agent's masked input: an all-zero update, fully masked."""
    ids = sorted(federation.agents)
    length = 1 << 16
    zeros = {a: np.zeros(length, dtype=np.uint32) for a in ids}
    agents = {a: federation.agent_round(a, 9, FULL, b"seed") for a in ids}
    roster = [agents[a].advertise() for a in ids]
    sealed = {a: agents[a].share_keys(roster) for a in ids}
    me = agents[ids[0]]
    me.receive_shares({s: blobs[ids[0]] for s, blobs in sealed.items() if ids[0] in blobs})
    masked = me.mask_codes(zeros[ids[0]].copy())
    counts = np.bincount(masked.view(np.uint8), minlength=256)
    expected = counts.sum() / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 255 degrees of freedom: the 99.9th percentile is about 330.
    assert chi2 < 330, chi2
    wire = np.frombuffer(NARROW.fixed_point.to_wire(masked), np.uint8)  # the low 21 bits, packed
    counts = np.bincount(wire, minlength=256)
    expected_wire = counts.sum() / 256
    assert float(((counts - expected_wire) ** 2 / expected_wire).sum()) < 330
    # The same statistic on the unmasked input is enormous: the test can fail.
    raw = np.bincount(zeros[ids[0]].view(np.uint8), minlength=256)
    assert float(((raw - expected) ** 2 / expected).sum()) > 1e5


@given(
    size=st.sampled_from(sorted(shamir.PRIMES)),
    n=st.integers(min_value=2, max_value=12),
    data=st.data(),
)
@settings(max_examples=40, deadline=None)
def test_shamir_any_t_shares_recover_fewer_do_not(size: int, n: int, data: st.DataObject) -> None:
    secret = data.draw(st.binary(min_size=size, max_size=size))
    t = data.draw(st.integers(min_value=1, max_value=n))
    shares = shamir.split(secret, t, list(range(1, n + 1)))
    assert {len(s) for s in shares.values()} == {shamir.share_bytes(size)}
    chosen = data.draw(st.permutations(list(shares)))[:t]
    assert shamir.reconstruct({x: shares[x] for x in chosen}, t, size) == secret
    if t > 1:
        fewer = {x: shares[x] for x in chosen[: t - 1]}
        with pytest.raises(InvalidArgument):
            shamir.reconstruct(fewer, t, size)
        # t - 1 shares with a wrong guess for the last one interpolate to something else.
        wrong = dict(fewer) | {chosen[-1]: (1).to_bytes(shamir.share_bytes(size), "big")}
        with contextlib.suppress(InvalidArgument):  # or it falls outside the secret's range
            assert shamir.reconstruct(wrong, t, size) != secret


def _probably_prime(n: int, rounds: int = 40) -> bool:
    """Miller-Rabin with random bases (a composite passes with probability below 4^-rounds)."""
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    rng = random.Random(n)
    for _ in range(rounds):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_shamir_fields_are_the_largest_primes_of_their_share_size() -> None:
    for size, prime in shamir.PRIMES.items():
        top = 1 << (8 * shamir.share_bytes(size))
        assert _probably_prime(prime)
        assert not any(_probably_prime(c) for c in range(prime + 2, top, 2))
        assert prime > 1 << (8 * size + 70)  # at least 70 bits of checksum headroom


def test_shamir_detects_a_corrupted_share_and_refuses_wrong_sizes() -> None:
    secret = bytes(range(16))
    shares = shamir.split(secret, 3, [1, 2, 3])
    caught = 0
    for i in range(200):  # a random corruption of one share: the secret falls outside 16 bytes
        bad = dict(shares) | {2: random.Random(i).randbytes(shamir.share_bytes(16))}
        with contextlib.suppress(InvalidArgument):
            shamir.reconstruct(bad, 3, 16)
            continue
        caught += 1
    assert caught == 200
    with pytest.raises(InvalidArgument, match="must be 25 bytes"):
        shamir.reconstruct(dict(shares) | {3: shares[3] + b"\0"}, 3, 16)
    with pytest.raises(InvalidArgument, match="must be 41 bytes"):
        shamir.reconstruct(shares, 3, 32)  # a seed's shares read as a key's
    with pytest.raises(ValueError, match="not 20"):
        shamir.split(bytes(20), 2, [1, 2])


def test_mask_streams_are_deterministic_keyed_and_cancel() -> None:
    a, b = expand(b"k" * 32, 100_000), expand(b"k" * 32, 100_000)
    np.testing.assert_array_equal(a, b)
    assert (expand(b"j" * 32, 100_000) != a).mean() > 0.99
    buf = np.arange(300_000, dtype=np.uint32)
    apply_mask(buf, b"x" * 32, +1)
    assert (buf != np.arange(300_000, dtype=np.uint32)).mean() > 0.99
    apply_mask(buf, b"x" * 32, -1)
    np.testing.assert_array_equal(buf, np.arange(300_000, dtype=np.uint32))


def test_fixed_point_is_unbiased_within_a_step_and_clips() -> None:
    fp = FixedPoint(clip=0.5, bits=12)
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, 0.5, 200_000).astype(np.float32)
    decoded = fp.decode_sum(fp.encode(x, rng), 1)
    assert np.max(np.abs(decoded - x)) <= fp.step + 1e-9
    assert abs(float(np.mean(decoded - x))) < fp.step / 50  # stochastic rounding: no bias
    many = np.stack([fp.encode(np.full(1, 0.123, np.float32), rng) for _ in range(4000)])
    assert abs(fp.decode_sum(many.sum(0, dtype=np.uint32), 4000)[0] / 4000 - 0.123) < fp.step / 10
    clipped = fp.decode_sum(fp.encode(np.array([9.0, -9.0], np.float32), rng), 1)
    np.testing.assert_allclose(clipped, [0.5, -0.5])
    with pytest.raises(InvalidArgument, match="NaN"):
        fp.encode(np.array([np.nan], np.float32), rng)


@settings(max_examples=60, deadline=None)
@given(
    levels=st.one_of(st.integers(2, 40), st.integers(2, 1 << 27)),  # 9 agents at 2^27: DESIGN's widest
    pack=st.booleans(),
    weights=st.lists(st.floats(1e-4, 1.0), min_size=1, max_size=9),
)
def test_summed_weight_is_exact_at_any_levels(levels: int, pack: bool, weights: list[float]) -> None:
    """The weight travels as base-2^bits digits: its sum is exact to 2^-24 a contributor, even at
    2 levels, where one stochastically rounded coordinate would be off by its whole range; packed
    or not, the codes' sum decodes from the sum of the elements."""
    fp = SecAggParams.for_round(2, 0, 1.0, 2, len(weights), levels=levels, pack=pack).fixed_point
    assert fp.levels >= levels - 1 and fp.bits == levels.bit_length() - 1
    rng = np.random.default_rng(levels)
    total = np.zeros(fp.masked_length(3), dtype=np.uint32)
    for w in weights:
        elements = fp.encode_weighted(np.array([0.5, -0.25, 0.0], np.float32), w, rng)
        assert elements.size == -(-(3 + fp.weight_digits) // fp.group)
        assert int(elements.max()) < 2**fp.ring_bits
        total += elements
    mean, weight = fp.decode_weighted_mean(total, len(weights), 3)
    assert abs(weight - sum(weights)) <= len(weights) * 2.0**-24
    assert abs(float(mean[0]) * weight - 0.5 * sum(weights)) <= len(weights) * fp.step + 1e-6


def test_weighted_codes_refuse_bad_weights_and_buffers() -> None:
    fp = FixedPoint(1.0, 4, 6)
    rng = np.random.default_rng(0)
    with pytest.raises(InvalidArgument, match="weight must be in"):
        fp.encode_weighted(np.zeros(4, np.float32), 0.0, rng)
    with pytest.raises(InvalidArgument, match="expected 10"):
        fp.encode_weighted(np.zeros(4, np.float32), 0.5, rng, out=np.empty(5, np.uint32))
    with pytest.raises(InvalidArgument, match="does not hold"):
        fp.decode_weighted_mean(np.zeros(3, np.uint32), 1)
    with pytest.raises(InvalidArgument, match="does not hold"):
        fp.decode_weighted_mean(np.zeros(8, np.uint32), 1, 5)
    with pytest.raises(InvalidArgument, match="must be positive"):
        fp.decode_weighted_mean(np.zeros(8, np.uint32), 1)


def test_headroom_and_parameter_checks_say_why() -> None:
    check_headroom(2**16, 100)  # 100 * (2^16 - 1) needs 23 bits, + 1 (DESIGN's spare bit) = 24
    check_headroom(2**24, 128)  # 128 * (2^24 - 1) < 2^31
    with pytest.raises(ConfigError, match="headroom"):
        check_headroom(2**24, 129)
    with pytest.raises(ConfigError, match="at least 2 code levels"):
        check_headroom(1, 4)
    with pytest.raises(ConfigError, match="above the number of agents"):
        SecAggParams(threshold=11).check(10)
    with pytest.raises(ConfigError, match="must be more than half"):
        SecAggParams(threshold=2, neighbours=4).check(10)
    with pytest.raises(ConfigError, match="plus the agent itself"):
        SecAggParams(threshold=6, neighbours=4).check(10)
    SecAggParams(threshold=3, neighbours=4).check(10)


@pytest.mark.parametrize(("n", "k"), [(10, 3), (10, 4), (9, 3), (25, 6), (7, 0)])
def test_graph_is_regular_symmetric_and_seeded(n: int, k: int) -> None:
    ids = [f"a{i}" for i in range(n)]
    graph = neighbours(ids, k, b"seed-1")
    want = n - 1 if k == 0 else (k + 1 if k % 2 and n % 2 else k)
    for a, peers in graph.items():
        assert a not in peers and len(peers) == want
        assert all(a in graph[b] for b in peers)
    assert neighbours(list(reversed(ids)), k, b"seed-1") == graph
    if 0 < k < n - 1:
        assert neighbours(ids, k, b"seed-2") != graph


def test_advertisements_verify_against_every_ca_of_the_bundle_and_the_agents_crl(
    federation: Federation, tmp_path
) -> None:
    """During a CA rotation the bundle holds both CAs: a peer issued by the new one verifies (at
    the agent and in the aggregator's check) once the bundle has it; a peer the agent's CRL lists
    is refused in the roster, naming serial and reason."""
    old, new = federation.ca, create_ca("next CA")
    me, peer = sorted(federation.agents)[:2]
    moved = issue_agent(new, SpiffeId.parse(peer))
    keys_of_peer = federation.agent_round(peer, 1, FULL, b"s")
    adv = sign_advertisement(
        1, peer, keys_of_peer.cipher, keys_of_peer.mask, moved.cert_pem(), moved.key, bytes(32)
    )
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(RosterError, match="not issued by the federation CA"):
        verify_advertisement(adv, (old.cert,), 1, now)
    verify_advertisement(adv, (old.cert, new.cert), 1, now)
    keys.check_posted_advertisement(adv, old.cert_pem() + new.cert_pem())
    with pytest.raises(InvalidArgument, match="not issued by the federation CA"):
        keys.check_posted_advertisement(adv, old.cert_pem())

    bundle, crl = tmp_path / "ca.pem", tmp_path / "crl.pem"
    bundle.write_bytes(old.cert_pem() + new.cert_pem())

    def write_crl(ca: Issued, serial: int) -> RevocationList:
        entry = revoked_entry(serial, x509.ReasonFlags.key_compromise)
        crl.write_bytes(build_crl(ca, [entry], 1).public_bytes(serialization.Encoding.PEM))
        return RevocationList.load(crl, bundle)

    revoked = write_crl(new, moved.cert.serial_number)
    with pytest.raises(RosterError, match=rf"certificate of {peer} is revoked: serial .* \(keyCompromise\)"):
        verify_advertisement(adv, (old.cert, new.cert), 1, now, revoked)
    # The same serial revoked by the other CA is another certificate.
    verify_advertisement(adv, (old.cert, new.cert), 1, now, write_crl(old, moved.cert.serial_number))

    # In the protocol: an agent holding the CRL refuses the roster at its key-sharing step.
    mine = federation.agent_round(me, 1, SecAggParams(threshold=2), b"s")
    mine.cas, mine.revocations = (old.cert, new.cert), revoked
    with pytest.raises(RosterError, match="is revoked"):
        mine.share_keys([mine.advertise(), adv])
    mine.revocations = None
    assert mine.share_keys([mine.advertise(), adv])  # without it, the same roster is taken
