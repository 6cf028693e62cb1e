"""Whom a masked round invites: connected agents up to ``max_agents``, leaving out each one whose
announced privacy policy the round could not meet.

Such an agent would refuse the round by its own check (``agent.secure``) once it saw the roster,
and the aggregator would wait ``secagg.key_deadline_s`` for it in every round. Leaving it out
ends that wait before it starts, and the watching agent is told why (``RoundEvent.not_invited``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from common.secagg.graph import majority, share_holders
from protos.cloudfed.v1 import federation_pb2 as pb


@dataclass
class AgentInfo:
    """What an agent said when it joined."""

    num_examples: int
    software_version: str
    colluders: int = 0
    """Agents that may collude with the aggregator, by the agent's privacy policy: its rounds'
    threshold must allow for them."""
    min_agents_per_sum: int = 0
    """The fewest agents whose sum the agent lets the aggregator learn (0: it announced no policy)."""
    joined_at: float = field(default_factory=time.time)
    budget_spent: str = ""
    """Why the agent trains no further round of this connection (it said so at Join, or declined
    a round, because its differential-privacy budget is spent), or ''. A new Join sets it anew."""
    differential_privacy: str = ""
    """The DP guarantee it announced, in words (``server.admission.differential_privacy``)."""
    announced_dp: pb.DifferentialPrivacy | None = None
    """That guarantee as announced (None without DP), to restate with each upload's spend."""


@dataclass(frozen=True)
class Invitation:
    """A round's invited agents, and those left out by their own policy (with why)."""

    invited: frozenset[str]
    left_out: Mapping[str, str]


def invite(
    candidates: Sequence[str],
    limit: int,
    agents: Mapping[str, AgentInfo],
    neighbours: int,
    threshold: int = 0,
) -> Invitation:
    """The first ``limit`` of ``candidates`` whose policies a round of just them meets.

    A round of n agents meets an agent's policy when n >= its ``min_agents_per_sum`` and the
    round's threshold (``threshold``, or at most the share holders when automatic) is a majority
    of the share holders plus its colluders. Leaving an agent out shrinks the round, which can
    break another's policy, so this repeats until every invited agent's policy holds."""
    pool = list(candidates)
    left_out: dict[str, str] = {}
    while True:
        chosen = pool[:limit]
        holders = share_holders(len(chosen), neighbours)
        refused = {
            a: why
            for a in chosen
            if (why := _unmet(agents[a], len(chosen), holders, threshold or holders)) is not None
        }
        if not refused:
            return Invitation(frozenset(chosen), left_out)
        left_out.update(refused)
        pool = [a for a in pool if a not in refused]


def _unmet(info: AgentInfo, agents: int, holders: int, most_threshold: int) -> str | None:
    """Why a round of ``agents`` (``holders`` share holders, threshold up to ``most_threshold``)
    breaks ``info``'s policy, or None."""
    if info.min_agents_per_sum > agents:
        return (
            f"its privacy.min_agents_per_sum ({info.min_agents_per_sum}) is more than the"
            f" {agents} agents this round could invite"
        )
    least = majority(holders, info.colluders)
    if least > most_threshold:
        return (
            f"its privacy.colluders ({info.colluders}) needs a threshold of {least}, and"
            f" {holders} share holders allow at most {most_threshold}"
        )
    return None
