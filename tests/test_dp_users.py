"""User-level differential privacy: records that name their user, rows kept with their user in
the token store, users dealt whole to ranks, DP-SGD that samples users and clips each sampled
user's mean gradient, and a ledger that never mixes units."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from agent.cli import check
from agent.daemon import Agent
from agent.data import Example, TokenBlocks, held_out, iter_records, record_blocks, user_key
from agent.demo import prepare
from agent.dp_budget import (
    EVAL_TOKENS,
    EVAL_UNITS,
    LEDGER,
    RECORDS,
    CountRelease,
    PrivacyLedger,
    Spend,
    describe,
    epsilon,
)
from agent.dp_sgd import DpStep
from agent.dp_units import PrivacyUnits, micro_batches, user_units
from agent.token_store import TokenStore, open_entry
from agent.trainer import LoraTrainer
from common.config import AgentConfig, AggregatorConfig, DpConfig, load
from common.errors import ConfigError
from common.tinylm import DOMAINS, build_tiny_lm, domain_corpus
from server.app import build_aggregator
from server.cli import seed
from tests.agentsim import in_process
from tests.test_dp import BLOCK, LORA, _private, _record_gradient
from tests.test_faults import query

USERS = DpConfig(enabled=True, noise_multiplier=1.0, delta=1e-5, unit="user", records_per_user=4)
SIZES = [1, 5, 2, 3, 1, 4, 2, 6]
"""Rows of each user in the fixture: some larger than a micro-batch of 3, some alone in one."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, TokenBlocks, np.ndarray]:
    """A tiny Llama on disk, 24 records one row each, and the user of each row (users' rows are
    interleaved, as a corpus would have them)."""
    root: Path = tmp_path_factory.mktemp("dp-users")
    docs = [doc for domain in DOMAINS for doc in domain_corpus(domain, 12, seed=1)]
    path = str(build_tiny_lm(root / "model", docs))
    rows, _ = record_blocks(
        LoraTrainer(path, LORA).tokenizer, [Example.plain(d) for d in domain_corpus(DOMAINS[0], 24)], BLOCK
    )
    owners = np.repeat(np.arange(len(SIZES)), SIZES)
    return path, rows, np.random.default_rng(0).permutation(owners)


def _user_gradients(trainer: LoraTrainer, rows: TokenBlocks, owners: np.ndarray) -> list[list[torch.Tensor]]:
    """Each user's mean record gradient, by plain autograd one record at a time."""
    out = []
    for user in range(len(SIZES)):
        records = [_record_gradient(trainer, rows[i : i + 1]) for i in np.flatnonzero(owners == user)]
        out.append([sum(r[k] for r in records) / len(records) for k in range(len(records[0]))])
    return out


def _norm(grads: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.norm()) ** 2 for g in grads))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_the_private_gradient_sums_each_users_clipped_mean_gradient(tiny, checkpointing: bool) -> None:  # type: ignore[no-untyped-def]
    """Every user sampled, no noise: the gradient is each user's mean record gradient (plain
    autograd, no checkpointing), clipped, summed, over the expected batch of users; micro-batches
    of 3 rows, which split users of up to 6 rows, change nothing, nor does activation
    checkpointing; it is not the record-level gradient."""
    path, rows, owners = tiny
    users = _user_gradients(_private(path), rows, owners)
    trainer = _private(path, checkpointing)
    norms = [_norm(u) for u in users]
    clip = float(np.median(norms))
    assert sum(n > clip * 1.01 for n in norms) >= 3 and sum(n < clip * 0.99 for n in norms) >= 3
    want = [
        sum(u[k] * min(1.0, clip / (n + 1e-6)) for u, n in zip(users, norms, strict=True)) / 5.0
        for k in range(len(users[0]))
    ]
    units = PrivacyUnits.grouped(np.arange(len(rows)), owners)
    assert trainer.private is not None
    results = []
    for micro_batch in (3, 100):
        loss, count, finite = trainer.private.step(rows, DpStep(0.0, clip, 1.0, 5.0, 100), micro_batch, units)
        assert count == len(rows) and finite and math.isfinite(loss)
        results.append([p.grad.clone() for p in trainer.private.params])  # type: ignore[union-attr]
    for got in results:
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    trainer.private.step(rows, DpStep(0.0, clip, 1.0, 5.0), 100)  # each record its own unit
    records = [p.grad for p in trainer.private.params]
    assert any(not torch.allclose(r, w, rtol=1e-2) for r, w in zip(records, want, strict=True))


