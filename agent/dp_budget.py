"""The agent's differential-privacy budget: every round's DP-SGD spend, kept in its state dir,
and the epsilon of all of them together (opacus' RDP or PRV accountant).

A round's spend is recorded after its training and before anything of it leaves the cloud, with
the file fsynced: a crash may count a round that was never sent, never the other way round. A
round that would take the epsilon over ``privacy.dp.max_epsilon`` is refused before it trains,
and the ledger remembers that refusal with the settings it was made under: the agent announces it
at its next Join, so the aggregator does not invite it again, until those settings change.

Spends are kept with the unit they protect (a record, or a user): an epsilon is stated for one
unit, so a ledger of one unit is never composed with rounds of the other.

The counts that leave the cloud are released through the Gaussian mechanism too, once for each
true count, and composed with the rounds: a restart announces the same noisy count again, which
costs nothing more; a changed corpus costs a new release. They are the count of units the sample
rate is taken over (records, or users: one changes it by at most one) and the FedAvg weight sent at
Join and with every update: the records, with user-level privacy each user's counted up to
``records_per_user`` (one user changes that by at most ``records_per_user``, and the noise is
scaled by it), so that clouds of either unit weigh alike.

Shared eval losses are released through the Gaussian mechanism as well (``release_eval``): for
each global version, the sum over held-out units of each one's mean token loss, clipped, plus
noise, over the held-out units' noisy count, weighed by their noisy token count. Held-out units
are never trained on (the split is a fixed function of each record's, or user's, key), so a unit
is in one of two disjoint datasets: its epsilon is that of the training releases or that of the
eval releases (parallel composition), and each has ``max_epsilon`` for its budget.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

from agent.dp_sgd import DpStep
from common.config import DpConfig
from common.durable import replace_durably
from common.errors import ConfigError, DataLoss, PolicyRefused

log = logging.getLogger(__name__)
LEDGER = "dp-ledger.json"
UNITS, RECORDS = "units", "records"
"""The kinds of count released of the training data: the units (records or users) and the
user-level weight."""
EVAL_UNITS, EVAL_TOKENS = "eval_units", "eval_tokens"
"""The kinds of count released of the held-out data: its units, and the tokens an eval loss is
weighed by (each unit's up to a cap)."""
TRAINING_KINDS = (UNITS, RECORDS)
LARGEST_ALPHA = "Optimal order is the largest alpha"
"""opacus' warning when a small epsilon's best Renyi order is its largest: still a valid bound."""
SMALLEST_ALPHA = "Optimal order is the smallest alpha"
"""Its warning when a very large epsilon's (a spent budget's) best order is its smallest: a valid,
looser bound, so the ledger over-counts and never under-counts."""


class PrivacyBudgetSpent(PolicyRefused):
    """Training another round would spend more than ``privacy.dp.max_epsilon``."""


class EvalTooNoisy(PolicyRefused):
    """An eval loss released with the configured noise would be noisier than
    ``privacy.dp.eval_max_deviation``: it stays in the cloud."""


@dataclass(frozen=True)
class Spend:
    """One round of DP-SGD: ``steps`` steps at ``sample_rate`` with ``noise_multiplier``."""

    round_id: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    time: float = 0.0
    unit: str = "record"
    """What the spend protects: ``record`` or ``user`` (``privacy.dp.unit``)."""


@dataclass(frozen=True)
class CountRelease:
    """One release of a count: ``units`` (the true count, which stays in this cloud's state dir)
    plus Gaussian noise of standard deviation ``noise * sensitivity``, rounded."""

    units: int
    released: int
    noise: float
    time: float = 0.0
    unit: str = "record"
    kind: str = UNITS
    """``units`` (what the sample rate is over) or ``records`` (the user-level FedAvg weight)."""
    sensitivity: int = 1
    """The most one unit changes the count by."""

    @property
    def mechanism(self) -> tuple[float, float, int]:
        """As the accountants see it: one step, everything sampled, noise over sensitivity 1."""
        return (self.noise, 1.0, 1)

    @property
    def training(self) -> bool:
        """Whether it counts the training data (else the held-out data)."""
        return self.kind in TRAINING_KINDS


class SharedEval(NamedTuple):
    """A version's eval loss as it leaves the cloud."""

    loss: float
    tokens: int
    stddev: float
    """Standard deviation of the noise on ``loss``, in nats: the sum's noise over the released
    unit count (a function of released numbers, so free to share); 0 for an exact loss."""


def loss_deviation(noise: float, clip: float, units: int) -> float:
    """Standard deviation of a released eval loss's noise: the sum's (``noise x clip``) over
    ``units`` held-out units."""
    return noise * clip / units


@dataclass(frozen=True)
class EvalRelease:
    """One global version's eval loss as it left the cloud: ``clipped_sum`` (the sum over
    held-out units of each one's mean token loss clipped to ``clip``, which stays in this cloud's
    state dir) plus Gaussian noise of deviation ``noise * clip``."""

    subject: str
    """What was evaluated: the global version's digest and the held-out data's (the same
    subject gets the same release back)."""
    version: int
    clipped_sum: float
    released_sum: float
    noise: float
    clip: float
    time: float = 0.0
    unit: str = "record"

    @property
    def mechanism(self) -> tuple[float, float, int]:
        """As the accountants see it: one step over every held-out unit, sensitivity ``clip``."""
        return (self.noise, 1.0, 1)


def epsilon(
    spends: list[Spend],
    delta: float,
    accountant: str,
    releases: Sequence[CountRelease] = (),
) -> float:
    """The epsilon at ``delta`` of all ``spends`` and count ``releases`` composed (0 for none)."""
    history = tuple((s.noise_multiplier, s.sample_rate, s.steps) for s in spends)
    history += tuple(r.mechanism for r in releases)
    if not history:
        return 0.0
    return _epsilon(history, delta, accountant)


@functools.lru_cache(maxsize=64)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LARGEST_ALPHA)
        warnings.filterwarnings("ignore", message=SMALLEST_ALPHA)
        return float(acc.get_epsilon(delta))


