"""FederationService: thin gRPC adapter over the coordinator, spool and store."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator

from google.protobuf import timestamp_pb2

from common.codecs.registry import CodecSettings
from common.config import AggregatorConfig
from common.errors import InvalidArgument, NotFound
from common.grpc_wrap import Context
from common.identity import require_peer
from common.secagg_pb import (
    DECLINE_REASONS,
    EVAL_WITHHELD_REASONS,
    advertisement_from_pb,
    advertisement_to_pb,
    reveals_from_pb,
    sealed_from_pb,
    sealed_to_pb,
)
from common.tls import peer_certificate, peer_certificate_pem
from common.wire import WIRE_REVISION, check_joiner
from protos.cloudfed.v1 import federation_pb2 as pb
from protos.cloudfed.v1 import federation_pb2_grpc as pb_grpc
from server.admission import admit, differential_privacy
from server.downloads import send_codec_state, send_model
from server.invitations import AgentInfo
from server.revocations import RevocationWatch
from server.rounds import Phase, RoundCoordinator, RoundState
from server.spool import UploadSpool
from server.state import AgentCertificate, WithheldEval
from server.uploads import receive_upload
from server.version_ranking import AgentEval, describe

log = logging.getLogger(__name__)


def settings_of(config: AggregatorConfig, rounds: RoundCoordinator) -> pb.FederationSettings:
    """The federation settings sent in JoinResponse."""
    f = config.federation
    layout = pb.ParamLayout(
        params=[
            pb.ParamSpec(
                name=e.name,
                shape=e.shape,
                dtype=pb.ElementType.Value(f"ELEMENT_TYPE_{e.dtype.upper()}"),
                offset=e.offset,
            )
            for e in rounds.layout.entries
        ],
        digest=rounds.layout.digest,
    )
    return pb.FederationSettings(
        federation_id=f.federation_id,
        model_id=f.model_id,
        layout=layout,
        codec=codec_spec(rounds.codec),
        secagg=pb.SecAggSettings(
            enabled=config.secagg.enabled,
            threshold=config.secagg.threshold,
            neighbours=config.secagg.neighbours,
            clip=config.secagg.clip,
            bits=config.secagg.weight_bits,
            ring_bits=config.secagg.ring_bits(config.rounds.max_agents),
            levels=config.secagg.code_levels,
            adaptive_clip=config.secagg.adaptive_clip,
            clip_segment=config.secagg.clip_segment,
            coverage=config.secagg.coverage,
        ),
        chunk_limits=pb.ChunkLimits(
            max_chunk_bytes=config.limits.max_chunk_bytes, max_update_bytes=config.limits.max_update_bytes
        ),
        lora=pb.LoraSettings(
            rank=f.lora_rank, alpha=f.lora_alpha, target_modules=f.target_modules, dropout=f.lora_dropout
        ),
        training=pb.TrainingSettings(
            local_steps=f.local_steps,
            learning_rate=f.learning_rate,
            batch_size=f.batch_size,
            sequence_length=f.sequence_length,
            seed=f.seed,
        ),
    )


def codec_spec(codec: CodecSettings) -> pb.CodecSpec:
    """The codec and its parameters as sent with Join (agents echo them in every upload header)."""
    spec = pb.CodecSpec(name=codec.name)
    spec.params.update(codec.params())
    return spec


def event_of(state: RoundState, agent_uri: str) -> pb.RoundEvent:
    """A round state as the watching agent sees it."""
    deadline = timestamp_pb2.Timestamp()
    if state.deadline:
        deadline.FromNanoseconds(int(state.deadline * 1e9))
    return pb.RoundEvent(
        round_id=state.round_id,
        phase=pb.RoundPhase.ValueType(int(state.phase)),
        global_version=state.global_version,
        participant=agent_uri in state.participants,
        phase_deadline=deadline if state.deadline else None,
        reason=state.reason,
        codec=codec_spec(state.codec) if state.codec is not None else None,
        not_invited=state.left_out.get(agent_uri, ""),
    )


DECLINE_LABELS = {wire: label for label, wire in DECLINE_REASONS.items()}
"""The ``reason`` label of cloudfed_rounds_declined_total, by wire reason."""
WITHHELD_LABELS = {wire: label for label, wire in EVAL_WITHHELD_REASONS.items()}
"""The ``reason`` label of cloudfed_evals_withheld_total, by wire reason."""


class FederationServicer(pb_grpc.FederationServiceServicer):
    """Each handler reads the caller from the auth interceptor and delegates."""

    def __init__(
        self,
        config: AggregatorConfig,
        rounds: RoundCoordinator,
        spool: UploadSpool,
        revocations: RevocationWatch | None = None,
    ) -> None:
        self._config = config
        self._rounds = rounds
        self._spool = spool
        self._revocations = revocations

    async def Join(self, request: pb.JoinRequest, context: Context) -> pb.JoinResponse:
        peer = require_peer()
        check_joiner(
            request.wire_revision, request.supported_codecs, self._rounds.codec.name, request.software_version
        )
        policy = request.privacy
        announced = policy if request.HasField("privacy") else None
        admit(peer, announced, self._config)
        shown, guarantee = differential_privacy(announced)
        info = AgentInfo(
            request.num_examples,
            request.software_version,
            colluders=policy.colluders,
            min_agents_per_sum=policy.min_agents_per_sum,
            budget_spent=policy.budget_spent,
            differential_privacy=shown,
            announced_dp=guarantee,
        )
        certificate = peer_certificate(context.auth_context())
        await self._rounds.join(peer, info, AgentCertificate.of(certificate))
        log.info(
            "%s joined (software %s, %d examples, %s x%d; masking %s, sums over >= %d, %d colluders; DP %s)",
            peer,
            request.software_version,
            request.num_examples,
            request.device.accelerator or "?",
            request.device.device_count,
            "required" if policy.require_masking else "not required",
            policy.min_agents_per_sum or 2,
            policy.colluders,
            info.differential_privacy or "not announced",
        )
        return pb.JoinResponse(
            agent_id=peer.uri,
            settings=settings_of(self._config, self._rounds),
            global_version=self._rounds.state.global_version,
            wire_revision=WIRE_REVISION,
        )

    async def WatchRounds(
        self, request: pb.WatchRoundsRequest, context: Context
    ) -> AsyncIterator[pb.WatchRoundsResponse]:
        peer = require_peer()
        async for state in self._rounds.watch(peer):
            yield pb.WatchRoundsResponse(event=event_of(state, peer.uri))

    async def DownloadModel(
        self, request: pb.DownloadModelRequest, context: Context
    ) -> AsyncIterator[pb.DownloadModelResponse]:
        version = request.version or self._rounds.state.global_version
        messages = send_model(
            require_peer(), self._rounds.store, version, request.offset, self._config.limits.max_chunk_bytes
        )
        async for message in messages:
            yield message

    async def DownloadCodecState(
        self, request: pb.DownloadCodecStateRequest, context: Context
    ) -> AsyncIterator[pb.DownloadCodecStateResponse]:
        messages = send_codec_state(
            require_peer(),
            self._rounds.codec_state(request.sha256.hex()),
            request.sha256,
            request.offset,
            self._config.limits.max_chunk_bytes,
        )
        async for message in messages:
            yield message

    async def UploadUpdate(
        self, request_iterator: AsyncIterator[pb.UploadUpdateRequest], context: Context
    ) -> pb.UploadUpdateResponse:
        return await receive_upload(require_peer(), request_iterator, self._spool, self._rounds)

    async def GetUploadStatus(
        self, request: pb.GetUploadStatusRequest, context: Context
    ) -> pb.GetUploadStatusResponse:
        committed, verified = self._spool.status(require_peer(), request.upload_id)
        return pb.GetUploadStatusResponse(
            upload_id=request.upload_id, committed_bytes=committed, digest_verified=verified
        )

    async def ReportEval(self, request: pb.ReportEvalRequest, context: Context) -> pb.ReportEvalResponse:
        peer = require_peer()
        report = AgentEval(request.eval_loss, request.eval_tokens, request.eval_loss_stddev)
        if request.withheld:
            why = WITHHELD_LABELS.get(request.withheld_reason, "unspecified")
            withheld = WithheldEval(request.global_version, why, request.withheld)
            self._rounds.evals.withheld(peer, withheld, report)
            log.info("%s: eval loss of version %d withheld (%s): %s", peer, *withheld)
            return pb.ReportEvalResponse()
        if request.withheld_reason:
            raise InvalidArgument("withheld_reason is set but withheld is empty: say why in withheld")
        self._rounds.evals.record(peer, request.global_version, report)
        log.info("%s: eval loss %s at version %d", peer, describe({peer.uri: report}), request.global_version)
        return pb.ReportEvalResponse()

    async def AdvertiseKeys(
        self, request: pb.AdvertiseKeysRequest, context: Context
    ) -> pb.AdvertiseKeysResponse:
        # The certificate peers verify is the one this connection was authenticated with: agents
        # send none (it reached us in the TLS handshake), and one in the message is not trusted.
        certificate = peer_certificate_pem(context.auth_context())
        adv = dataclasses.replace(advertisement_from_pb(request.advertisement), certificate_pem=certificate)
        ca_pem = await asyncio.to_thread(self._config.tls.ca.read_bytes)  # as rotated on disk
        await self._rounds.advertise_keys(require_peer(), adv, ca_pem)
        return pb.AdvertiseKeysResponse()

    async def ShareKeys(self, request: pb.ShareKeysRequest, context: Context) -> pb.ShareKeysResponse:
        peer = require_peer()
        roster = self._rounds.roster_ids(peer, request.round_id, Phase.SHARE_KEYS)
        await self._rounds.share_keys(peer, request.round_id, sealed_from_pb(request.shares, roster))
        return pb.ShareKeysResponse()

    async def GetSecAggState(
        self, request: pb.GetSecAggStateRequest, context: Context
    ) -> pb.GetSecAggStateResponse:
        view = await self._rounds.secagg_state(require_peer(), request.round_id, request.phase)
        return pb.GetSecAggStateResponse(
            round_id=request.round_id,
            phase=pb.RoundPhase.ValueType(int(view.phase)),
            roster=[advertisement_to_pb(a) for a in view.roster],
            graph_seed=view.graph_seed,
            threshold=view.threshold,
            ring_bits=view.ring_bits,
            max_code=view.max_code,
            code_base=view.code_base,
            codes_per_element=view.group,
            coverage=view.coverage,
            weight_scale=view.weight_scale,
            shares=sealed_to_pb(view.shares, [a.agent_id for a in view.roster]),
            survivors=view.survivors,
            dropped=view.dropped,
            clip_segment=view.clips.segment if view.clips is not None else 0,
            segment_clips=view.clips.bounds.tolist() if view.clips is not None else [],
        )

    async def RevealShares(
        self, request: pb.RevealSharesRequest, context: Context
    ) -> pb.RevealSharesResponse:
        peer = require_peer()
        roster = self._rounds.roster_ids(peer, request.round_id, Phase.UNMASK)
        await self._rounds.reveal_shares(peer, request.round_id, reveals_from_pb(request.shares, roster))
        return pb.RevealSharesResponse()

    async def DeclineRound(
        self, request: pb.DeclineRoundRequest, context: Context
    ) -> pb.DeclineRoundResponse:
        reason = DECLINE_LABELS.get(request.reason, "unspecified")
        await self._rounds.decline(require_peer(), request.round_id, reason, request.detail)
        return pb.DeclineRoundResponse()

    async def GetRevocationList(
        self, request: pb.GetRevocationListRequest, context: Context
    ) -> pb.GetRevocationListResponse:
        require_peer()
        if self._revocations is None:
            raise NotFound("this aggregator enforces no certificate revocation list (tls.crl)")
        return pb.GetRevocationListResponse(crl_pem=self._revocations.pem)