def test_a_user_with_many_records_moves_the_gradient_no_more_than_the_clip(tiny) -> None:  # type: ignore[no-untyped-def]
    """The sensitivity the guarantee rests on: one user holding all 24 records moves the noiseless
    sum by at most max_grad_norm, where the same records as 24 units move it by far more."""
    path, rows, _ = tiny
    trainer = _private(path)
    assert trainer.private is not None
    clip = 1e-3  # below every record's gradient norm
    one_user = PrivacyUnits.grouped(np.arange(len(rows)), np.zeros(len(rows), dtype=np.int64))
    trainer.private.step(rows, DpStep(0.0, clip, 1.0, 1.0, len(rows)), 8, one_user)
    as_user = _norm([p.grad for p in trainer.private.params])  # type: ignore[misc]
    trainer.private.step(rows, DpStep(0.0, clip, 1.0, 1.0), 8)
    as_records = _norm([p.grad for p in trainer.private.params])  # type: ignore[misc]
    assert as_user <= clip * (1 + 1e-4) and as_records > 5 * clip


def test_records_per_user_caps_the_rows_of_a_user_a_step_draws_at_random() -> None:
    units = PrivacyUnits.grouped(np.arange(20, 32), np.array([7] * 10 + [3] * 2))
    assert len(units) == 2 and units.rows == 12 and not units.single_rows
    generator = torch.Generator().manual_seed(0)
    draws = [units.draw(torch.tensor([0, 1]), 3, generator) for _ in range(20)]
    for rows, sizes in draws:
        assert sizes.tolist() == [2, 3]  # user 3 (2 rows, both) then user 7 (3 of its 10)
        assert sorted(rows[:2].tolist()) == [30, 31] and set(rows[2:].tolist()) <= set(range(20, 30))
        assert len(set(rows[2:].tolist())) == 3
    assert len({tuple(sorted(r[2:].tolist())) for r, _ in draws}) > 5  # a fresh subset each step
    assert [s.tolist() for _, s in [units.draw(torch.tensor([], dtype=torch.long), 3, generator)]] == [[]]


def test_users_are_poisson_sampled_at_the_rate(tiny) -> None:  # type: ignore[no-untyped-def]
    """Each step draws each user with the sample rate, all of their rows or none."""
    path, rows, owners = tiny
    trainer = _private(path)
    assert trainer.private is not None
    units = PrivacyUnits.grouped(np.arange(len(rows)), owners)
    counts = set()
    drawn = 0
    for _ in range(30):
        count = trainer.private.step(rows, DpStep(1.0, 1.0, 0.5, 4.0, 100), 8, units)[1]
        counts.add(count)
        drawn += count
    possible = {sum(c) for c in _subsets(SIZES)}
    assert counts <= possible and len(counts) >= 4  # unions of whole users, varying
    assert 0.35 < drawn / (30 * len(rows)) < 0.65


