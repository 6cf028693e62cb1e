"""The plaintext gRPC health port: a minimal server for the agent, and a client wait until SERVING."""

from __future__ import annotations

import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def wait_serving(target: str, timeout: float = 60.0, service: str = "") -> None:
    """Block until the health service at ``target`` reports SERVING; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(target) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2
                )
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{target} not SERVING after {timeout:.0f}s")


class HealthPort:
    """A plaintext server with only the standard health service, for probes (liveness of the event loop)."""

    def __init__(self, listen: str) -> None:
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self._servicer: Any = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, self._server)
        self.port = self._server.add_insecure_port(listen)

    async def start(self) -> None:
        """Serve and report SERVING for the whole server ('')."""
        await self._server.start()
        await self._servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float = 1.0) -> None:
        """Report NOT_SERVING, then stop."""
        await self._servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.stop(grace)
