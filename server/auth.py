"""Authentication and authorisation of agents from their TLS certificates."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc

from common.errors import PermissionDenied, Unauthenticated
from common.grpc_wrap import AroundInterceptor, Context
from common.identity import SpiffeId, current_peer
from common.tls import peer_spiffe_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AccessPolicy:
    """Who may call the aggregator.

    ``allowed_agents`` holds SPIFFE id patterns (``fnmatch``, e.g.
    ``spiffe://example.org/cloud/aws/agent/*``); empty allows every agent of
    the trust domain.
    """

    trust_domain: str
    allowed_agents: Sequence[str] = ()

    def authorize(self, auth_context: Mapping[str, Iterable[bytes]]) -> SpiffeId:
        """The caller's identity, or raise Unauthenticated / PermissionDenied."""
        peer = peer_spiffe_id(auth_context)
        if peer.trust_domain != self.trust_domain:
            raise Unauthenticated(f"{peer} is outside trust domain {self.trust_domain}")
        if self.allowed_agents and not any(fnmatch.fnmatchcase(peer.uri, p) for p in self.allowed_agents):
            raise PermissionDenied(f"{peer} is not in the allow-list")
        return peer


def auth_interceptor(policy: AccessPolicy) -> AroundInterceptor:
    """The one interceptor that authenticates every call and sets ``current_peer``."""

    @asynccontextmanager
    async def around(context: Context, method: str) -> AsyncIterator[None]:
        try:
            peer = policy.authorize(context.auth_context())
        except (Unauthenticated, PermissionDenied) as exc:
            code = (
                grpc.StatusCode.PERMISSION_DENIED
                if isinstance(exc, PermissionDenied)
                else grpc.StatusCode.UNAUTHENTICATED
            )
            log.warning("rejected %s: %s", method, exc)
            await context.abort(code, str(exc))
        token = current_peer.set(peer)
        try:
            yield
        finally:
            # A stream closed by the server's shutdown runs this in another task's context,
            # where there is nothing to reset (the handler's own context is gone with it).
            with contextlib.suppress(ValueError):
                current_peer.reset(token)

    return AroundInterceptor(around)
