"""Domain errors raised by protocol cores and services.

Each class names the failure, not the transport; ``common.grpc_errors`` maps
them to gRPC status codes, so cores stay free of gRPC.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.identity import SpiffeId


class CloudfedError(Exception):
    """Base class of all errors a caller should see with a clear message."""


class InvalidArgument(CloudfedError):
    """Malformed input: bad header, bad order, bad offsets, wrong codec."""


class DataLoss(CloudfedError):
    """Payload bytes do not match their digest."""


class Unauthenticated(CloudfedError):
    """The caller's identity is unknown or unreadable."""


class CertificateRevoked(Unauthenticated):
    """The caller's certificate is on the CA's revocation list."""

    def __init__(self, peer: SpiffeId, message: str) -> None:
        super().__init__(message)
        self.peer = peer


class PermissionDenied(CloudfedError):
    """The caller is known but not allowed."""


class ResourceExhausted(CloudfedError):
    """A size or count limit was exceeded."""


class FailedPrecondition(CloudfedError):
    """Wrong round or phase for this request."""


class Aborted(CloudfedError):
    """A concurrent change won a race (version, upload in progress); retry."""


class NotFound(CloudfedError):
    """The named object (version, upload) does not exist."""


class ConfigError(CloudfedError):
    """A configuration value is missing or invalid; the message names the field."""


class PolicyRefused(FailedPrecondition):
    """The aggregator asked for something this agent's privacy policy forbids."""


class TrainingFailed(Aborted):
    """This round's local training or encoding failed (e.g. the loss diverged): the agent sits
    the round out."""
