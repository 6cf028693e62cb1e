"""gRPC client metrics for the agent's channel (grpc_client_* names, as community dashboards use)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import Counter, Histogram

from common.metrics import LATENCY_BUCKETS, MESSAGE_KINDS, TRANSFER_BYTES

_LABELS = ["grpc_type", "grpc_service", "grpc_method"]
STARTED = Counter("grpc_client_started", "RPCs started by the client.", _LABELS)
HANDLED = Counter(
    "grpc_client_handled", "RPCs completed by the client, by status code.", [*_LABELS, "grpc_code"]
)
MSG_SENT = Counter("grpc_client_msg_sent", "Stream messages sent by the client.", _LABELS)
MSG_RECEIVED = Counter("grpc_client_msg_received", "Stream messages received by the client.", _LABELS)
HANDLING = Histogram(
    "grpc_client_handling_seconds",
    "Time from start to end of an RPC on the client.",
    _LABELS,
    buckets=LATENCY_BUCKETS,
)


if TYPE_CHECKING:
    _UU = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _US = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _SU = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _SS = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:
    _UU, _US = grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor
    _SU, _SS = grpc.aio.StreamUnaryClientInterceptor, grpc.aio.StreamStreamClientInterceptor


class _ClientMetrics:
    """Counting and timing shared by the four interceptor shapes."""

    def __init__(self, rpc_types: dict[str, str], peer: dict[str, str]) -> None:
        self._types = rpc_types
        self._peer = peer  # {"cloud", "agent"} of this agent, filled in by the client after Join
        self._pending: set[asyncio.Task[None]] = set()

    def _control(self, labels: dict[str, str], direction: str, message: Any) -> None:
        kind = MESSAGE_KINDS.get(labels["grpc_method"])
        if kind is not None:
            TRANSFER_BYTES.labels(direction=direction, kind=kind, **self._peer).inc(message.ByteSize())

    def _labels(self, details: grpc.aio.ClientCallDetails) -> dict[str, str]:
        method = details.method.decode() if isinstance(details.method, bytes) else str(details.method)
        service, _, name = method.lstrip("/").rpartition("/")
        return {"grpc_type": self._types.get(method, "unary"), "grpc_service": service, "grpc_method": name}

    def _start(self, labels: dict[str, str]) -> float:
        STARTED.labels(**labels).inc()
        return time.perf_counter()

    @staticmethod
    def _finish(labels: dict[str, str], began: float, code: grpc.StatusCode) -> None:
        HANDLING.labels(**labels).observe(time.perf_counter() - began)
        HANDLED.labels(**labels, grpc_code=code.name).inc()

    def _on_done(self, labels: dict[str, str], began: float, unary_response: bool) -> Callable[[Any], None]:
        async def record(call: Any) -> None:
            code = await call.code()
            if code == grpc.StatusCode.OK and unary_response:
                MSG_RECEIVED.labels(**labels).inc()
                self._control(labels, "received", await call)
            self._finish(labels, began, code)

        def done(call: Any) -> None:
            task = asyncio.ensure_future(record(call))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

        return done

    async def _counted_requests(self, requests: Any, labels: dict[str, str]) -> AsyncIterator[Any]:
        sent = MSG_SENT.labels(**labels)
        if hasattr(requests, "__aiter__"):
            async for request in requests:
                sent.inc()
                self._control(labels, "sent", request)
                yield request
        else:
            for request in requests:
                sent.inc()
                self._control(labels, "sent", request)
                yield request

    async def _responses(self, call: Any, labels: dict[str, str], began: float) -> AsyncIterator[Any]:
        received = MSG_RECEIVED.labels(**labels)
        code = grpc.StatusCode.OK
        try:
            async for response in call:
                received.inc()
                self._control(labels, "received", response)
                yield response
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self._finish(labels, began, code)


class _UnaryUnary(_ClientMetrics, _UU):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        labels = self._labels(details)
        began = self._start(labels)
        MSG_SENT.labels(**labels).inc()
        self._control(labels, "sent", request)
        call = await continuation(details, request)
        call.add_done_callback(self._on_done(labels, began, unary_response=True))
        return call


class _StreamUnary(_ClientMetrics, _SU):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        labels = self._labels(details)
        began = self._start(labels)
        call = await continuation(details, self._counted_requests(request_iterator, labels))
        call.add_done_callback(self._on_done(labels, began, unary_response=True))
        return call


class _UnaryStream(_ClientMetrics, _US):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        labels = self._labels(details)
        began = self._start(labels)
        MSG_SENT.labels(**labels).inc()
        self._control(labels, "sent", request)
        return self._responses(await continuation(details, request), labels, began)


class _StreamStream(_ClientMetrics, _SS):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        labels = self._labels(details)
        began = self._start(labels)
        call = await continuation(details, self._counted_requests(request_iterator, labels))
        return self._responses(call, labels, began)


def client_metrics_interceptors(rpc_types: dict[str, str], peer: dict[str, str]) -> list[Any]:
    """One interceptor per call shape (grpc.aio files each interceptor under one shape only)."""
    return [cls(rpc_types, peer) for cls in (_UnaryUnary, _StreamUnary, _UnaryStream, _StreamStream)]
