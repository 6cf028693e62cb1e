"""The aggregator's federation metrics: rounds, versions, agents, phase latency, evals, revocation."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from common.metrics import LATENCY_BUCKETS
from common.secagg_pb import EVAL_WITHHELD_REASONS

ROUND = Gauge("cloudfed_round", "Id of the current (or last) round.")
GLOBAL_VERSION = Gauge("cloudfed_global_version", "Latest committed global model version.")
AGENTS = Gauge(
    "cloudfed_agents",
    "Agents by state: connected (watching rounds), participating now, or budget_spent (connected, but"
    " their differential-privacy budget is spent: invited to no round).",
    ["state"],
)
ROUNDS = Counter("cloudfed_rounds", "Rounds ended, by outcome and reason.", ["outcome", "reason"])
DROPPED = Counter(
    "cloudfed_stragglers_dropped", "Participants dropped at a round's deadline.", ["cloud", "agent"]
)
DECLINED = Counter(
    "cloudfed_rounds_declined",
    "Rounds an agent sat out by its own account: declined (DeclineRound) or left uninvited by its"
    " privacy policy, by reason; reason=revoked: taken out because its certificate was revoked.",
    ["cloud", "agent", "reason"],
)
PHASE_SECONDS = Histogram(
    "cloudfed_round_phase_seconds",
    "Time the aggregator spent in each round phase.",
    ["phase"],
    buckets=LATENCY_BUCKETS,
)
EVAL_LOSS = Gauge(
    "cloudfed_eval_loss", "Last eval loss of the global model an agent reported.", ["cloud", "agent"]
)
EVAL_LOSS_STDDEV = Gauge(
    "cloudfed_eval_loss_stddev",
    "Standard deviation of the differential-privacy noise in that last eval loss (0: exact).",
    ["cloud", "agent"],
)
EVALS_WITHHELD = Counter(
    "cloudfed_evals_withheld",
    "Versions whose eval loss an agent evaluated but withheld, by why: not_shared (its policy),"
    " too_noisy or privacy_budget (its differential privacy), not_finite, unspecified (older agents).",
    ["cloud", "agent", "reason"],
)
WITHHELD_REASONS = (*EVAL_WITHHELD_REASONS, "unspecified")
"""The ``reason`` labels of withheld evals."""
EVAL_WITHHELD = Gauge(
    "cloudfed_eval_withheld",
    "1 for the reason an agent withheld its eval loss of the latest version it evaluated, 0 for the"
    " other reasons and once it reports a loss again.",
    ["cloud", "agent", "reason"],
)
EVAL_VERSION = Gauge(
    "cloudfed_eval_version", "Global version of that last reported eval loss.", ["cloud", "agent"]
)
SECAGG_WRONG_SHARES = Counter(
    "cloudfed_secagg_wrong_shares",
    "Revealed shares that disagree with their owner's signed advertisement (left out when t right"
    " ones remained), counted for both parties: the holder that revealed one (role=revealed) and"
    " the owner that dealt it (role=dealt). Shares are not verifiable, so either may be at fault.",
    ["cloud", "agent", "role"],
)
SECAGG_DROPOUTS_RECOVERED = Counter(
    "cloudfed_secagg_dropouts_recovered",
    "Agents that shared keys but whose masked input never arrived, whose masks were removed from the sum.",
)
CRL_REVOKED = Gauge("cloudfed_crl_revoked_certificates", "Certificates the aggregator's current CRL revokes.")
CRL_NEXT_UPDATE = Gauge(
    "cloudfed_crl_next_update_timestamp_seconds",
    "When the aggregator's current CRL says a newer one is due (unix time; alert before it passes).",
)
CRL_RELOAD_FAILURES = Counter(
    "cloudfed_crl_reload_failures",
    "CRL files that could not be taken (unreadable, not signed by the CA, older CRL number);"
    " the aggregator keeps enforcing the last good list.",
)
REVOKED_CALLS = Counter(
    "cloudfed_revoked_calls",
    "Calls refused or ended because the caller's certificate is revoked, by when: at the call's"
    " start (refused) or while it ran (ended, when a new CRL was taken).",
    ["cloud", "agent", "when"],
)
AGENT_CERT_EXPIRY = Gauge(
    "cloudfed_agent_certificate_expiry_timestamp_seconds",
    "When the certificate an agent last joined with stops being valid (unix time), as the aggregator saw"
    " it at Join: one place to watch every cloud's certificates.",
    ["cloud", "agent"],
)
CHECKPOINTS_KEPT = Gauge(
    "cloudfed_checkpoints_kept", "Global versions whose checkpoint is on disk ([checkpoints] retention)."
)
CHECKPOINT_BYTES = Gauge("cloudfed_checkpoint_bytes", "Bytes of the global versions' checkpoints on disk.")
CHECKPOINTS_PRUNED = Counter(
    "cloudfed_checkpoints_pruned", "Checkpoints of global versions pruned by the retention policy."
)
FINISHED = Gauge(
    "cloudfed_federation_finished",
    "1 once the federation is finished (rounds.max_versions or early stopping): no round starts again.",
)


def eval_withheld(labels: dict[str, str], reason: str | None) -> None:
    """An agent's latest word on an evaluation: withheld for ``reason``, or a loss (None)."""
    for known in WITHHELD_REASONS:
        EVAL_WITHHELD.labels(**labels, reason=known).set(1 if known == reason else 0)