def _subsets(sizes: list[int]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for s in sizes:
        out += [(*o, s) for o in out]
    return out


def test_users_are_dealt_whole_to_the_ranks() -> None:
    keys = np.array([user_key(str(u)) for u in np.random.default_rng(1).integers(0, 30, 300)])
    shards = [user_units(keys, rank, 3) for rank in range(3)]
    rows = [set(s.order.tolist()) for s in shards]
    assert set().union(*rows) == set(range(300)) and sum(map(len, rows)) == 300
    owners_by_rank = [{int(keys[r]) for r in rs} for rs in rows]
    assert all(a.isdisjoint(b) for i, a in enumerate(owners_by_rank) for b in owners_by_rank[i + 1 :])
    assert sum(len(s) for s in shards) == len(set(keys.tolist())) and all(len(s) >= 5 for s in shards)
    for shard in shards:  # each unit's rows belong to one user
        for u in range(len(shard)):
            unit_rows = shard.order[int(shard.starts[u]) : int(shard.starts[u + 1])]
            assert len({int(keys[r]) for r in unit_rows}) == 1
    with pytest.raises(ConfigError, match="2 users cannot be shared by 3 ranks"):
        user_units(np.array([5, 5, 9]), 2, 3)


def test_users_are_dealt_so_that_the_ranks_expect_the_same_work() -> None:
    """Six users of 40 records among 60 of one: dealt in key order, the heavy ones could share a
    rank; dealt heaviest first in snake order, each rank's rows a step (a user's capped at 8)
    differ by at most one user's. Whatever the order of the rows, the deal is the same."""
    users = [f"heavy-{u}" for u in range(6) for _ in range(40)] + [f"light-{u}" for u in range(60)]
    keys = np.array([user_key(u) for u in users])
    for world in (2, 3, 4):
        shards = [user_units(keys, rank, world, cap=8) for rank in range(world)]
        work = [sum(min(8, int(n)) for n in torch.diff(s.starts)) for s in shards]
        assert sum(work) == 6 * 8 + 60 and max(work) - min(work) <= 8, (world, work)
        heavy = [sum(int(n) == 40 for n in torch.diff(s.starts)) for s in shards]
        assert max(heavy) - min(heavy) <= 1, (world, heavy)
        uncapped = [s.rows for s in [user_units(keys, rank, world) for rank in range(world)]]
        assert max(uncapped) - min(uncapped) <= 40, (world, uncapped)
    shuffled = np.random.default_rng(3).permutation(len(keys))
    for rank in range(3):
        mine = {int(keys[r]) for r in user_units(keys, rank, 3, cap=8).order.tolist()}
        assert mine == {
            int(keys[shuffled][r]) for r in user_units(keys[shuffled], rank, 3, cap=8).order.tolist()
        }


def test_micro_batches_hold_whole_users() -> None:
    assert micro_batches(torch.tensor([2, 2, 5, 1, 1, 1, 1]), 4) == [(0, 2), (2, 3), (3, 7)]
    assert micro_batches(torch.tensor([1] * 5), 2) == [(0, 2), (2, 4), (4, 5)]
    assert micro_batches(torch.tensor([], dtype=torch.long), 4) == []


def _write_users(path: Path, users: list[object], **extra: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"text": f"record {i} of user {u} " + "words " * (i % 7), "user": u, **extra})
        for i, u in enumerate(users)
    ]
    path.write_text("\n".join(lines) + "\n")


