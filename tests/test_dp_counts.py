"""The FedAvg weight under differential privacy: the count of training units an agent announces
is released through the Gaussian mechanism, composed with its rounds, kept across restarts and
released again only when the count changes; the corpus counts the distinct users it covers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import statistics
import warnings
from pathlib import Path

import pytest
from opacus.accountants.utils import get_noise_multiplier

from agent import token_store
from agent.daemon import Agent
from agent.demo import prepare
from agent.dp_budget import (
    LEDGER,
    RECORDS,
    CountRelease,
    PrivacyBudgetSpent,
    PrivacyLedger,
    Spend,
    describe,
    epsilon,
    planned_noise,
    preview,
)
from agent.dp_sgd import DpStep
from agent.token_store import TokenStore
from common.config import AgentConfig, AggregatorConfig, DpConfig, load
from common.errors import ConfigError
from tests.agentsim import in_process
from tests.test_faults import query

DP = DpConfig(enabled=True, noise_multiplier=1.0, max_epsilon=8.0, delta=1e-5, count_noise=20.0)


def test_the_released_count_is_the_true_one_plus_gaussian_noise(tmp_path: Path) -> None:
    """Over fresh ledgers the releases of 3,000 records centre on 3,000 with the configured
    deviation (5 standard errors either side), and the true count stays in the ledger beside it."""
    released = [PrivacyLedger(tmp_path / str(i), DP).released_count(3000) for i in range(300)]
    assert abs(statistics.fmean(released) - 3000) < 5 * 20 / 300**0.5
    assert 16 < statistics.stdev(released) < 24
    assert len(set(released)) > 30
    kept = json.loads((tmp_path / "0" / "privacy" / LEDGER).read_text())["counts"]
    assert [(c["units"], c["released"], c["noise"], c["unit"]) for c in kept] == [
        (3000, released[0], 20.0, "record")
    ]


def test_the_same_count_is_released_once_and_a_changed_one_again(tmp_path: Path) -> None:
    """A restart announces the stored release at no cost; another count is a new release, and
    the epsilon is that of the Gaussian mechanisms composed (with the rounds, too)."""
    ledger = PrivacyLedger(tmp_path, DP)
    first = ledger.released_count(3000)
    one = ledger.epsilon
    alone = epsilon([], DP.delta, DP.accountant, [CountRelease(3000, first, 20.0)])
    assert one == pytest.approx(alone) and 0 < one < 1
    restarted = PrivacyLedger(tmp_path, DP)
    assert restarted.released_count(3000) == first and restarted.epsilon == pytest.approx(one)
    assert len(restarted.counts) == 1
    grown = restarted.released_count(3100)
    assert [c.units for c in PrivacyLedger(tmp_path, DP).counts] == [3000, 3100]
    assert restarted.epsilon > one
    assert restarted.epsilon == pytest.approx(epsilon([], DP.delta, DP.accountant, restarted.counts))
    assert PrivacyLedger(tmp_path, DP).released_count(3100) == grown
    dp = restarted.plan(1, grown, 8, 1, 50)
    assert dp.sample_rate == 8 / grown  # the rate follows the announced count, not the true one
    after = restarted.record(1, dp, 50)
    rounds_alone = epsilon(restarted.spends, DP.delta, DP.accountant)
    assert after > rounds_alone and after > restarted.epsilon - 1e-9 > 0
    assert after == pytest.approx(epsilon(restarted.spends, DP.delta, DP.accountant, restarted.counts))


def test_a_release_over_the_budget_is_refused_and_nothing_is_kept(tmp_path: Path) -> None:
    tight = dataclasses.replace(DP, max_epsilon=0.5, count_noise=2.0)  # one release costs ~2.6
    ledger = PrivacyLedger(tmp_path, tight)
    with pytest.raises(PrivacyBudgetSpent, match=r"new count of training records would take it to \d"):
        ledger.released_count(3000)
    assert ledger.counts == [] and not ledger.path.exists()
    with pytest.raises(ConfigError, match=r"delta \(1e-05\) must be below 1 / training records"):
        PrivacyLedger(tmp_path, DP).released_count(100_000)  # checked on the true count first


def test_planned_rounds_leave_room_for_the_count_release(tmp_path: Path) -> None:
    """Without releases the bisection finds opacus' noise; with one, a little more noise, and the
    planned rounds and the release together still spend (almost) exactly the budget."""
    config = DpConfig(enabled=True, max_epsilon=3.0, delta=1e-5, planned_rounds=4, count_noise=5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opacus = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=8 / 400, steps=200)
    plain = planned_noise(config, 8 / 400, 50)
    assert plain == pytest.approx(opacus, rel=0.02)
    ledger = PrivacyLedger(tmp_path, config)
    released = ledger.released_count(400)
    noise = planned_noise(config, 8 / released, 50, tuple(r.mechanism for r in ledger.counts))
    assert noise > plain
    for round_id in range(4):
        dp = ledger.plan(round_id, released, 8, 1, 50)
        assert dp.noise_multiplier == noise
        ledger.record(round_id, dp, 50)
    assert 3.0 - 0.02 < ledger.epsilon <= 3.0
    with pytest.raises(PrivacyBudgetSpent):
        ledger.plan(5, released, 8, 1, 50)


def test_a_ledger_never_mixes_the_units_of_its_counts(tmp_path: Path) -> None:
    users = dataclasses.replace(DP, unit="user")
    PrivacyLedger(tmp_path, users).released_count(500)
    with pytest.raises(ConfigError, match="protecting a user"):
        PrivacyLedger(tmp_path, DP)
    old = tmp_path / "old"  # a ledger from before count releases: no counts, nothing spent on one
    (old / "privacy").mkdir(parents=True)
    (old / "privacy" / LEDGER).write_text(json.dumps({"spends": [dataclasses.asdict(Spend(1, 1.0, 0.1, 5))]}))
    assert PrivacyLedger(old, DP).counts == []


def test_the_preview_counts_the_rounds_the_budget_lasts_and_spends_nothing(tmp_path: Path) -> None:
    """From an empty ledger the preview counts the release it would make; once the count is
    released and a round spent, it counts them and no second release; the ledger is unchanged."""
    config = dataclasses.replace(DP, max_epsilon=3.0)

    def lasts(line: str) -> int:
        found = re.search(r"lasts (\d+) more rounds of 50 steps", line)
        assert found, line
        return int(found[1])

    fresh = preview(config, tmp_path, 400, 8, 50)
    assert fresh.startswith(
        "400 training records, a step samples 8 (rate 0.02) on 1 rank(s): noise multiplier 1.000"
    )
    assert not (tmp_path / "privacy" / LEDGER).exists()
    rounds = lasts(fresh)
    release = CountRelease(400, 400, 20.0)

    def spent(n: int, spends: list[Spend]) -> float:
        return epsilon([*spends, Spend(0, 1.0, 0.02, n * 50)], 1e-5, "rdp", [release])

    assert rounds > 1 and spent(rounds, []) <= 3.0 < spent(rounds + 1, [])
    ledger = PrivacyLedger(tmp_path, config)
    ledger.released_count(400)
    ledger.record(1, DpStep(1.0, 1.0, 0.02, 8.0), 50)
    before = ledger.path.read_text()
    assert lasts(preview(config, tmp_path, 400, 8, 50)) == rounds - 1
    assert ledger.path.read_text() == before
    assert "lasts 0 more rounds" in preview(
        dataclasses.replace(config, max_epsilon=0.3), tmp_path, 400, 8, 50
    )
    two = preview(config, tmp_path / "other", 400, 8, 50, ranks=2)
    assert "a step samples 16 (rate 0.04) on 2 rank(s)" in two and lasts(two) < rounds


def test_check_describes_the_announced_count(tmp_path: Path) -> None:
    assert "announces" not in describe(DP, tmp_path)
    released = PrivacyLedger(tmp_path, DP).released_count(3000)
    assert describe(DP, tmp_path).endswith(
        f"; weighs its updates by {released} training records (noise deviation 20; 1 count release)"
    )


@pytest.mark.parametrize("change", [{"count_noise": 0.0}, {"count_noise": float("nan")}])
def test_the_config_refuses_a_count_noise_that_is_not_positive(change: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match=r"privacy\.dp\.count_noise must be > 0"):
        dataclasses.replace(DP, **change).validate()


def test_the_corpus_counts_each_training_users_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Users counted once however many records they hold, the held-out users not at all, in
    batches smaller than the corpus; their records counted up to a cap as the user-level weight
    is; a count stored before users were counted is made again."""
    monkeypatch.setattr(token_store._UserRecords, "BATCH", 7)
    data = tmp_path / "data.jsonl"
    owners = [f"customer-{i % 23}" for i in range(150)] + ["whale"] * 40  # one user holds 40 records
    lines = [{"text": f"record {i} of {user}", "user": user} for i, user in enumerate(owners)]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    store = TokenStore(tmp_path / "tokens")
    corpus = store.corpus(data, 0.2, user_field="user")
    held = {u for u in set(owners) if token_store.held_out(json.dumps(["user", u]), 0.2)}
    assert "whale" not in held  # the split's hash keeps this name in training
    records = {u: owners.count(u) for u in set(owners) - held}
    assert corpus.train_users == corpus.train_units == len(records) and 10 < len(records) <= 24
    assert corpus.train_records == sum(records.values())
    assert corpus.capped_records(4) == sum(min(n, 4) for n in records.values())
    assert corpus.capped_records(1000) == corpus.train_records
    assert dict(corpus.user_records) == {
        n: sum(1 for m in records.values() if m == n) for n in set(records.values())
    }
    plain = TokenStore(tmp_path / "plain").corpus(data, 0.2)
    assert (plain.train_users, plain.train_units) == (0, plain.train_records)
    counts = store.root / "corpus.json"
    stored = json.loads(counts.read_text())
    assert [tuple(pair) for pair in stored["user_records"]] == list(corpus.user_records)
    del stored["user_records"]
    stored["train"] = 1  # from an older version: counted again, not trusted
    counts.write_text(json.dumps(stored))
    again = store.corpus(data, 0.2, user_field="user")
    assert (again.train_records, again.user_records) == (corpus.train_records, corpus.user_records)


