"""Build the aggregator's gRPC servers: mTLS federation API and plaintext health port."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.codecs.registry import CodecSettings
from common.codecs.state import CodecState
from common.config import AggregatorConfig, FederationConfig
from common.grpc_errors import error_interceptor
from common.grpc_options import server_options
from common.metrics import grpc_metrics_interceptor, publish_validity, rpc_types_of
from common.tls import ReloadingServerCredentials
from protos.cloudfed.v1 import federation_pb2, federation_pb2_grpc
from server.auth import AccessPolicy, auth_interceptor
from server.autoencoder import AutoencoderPlan
from server.checkpoints import CheckpointStore
from server.fetchsgd import FetchSGDPlan
from server.optimizer import make_optimizer
from server.revocations import RevocationWatch
from server.rounds import RoundCoordinator
from server.servicer import FederationServicer
from server.spool import UploadSpool
from server.state import StateDB

log = logging.getLogger(__name__)
SERVICE_NAME = federation_pb2.DESCRIPTOR.services_by_name["FederationService"].full_name


@dataclass
class Aggregator:
    """The running pieces of one aggregator."""

    config: AggregatorConfig
    rounds: RoundCoordinator
    spool: UploadSpool
    server: grpc.aio.Server
    port: int
    credentials: ReloadingServerCredentials
    access: AccessPolicy
    health_server: grpc.aio.Server | None
    health_port: int
    health: Any  # grpc_health.v1.health.aio.HealthServicer (untyped in the stubs)
    _crl_poll: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start both servers and mark the service SERVING."""
        revocations = self.access.revocations
        if revocations is not None:
            self._crl_poll = asyncio.create_task(revocations.poll(self.config.tls.crl_poll_s))
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Mark NOT_SERVING, then stop both servers, letting calls finish within ``grace``."""
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(grace)
        if self._crl_poll is not None:
            self._crl_poll.cancel()
            await asyncio.gather(self._crl_poll, return_exceptions=True)

    def reload(self) -> None:
        """Re-read the certificates at the next handshake and the CRL now (SIGHUP)."""
        self.credentials.reload()
        if self.access.revocations is not None:
            self.access.revocations.refresh(force=True)


def autoencoder_plan(f: FederationConfig) -> AutoencoderPlan | None:
    """The autoencoder's shape and schedule, when the federation uses it."""
    if f.codec != "autoencoder":
        return None
    return AutoencoderPlan(
        f.codec_ratio,
        f.autoencoder_block,
        f.autoencoder_hidden,
        f.autoencoder_decoder == "linear",
        f.autoencoder_warmup_rounds,
        f.autoencoder_refresh_every,
        seed=f.seed,
    )


def build_aggregator(config: AggregatorConfig) -> Aggregator:
    """Create (not start) the servers; ports bound, 0 means any free port."""
    state = config.state_dir
    spool = UploadSpool(state / "uploads", config.limits.max_update_bytes, config.limits.max_chunk_bytes)
    f = config.federation
    rounds = RoundCoordinator(
        config.rounds,
        CheckpointStore(state / "checkpoints"),
        spool,
        StateDB(state / "cloudfed.db"),
        make_optimizer(f.server_optimizer, f.server_lr, state / "optimizer"),
        CodecSettings(f.codec, f.codec_ratio, f.codec_bits, f.codec_clip, f.seed, segment=f.codec_segment),
        config.secagg,
        CodecState.of(f.codec_state) if f.codec == "eigen" and f.codec_state is not None else None,
        autoencoder_plan(f),
        FetchSGDPlan(f.fetchsgd_topk, f.fetchsgd_momentum),
        config.checkpoints,
    )
    credentials = ReloadingServerCredentials(config.tls.files(), on_load=publish_validity)
    tls = config.tls
    revocations = RevocationWatch(tls.crl, tls.ca) if tls.crl is not None else None
    access = AccessPolicy(config.trust_domain, config.allowed_agents, revocations, rounds.expel)
    server = grpc.aio.server(
        interceptors=[
            grpc_metrics_interceptor(
                rpc_types_of(federation_pb2.DESCRIPTOR.services_by_name["FederationService"])
            ),
            auth_interceptor(access),
            error_interceptor(),
        ],
        options=server_options(config.max_connection_age_s),
    )
    federation_pb2_grpc.add_FederationServiceServicer_to_server(
        FederationServicer(config, rounds, spool, revocations), server
    )
    port = server.add_secure_port(config.listen, credentials.credentials())
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_server, health_port = None, 0
    if config.health_listen:
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        services = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        if config.enable_reflection:
            from grpc_reflection.v1alpha import reflection

            services.append(reflection.SERVICE_NAME)
            reflection.enable_server_reflection(services, health_server)
        if config.enable_channelz:
            try:
                from grpc_channelz.v1 import channelz
            except ImportError as exc:
                raise RuntimeError("enable_channelz needs the grpcio-channelz package") from exc
            channelz.add_channelz_servicer(health_server)  # type: ignore[arg-type]
        health_port = health_server.add_insecure_port(config.health_listen)
    return Aggregator(
        config, rounds, spool, server, port, credentials, access, health_server, health_port, health_servicer
    )
