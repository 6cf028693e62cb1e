"""Whether this federation can ever meet an agent's privacy policy, announced at Join.

Agents enforce their own ``[privacy]`` policy (``agent.privacy``); the aggregator checks it too,
so that a federation that can never meet it refuses the agent at Join with the reason, in the
aggregator's logs and ``grpc_server_handled_total{grpc_code="FAILED_PRECONDITION"}``, instead of
the agent leaving silently or sitting every round out.
"""

from __future__ import annotations

from common.config import AggregatorConfig
from common.errors import PolicyRefused
from common.secagg.graph import majority
from protos.cloudfed.v1 import federation_pb2 as pb


def check_agent_policy(policy: pb.PrivacyPolicy, config: AggregatorConfig) -> None:
    """PolicyRefused, saying which setting breaks ``policy`` (nothing for an agent that announced
    none: one older than the field)."""
    sa, name = config.secagg, config.federation.federation_id
    if not sa.enabled:
        if policy.require_masking:
            raise PolicyRefused(
                f"federation {name!r} runs without secure aggregation, and the agent's policy requires"
                " masking (privacy.require_masking)"
            )
        return
    most = config.rounds.max_agents
    if policy.min_agents_per_sum > most or policy.colluders > most - 2:
        raise PolicyRefused(
            f"the agent's privacy policy (sums over >= {policy.min_agents_per_sum} agents, {policy.colluders}"
            f" colluders) needs more agents than this federation's rounds take (rounds.max_agents = {most})"
        )
    if sa.coverage and sa.coverage < policy.min_agents_per_sum:
        raise PolicyRefused(
            f"federation {name!r} sums each element over {sa.coverage} agents (secagg.coverage), fewer"
            f" than the agent's privacy.min_agents_per_sum ({policy.min_agents_per_sum})"
        )
    if sa.threshold:  # a fixed threshold: every round would be refused (the automatic one adapts)
        holders = sa.neighbours + 1 if sa.neighbours else config.rounds.max_agents
        least = majority(holders, policy.colluders)
        if sa.threshold < least:
            raise PolicyRefused(
                f"secagg.threshold ({sa.threshold}) is below the {least} that {holders} share holders"
                f" and the agent's privacy.colluders ({policy.colluders}) need"
            )