def test_a_user_level_ledger_releases_the_weight_with_noise_scaled_by_the_cap(tmp_path: Path) -> None:
    """The user-level weight (records, each user's up to records_per_user = 8) is its own release:
    noise of deviation 8 x 20 (over 200 fresh ledgers), the same accounting as a count of users,
    kept apart from the count of users it is released beside."""
    users = dataclasses.replace(DP, unit="user", records_per_user=8)
    released = []
    for i in range(200):
        ledger = PrivacyLedger(tmp_path / str(i), users)
        ledger.released_count(400)
        released.append(ledger.released_count(3000, RECORDS, 8))
    assert (
        120 < statistics.stdev(released) < 200 and abs(statistics.fmean(released) - 3000) < 5 * 160 / 200**0.5
    )
    units, weight = PrivacyLedger(tmp_path / "0", users).counts
    assert (units.kind, units.units, weight.kind, weight.units, weight.sensitivity) == (
        "units",
        400,
        RECORDS,
        3000,
        8,
    )
    alone = epsilon([], DP.delta, DP.accountant, [units])
    assert PrivacyLedger(tmp_path / "0", users).epsilon == pytest.approx(
        epsilon([], DP.delta, DP.accountant, [units] * 2)
    )
    assert PrivacyLedger(tmp_path / "0", users).epsilon > alone
    again = PrivacyLedger(tmp_path / "0", users)
    assert again.released_count(3000, RECORDS, 8) == weight.released and len(again.counts) == 2
    again.released_count(3000, RECORDS, 4)  # another cap: another release
    assert [c.sensitivity for c in PrivacyLedger(tmp_path / "0", users).counts] == [1, 8, 4]


