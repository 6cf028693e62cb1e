"""An agent's part in a secure-aggregation round, around its local training: advertise signed keys,
share secrets with its neighbours, mask the fixed-point update, answer the unmask request."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from agent import metrics
from agent.client import AggregatorClient
from common.config import PrivacyConfig
from common.errors import ConfigError, FailedPrecondition, PolicyRefused
from common.revocation import RevocationList
from common.secagg.agent import AgentRound
from common.secagg.clips import SegmentClips
from common.secagg.coverage import check_settings
from common.secagg.graph import check_parameters
from common.secagg.keys import RosterError
from common.secagg.params import SecAggParams
from common.secagg.ring import RING_BITS, update_weight
from common.secagg_pb import (
    advertise_request,
    advertisement_from_pb,
    reveal_request,
    sealed_from_pb,
    share_request,
)
from common.tls import TlsFiles
from protos.cloudfed.v1 import federation_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Signer:
    """This agent's certificate, its private key (signs advertisements), the federation's CA bundle
    and, with ``tls.crl``, the CA's revocation list that peers' certificates are checked against."""

    certificate_pem: bytes
    key: ec.EllipticCurvePrivateKey
    cas: tuple[x509.Certificate, ...]
    revocations: RevocationList | None = None

    @classmethod
    def load(cls, files: TlsFiles, revocations: RevocationList | None = None) -> Signer:
        """Read the agent's mTLS files; ``revocations``: the round's (``agent.revocations``)."""
        cert, key_pem, ca = files.read()
        key = load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError("tls.key: secure aggregation signs with an EC (P-256) certificate key")
        return cls(cert, key, tuple(x509.load_pem_x509_certificates(ca)), revocations)


class SecureParticipation:
    """One round. ``keys()`` runs while the model trains; ``mask()`` then ``unmask()`` after."""

    def __init__(
        self,
        client: AggregatorClient,
        signer: Signer,
        agent_id: str,
        settings: pb.SecAggSettings,
        round_id: int,
        wait_s: float,
        policy: PrivacyConfig | None = None,
    ) -> None:
        self.client, self.round_id, self.wait_s = client, round_id, wait_s
        self.settings = settings
        self.policy = policy or PrivacyConfig()
        params = self._params(max(settings.threshold, 2))
        self.protocol = AgentRound(
            round_id,
            agent_id,
            params,
            signer.cas,
            signer.certificate_pem,
            signer.key,
            b"",
            min_sum=self.policy.min_agents_per_sum,
            revocations=signer.revocations,
        )
        self.weight_scale = 1.0
        self.clips: SegmentClips | None = None
        self.roster_ids: list[str] = []
        """The round's agents in roster order (how shares name them on the wire)."""

    def _params(self, threshold: int, state: pb.GetSecAggStateResponse | None = None) -> SecAggParams:
        """The round's parameters; its layout (ring, largest code, packing) comes with the roster."""
        s = self.settings
        clip = 1.0 if s.adaptive_clip > 0 else s.clip  # adaptive: values go over their bounds
        if state is None:
            return SecAggParams(threshold, s.neighbours, clip, s.bits)
        return SecAggParams(
            threshold,
            s.neighbours,
            clip,
            s.bits,
            state.ring_bits,
            state.max_code,
            state.code_base,
            state.codes_per_element or 1,
            state.coverage,
        )

    def _round_params(self, state: pb.GetSecAggStateResponse) -> SecAggParams:
        """The round's parameters from the aggregator, checked against what Join allowed and this
        agent's privacy policy: no wider a code than Join's ring, no fewer levels, no sum of the
        roster able to wrap, no fewer agents than ``privacy.min_agents_per_sum``, a threshold above
        half of each agent's share holders plus ``privacy.colluders``."""
        widest = self.settings.ring_bits or RING_BITS
        group = state.codes_per_element or 1
        if not (0 < state.ring_bits <= RING_BITS and state.ring_bits <= widest * group):
            raise FailedPrecondition(
                f"round {self.round_id}: the aggregator set {state.ring_bits}-bit elements of {group}"
                f" codes; this federation allows up to {widest} bits a code"
            )
        if self.settings.levels and state.max_code < self.settings.levels - 1:
            raise FailedPrecondition(
                f"round {self.round_id}: codes up to {state.max_code}, fewer than the federation's"
                f" {self.settings.levels} levels"
            )
        if state.coverage != self.settings.coverage:  # fewer senders would tell the aggregator more
            raise FailedPrecondition(
                f"round {self.round_id}: {state.coverage or 'all'} agents an element, but this federation"
                f" joined with {self.settings.coverage or 'all'}"
            )
        try:
            check_settings(state.coverage, self.settings.neighbours)
            params = self._params(state.threshold, state)
            senders = params.senders(len(state.roster))
            if not params.fixed_point.contributors_fit(senders):  # also checks the layout
                raise ConfigError(f"{senders} agents' codes up to {state.max_code} can wrap")
            least = self.policy.min_agents_per_sum
            if len(state.roster) < least:
                raise PolicyRefused(
                    f"round {self.round_id}: {len(state.roster)} agents, fewer than"
                    f" privacy.min_agents_per_sum ({least}) whose sum the aggregator may learn"
                )
            # no threshold under which the aggregator (and colluders) could collect both our secrets
            colluders = self.policy.colluders
            check_parameters(len(state.roster), self.settings.neighbours, state.threshold, colluders)
            return params
        except ConfigError as exc:
            raise FailedPrecondition(f"round {self.round_id}: {exc}") from exc

    async def keys(self) -> None:
        """Advertise, verify the roster and share; then receive the neighbours' shares (UPLOAD phase)."""
        # No certificate or id: the aggregator attaches those of our TLS session (peers verify them).
        await self.client.advertise_keys(advertise_request(self.protocol.advertise()))
        state = await self.client.secagg_state(self.round_id, pb.ROUND_PHASE_SHARE_KEYS, self.wait_s)
        self.protocol.params = self._round_params(state)
        self.protocol.graph_seed = state.graph_seed
        self.weight_scale = state.weight_scale or 1.0
        if self.settings.adaptive_clip > 0:
            if not state.clip_segment:
                raise FailedPrecondition(f"round {self.round_id}: adaptive clipping, but no clip bounds sent")
            self.clips = SegmentClips(state.clip_segment, np.asarray(state.segment_clips, dtype=np.float32))
        roster = [advertisement_from_pb(a) for a in state.roster]
        self.roster_ids = [a.agent_id for a in roster]
        if self.roster_ids != sorted(set(self.roster_ids)):  # shares name peers by position in it
            raise RosterError(f"round {self.round_id}: the roster is not ordered by agent id")
        sealed = await asyncio.to_thread(self.protocol.share_keys, roster)  # RosterError: we refuse the round
        await self.client.share_keys(share_request(self.round_id, sealed, self.roster_ids))
        state = await self.client.secagg_state(self.round_id, pb.ROUND_PHASE_UPLOAD, self.wait_s)
        self.protocol.receive_shares(sealed_from_pb(state.shares, self.roster_ids))
        log.info(
            "round %d: keys verified for %d agents; masking with %d neighbours (threshold %d)",
            self.round_id,
            len(roster),
            len(self.protocol.masked_with),
            state.threshold,
        )

    def weight(self, num_examples: int) -> float:
        """This agent's weight in (0, 1]: its examples over the round's largest count."""
        return update_weight(num_examples, self.weight_scale)

    def mask(self, vector: np.ndarray, weight: float) -> bytes:
        """``[w * delta, w * clip]`` in fixed point, masked: the bytes that leave the cloud."""
        fp = self.protocol.params.fixed_point
        if self.clips is not None:
            vector = self.clips.scale_down(vector)  # InvalidArgument if the bounds do not fit
        clipped = float(np.mean(np.abs(vector) > fp.clip / weight))
        metrics.CLIPPED_RATIO.labels(**self.client.labels).set(clipped)
        if clipped > 0.01:
            log.warning("round %d: %.1f%% of coordinates exceed their clip", self.round_id, 100 * clipped)
        with metrics.step("mask"):
            elements = fp.masked_length(vector.size)
            codes = fp.encode_weighted(vector, weight, self.protocol.rounding(elements=elements))
            return fp.to_wire(self.protocol.mask_codes(codes))

    async def unmask(self) -> None:
        """Answer the unmask request if this agent's input is in the sum."""
        state = await self.client.secagg_state(self.round_id, pb.ROUND_PHASE_UNMASK, self.wait_s)
        if self.protocol.agent_id not in state.survivors:
            raise FailedPrecondition(f"round {self.round_id}: our masked update did not make it into the sum")
        reveals = self.protocol.unmask(list(state.survivors), list(state.dropped))
        await self.client.reveal_shares(reveal_request(self.round_id, reveals, self.roster_ids))
        log.info(
            "round %d: revealed shares for %d survivors and %d dropped agents",
            self.round_id,
            len(state.survivors),
            len(state.dropped),
        )
