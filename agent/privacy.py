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
    why = policy.refusal(settings.federation_id, sa.enabled, sa.coverage)
    if why is not None:
        raise PolicyRefused(why)


def announced(policy: PrivacyConfig, budget_spent: str = "", epsilon_spent: float = 0.0) -> pb.PrivacyPolicy:
    """The policy as Join announces it (the aggregator sizes thresholds for its colluders), why
    the agent's differential-privacy budget is spent, if it is (it is then invited to no round),
    and the DP guarantee it trains under, if any (for the federation's operators)."""
    dp = policy.dp
    guarantee = (
        pb.DifferentialPrivacy(
            unit=dp.unit, max_epsilon=dp.max_epsilon, delta=dp.delta, epsilon_spent=epsilon_spent
        )
        if dp.enabled
        else None
    )
    return pb.PrivacyPolicy(
        require_masking=policy.require_masking,
        min_agents_per_sum=policy.min_agents_per_sum,
        colluders=policy.colluders,
        budget_spent=budget_spent,
        differential_privacy=guarantee,
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
    if not policy.share_eval_losses:
        learns += ", and no eval loss"
    try:
        check_federation(policy, settings)
    except PolicyRefused as exc:
        return f"aggregator learns {learns}; REFUSED: {exc}"
    return f"aggregator learns {learns}; allowed by this agent's policy"
