"""The agent's privacy policy (``[privacy]``) against the federation the aggregator runs.

The aggregator chooses how updates are protected: masking, coverage, the threshold. An agent
does not take that on trust: before anything leaves its cloud it checks the federation at Join
(``check_federation``; the daemon exits on a refusal, the operator must act), each round's
parameters (``agent.secure``) and each unmask request (``common.secagg.agent``).
"""

from __future__ import annotations

from common.config import PrivacyConfig
from common.errors import PolicyRefused
from protos.cloudfed.v1 import federation_pb2 as pb


def check_federation(policy: PrivacyConfig, settings: pb.FederationSettings) -> None:
    """PolicyRefused, naming the policy field, if this federation's settings break ``policy``."""
    sa = settings.secagg
    if not sa.enabled:
        if policy.require_masking:
            raise PolicyRefused(
                f"federation {settings.federation_id!r} runs without secure aggregation, so its"
                " aggregator would see this cloud's updates; refused by privacy.require_masking (set it"
                " to false only if you trust the aggregator)"
            )
        return
    if sa.coverage and sa.coverage < policy.min_agents_per_sum:
        raise PolicyRefused(
            f"federation {settings.federation_id!r} sums each element over {sa.coverage} agents"
            f" (secagg.coverage), fewer than privacy.min_agents_per_sum ({policy.min_agents_per_sum})"
        )


def announced(policy: PrivacyConfig) -> pb.PrivacyPolicy:
    """The policy as Join announces it (the aggregator sizes thresholds for its colluders)."""
    return pb.PrivacyPolicy(
        require_masking=policy.require_masking,
        min_agents_per_sum=policy.min_agents_per_sum,
        colluders=policy.colluders,
    )


def describe(policy: PrivacyConfig, settings: pb.FederationSettings) -> str:
    """One line for ``cloudfed-agent check``: what the aggregator may learn, and the verdict."""
    sa = settings.secagg
    if not sa.enabled:
        learns = "each agent's update (no secure aggregation)"
    elif sa.coverage:
        learns = f"each element's sum over {sa.coverage} agents"
    else:
        learns = "the sum over each round's agents"
    try:
        check_federation(policy, settings)
    except PolicyRefused as exc:
        return f"aggregator learns {learns}; REFUSED: {exc}"
    return f"aggregator learns {learns}; allowed by this agent's policy"