EPSILON_TOLERANCE = 0.01
"""How far below ``max_epsilon`` the planned rounds may end (opacus' default tolerance)."""
MAX_NOISE = 1e6
"""Beyond this noise multiplier a budget is too low to plan for (opacus gives up at 2e6)."""


@functools.lru_cache(maxsize=16)
def planned_noise(
    config: DpConfig, sample_rate: float, steps: int, releases: tuple[tuple[float, float, int], ...] = ()
) -> float:
    """The noise multiplier that spends ``max_epsilon`` over ``planned_rounds`` rounds of
    ``steps`` steps beside the count ``releases`` made (their ``mechanism``); the configured
    ``noise_multiplier`` when set. Bisection as in opacus' ``get_noise_multiplier``, which
    composes no other mechanism."""
    if config.noise_multiplier > 0:
        return config.noise_multiplier
    total = config.planned_rounds * steps

    def spent(noise: float) -> float:
        return _epsilon(((noise, sample_rate, total), *releases), config.delta, config.accountant)

    low, high = 0.0, 10.0
    while spent(high) > config.max_epsilon:
        if high > MAX_NOISE:
            raise PrivacyBudgetSpent(
                f"privacy.dp.max_epsilon ({config.max_epsilon:g}) is too low for"
                f" {config.planned_rounds} planned rounds of {steps} steps at any noise"
            )
        low, high = high, 2 * high
    while config.max_epsilon - spent(high) > EPSILON_TOLERANCE:
        middle = (low + high) / 2
        if spent(middle) > config.max_epsilon:
            low = middle
        else:
            high = middle
    return high


@dataclass(frozen=True)
class Exhausted:
    """A refused round: the settings it was planned under (``PrivacyLedger.settings``) and why."""

    settings: str
    refusal: str