async def test_an_agent_whose_new_count_does_not_fit_still_joins_to_evaluate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The real agent daemon with a ledger whose rounds left too little budget for a count
    release (as one from before releases, or whose data grew after its last round): it releases
    nothing, joins with no count, announcing its budget spent, so no round is started for it,
    and evaluates the global version all the same."""
    agg_path, agent_paths, _ = prepare(tmp_path, rounds=1, secagg=False)
    uri = "spiffe://demo.cloudfed/cloud/aws/agent/agent-1"
    rounds_spent = epsilon([Spend(1, 1.0, 0.05, 50)], 1e-4, "rdp")
    env = {
        "CLOUDFED_AGENT_PRIVACY_DP_ENABLED": "true",
        "CLOUDFED_AGENT_PRIVACY_DP_NOISE_MULTIPLIER": "1.0",
        "CLOUDFED_AGENT_PRIVACY_DP_DELTA": "1e-4",
        "CLOUDFED_AGENT_PRIVACY_DP_MAX_EPSILON": f"{rounds_spent + 0.01}",
        "CLOUDFED_AGENT_PRIVACY_DP_COUNT_NOISE": "2",
        "CLOUDFED_AGENT_MAX_ROUNDS": "0",
    }
    config = dataclasses.replace(load(AgentConfig, agent_paths[0], env=env), metrics_listen="")
    ledger_file = config.state_dir / "privacy" / LEDGER
    ledger_file.parent.mkdir(parents=True)
    ledger_file.write_text(json.dumps({"spends": [dataclasses.asdict(Spend(1, 1.0, 0.05, 50))]}))
    agg = load(AggregatorConfig, agg_path, env={"CLOUDFED_ROUNDS_MIN_AGENTS": "1"})
    agg = dataclasses.replace(agg, metrics_listen="")
    caplog.set_level(logging.INFO)
    async with in_process(agg, Agent(config)) as run, asyncio.timeout(120):
        while "global version 0: eval loss" not in caplog.text:  # noqa: ASYNC110 (bounded poll)
            await asyncio.sleep(0.1)
        refusal = run.agg.rounds.agents[uri].budget_spent
        assert run.agg.rounds.trainable == [] and run.agg.rounds.state.round_id == 0
    assert refusal.startswith("privacy budget spent: this agent has spent epsilon") and "new count" in refusal
    assert "joining to evaluate new versions only, with no count" in caplog.text
    assert query(agg.state_dir / "cloudfed.db", "SELECT num_examples FROM agents") == [(0,)]
    assert PrivacyLedger(config.state_dir, config.privacy.dp).training_counts == []  # nothing released
