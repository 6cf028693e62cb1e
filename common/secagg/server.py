"""The aggregator's side of one secure-aggregation round: relay keys and sealed shares, add masked
codes into one running uint32 sum, and remove the masks from the sum after unmasking.

It never holds an agent's unmasked update: masked inputs go straight into the sum, and only the
sum is unmasked.
"""

from __future__ import annotations

import hmac
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from common.errors import Aborted, FailedPrecondition, InvalidArgument
from common.secagg import shamir
from common.secagg.agent import (
    MASK_KEY,
    SEALED_SHARE_BYTES,
    SECRET_BYTES,
    SELF_SEED,
    pair_mask_key,
    pair_sign,
    self_mask_key,
)
from common.secagg.coverage import Coverage
from common.secagg.graph import neighbours
from common.secagg.keys import COMMITMENT_BYTES, Advertisement, KeyPair, seed_commitment
from common.secagg.params import SecAggParams
from common.secagg.prg import apply_masks
from common.secagg.ring import RING_DTYPE

log = logging.getLogger(__name__)
MAX_SUBSETS = 1024
"""Most sets of t revealed shares tried for one secret before the round is given up."""
SECRET_NAMES = {SELF_SEED: "self-mask seed", MASK_KEY: "mask key"}


@dataclass
class ServerRound:
    """One round at the aggregator. ``length`` is the number of uint32 elements of an update (with
    coverage, each agent uploads only the elements it sends: ``upload_length``)."""

    round_id: int
    params: SecAggParams
    length: int
    graph_seed: bytes
    advertisements: dict[str, Advertisement] = field(default_factory=dict)
    sealed: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sender -> recipient -> blob
    uploaded: set[str] = field(default_factory=set)
    reveals: dict[str, dict[str, tuple[int, bytes]]] = field(default_factory=dict)
    wrong_reveals: dict[str, set[str]] = field(default_factory=dict)
    """Holders whose revealed share of some owner's secret was wrong (holder -> owners)."""
    total: np.ndarray | None = None
    graph: dict[str, frozenset[str]] = field(default_factory=dict)
    coverage: Coverage | None = None

    # Phase 1
    def add_advertisement(self, adv: Advertisement) -> None:
        """Keep an agent's advertisement (the servicer checked it came from that agent's connection)."""
        if adv.round_id != self.round_id:
            raise FailedPrecondition(f"advertisement for round {adv.round_id}, this is round {self.round_id}")
        if adv.agent_id in self.advertisements:
            raise FailedPrecondition(f"{adv.agent_id} already advertised keys this round")
        if len(adv.seed_commitment) != COMMITMENT_BYTES:  # every peer would refuse the roster
            raise InvalidArgument(
                f"advertisement without a {COMMITMENT_BYTES}-byte self-mask seed commitment"
            )
        self.advertisements[adv.agent_id] = adv

    def withdraw(self, agent_id: str) -> None:
        """Drop ``agent_id``'s advertisement before the roster closes (it declined the round), so
        that nobody seals shares for it or counts on its reveals."""
        if self.graph:
            raise FailedPrecondition(f"the roster of round {self.round_id} is closed")
        self.advertisements.pop(agent_id, None)

    @property
    def roster_ids(self) -> list[str]:
        """Everyone who advertised, in roster order (sorted ids): Shamir points are positions + 1,
        and shares on the wire name their peer by position."""
        return sorted(self.advertisements)

    def roster(self) -> list[Advertisement]:
        """Close phase 1: everyone who advertised, if at least t did."""
        if len(self.advertisements) < self.params.threshold:
            raise Aborted(
                f"{len(self.advertisements)} agents advertised keys; threshold {self.params.threshold}"
            )
        ids = self.roster_ids
        self.graph = neighbours(ids, self.params.neighbours, self.graph_seed)
        return [self.advertisements[a] for a in ids]

    # Phase 2
    def add_shares(self, sender: str, sealed: Mapping[str, bytes]) -> None:
        """Keep the sealed shares ``sender`` addressed to its neighbours (opaque to the aggregator)."""
        if sender not in self.graph:
            raise FailedPrecondition(f"{sender} is not in this round's roster")
        if sender in self.sealed:
            raise FailedPrecondition(f"{sender} already shared keys this round")
        if set(sealed) != set(self.graph[sender]):
            raise InvalidArgument(
                f"{sender} must seal one share for each of its {len(self.graph[sender])} neighbours"
            )
        wrong = sorted(peer for peer, blob in sealed.items() if len(blob) != SEALED_SHARE_BYTES)
        if wrong:  # opaque here, but a share of another size could only make its recipient refuse the round
            raise InvalidArgument(
                f"sealed shares for {', '.join(wrong)} are not {SEALED_SHARE_BYTES} bytes; none was kept"
            )
        self.sealed[sender] = dict(sealed)

    def shared(self) -> set[str]:
        """U2: the agents whose shares arrived."""
        return set(self.sealed)

    def shares_for(self, recipient: str) -> dict[str, bytes]:
        """Close phase 2 for one agent: the shares its neighbours in U2 sealed for it."""
        if len(self.sealed) < self.params.threshold:
            raise Aborted(f"{len(self.sealed)} agents shared keys; threshold {self.params.threshold}")
        return {s: blobs[recipient] for s, blobs in self.sealed.items() if recipient in blobs}

    # Phase 3
    def start_sum(self) -> None:
        """Allocate the running sum (touched now, not during the first upload); with coverage, fix
        who sends which element among the agents that shared keys."""
        self.total = np.zeros(self.length, dtype=RING_DTYPE)
        if self.params.coverage:
            k = self.params.coverage
            self.coverage = Coverage(self.graph_seed, self.round_id, self.shared(), k, self.length)

    def upload_length(self, sender: str) -> int:
        """Elements in ``sender``'s masked upload."""
        if self.params.coverage:
            if self.coverage is None:
                raise FailedPrecondition("uploads have not started")
            return self.coverage.sent(sender)
        return self.length

    def add_masked(self, sender: str, codes: np.ndarray, offset: int = 0) -> None:
        """Add a slice of ``sender``'s masked upload at ``offset`` into the running sum (mod 2^32);
        with coverage, each uploaded element goes to the element it stands for."""
        if sender not in self.sealed:
            raise FailedPrecondition(f"{sender} did not share keys this round")
        if self.total is None:
            self.start_sum()
        assert self.total is not None
        if codes.dtype != RING_DTYPE or offset + codes.size > self.upload_length(sender):
            raise InvalidArgument("masked input has the wrong type or length")
        if self.coverage is not None:
            where = self.coverage.positions(sender, offset, offset + codes.size)
            self.total[where] += codes
            return
        target = self.total[offset : offset + codes.size]
        np.add(target, codes, out=target)

    def finish_upload(self, sender: str) -> None:
        """``sender``'s whole masked input is in the sum."""
        self.uploaded.add(sender)

    # Phase 4
    def unmask_request(self) -> tuple[list[str], list[str]]:
        """(survivors U3, dropped U2 minus U3) for every survivor to answer."""
        if len(self.uploaded) < self.params.threshold:
            raise Aborted(f"{len(self.uploaded)} masked inputs arrived; threshold {self.params.threshold}")
        return sorted(self.uploaded), sorted(self.shared() - self.uploaded)

    def add_reveal(self, sender: str, shares: Mapping[str, tuple[int, bytes]]) -> None:
        """Keep a survivor's revealed shares, checking each is of the kind the request allows."""
        if sender not in self.uploaded:
            raise FailedPrecondition(f"{sender} is not a survivor of this round")
        survivors, dropped = self.unmask_request()
        held = {sender} | {owner for owner, blobs in self.sealed.items() if sender in blobs}
        expected = held & (set(survivors) | set(dropped))
        if set(shares) != expected:  # an honest survivor reveals every share it holds of them
            raise InvalidArgument(
                f"{sender} revealed shares of {len(shares)} agents; it holds shares of {len(expected)}"
                " agents the unmask request names and must reveal exactly those"
            )
        for peer, (kind, share) in shares.items():
            if not ((kind == SELF_SEED and peer in survivors) or (kind == MASK_KEY and peer in dropped)):
                raise InvalidArgument(f"{sender} revealed a share of the wrong kind for {peer}")
            if len(share) != shamir.share_bytes(SECRET_BYTES[kind]):
                raise InvalidArgument(f"{sender} revealed a share of {len(share)} bytes for {peer}")
        self.reveals[sender] = dict(shares)

    def unmasked_sum(self) -> np.ndarray:
        """Remove every mask from the running sum: self masks of survivors, pairwise masks between
        survivors and dropped agents. Aborted if some secret has fewer than t shares."""
        survivors, dropped = self.unmask_request()
        if self.total is None:
            raise FailedPrecondition("no masked input was added")
        points = {a: i + 1 for i, a in enumerate(self.roster_ids)}
        total = self.total
        masks: list[tuple[bytes, int]] = []
        owners: list[list[str]] = []  # with coverage: whose elements each mask is on
        for agent in survivors:
            seed = self._recover(agent, SELF_SEED, points)
            masks.append((self_mask_key(seed, self.round_id, agent), -1))
            owners.append([agent])
        for gone in dropped:
            mask_key = KeyPair.from_private_bytes(self._recover(gone, MASK_KEY, points))
            for agent in survivors:
                if gone in self.graph[agent] and agent in self.sealed.get(gone, {}):
                    secret = mask_key.agree(self.advertisements[agent].mask_public)
                    key = pair_mask_key(secret, self.round_id, agent, gone)
                    masks.append((key, -pair_sign(agent, gone)))  # undo what ``agent`` added
                    owners.append([agent, gone])
        if self.coverage is None:
            apply_masks(total, masks)
        else:
            columns = [[self.coverage.position(a) for a in who] for who in owners]
            apply_masks(total, masks, self.coverage.selector(columns))
        log.info(
            "secagg round %d: unmasked the sum of %d inputs (%d dropped after sharing)",
            self.round_id,
            len(survivors),
            len(dropped),
        )
        return total

    def covered_mean(self, total: np.ndarray, weights: Mapping[str, float], count: int) -> np.ndarray:
        """With coverage, the weighted mean (float32, ``count`` values) of the survivors' updates
        from the unmasked sum: each element's senders' sum over their summed ``weights``."""
        if self.coverage is None:
            raise FailedPrecondition("this round has no coverage")
        fp = self.params.fixed_point
        if fp.masked_length(count) != self.length:
            raise InvalidArgument(f"a masked sum of {self.length} elements does not hold {count} values")
        return self.coverage.mean(total, fp, weights, count)

    def _recover(self, owner: str, kind: int, points: Mapping[str, int]) -> bytes:
        """``owner``'s secret from t revealed shares that give the one its advertisement names (the
        seed's commitment, the mask key's public key). A holder's wrong share is left out (and
        named in ``wrong_reveals``) as long as t right ones were revealed; Aborted otherwise."""
        holders = {points[h]: h for h in self.reveals}
        shares = {
            points[holder]: share
            for holder, revealed in self.reveals.items()
            for peer, (k, share) in revealed.items()
            if peer == owner and k == kind
        }
        t, size, name = self.params.threshold, SECRET_BYTES[kind], SECRET_NAMES[kind]
        if len(shares) < t:
            raise Aborted(f"{len(shares)} shares of {owner}'s {name} revealed; threshold {t}")
        for subset in itertools.islice(itertools.combinations(sorted(shares), t), MAX_SUBSETS):
            secret = self._interpolate(shares, subset, size)
            if secret is None or not self._advertised(owner, kind, secret):
                continue
            wrong = [
                holders[x]
                for x in shares
                if x not in subset and self._interpolate(shares, (*subset[1:], x), size) != secret
            ]
            if wrong:
                log.warning(
                    "secagg round %d: %s revealed wrong shares of %s's %s; recovered from the others",
                    self.round_id,
                    wrong,
                    owner,
                    name,
                )
                for holder in wrong:
                    self.wrong_reveals.setdefault(holder, set()).add(owner)
            return secret
        raise Aborted(
            f"no {t} of the {len(shares)} revealed shares of {owner}'s {name} give the one it"
            f" advertised: holders revealed wrong shares, or {owner} dealt inconsistent ones"
        )

    @staticmethod
    def _interpolate(shares: Mapping[int, bytes], subset: tuple[int, ...], size: int) -> bytes | None:
        try:
            return shamir.reconstruct({x: shares[x] for x in subset}, len(subset), size)
        except InvalidArgument:  # out of the secret's range: some share there is wrong
            return None

    def _advertised(self, owner: str, kind: int, secret: bytes) -> bool:
        """Whether ``secret`` is the one ``owner``'s advertisement commits to."""
        adv = self.advertisements[owner]
        if kind == SELF_SEED:
            return hmac.compare_digest(seed_commitment(secret, self.round_id, owner), adv.seed_commitment)
        return KeyPair.from_private_bytes(secret).public == adv.mask_public