def announced_counts(config: DpConfig, units: int, capped_records: int) -> list[tuple[int, str, int]]:
    """The counts an agent releases, as (true count, kind, sensitivity): its ``units`` (records or
    users; the sample rate is over them), then its FedAvg weight, which with user-level privacy is
    ``capped_records``, each user's records up to ``records_per_user`` (else the units again)."""
    wanted = [(units, UNITS, 1)]
    if config.unit == "user":
        wanted.append((capped_records, RECORDS, config.records_per_user))
    return wanted


def _counted(unit: str, kind: str) -> str:
    """What a count of ``kind`` counts, in words."""
    if kind == RECORDS:
        return "training records (each user's up to records_per_user)"
    if kind == EVAL_UNITS:
        return f"held-out {unit}s"
    if kind == EVAL_TOKENS:
        return f"held-out tokens (each {unit}'s up to a cap)"
    return f"training {unit}s"


class PrivacyLedger:
    """This agent's DP-SGD spends, across rounds and restarts (``<state_dir>/privacy/``)."""

    def __init__(self, state_dir: Path, config: DpConfig) -> None:
        self.config = config
        self.path = state_dir / "privacy" / LEDGER
        self.spends, self.exhausted, self.counts, self.evals = self._load()
        other = {s.unit for s in self.spends} | {c.unit for c in self.counts} | {e.unit for e in self.evals}
        other -= {config.unit}
        if other:
            raise ConfigError(
                f"privacy.dp.unit is {config.unit!r} but the privacy ledger {self.path} holds rounds"
                f" spent protecting a {other.pop()}: an epsilon for one cannot be composed with the"
                " other. Keep the unit, or move the ledger aside to start a new guarantee (the rounds"
                " it records stay spent for their unit)"
            )

    def _load(self) -> tuple[list[Spend], Exhausted | None, list[CountRelease], list[EvalRelease]]:
        if not self.path.exists():
            return [], None, [], []
        try:
            data = json.loads(self.path.read_text())
            exhausted = data.get("exhausted")
            return (
                [Spend(**s) for s in data["spends"]],
                Exhausted(**exhausted) if exhausted else None,
                [CountRelease(**c) for c in data.get("counts", [])],
                [EvalRelease(**e) for e in data.get("evals", [])],
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:  # never start again from zero
            raise DataLoss(
                f"privacy ledger {self.path} cannot be read ({exc}); it records the privacy this agent"
                " has spent, so the agent will not train until it is restored"
            ) from exc

    @property
    def training_counts(self) -> list[CountRelease]:
        """The releases of counts of the training data."""
        return [c for c in self.counts if c.training]

    @property
    def epsilon(self) -> float:
        """The epsilon spent so far on the training data (rounds and count releases)."""
        return epsilon(self.spends, self.config.delta, self.config.accountant, self.training_counts)

    @property
    def eval_epsilon(self) -> float:
        """The epsilon spent so far on the held-out data (eval losses and their counts)."""
        return self._eval_epsilon(self.counts, self.evals)

    @property
    def guarantee(self) -> float:
        """The epsilon of any one unit, held out or not: the larger of the two."""
        return max(self.epsilon, self.eval_epsilon)

    def _eval_epsilon(
        self, counts: Sequence[CountRelease], evals: Sequence[EvalRelease], planned: int = 0
    ) -> float:
        """The epsilon of the held-out data's count releases among ``counts``, ``evals`` and
        ``planned`` more eval releases at ``eval_noise`` (releases of one noise as one entry of
        that many steps: the accountants compose them alike)."""
        steps = collections.Counter(e.noise for e in evals)
        steps[self.config.eval_noise] += planned
        history = tuple(c.mechanism for c in counts if not c.training)
        history += tuple((noise, 1.0, n) for noise, n in sorted(steps.items()) if n)
        if not history:
            return 0.0
        return _epsilon(history, self.config.delta, self.config.accountant)

    def _epsilon_with(self, release: CountRelease) -> float:
        """The epsilon of ``release``'s side (training or held-out data) once it is made."""
        if release.training:
            return epsilon(
                self.spends, self.config.delta, self.config.accountant, [*self.training_counts, release]
            )
        return self._eval_epsilon([*self.counts, release], self.evals)

    def announce(self, units: int, capped_records: int) -> tuple[int, int]:
        """The training units and the FedAvg weight as they may leave the cloud (the releases of
        ``announced_counts``, made or kept here)."""
        released = [
            self.released_count(*count) for count in announced_counts(self.config, units, capped_records)
        ]
        return released[0], released[-1]

    def release_of(self, units: int, kind: str, sensitivity: int) -> CountRelease | None:
        """The release already made of this true count, if any."""
        for release in reversed(self.counts):
            if (release.units, release.kind, release.sensitivity) == (units, kind, sensitivity):
                return release
        return None

    def released_count(self, units: int, kind: str = UNITS, sensitivity: int = 1) -> int:
        """A count as it may leave the cloud: ``units`` plus Gaussian noise of deviation
        ``privacy.dp.count_noise * sensitivity``, rounded, at least 1. Drawn once for each true
        count (of this ``kind`` and ``sensitivity``) and kept durably before it is returned; the
        same count gets the same release back. ConfigError for a delta too large for the units,
        PrivacyBudgetSpent when a new release does not fit in the budget."""
        c = self.config
        if kind == UNITS:
            self.check_delta(units)
        kept = self.release_of(units, kind, sensitivity)
        if kept is not None:
            return kept.released
        noise = random.SystemRandom().gauss(0.0, c.count_noise * sensitivity)
        noisy = max(1, round(units + noise))
        release = CountRelease(units, noisy, c.count_noise, time.time(), c.unit, kind, sensitivity)
        before = self.epsilon if release.training else self.eval_epsilon
        after = self._epsilon_with(release)
        side = "" if release.training else " on its held-out data"
        if after > c.max_epsilon:
            raise PrivacyBudgetSpent(
                f"privacy budget spent: this agent has spent epsilon {before:.3f}{side} (delta"
                f" {c.delta:g}) and announcing its new count of {_counted(c.unit, kind)} would take"
                f" it to {after:.3f}, over privacy.dp.max_epsilon ({c.max_epsilon:g})"
            )
        self._save(self.spends, self.exhausted, [*self.counts, release])
        log.info(
            "announcing %d %s (the true count plus Gaussian noise of deviation %g): epsilon %.3f%s of"
            " %g spent (delta %g)",
            noisy,
            _counted(c.unit, kind),
            c.count_noise * sensitivity,
            after,
            side,
            c.max_epsilon,
            c.delta,
        )
        return noisy

    def release_eval(
        self, subject: str, version: int, clipped_sum: float, units: int, tokens: int, token_cap: int
    ) -> SharedEval:
        """A version's eval loss and its weight as they may leave the cloud, from ``units``
        held-out units whose mean token losses, clipped to ``eval_loss_clip``, sum to
        ``clipped_sum``, and their ``tokens`` (each unit's up to ``token_cap``): the noisy sum
        over the noisy unit count (kept within 0..clip), the noisy token count, and the loss's
        noise deviation. The same
        ``subject`` (version and data) gets the same release back; PrivacyBudgetSpent when a new
        release does not fit in the held-out data's budget, EvalTooNoisy when the noisy unit
        count makes the loss noisier than ``eval_max_deviation`` (nothing more is released)."""
        c = self.config
        count = self.released_count(units, EVAL_UNITS)
        deviation = loss_deviation(c.eval_noise, c.eval_loss_clip, count)
        if deviation > c.eval_max_deviation:
            held = f"{count} held-out {c.unit}{'' if count == 1 else 's'}"
            raise EvalTooNoisy(
                f"with {held} (as released), a released eval loss would carry noise of"
                f" deviation {deviation:.3g} nats, over privacy.dp.eval_max_deviation"
                f" ({c.eval_max_deviation:g}); it stays in this cloud (hold out more {c.unit}s, or lower"
                " eval_noise at a higher epsilon)"
            )
        weight = self.released_count(tokens, EVAL_TOKENS, token_cap)
        kept = next((e for e in reversed(self.evals) if e.subject == subject), None)
        if kept is None:
            noise = random.SystemRandom().gauss(0.0, c.eval_noise * c.eval_loss_clip)
            kept = EvalRelease(
                subject,
                version,
                clipped_sum,
                clipped_sum + noise,
                c.eval_noise,
                c.eval_loss_clip,
                time.time(),
                c.unit,
            )
            after = self._eval_epsilon(self.counts, [*self.evals, kept])
            if after > c.max_epsilon:
                raise PrivacyBudgetSpent(
                    f"privacy budget of the held-out data spent: this agent has spent epsilon"
                    f" {self.eval_epsilon:.3f} on it (delta {c.delta:g}) and releasing the eval loss of"
                    f" global version {version} would take it to {after:.3f}, over"
                    f" privacy.dp.max_epsilon ({c.max_epsilon:g}); the loss stays in this cloud"
                )
            self._save(self.spends, self.exhausted, self.counts, [*self.evals, kept])
        loss = min(max(kept.released_sum / count, 0.0), kept.clip)
        return SharedEval(loss, weight, loss_deviation(kept.noise, kept.clip, count))

    def check_delta(self, units: int) -> None:
        """ConfigError unless delta < 1 / ``units`` (a larger one allows releasing a record, or
        a user's records, outright)."""
        if self.config.delta * units >= 1:
            what = "records" if self.config.unit == "record" else "users"
            raise ConfigError(
                f"privacy.dp.delta ({self.config.delta:g}) must be below 1 / training {what}"
                f" (1/{units}): a larger delta allows releasing a {self.config.unit}'s data outright"
            )

    def plan(self, round_id: int, units: int, batch_size: int, world_size: int, steps: int) -> DpStep:
        """The round's DP-SGD settings for ``units`` training records (or users: the released
        count, so that the sample rate and the noise reveal nothing more) over ``world_size``
        ranks sampling ``batch_size`` each on average; PrivacyBudgetSpent if it does not fit."""
        c = self.config
        expected = min(batch_size * world_size, units)
        rate = expected / units
        noise = planned_noise(c, rate, steps, tuple(r.mechanism for r in self.training_counts))
        after = epsilon(
            [*self.spends, Spend(round_id, noise, rate, steps, unit=c.unit)],
            c.delta,
            c.accountant,
            self.training_counts,
        )
        if after > c.max_epsilon:
            refusal = (
                f"privacy budget spent: this agent has spent epsilon {self.epsilon:.3f} (delta"
                f" {c.delta:g}) and round {round_id} would take it to {after:.3f}, over"
                f" privacy.dp.max_epsilon ({c.max_epsilon:g})"
            )
            self._save(
                self.spends,
                Exhausted(self.settings(units, batch_size, world_size, steps), refusal),
                self.counts,
            )
            raise PrivacyBudgetSpent(refusal)
        per_unit = c.records_per_user if c.unit == "user" else 1
        return DpStep(noise, c.max_grad_norm, rate, float(expected), per_unit)

    def settings(self, units: int, batch_size: int, world_size: int, steps: int) -> str:
        """What a round's spend depends on: the records (or users), the federation's batch and
        steps, the ranks and this agent's DP configuration."""
        return json.dumps([units, batch_size, world_size, steps, asdict(self.config)], sort_keys=True)

    def still_exhausted(self, settings: str) -> bool:
        """Whether the remembered refusal holds under ``settings`` (from ``settings()``); a
        refusal made under other settings is forgotten (a round may fit now: the next plan says)."""
        if self.exhausted is None:
            return False
        if self.exhausted.settings != settings:
            self._save(self.spends, None, self.counts)
        return self.exhausted is not None

    def record(self, round_id: int, dp: DpStep, steps: int) -> float:
        """Add a round's spend, durably, before its update leaves the cloud; the epsilon after it."""
        spend = Spend(round_id, dp.noise_multiplier, dp.sample_rate, steps, time.time(), self.config.unit)
        self._save([*self.spends, spend], None, self.counts)
        spent = self.epsilon
        if math.isfinite(spent):
            log.info(
                "round %d: %s-level DP-SGD with noise multiplier %.3f, sample rate %.4g, %d steps: epsilon"
                " %.3f of %g spent (delta %g)",
                round_id,
                self.config.unit,
                dp.noise_multiplier,
                dp.sample_rate,
                steps,
                spent,
                self.config.max_epsilon,
                self.config.delta,
            )
        return spent

    def _save(
        self,
        spends: list[Spend],
        exhausted: Exhausted | None,
        counts: list[CountRelease],
        evals: list[EvalRelease] | None = None,
    ) -> None:
        evals = self.evals if evals is None else evals
        data: dict[str, object] = {
            "spends": [asdict(s) for s in spends],
            "counts": [asdict(c) for c in counts],
            "evals": [asdict(e) for e in evals],
        }
        if exhausted is not None:
            data["exhausted"] = asdict(exhausted)
        replace_durably(self.path, json.dumps(data, indent=1).encode())
        self.spends, self.exhausted, self.counts, self.evals = spends, exhausted, counts, evals


MAX_PREVIEW_ROUNDS = 100_000
"""``preview`` counts the rounds a budget lasts up to this many."""


def _most_that_fit(fits: Callable[[int], bool]) -> int:
    """The most releases (rounds, versions) up to ``MAX_PREVIEW_ROUNDS`` that ``fits`` accepts,
    ``fits`` holding for every count below one it holds for (doubling, then bisection)."""
    lasts, beyond = 0, 1
    while beyond <= MAX_PREVIEW_ROUNDS and fits(beyond):
        lasts, beyond = beyond, 2 * beyond
    while beyond - lasts > 1 and lasts < MAX_PREVIEW_ROUNDS:
        middle = (lasts + beyond) // 2
        lasts, beyond = (middle, beyond) if fits(middle) else (lasts, middle)
    return lasts


def preview(
    config: DpConfig,
    state_dir: Path,
    units: int,
    batch_size: int,
    steps: int,
    ranks: int = 1,
    capped_records: int = 0,
) -> str:
    """One line for ``cloudfed-agent check``: what rounds of the federation's ``batch_size`` and
    ``steps`` would cost this agent's ``units`` training records (or users, holding
    ``capped_records`` counted as the weight is), from its ledger on: the count releases it would
    make, the noise, and how many rounds the budget lasts. Spends nothing (the counts are the true
    ones, and this line stays in the cloud)."""
    ledger = PrivacyLedger(state_dir, config)
    ledger.check_delta(units)
    counts = ledger.training_counts
    for count, kind, sensitivity in announced_counts(config, units, capped_records):
        if ledger.release_of(count, kind, sensitivity) is None:
            counts.append(CountRelease(count, count, config.count_noise, 0.0, config.unit, kind, sensitivity))
    expected = min(batch_size * ranks, units)
    rate = expected / units
    noise = planned_noise(config, rate, steps, tuple(c.mechanism for c in counts))

    def after(rounds: int) -> float:
        planned = Spend(0, noise, rate, rounds * steps, unit=config.unit)
        return epsilon([*ledger.spends, planned], config.delta, config.accountant, counts)

    lasts = _most_that_fit(lambda rounds: after(rounds) <= config.max_epsilon)
    rounds = f"{lasts} more rounds" if lasts < MAX_PREVIEW_ROUNDS else f"over {MAX_PREVIEW_ROUNDS} rounds"
    first = f", epsilon {after(1):.3f} after the next" if lasts else ""
    return (
        f"{units} training {config.unit}s, a step samples {expected} (rate {rate:.4g}) on {ranks} rank(s):"
        f" noise multiplier {noise:.3f}{first}; the budget ({config.max_epsilon:g}) lasts {rounds} of"
        f" {steps} steps"
    )


def describe(config: DpConfig, state_dir: Path) -> str:
    """One line for ``cloudfed-agent check``: whether updates are DP, and the budget spent."""
    if not config.enabled:
        return "off: updates are not differentially private for this cloud's records"
    ledger = PrivacyLedger(state_dir, config)
    if config.unit == "user":
        unit = (
            f"user-level DP-SGD: epsilon {ledger.epsilon:.3f} of {config.max_epsilon:g} for each user"
            f" (field {config.user_field!r})"
        )
        clipped = f"each user's mean gradient over up to {config.records_per_user} records clipped to"
    else:
        unit = f"DP-SGD: epsilon {ledger.epsilon:.3f} of {config.max_epsilon:g}"
        clipped = "records clipped to"
    announced = ""
    weight_kind = RECORDS if config.unit == "user" else UNITS  # the last of announced_counts
    weights = [c for c in ledger.counts if c.kind == weight_kind]
    if weights:
        last, n = weights[-1], len(ledger.training_counts)
        announced = (
            f"; weighs its updates by {last.released} training records (noise deviation"
            f" {last.noise * last.sensitivity:g}; {n} count release{'s' if n > 1 else ''})"
        )
    evals = ""
    if ledger.evals:
        n = len(ledger.evals)
        evals = (
            f"; eval losses: epsilon {ledger.eval_epsilon:.3f} of {config.max_epsilon:g} on the held-out"
            f" {config.unit}s over {n} release{'s' if n > 1 else ''}"
        )
    return (
        f"{unit} spent over {len(ledger.spends)} rounds (delta {config.delta:g}, {config.accountant}"
        f" accountant, {clipped} {config.max_grad_norm:g}){announced}{evals}"
    )


def eval_preview(config: DpConfig, state_dir: Path, units: int) -> str:
    """One line for ``cloudfed-agent check``: what releasing eval losses over ``units`` held-out
    units (records or users) would cost, from the ledger on: the noise on a released loss and how
    many versions the held-out data's budget lasts (with the count releases it would make).
    Spends nothing."""
    ledger = PrivacyLedger(state_dir, config)
    counts = [c for c in ledger.counts if not c.training]
    unit_count = CountRelease(units, units, config.count_noise, 0.0, config.unit, EVAL_UNITS)
    if ledger.release_of(units, EVAL_UNITS, 1) is None:
        counts.append(unit_count)
    if not any(c.kind == EVAL_TOKENS for c in counts):  # the token count's noise does not depend on it
        counts.append(replace(unit_count, kind=EVAL_TOKENS))

    def fits(versions: int) -> bool:
        return ledger._eval_epsilon(counts, ledger.evals, versions) <= config.max_epsilon

    lasts = _most_that_fit(fits)
    versions = (
        f"{lasts} more versions" if lasts < MAX_PREVIEW_ROUNDS else f"over {MAX_PREVIEW_ROUNDS} versions"
    )
    deviation = loss_deviation(config.eval_noise, config.eval_loss_clip, units)
    line = (
        f"{units} held-out {config.unit}s: each version's eval loss released with noise of deviation"
        f" {deviation:.3g} nats (mean token losses clipped to {config.eval_loss_clip:g}); the budget"
        f" ({config.max_epsilon:g}) lasts {versions}"
    )
    if deviation > config.eval_max_deviation:
        line += (
            f"; over eval_max_deviation ({config.eval_max_deviation:g}): the losses would stay in this cloud"
        )
    return line
