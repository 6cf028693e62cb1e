"""Authentication and authorisation of agents from their TLS certificates."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc
from cryptography import x509

from common.errors import CertificateRevoked, PermissionDenied, Unauthenticated
from common.grpc_wrap import AroundInterceptor, Context
from common.identity import SpiffeId, current_peer
from common.revocation import RevocationList
from common.tls import peer_certificate, spiffe_id_of
from server.metrics import REVOKED_CALLS
from server.revocations import RevocationWatch

log = logging.getLogger(__name__)


class LiveCalls:
    """The calls in flight with their callers' certificates, so revocation can end them."""

    def __init__(self) -> None:
        self._calls: dict[asyncio.Task[object], tuple[SpiffeId, x509.Certificate]] = {}
        self._ended: dict[asyncio.Task[object], str] = {}

    @contextlib.contextmanager
    def track(self, task: asyncio.Task[object], peer: SpiffeId, cert: x509.Certificate) -> Iterator[None]:
        """Register ``task`` as a call of ``peer`` for as long as the block runs."""
        self._calls[task] = (peer, cert)
        try:
            yield
        finally:
            del self._calls[task]
            self._ended.pop(task, None)

    def end_revoked(self, revocations: RevocationList) -> int:
        """Cancel every live call whose certificate ``revocations`` lists; how many."""
        ended = 0
        for task, (peer, cert) in list(self._calls.items()):
            revoked = revocations.lookup(cert)
            if revoked is None or task in self._ended:
                continue
            self._ended[task] = f"the certificate of {peer} ({revoked.describe()})"
            REVOKED_CALLS.labels(peer.cloud, peer.name, "ended").inc()
            log.warning("ending a call of %s: its certificate %s", peer, revoked.describe())
            task.cancel()
            ended += 1
        return ended

    def revoked_reason(self, task: asyncio.Task[object]) -> str | None:
        """Why ``task`` was cancelled by revocation, or None if it was not."""
        return self._ended.get(task)

    def __len__(self) -> int:
        return len(self._calls)


@dataclass
class AccessPolicy:
    """Who may call the aggregator.

    ``allowed_agents`` holds SPIFFE id patterns (``fnmatch``, e.g.
    ``spiffe://example.org/cloud/aws/agent/*``); empty allows every agent of
    the trust domain. With ``revocations``, certificates its CRL lists are
    refused, and calls already running end when a new CRL lists theirs;
    ``on_revoked`` hears of each such caller (the coordinator takes it out of
    the round in progress).
    """

    trust_domain: str
    allowed_agents: Sequence[str] = ()
    revocations: RevocationWatch | None = None
    on_revoked: Callable[[SpiffeId, str], Awaitable[None]] | None = None
    live: LiveCalls = field(default_factory=LiveCalls)

    def __post_init__(self) -> None:
        if self.revocations is not None:
            self.revocations.on_change = self.live.end_revoked

    def authorize(self, auth_context: Mapping[str, Iterable[bytes]]) -> tuple[SpiffeId, x509.Certificate]:
        """The caller's identity and certificate, or raise Unauthenticated / PermissionDenied."""
        cert = peer_certificate(auth_context)
        peer = spiffe_id_of(cert)
        if peer.trust_domain != self.trust_domain:
            raise Unauthenticated(f"{peer} is outside trust domain {self.trust_domain}")
        revoked = self.revocations.current.lookup(cert) if self.revocations is not None else None
        if revoked is not None:
            REVOKED_CALLS.labels(peer.cloud, peer.name, "refused").inc()
            raise CertificateRevoked(peer, f"the certificate of {peer} is revoked: {revoked.describe()}")
        if self.allowed_agents and not any(fnmatch.fnmatchcase(peer.uri, p) for p in self.allowed_agents):
            raise PermissionDenied(f"{peer} is not in the allow-list")
        return peer, cert

    async def revoked(self, peer: SpiffeId, why: str) -> None:
        """Tell ``on_revoked`` that ``peer`` called with a revoked certificate."""
        if self.on_revoked is not None:
            await self.on_revoked(peer, why)


def auth_interceptor(policy: AccessPolicy) -> AroundInterceptor:
    """The one interceptor that authenticates every call and sets ``current_peer``.

    A call whose certificate is revoked while it runs (a Watch stream, a wait for
    a phase) ends with UNAUTHENTICATED as soon as the aggregator takes the new CRL.
    """

    @asynccontextmanager
    async def around(context: Context, method: str) -> AsyncIterator[None]:
        try:
            peer, cert = policy.authorize(context.auth_context())
        except CertificateRevoked as exc:
            log.warning("rejected %s: %s", method, exc)
            await policy.revoked(exc.peer, str(exc))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except (Unauthenticated, PermissionDenied) as exc:
            code = (
                grpc.StatusCode.PERMISSION_DENIED
                if isinstance(exc, PermissionDenied)
                else grpc.StatusCode.UNAUTHENTICATED
            )
            log.warning("rejected %s: %s", method, exc)
            await context.abort(code, str(exc))
        task = asyncio.current_task()
        assert task is not None
        token = current_peer.set(peer)
        try:
            with policy.live.track(task, peer, cert):
                try:
                    yield
                except asyncio.CancelledError:
                    reason = policy.live.revoked_reason(task)
                    if reason is None:
                        raise
                    task.uncancel()
                    await policy.revoked(peer, reason)
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{reason}; call ended")
        finally:
            # A stream closed by the server's shutdown runs this in another task's context,
            # where there is nothing to reset (the handler's own context is gone with it).
            with contextlib.suppress(ValueError):
                current_peer.reset(token)

    return AroundInterceptor(around)
