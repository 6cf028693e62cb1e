"""The agent's side of one secure-aggregation round: advertise, share, mask, unmask."""

from __future__ import annotations

import datetime as dt
import logging
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from common.errors import FailedPrecondition, InvalidArgument, PolicyRefused
from common.revocation import RevocationList
from common.secagg import shamir
from common.secagg.coverage import MIN_SENDERS, Coverage, CoveredUniforms
from common.secagg.graph import neighbours
from common.secagg.keys import (
    Advertisement,
    KeyPair,
    RosterError,
    derive,
    open_sealed,
    seal,
    seed_commitment,
    sign_advertisement,
    verify_advertisement,
)
from common.secagg.params import SecAggParams
from common.secagg.prg import apply_masks
from common.secagg.strata import StratifiedUniforms, Uniforms, stratifies

log = logging.getLogger(__name__)

SELF_SEED = 0  # kinds of share revealed at unmask
MASK_KEY = 1
SECRET_BYTES = {SELF_SEED: 16, MASK_KEY: 32}
SEAL_TAG_BYTES = 16
SEALED_SHARE_BYTES = (
    shamir.share_bytes(SECRET_BYTES[SELF_SEED]) + shamir.share_bytes(SECRET_BYTES[MASK_KEY]) + SEAL_TAG_BYTES
)
"""Size of one sealed share on the wire: both secrets' Shamir shares and the AES-GCM-SIV tag."""
"""Each kind's secret: a 128-bit self-mask seed (AES-128-level, as the X25519 pairwise secrets), an
X25519 private key."""


def share_aad(round_id: int, sender: str, recipient: str) -> bytes:
    """Binds an encrypted share to its round, sender and recipient."""
    return (
        b"cloudfed-secagg-share" + struct.pack(">Q", round_id) + sender.encode() + b"\0" + recipient.encode()
    )


def pair_mask_key(secret: bytes, round_id: int, a: str, b: str) -> bytes:
    """The pairwise mask key of agents a and b (order-free)."""
    low, high = sorted((a, b))
    return derive(secret, "pair-mask", round_id, low, high)


def self_mask_key(seed: bytes, round_id: int, agent: str) -> bytes:
    """The self-mask key from an agent's seed b_u."""
    return derive(seed, "self-mask", round_id, agent)


def pair_sign(me: str, peer: str) -> int:
    """+1 if ``me`` adds the pairwise mask, -1 if it subtracts it (so each pair cancels)."""
    return 1 if me < peer else -1


