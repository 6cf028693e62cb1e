"""Whether this federation can ever meet an agent's privacy policy, announced at Join.

Agents enforce their own ``[privacy]`` policy (``agent.privacy``); the aggregator checks it too,
so that a federation that can never meet it refuses the agent at Join with the reason, in the
aggregator's logs and ``grpc_server_handled_total{grpc_code="FAILED_PRECONDITION"}``, instead of
the agent leaving silently or sitting every round out.
"""

from __future__ import annotations

import logging
import math

from common.config import DP_UNITS, AggregatorConfig, PrivacyConfig
from common.errors import InvalidArgument, PolicyRefused
from common.identity import SpiffeId
from common.secagg.graph import majority, share_holders
from protos.cloudfed.v1 import federation_pb2 as pb

log = logging.getLogger(__name__)


def admit(peer: SpiffeId, announced: pb.PrivacyPolicy | None, config: AggregatorConfig) -> None:
    """PolicyRefused (logged, naming the agent) if ``peer``'s announced policy breaks this
    federation's settings; nothing for an agent that announced none (one older than the field)."""
    if announced is None:
        return
    try:
        check_agent_policy(announced, config)
    except PolicyRefused as exc:
        log.warning("%s refused at Join: %s", peer, exc)
        raise


NO_DP = "none: this agent's updates are not differentially private"
"""How an agent that announced a policy without differential privacy is shown."""


def differential_privacy(announced: pb.PrivacyPolicy | None) -> tuple[str, pb.DifferentialPrivacy | None]:
    """The DP guarantee an agent announced at Join: in a line for the operators ('' when it
    announced no policy at all, an agent older than the field), and the message itself (None
    without DP); INVALID_ARGUMENT when it makes no sense."""
    if announced is None:
        return "", None
    if not announced.HasField("differential_privacy"):
        return NO_DP, None
    dp = announced.differential_privacy
    if dp.unit not in DP_UNITS:
        raise InvalidArgument(f"privacy.differential_privacy.unit must be one of {', '.join(DP_UNITS)}")
    if not (0.0 < dp.delta < 1.0 and math.isfinite(dp.max_epsilon) and dp.max_epsilon > 0):
        raise InvalidArgument("privacy.differential_privacy needs 0 < delta < 1 and a finite max_epsilon > 0")
    check_spend(dp.epsilon_spent, "privacy.differential_privacy.epsilon_spent")
    return describe_dp(dp, dp.epsilon_spent, "at its last Join"), dp


def check_spend(epsilon: float, field: str) -> None:
    """INVALID_ARGUMENT unless an announced DP spend is a finite epsilon >= 0."""
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise InvalidArgument(f"{field} must be finite and >= 0")


def describe_dp(dp: pb.DifferentialPrivacy, spent: float, when: str) -> str:
    """An agent's announced guarantee with the epsilon it had spent ``when``, in a line."""
    return (
        f"{dp.unit}-level DP-SGD, epsilon {spent:.3f} of {dp.max_epsilon:g} spent {when} (delta {dp.delta:g})"
    )


def check_agent_policy(announced: pb.PrivacyPolicy, config: AggregatorConfig) -> None:
    """PolicyRefused, saying which setting breaks the ``announced`` policy."""
    sa = config.secagg
    policy = PrivacyConfig(announced.require_masking, announced.min_agents_per_sum, announced.colluders)
    why = policy.refusal(config.federation.federation_id, sa.enabled, sa.coverage)
    if why is not None:
        raise PolicyRefused(why)
    if not sa.enabled:
        return
    most = config.rounds.max_agents
    if policy.min_agents_per_sum > most or policy.colluders > most - 2:
        raise PolicyRefused(
            f"the agent's privacy policy (sums over >= {policy.min_agents_per_sum} agents, {policy.colluders}"
            f" colluders) needs more agents than this federation's rounds take (rounds.max_agents = {most})"
        )
    if sa.threshold:  # a fixed threshold: every round would be refused (the automatic one adapts)
        holders = share_holders(most, sa.neighbours)
        least = majority(holders, policy.colluders)
        if sa.threshold < least:
            raise PolicyRefused(
                f"secagg.threshold ({sa.threshold}) is below the {least} that {holders} share holders"
                f" and the agent's privacy.colluders ({policy.colluders}) need"
            )
