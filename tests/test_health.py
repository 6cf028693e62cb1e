"""The plaintext probe port serves the gRPC health service and nothing else."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.cloudfed.v1 import federation_pb2 as pb
from protos.cloudfed.v1 import federation_pb2_grpc as pb_grpc
from server.app import SERVICE_NAME


async def test_health_answers_on_plaintext_port_and_nothing_else(start_aggregator) -> None:
    run = await start_aggregator()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{run.agg.health_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", SERVICE_NAME):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.FederationServiceStub(ch).Join(pb.JoinRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # Reflection is opt-in: off by default.
        call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(timeout=5)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_shutdown_reports_not_serving_before_closing(start_aggregator) -> None:
    import asyncio

    run = await start_aggregator()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{run.agg.health_port}") as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(run.agg.stop(grace=1))
        second = await watch.read()
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping


async def test_plaintext_client_cannot_reach_the_mtls_port(start_aggregator) -> None:
    run = await start_aggregator()
    async with grpc.aio.insecure_channel(run.target) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.FederationServiceStub(ch).Join(pb.JoinRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert run.agg.rounds.agents == {}


async def test_reflection_is_served_on_the_health_port_when_enabled(pki, tmp_path) -> None:
    import dataclasses

    from server.app import build_aggregator
    from tests.conftest import aggregator_config, seed_store, small_adapter

    seed_store(tmp_path, small_adapter())
    agg = build_aggregator(dataclasses.replace(aggregator_config(pki, tmp_path), enable_reflection=True))
    await agg.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{agg.health_port}") as ch:
            call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(timeout=5)
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            reply = await call.read()
            await call.done_writing()
    finally:
        await agg.stop(0)
    names = {s.name for s in reply.list_services_response.service}
    assert "grpc.health.v1.Health" in names
    assert SERVICE_NAME not in names  # the federation API is never on the plaintext port
