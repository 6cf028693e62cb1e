"""Wrap aio RPC method handlers so interceptors can run code around each call.

An interceptor supplies ``around(context, method)``: an async context manager
entered around the call. It may yield per-call hooks whose ``received()`` and
``sent()`` are called for every request and response message.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import grpc

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
if TYPE_CHECKING:
    _InterceptorBase = grpc.aio.ServerInterceptor[Any, Any]
else:
    _InterceptorBase = grpc.aio.ServerInterceptor


class CallHooks(Protocol):
    """Per-call message observers."""

    def received(self, message: Any) -> None:
        """One request message arrived."""

    def sent(self, message: Any) -> None:
        """One response message left."""


Around = Callable[[Context, str], AbstractAsyncContextManager["CallHooks | None"]]
"""Factory of an async context manager entered around one call: (context, method)."""


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def _counted(requests: AsyncIterator[Any], hooks: CallHooks) -> AsyncIterator[Any]:
    async for request in requests:
        hooks.received(request)
        yield request


def wrap_handler(handler: Handler, method: str, around: Around) -> Handler:
    """Return a handler that runs ``around(context, method)`` around the original."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        uu: Callable[..., Any] = handler.unary_unary

        async def unary_unary(request: Any, context: Context) -> Any:
            async with around(context, method) as hooks:
                if hooks:
                    hooks.received(request)
                response = await _maybe_await(uu(request, context))
                if hooks:
                    hooks.sent(response)
                return response

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
    if handler.stream_unary is not None:
        su: Callable[..., Any] = handler.stream_unary

        async def stream_unary(requests: Any, context: Context) -> Any:
            async with around(context, method) as hooks:
                response = await _maybe_await(su(_counted(requests, hooks) if hooks else requests, context))
                if hooks:
                    hooks.sent(response)
                return response

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
    if handler.unary_stream is not None:
        us: Callable[..., Any] = handler.unary_stream

        async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            async with around(context, method) as hooks:
                if hooks:
                    hooks.received(request)
                async for item in us(request, context):
                    if hooks:
                        hooks.sent(item)
                    yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
    ss: Callable[..., Any] | None = handler.stream_stream
    assert ss is not None

    async def stream_stream(requests: Any, context: Context) -> AsyncIterator[Any]:
        async with around(context, method) as hooks:
            async for item in ss(_counted(requests, hooks) if hooks else requests, context):
                if hooks:
                    hooks.sent(item)
                yield item

    return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)


class AroundInterceptor(_InterceptorBase):
    """A server interceptor that enters an async context manager around every call."""

    def __init__(self, around: Around) -> None:
        self._around = around

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler: Handler | None = await continuation(handler_call_details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
            return handler  # type: ignore[return-value]
        return wrap_handler(handler, handler_call_details.method, self._around)
