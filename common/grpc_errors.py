"""Map domain errors to gRPC status codes, in one place."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from common import errors
from common.grpc_wrap import AroundInterceptor, Context

log = logging.getLogger(__name__)

STATUS_OF: dict[type[errors.CloudfedError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(exc: errors.CloudfedError) -> grpc.StatusCode:
    """The status code for a domain error (most specific class wins)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


@asynccontextmanager
async def map_errors(context: Context) -> AsyncIterator[None]:
    """Turn domain errors raised inside a handler into the matching status."""
    try:
        yield
    except errors.CloudfedError as exc:
        code = status_of(exc)
        log.info("rpc failed with %s: %s", code.name, exc)
        await context.abort(code, str(exc))


def error_interceptor() -> AroundInterceptor:
    """A server interceptor applying ``map_errors`` to every call."""
    return AroundInterceptor(lambda context, _method: map_errors(context))
