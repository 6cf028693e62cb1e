"""The agent's differential-privacy budget: every round's DP-SGD spend, kept in its state dir,
and the epsilon of all of them together (opacus' RDP or PRV accountant).

A round's spend is recorded after its training and before anything of it leaves the cloud, with
the file fsynced: a crash may count a round that was never sent, never the other way round. A
round that would take the epsilon over ``privacy.dp.max_epsilon`` is refused before it trains,
and the ledger remembers that refusal with the settings it was made under: the agent announces it
at its next Join, so the aggregator does not invite it again, until those settings change.

Spends are kept with the unit they protect (a record, or a user): an epsilon is stated for one
unit, so a ledger of one unit is never composed with rounds of the other.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.dp_sgd import DpStep
from common.config import DpConfig
from common.durable import replace_durably
from common.errors import ConfigError, DataLoss, PolicyRefused

log = logging.getLogger(__name__)
LEDGER = "dp-ledger.json"
LARGEST_ALPHA = "Optimal order is the largest alpha"
"""opacus' warning when a small epsilon's best Renyi order is its largest: still a valid bound."""


class PrivacyBudgetSpent(PolicyRefused):
    """Training another round would spend more than ``privacy.dp.max_epsilon``."""


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


def epsilon(spends: list[Spend], delta: float, accountant: str) -> float:
    """The epsilon at ``delta`` of all ``spends`` composed (0 for none)."""
    if not spends:
        return 0.0
    history = tuple((s.noise_multiplier, s.sample_rate, s.steps) for s in spends)
    return _epsilon(history, delta, accountant)


@functools.lru_cache(maxsize=64)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LARGEST_ALPHA)
        return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=16)
def planned_noise(config: DpConfig, sample_rate: float, steps: int) -> float:
    """The noise multiplier that spends ``max_epsilon`` over ``planned_rounds`` rounds of
    ``steps`` steps (``config.noise_multiplier`` when set)."""
    if config.noise_multiplier > 0:
        return config.noise_multiplier
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LARGEST_ALPHA)
        return float(
            get_noise_multiplier(
                target_epsilon=config.max_epsilon,
                target_delta=config.delta,
                sample_rate=sample_rate,
                steps=config.planned_rounds * steps,
                accountant=config.accountant,
            )
        )


@dataclass(frozen=True)
class Exhausted:
    """A refused round: the settings it was planned under (``PrivacyLedger.settings``) and why."""

    settings: str
    refusal: str


class PrivacyLedger:
    """This agent's DP-SGD spends, across rounds and restarts (``<state_dir>/privacy/``)."""

    def __init__(self, state_dir: Path, config: DpConfig) -> None:
        self.config = config
        self.path = state_dir / "privacy" / LEDGER
        self.spends, self.exhausted = self._load()
        other = {s.unit for s in self.spends} - {config.unit}
        if other:
            raise ConfigError(
                f"privacy.dp.unit is {config.unit!r} but the privacy ledger {self.path} holds rounds"
                f" spent protecting a {other.pop()}: an epsilon for one cannot be composed with the"
                " other. Keep the unit, or move the ledger aside to start a new guarantee (the rounds"
                " it records stay spent for their unit)"
            )

    def _load(self) -> tuple[list[Spend], Exhausted | None]:
        if not self.path.exists():
            return [], None
        try:
            data = json.loads(self.path.read_text())
            exhausted = data.get("exhausted")
            return [Spend(**s) for s in data["spends"]], Exhausted(**exhausted) if exhausted else None
        except (OSError, ValueError, KeyError, TypeError) as exc:  # never start again from zero
            raise DataLoss(
                f"privacy ledger {self.path} cannot be read ({exc}); it records the privacy this agent"
                " has spent, so the agent will not train until it is restored"
            ) from exc

    @property
    def epsilon(self) -> float:
        """The epsilon spent so far."""
        return epsilon(self.spends, self.config.delta, self.config.accountant)

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
        """The round's DP-SGD settings for ``units`` training records (or users) over
        ``world_size`` ranks sampling ``batch_size`` each on average; PrivacyBudgetSpent if it
        does not fit."""
        c = self.config
        self.check_delta(units)
        expected = min(batch_size * world_size, units)
        rate = expected / units
        noise = planned_noise(c, rate, steps)
        after = epsilon(
            [*self.spends, Spend(round_id, noise, rate, steps, unit=c.unit)], c.delta, c.accountant
        )
        if after > c.max_epsilon:
            refusal = (
                f"privacy budget spent: this agent has spent epsilon {self.epsilon:.3f} (delta"
                f" {c.delta:g}) and round {round_id} would take it to {after:.3f}, over"
                f" privacy.dp.max_epsilon ({c.max_epsilon:g})"
            )
            self._save(self.spends, Exhausted(self.settings(units, batch_size, world_size, steps), refusal))
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
            self._save(self.spends, None)
        return self.exhausted is not None

    def record(self, round_id: int, dp: DpStep, steps: int) -> float:
        """Add a round's spend, durably, before its update leaves the cloud; the epsilon after it."""
        spend = Spend(round_id, dp.noise_multiplier, dp.sample_rate, steps, time.time(), self.config.unit)
        self._save([*self.spends, spend], None)
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

    def _save(self, spends: list[Spend], exhausted: Exhausted | None) -> None:
        data: dict[str, object] = {"spends": [asdict(s) for s in spends]}
        if exhausted is not None:
            data["exhausted"] = asdict(exhausted)
        replace_durably(self.path, json.dumps(data, indent=1).encode())
        self.spends, self.exhausted = spends, exhausted


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
    return (
        f"{unit} spent over {len(ledger.spends)} rounds (delta {config.delta:g}, {config.accountant}"
        f" accountant, {clipped} {config.max_grad_norm:g})"
    )