def test_records_name_their_user_and_the_split_holds_out_whole_users(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    _write_users(data, [f"u{i % 40}" for i in range(400)])
    records = list(iter_records(data, "user"))
    assert [r.user for r in records[:3]] == ["u0", "u1", "u2"]
    sides: dict[str, set[bool]] = {}
    for r in records:
        sides.setdefault(r.user, set()).add(held_out(r.key, 0.2))
    assert all(len(s) == 1 for s in sides.values())  # every user's records on one side
    assert 2 <= sum(s == {True} for s in sides.values()) <= 16
    assert [r.user for r in iter_records(data)] == [""] * 400  # not read without user-level privacy
    _write_users(data, [7, "7"])
    assert {r.user for r in iter_records(data, "user")} == {"7"}
    data.write_text(json.dumps({"text": "t", "meta": {"user_id": "ann"}}) + "\n")  # a dotted path
    assert [r.user for r in iter_records(data, "meta.user_id")] == ["ann"]
    with pytest.raises(ConfigError, match=r"data.jsonl:1: .*'meta.account'.*got None"):
        list(iter_records(data, "meta.account"))
    for bad, shown in ((None, "None"), (True, "True"), ("", "''"), ([1], r"\[1\]")):
        _write_users(data, ["a", bad])
        with pytest.raises(
            ConfigError, match=rf"data.jsonl:2: user-level privacy needs .*'user'.*got {shown}"
        ):
            list(iter_records(data, "user"))
    text = tmp_path / "notes.txt"
    text.write_text("a document\n\nanother\n")
    with pytest.raises(ConfigError, match="plain-text documents name no user"):
        list(iter_records(text, "user"))


def test_the_token_store_keeps_each_rows_user_across_chunks_and_dropped_rows(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Rows are written in chunks of 3 records; every fifth record has nothing to learn within a
    block (its completion lies past the cut) and loses its row: each kept row still carries its
    own record's user, and the entry is keyed apart from the record-level one."""
    path, _, _ = tiny
    tokenizer = LoraTrainer(path, LORA).tokenizer
    monkeypatch.setattr("agent.token_store.CHUNK_TOKENS", 3 * BLOCK)
    data = tmp_path / "data.jsonl"
    lines = []
    for i in range(120):
        user = f"user-{i % 13}"
        if i % 5 == 4:
            record = {"prompt": "x " * 200, "completion": "late", "user": user}
        else:
            record = {"text": f"{user} wrote record {i}", "user": user}
        lines.append(json.dumps(record))
    data.write_text("\n".join(lines) + "\n")
    store = TokenStore(tmp_path / "tokens")
    corpus = store.corpus(data, 0.2, user_field="user")
    entry = open_entry(store.prepare(corpus, tokenizer, BLOCK, True), BLOCK)
    train = [r for r in iter_records(data, "user") if not held_out(r.key, 0.2)]
    want_rows, _ = record_blocks(tokenizer, train, BLOCK)
    kept = [r for r in train if not isinstance(r, Example) or r.learned == ((0, len(r.text)),)]
    assert entry.train_users is not None and len(entry.train_users) == len(want_rows) == len(kept) > 40
    assert torch.equal(entry.train.input_ids, want_rows.input_ids)
    assert entry.train_users.tolist() == [user_key(r.user) for r in kept]
    record_level = store.prepare(store.corpus(data, 0.2), tokenizer, BLOCK, True)
    assert open_entry(record_level, BLOCK).train_users is None


def test_the_ledger_keeps_the_unit_and_never_mixes_units(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, USERS)
    with pytest.raises(ConfigError, match=r"below 1 / training users \(1/100000\)"):
        ledger.check_delta(100_000)
    step = ledger.plan(1, 400, 8, 2, 10)
    assert step.sample_rate == 16 / 400 and step.expected_batch == 16 and step.records_per_unit == 4
    ledger.record(1, step, 10)
    assert [s.unit for s in PrivacyLedger(tmp_path, USERS).spends] == ["user"]
    assert describe(USERS, tmp_path).startswith("user-level DP-SGD: epsilon ")
    assert "each user's mean gradient over up to 4 records clipped to 1" in describe(USERS, tmp_path)
    record_level = dataclasses.replace(USERS, unit="record")
    with pytest.raises(ConfigError, match="holds rounds spent protecting a user"):
        PrivacyLedger(tmp_path, record_level)
    old = tmp_path / "old"  # a ledger written before units were recorded protects records
    (old / "privacy").mkdir(parents=True)
    spend = {k: v for k, v in dataclasses.asdict(Spend(1, 1.0, 0.1, 5)).items() if k != "unit"}
    (old / "privacy" / "dp-ledger.json").write_text(json.dumps({"spends": [spend]}))
    assert PrivacyLedger(old, record_level).spends[0].unit == "record"
    with pytest.raises(ConfigError, match="protecting a record"):
        PrivacyLedger(old, USERS)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"unit": "customer"}, "privacy.dp.unit: expected one of record, user"),
        ({"user_field": ""}, "privacy.dp.user_field must name"),
        ({"records_per_user": 0}, "privacy.dp.records_per_user must be >= 1"),
    ],
)
def test_the_config_refuses_a_bad_user_setting(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(USERS, **change).validate()


async def test_the_agent_daemon_trains_a_round_with_user_level_dp(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real agent daemon in process, its JSONL records of 30 users: it refuses records without
    a user at start; `check --tokenize` builds the entry and counts the training users; the daemon
    announces the noised count of its users its ledger released at an earlier start (its FedAvg
    weight, at Join and in the upload), trains a round on them sampling users (the ledger's rate
    is batch / announced users), and exports its epsilon per user."""
    agg_path, agent_paths, _ = prepare(tmp_path, rounds=1, secagg=False)
    data = agent_paths[0].parent / "data.jsonl"
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    env = {
        "CLOUDFED_AGENT_PRIVACY_DP_ENABLED": "true",
        "CLOUDFED_AGENT_PRIVACY_DP_UNIT": "user",
        "CLOUDFED_AGENT_PRIVACY_DP_RECORDS_PER_USER": "3",
        "CLOUDFED_AGENT_PRIVACY_DP_NOISE_MULTIPLIER": "1.0",
        "CLOUDFED_AGENT_PRIVACY_DP_DELTA": "1e-3",
        "CLOUDFED_AGENT_PRIVACY_DP_MAX_EPSILON": "50",
        "CLOUDFED_AGENT_MAX_ROUNDS": "1",
        "CLOUDFED_AGENT_ACTIVATION_CHECKPOINTING": "true",  # DP-SGD recomputes activations too
        "CLOUDFED_AGENT_PRIVACY_DP_EVAL_MAX_DEVIATION": "inf",  # share however noisy (3 held-out users)
    }
    config = dataclasses.replace(load(AgentConfig, agent_paths[0], env=env), metrics_listen="")
    with pytest.raises(ConfigError, match=r"data.jsonl:1: user-level privacy needs .*'user'"):
        Agent(config)
    data.write_text(
        "".join(json.dumps({"text": t, "user": f"customer-{i % 30}"}) + "\n" for i, t in enumerate(texts))
    )
    agg = dataclasses.replace(
        load(AggregatorConfig, agg_path, env={"CLOUDFED_ROUNDS_MIN_AGENTS": "1"}), metrics_listen=""
    )

    def _held(u: int) -> bool:
        return held_out(json.dumps(["user", f"customer-{u}"]), config.eval_fraction)

    held = sum(_held(u) for u in range(30))
    seed(agg, None)
    server = build_aggregator(agg)
    await server.start()
    try:
        assert await check(config, tokenize=True) == 0  # the preflight builds the user-level entry
    finally:
        await server.stop(0)
    out = capsys.readouterr().out
    assert f"a record a row (DP), {30 - held} training users from 'user')" in out, out
    model_line = (
        r"model           model: [\d.]+M parameters; base weights [\d.]+ MB in fp32 on cpu \(bf16: .* free"
    )
    assert re.search(model_line, out), out
    assert "dp              user-level DP-SGD: epsilon 0.000 of 50 for each user (field 'user')" in out
    plan = re.search(
        r"dp plan         (\d+) training users, a step samples 8 \(rate \S+\) on 1 rank\(s\):"
        r" noise multiplier 1\.000, epsilon \S+ after the next; the budget \(50\) lasts (\d+) more rounds"
        r" of (\d+) steps",
        out,
    )
    assert plan, out
    users, lasts, steps = (int(g) for g in plan.groups())
    assert users == 30 - held and lasts > 1

    def spent(rounds: int) -> float:  # what that many rounds would cost, with the two count releases
        releases = [CountRelease(users, users, 20.0, unit="user")] * 2  # users; records (noise x cap)
        return epsilon([Spend(0, 1.0, 8 / users, rounds * steps)], 1e-3, "rdp", releases)

    assert spent(lasts) <= 50 < spent(lasts + 1)
    # as if drawn at an earlier start, which this start announces again: the users (the sample
    # rate is over them) and the records, each user's up to 3 (the FedAvg weight)
    announced, capped = 30 - held + 13, sum(min(3, len(texts[u::30])) for u in range(30) if not _held(u))
    weighs = capped - 5
    kept = [
        CountRelease(30 - held, announced, 2.0, 0.0, "user"),
        CountRelease(capped, weighs, 2.0, 0.0, "user", RECORDS, 3),
    ]
    ledger_file = config.state_dir / "privacy" / LEDGER
    ledger_file.parent.mkdir(parents=True)
    ledger_file.write_text(json.dumps({"spends": [], "counts": [dataclasses.asdict(k) for k in kept]}))
    caplog.set_level(logging.INFO)
    async with in_process(agg, Agent(config)) as run, asyncio.timeout(120):
        await run.agents[0]  # trains round 1, evaluates version 1 and stops
    assert "round 1 trained" in caplog.text and "tokenized before" in caplog.text
    assert "base weights torch.float32, activation checkpointing" in caplog.text
    ledger = PrivacyLedger(config.state_dir, config.privacy.dp)
    (spend,), spent = ledger.spends, ledger.epsilon
    assert ledger.training_counts == kept  # the same users and records: no new release
    # versions 0 and 1's eval losses left the cloud with DP, over the held-out users (a budget of
    # their own): their noisy sums over the users' noisy count, weighed by their noisy tokens
    users_count, tokens_count = (c for c in ledger.counts if not c.training)
    assert (users_count.units, users_count.kind, users_count.sensitivity) == (held, EVAL_UNITS, 1)
    assert (tokens_count.kind, tokens_count.sensitivity) == (EVAL_TOKENS, 3 * 64)  # 3 records a user
    assert [r.version for r in ledger.evals] == [0, 1]
    assert all(0 < r.clipped_sum <= 10 * held and r.unit == "user" for r in ledger.evals)
    received = "SELECT version, eval_loss, tokens, loss_stddev FROM evals"
    assert query(agg.state_dir / "cloudfed.db", received) == [
        (
            r.version,
            pytest.approx(min(max(r.released_sum / users_count.released, 0.0), 10.0)),
            tokens_count.released,
            pytest.approx(20.0 * 10.0 / users_count.released),  # with the deviation of its noise
        )
        for r in ledger.evals
    ]
    assert ledger.eval_epsilon == pytest.approx(
        epsilon([], 1e-3, "rdp", [users_count, tokens_count, *[CountRelease(0, 0, 20.0)] * 2])
    )  # four Gaussian releases of noise 20 (the losses' over their clip)
    assert "dp eval plan    " in out and f"{held} held-out users" in out
    assert query(agg.state_dir / "cloudfed.db", "SELECT num_examples FROM agents") == [(weighs,)]
    assert query(
        agg.state_dir / "cloudfed.db", "SELECT weight FROM participants WHERE status = 'uploaded'"
    ) == [(weighs,)]
    at_join = epsilon([], 1e-3, "rdp", kept)  # the releases were spent before the Join
    assert query(agg.state_dir / "cloudfed.db", "SELECT differential_privacy FROM agents") == [
        (f"user-level DP-SGD, epsilon {spent:.3f} of 50 spent after round 1 (delta 0.001)",)
    ]  # what the agent announced at Join, restated with its upload's spend, for the operators
    assert f"epsilon {at_join:.3f} of 50 spent at its last Join" in caplog.text  # the Join's line
    assert f"records of {30 - held} users (at most 3 records of a user a step)" in caplog.text
    assert spend.unit == "user" and spend.sample_rate == pytest.approx(8 / announced)
    exported = {  # other tests in this process may have exported record-level gauges for aws
        sample.name
        for family in REGISTRY.collect()
        if family.name.startswith("cloudfed_agent_dp_epsilon")
        for sample in family.samples
        if sample.labels.get("cloud") == "aws" and sample.labels["unit"] == "user" and sample.value > 0
    }
    assert exported == {"cloudfed_agent_dp_epsilon", "cloudfed_agent_dp_epsilon_budget"}
