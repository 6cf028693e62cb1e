"""The agent's metrics: time per round step, raw vs encoded update size, estimated egress cost, rounds
sat out."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

from common.metrics import LATENCY_BUCKETS

PHASE_SECONDS = Histogram(
    "cloudfed_agent_phase_seconds",
    "Time the agent spent in each step of a round.",
    ["phase"],
    buckets=LATENCY_BUCKETS,
)
UPDATE_RAW_BYTES = Counter(
    "cloudfed_update_raw_bytes", "Update size before encoding (float32 parameters).", ["cloud", "agent"]
)
UPDATE_ENCODED_BYTES = Counter(
    "cloudfed_update_encoded_bytes", "Update size after encoding, as uploaded.", ["cloud", "agent"]
)
EGRESS_COST = Counter(
    "cloudfed_egress_cost_dollars", "Estimated cost of the bytes this agent sent out of its cloud.", ["cloud"]
)
ROUNDS_TRAINED = Counter(
    "cloudfed_agent_rounds", "Rounds this agent trained and uploaded for.", ["cloud", "agent"]
)
ROUNDS_SAT_OUT = Counter(
    "cloudfed_agent_rounds_sat_out",
    "Rounds this agent refused to take part in, by reason (privacy_policy, privacy_budget, roster, protocol,"
    " training, aggregator).",
    ["cloud", "agent", "reason"],
)
CLIPPED_RATIO = Gauge(
    "cloudfed_secagg_clipped_ratio",
    "Fraction of coordinates of the last masked update beyond their clip bound (clipped before encoding).",
    ["cloud", "agent"],
)
DP_EPSILON = Gauge(
    "cloudfed_agent_dp_epsilon",
    "Differential privacy this agent has spent on each of its training records, or users (unit:"
    " privacy.dp.unit); epsilon at privacy.dp.delta, over every round it trained.",
    ["cloud", "agent", "unit"],
)
DP_EVAL_EPSILON = Gauge(
    "cloudfed_agent_dp_eval_epsilon",
    "Differential privacy this agent has spent on each of its held-out records, or users, by releasing"
    " eval losses (a budget of its own: held-out data is never trained on); epsilon at privacy.dp.delta.",
    ["cloud", "agent", "unit"],
)
DP_EPSILON_BUDGET = Gauge(
    "cloudfed_agent_dp_epsilon_budget",
    "This agent's privacy budget (privacy.dp.max_epsilon): it trains no round that would spend more.",
    ["cloud", "agent", "unit"],
)
EVAL_LOSS = Gauge(
    "cloudfed_agent_eval_loss",
    "Eval loss (nats a token) of the latest global version this agent evaluated, on its held-out"
    " records; exported whether or not privacy.share_eval_losses sends it to the aggregator.",
    ["cloud", "agent"],
)
EVALS_WITHHELD = Counter(
    "cloudfed_agent_evals_withheld",
    "Global versions whose eval loss this agent kept from the aggregator, by reason (not_shared,"
    " too_noisy, privacy_budget, not_finite).",
    ["cloud", "agent", "reason"],
)
STEP = Gauge("cloudfed_agent_step", "1 while the agent is in this step of a round, else 0.", ["phase"])


@contextmanager
def step(phase: str) -> Iterator[None]:
    """Mark the agent as in ``phase`` and time it."""
    STEP.labels(phase=phase).set(1)
    try:
        with PHASE_SECONDS.labels(phase=phase).time():
            yield
    finally:
        STEP.labels(phase=phase).set(0)
