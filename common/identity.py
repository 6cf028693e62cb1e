"""SPIFFE-style agent identities and the per-call identity context variable."""

from __future__ import annotations

import contextvars
import re
from dataclasses import dataclass

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?$")
_AGENT_PATH = re.compile(rf"^/cloud/(?P<cloud>{_SEGMENT})/agent/(?P<name>{_SEGMENT})$")


class IdentityError(ValueError):
    """A string is not a valid cloudfed SPIFFE id."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """``spiffe://<trust_domain>/cloud/<cloud>/agent/<name>``."""

    trust_domain: str
    cloud: str
    name: str

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse and validate an agent SPIFFE id."""
        prefix = "spiffe://"
        if not uri.startswith(prefix):
            raise IdentityError(f"not a spiffe:// URI: {uri!r}")
        rest = uri[len(prefix) :]
        domain, sep, path = rest.partition("/")
        if not sep or not _TRUST_DOMAIN.match(domain):
            raise IdentityError(f"bad trust domain in {uri!r}")
        match = _AGENT_PATH.match("/" + path)
        if match is None:
            raise IdentityError(f"path of {uri!r} is not /cloud/<cloud>/agent/<name>")
        return cls(domain, match["cloud"], match["name"])

    @staticmethod
    def validate_trust_domain(domain: str) -> str:
        """Return ``domain`` if it is a valid trust domain, else raise."""
        if not _TRUST_DOMAIN.match(domain):
            raise IdentityError(f"bad trust domain {domain!r}")
        return domain

    @property
    def uri(self) -> str:
        """The URI form."""
        return f"spiffe://{self.trust_domain}/cloud/{self.cloud}/agent/{self.name}"

    def __str__(self) -> str:
        return self.uri


current_peer: contextvars.ContextVar[SpiffeId] = contextvars.ContextVar("cloudfed_peer")
"""The authenticated caller of the RPC being handled; set by the auth interceptor."""


def require_peer() -> SpiffeId:
    """The authenticated caller; raises LookupError outside an authenticated RPC."""
    return current_peer.get()