@dataclass
class AgentRound:
    """One agent in one round. Methods are called in phase order; each checks its inputs."""

    round_id: int
    agent_id: str
    params: SecAggParams
    cas: tuple[x509.Certificate, ...]
    """The federation's CA bundle: a peer's certificate must come from one of them."""
    certificate_pem: bytes
    signing_key: ec.EllipticCurvePrivateKey
    graph_seed: bytes
    cipher: KeyPair = field(default_factory=KeyPair.generate)
    mask: KeyPair = field(default_factory=KeyPair.generate)
    self_seed: bytes = field(default_factory=lambda: os.urandom(SECRET_BYTES[SELF_SEED]))
    roster: dict[str, Advertisement] = field(default_factory=dict)
    points: dict[str, int] = field(default_factory=dict)
    my_neighbours: frozenset[str] = frozenset()
    held: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # sender -> (b share, sk share)
    masked_with: frozenset[str] = frozenset()
    unmasked: bool = False
    covered: Coverage | None = None
    min_sum: int = MIN_SENDERS
    """The fewest agents whose sum this agent lets the aggregator learn (``privacy.min_agents_per_sum``):
    an unmask request leaving fewer survivors, or with coverage fewer senders of one of this
    agent's elements, is refused."""
    revocations: RevocationList | None = None
    """Peers whose certificates this CRL lists are refused in the roster (``tls.crl``)."""

    def advertise(self) -> Advertisement:
        """Phase 1: both public keys, signed with the certificate key."""
        return sign_advertisement(
            self.round_id,
            self.agent_id,
            self.cipher,
            self.mask,
            self.certificate_pem,
            self.signing_key,
            seed_commitment(self.self_seed, self.round_id, self.agent_id),
        )

    def share_keys(self, roster: Sequence[Advertisement], now: dt.datetime | None = None) -> dict[str, bytes]:
        """Phase 2: verify every advertisement, then seal shares of b_u and s_sk_u for each neighbour."""
        now = now or dt.datetime.now(dt.UTC)
        by_id: dict[str, Advertisement] = {}
        for adv in roster:
            verify_advertisement(adv, self.cas, self.round_id, now, self.revocations)
            if adv.agent_id in by_id:
                raise RosterError(f"the roster lists {adv.agent_id} twice")
            by_id[adv.agent_id] = adv
        mine = by_id.get(self.agent_id)
        if mine is None or (mine.cipher_public, mine.mask_public) != (self.cipher.public, self.mask.public):
            raise RosterError("the roster does not carry this agent's own keys unchanged")
        if len(by_id) < self.params.threshold:
            raise RosterError(f"roster of {len(by_id)} agents is below the threshold {self.params.threshold}")
        self.roster = by_id
        ids = sorted(by_id)
        self.points = {a: i + 1 for i, a in enumerate(ids)}
        self.my_neighbours = neighbours(ids, self.params.neighbours, self.graph_seed)[self.agent_id]
        holders = sorted(self.my_neighbours | {self.agent_id})
        xs = [self.points[h] for h in holders]
        b_shares = shamir.split(self.self_seed, self.params.threshold, xs)
        sk_shares = shamir.split(self.mask.private_bytes(), self.params.threshold, xs)
        sealed: dict[str, bytes] = {}
        for holder in holders:
            x = self.points[holder]
            if holder == self.agent_id:
                self.held[holder] = (b_shares[x], sk_shares[x])
                continue
            key = self._share_key(holder)
            aad = share_aad(self.round_id, self.agent_id, holder)
            sealed[holder] = seal(key, b_shares[x] + sk_shares[x], aad)
        return sealed

    def receive_shares(self, sealed: Mapping[str, bytes]) -> None:
        """Phase 2 result: the shares neighbours sealed for this agent. Their senders are the peers
        this agent masks with."""
        b_size = shamir.share_bytes(SECRET_BYTES[SELF_SEED])
        both_size = b_size + shamir.share_bytes(SECRET_BYTES[MASK_KEY])
        for sender, blob in sealed.items():
            if sender not in self.my_neighbours:
                raise RosterError(f"{sender} sent shares but is not a neighbour")
            plain = open_sealed(
                self._share_key(sender), blob, share_aad(self.round_id, sender, self.agent_id)
            )
            if len(plain) != both_size:
                raise RosterError(f"share from {sender} has the wrong size")
            self.held[sender] = (plain[:b_size], plain[b_size:])
        self.masked_with = frozenset(sealed)
        if len(self.masked_with) + 1 < self.params.threshold:
            raise FailedPrecondition(
                f"only {len(self.masked_with)} neighbours shared keys; threshold {self.params.threshold}"
            )

    def rounding(self, private: np.random.Generator | None = None, elements: int = 0) -> Uniforms:
        """Dithers for this round's fixed-point codes: stratified with the roster's other agents
        (``strata``; with coverage, with each element's senders) for codes of up to
        ``strata.STRATIFIED_MAX_CODE``, once the roster is verified (``share_keys``; with coverage,
        once the shares arrived, for an update of ``elements`` elements); finer codes round with
        ``private`` alone."""
        private = private or np.random.default_rng()
        if not stratifies(self.params.fixed_point.levels):
            return private
        if self.params.coverage:
            return CoveredUniforms(self.coverage(elements), self.agent_id, self.params.group, private)
        if not self.points:
            raise FailedPrecondition("no verified roster yet: the round's dithers need it")
        position = self.points[self.agent_id] - 1  # rank in the sorted roster, as Shamir's points
        return StratifiedUniforms(self.graph_seed, self.round_id, position, len(self.points), private)

    def coverage(self, elements: int) -> Coverage:
        """Who sends which of the round's ``elements`` elements: this agent and the peers it masks
        with (everyone who shared keys; coverage needs the full graph)."""
        if not self.masked_with:
            raise FailedPrecondition("no shares received yet: coverage needs the round's senders")
        if self.covered is None or self.covered.elements != elements:
            members = self.masked_with | {self.agent_id}
            self.covered = Coverage(self.graph_seed, self.round_id, members, self.params.coverage, elements)
        return self.covered

    def mask_codes(self, codes: np.ndarray) -> np.ndarray:
        """Phase 3: add the self mask and the pairwise masks to fixed-point codes, in place, and
        return what is uploaded: all of ``codes``, or with coverage the elements this agent sends
        (each pairwise mask only where the peer sends too)."""
        masks = [(self_mask_key(self.self_seed, self.round_id, self.agent_id), +1)]
        peers = sorted(self.masked_with)
        for peer in peers:
            secret = self.mask.agree(self.roster[peer].mask_public)
            key = pair_mask_key(secret, self.round_id, self.agent_id, peer)
            masks.append((key, pair_sign(self.agent_id, peer)))
        if not self.params.coverage:
            apply_masks(codes, masks)
            return codes
        coverage = self.coverage(codes.size)
        columns = [None] + [[coverage.position(p)] for p in peers]
        apply_masks(codes, masks, coverage.selector(columns))
        return coverage.compact(codes, self.agent_id)

    def unmask(self, survivors: Iterable[str], dropped: Iterable[str]) -> dict[str, tuple[int, bytes]]:
        """Phase 4: self-seed shares of survivors, mask-key shares of dropped agents, never both for
        one peer; refused if fewer than t survivors are listed."""
        alive, gone = set(survivors), set(dropped)
        both = alive & gone
        if both:
            raise InvalidArgument(f"unmask request names {sorted(both)} as both surviving and dropped")
        if len(alive) < self.params.threshold:
            raise InvalidArgument(
                f"unmask request lists {len(alive)} survivors; threshold {self.params.threshold}"
            )
        if self.agent_id not in alive:
            raise InvalidArgument("unmask request does not list this agent as a survivor")
        if self.unmasked:
            raise FailedPrecondition("this agent already answered an unmask request this round")
        unknown = (alive | gone) - set(self.roster)
        if unknown:
            raise InvalidArgument(f"unmask request names agents outside the roster: {sorted(unknown)}")
        if len(alive) < self.min_sum:
            raise PolicyRefused(
                f"unmask request lists {len(alive)} survivors; this agent's policy allows sums over no"
                f" fewer than {self.min_sum} agents"
            )
        if self.params.coverage:  # no element of this agent's may be left to fewer senders
            if self.covered is None:
                raise FailedPrecondition("this agent has not masked an update this round")
            self.covered.check_survivors(self.agent_id, alive, self.min_sum)
        self.unmasked = True
        out: dict[str, tuple[int, bytes]] = {}
        for peer, (b_share, sk_share) in self.held.items():
            if peer in alive:
                out[peer] = (SELF_SEED, b_share)
            elif peer in gone:
                out[peer] = (MASK_KEY, sk_share)
        log.info("secagg round %d: revealed %d shares", self.round_id, len(out))
        return out

    def _share_key(self, peer: str) -> bytes:
        secret = self.cipher.agree(self.roster[peer].cipher_public)
        low, high = sorted((self.agent_id, peer))
        return derive(secret, "share-encryption", self.round_id, low, high)
