"""Record-level differential privacy in the agent: DP-SGD's clipped, noised gradients, one record
a row, the privacy ledger and its budget, and the config's refusals."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import sqlite3
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from agent.causal_loss import per_record_loss
from agent.daemon import Agent
from agent.data import IGNORE, Example, TokenBlocks, record_blocks
from agent.demo import prepare
from agent.dp_budget import LEDGER, PrivacyBudgetSpent, PrivacyLedger, Spend, describe, epsilon, planned_noise
from agent.dp_sgd import DpStep
from agent.trainer import LocalTraining, LoraSpec, LoraTrainer, initial_adapter
from common.config import AgentConfig, AggregatorConfig, DpConfig, PrivacyConfig, load
from common.errors import ConfigError, DataLoss
from common.tinylm import DOMAINS, build_tiny_lm, domain_corpus
from tests.agentsim import in_process
from tests.daemons import run_cli, start, stop, torchrun, wait_serving

LORA = LoraSpec(4, 8.0, ("q_proj", "v_proj"))
BLOCK = 32
DP = DpConfig(enabled=True, noise_multiplier=1.0, max_epsilon=8.0, delta=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, TokenBlocks]:
    """A tiny Llama on disk and 24 records of one domain, one row each."""
    root: Path = tmp_path_factory.mktemp("dp")
    docs = [doc for domain in DOMAINS for doc in domain_corpus(domain, 12, seed=1)]
    path = str(build_tiny_lm(root / "model", docs))
    trainer = LoraTrainer(path, LORA)
    rows, _ = record_blocks(
        trainer.tokenizer, [Example.plain(d) for d in domain_corpus(DOMAINS[0], 24)], BLOCK
    )
    return path, rows


def _private(path: str, checkpointing: bool = False) -> LoraTrainer:
    trainer = LoraTrainer(path, LORA, private=True, checkpointing=checkpointing)
    start = initial_adapter(path, LORA, seed=3)
    start = {
        k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
        for k, v in start.items()
    }
    trainer.set_adapter(start)  # B != 0, so that every LoRA weight has a gradient
    trainer.model.train()
    return trainer


def _watch_recomputation(trainer: LoraTrainer) -> list[bool]:
    """Whether autograd was on at each forward of the first layer's query projection, from now."""
    seen: list[bool] = []
    layer = trainer.model.base_model.model.model.layers[0].self_attn.q_proj
    layer.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    return seen


def _record_gradient(trainer: LoraTrainer, row: TokenBlocks) -> list[torch.Tensor]:
    """One record's gradient of its own loss, by plain autograd."""
    params = trainer.private.params  # type: ignore[union-attr]
    for p in params:
        p.grad = None
    loss = per_record_loss(trainer.model(input_ids=row.to("cpu").input_ids).logits, row.to("cpu").labels)
    with warnings.catch_warnings():  # opacus' hooks are still on the model (they fire, unused here)
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        grads = torch.autograd.grad(loss.sum(), params)
    for p in params:
        p.grad_sample = None
    return [g.detach() for g in grads]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_the_private_gradient_is_the_sum_of_clipped_record_gradients_over_the_expected_batch(  # type: ignore[no-untyped-def]
    tiny, checkpointing: bool
) -> None:
    """With no noise and every record sampled, the gradient DP-SGD sets is each record's gradient
    (computed alone, by plain autograd, without checkpointing) clipped to max_grad_norm, summed,
    over the expected batch; micro-batches of 5 do not change it, nor does recomputing each
    layer's activations in the backward (which the test sees happen)."""
    path, rows = tiny
    records = [_record_gradient(_private(path), rows[i : i + 1]) for i in range(len(rows))]
    trainer = _private(path, checkpointing)
    recomputed = _watch_recomputation(trainer)
    norms = torch.tensor([math.sqrt(sum(float(g.norm()) ** 2 for g in r)) for r in records])
    clip = float(norms.median())  # half the records are clipped, half are not
    assert (norms > clip * 1.01).sum() >= 5 and (norms < clip * 0.99).sum() >= 5
    expected_batch = 10.0
    want = [torch.zeros_like(g) for g in records[0]]
    for r, n in zip(records, norms, strict=True):
        for w, g in zip(want, r, strict=True):
            w += g * min(1.0, clip / (float(n) + 1e-6))
    assert trainer.private is not None
    loss, count, finite = trainer.private.step(rows, DpStep(0.0, clip, 1.0, expected_batch), micro_batch=5)
    assert count == len(rows) and finite and math.isfinite(loss)
    for p, w in zip(trainer.private.params, want, strict=True):
        torch.testing.assert_close(p.grad, w / expected_batch, rtol=1e-4, atol=1e-7)
    # 5 micro-batches, each through the first layer's query projection once (with checkpointing
    # without autograd, then again with it when the backward recomputes it)
    assert recomputed == ([False, True] * 5 if checkpointing else [True] * 5)
    unclipped = [sum(r[i] for r in records) / expected_batch for i in range(len(want))]
    assert any(
        not torch.allclose(p.grad, u, rtol=1e-3)
        for p, u in zip(trainer.private.params, unclipped, strict=True)
    )


def test_the_loss_taken_in_chunks_gives_the_full_logits_private_gradient(tiny) -> None:  # type: ignore[no-untyped-def]
    """A Llama's per-record losses taken a few positions at a time (``agent.causal_loss``; what they
    keep and recompute is tested there) equal those from its full logits, and so does the private
    gradient opacus takes from them, with activation checkpointing too."""
    path, rows = tiny
    ids, labels = rows.input_ids.long(), rows.labels.long()
    trainer = _private(path)
    loss = trainer.private.loss  # type: ignore[union-attr]
    assert loss.chunked and loss.head_frozen
    full = per_record_loss(trainer.model(input_ids=ids).logits, labels)
    for chunk in (0, 5, 30, 31, 256):
        loss.chunk_logits = chunk * len(ids) * loss.vocabulary
        torch.testing.assert_close(loss.per_record(ids, labels), full, rtol=1e-5, atol=1e-6)
    grads = []  # fresh trainers: the forwards above left opacus' hooks activations to take
    for chunk, checkpointing in ((0, False), (5, False), (5, True)):
        fresh = _private(path, checkpointing)
        assert fresh.private is not None
        fresh.private.loss.chunk_logits = chunk * 8 * fresh.private.loss.vocabulary  # 8-row micro-batches
        fresh.private.step(rows, DpStep(0.0, 1.0, 1.0, 10.0), micro_batch=8)
        grads.append([p.grad.clone() for p in fresh.private.params])  # type: ignore[union-attr]
    for other in grads[1:]:
        for a, b in zip(other, grads[0], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_bf16_base_gives_the_float32_private_gradient_to_within_its_rounding(tiny) -> None:  # type: ignore[no-untyped-def]
    """DP-SGD with the frozen base in bfloat16 (``precision = "auto"`` on a GPU), with reentrant
    checkpointing and the loss in chunks: the LoRA weights stay float32 and the private gradient is
    the float32 one to within bf16's rounding (on CPU; the same code runs on CUDA)."""
    path, rows = tiny
    grads = []
    for dtype, checkpointing, chunk in ((torch.float32, False, 0), (torch.bfloat16, True, 5)):
        trainer = LoraTrainer(path, LORA, private=True, checkpointing=checkpointing, dtype=dtype)
        trainer.set_adapter(_private(path).adapter())  # the same start (B != 0)
        assert trainer.private is not None
        assert all(p.dtype == torch.float32 for p in trainer.private.params)
        trainer.losses.chunk_logits = chunk * 8 * trainer.losses.vocabulary  # 8-row micro-batches
        trainer.private.step(rows, DpStep(0.0, 1.0, 1.0, 10.0), micro_batch=8)
        grads.append(torch.cat([p.grad.flatten() for p in trainer.private.params]))  # type: ignore[union-attr]
    exact, bf16 = grads
    assert not torch.equal(bf16, exact)  # the base did run in bf16
    assert float((bf16 - exact).norm() / exact.norm()) < 0.02


def test_the_noise_has_the_stated_deviation_and_is_not_the_federations_seed(tiny) -> None:  # type: ignore[no-untyped-def]
    """Sampling no record, the gradient is the noise alone: N(0, (noise_multiplier * C)^2) over
    the expected batch, and two trainers draw different noise (it is seeded by the OS)."""
    path, rows = tiny
    grads = []
    for _ in range(2):
        trainer = _private(path)
        assert trainer.private is not None
        _, count, _ = trainer.private.step(rows, DpStep(1.5, 0.4, 0.0, 8.0), micro_batch=8)
        assert count == 0
        grads.append(torch.cat([p.grad.flatten() for p in trainer.private.params]))  # type: ignore[union-attr]
    want = 1.5 * 0.4 / 8.0
    for g in grads:  # 4,096 values: the sample deviation is within 5% of the stated one
        assert abs(float(g.std()) / want - 1) < 0.05 and abs(float(g.mean())) < 4 * want / math.sqrt(
            g.numel()
        )
    assert not torch.equal(grads[0], grads[1])


def test_records_are_poisson_sampled_at_the_rate(tiny) -> None:  # type: ignore[no-untyped-def]
    """Each step draws each record with the sample rate, independently: the count varies from step
    to step around rate x records."""
    path, rows = tiny
    trainer = _private(path)
    assert trainer.private is not None
    counts = [trainer.private.step(rows, DpStep(1.0, 1.0, 0.25, 6.0), micro_batch=8)[1] for _ in range(40)]
    mean = sum(counts) / len(counts)  # 6 expected; the mean of 40 draws has deviation 0.33
    assert 4.7 < mean < 7.3 and len(set(counts)) >= 3


def test_dp_sgd_training_lowers_the_loss_and_moves_only_by_noisy_steps(tiny) -> None:  # type: ignore[no-untyped-def]
    path, rows = tiny
    trainer = _private(path)
    start = trainer.adapter()
    before, _ = trainer.evaluate(rows)
    training = LocalTraining(steps=30, learning_rate=1e-2, batch_size=8, sequence_length=BLOCK)
    dp = DpStep(noise_multiplier=0.5, max_grad_norm=1.0, sample_rate=8 / len(rows), expected_batch=8.0)
    delta, train_loss = trainer.train(rows, training, round_id=1, dp=dp)
    after, _ = trainer.evaluate(rows)
    assert math.isfinite(train_loss) and after < before - 0.05
    assert set(delta) == set(start) and all(torch.isfinite(d).all() for d in delta.values())
    with pytest.raises(ConfigError, match="not made private"):
        LoraTrainer(path, LORA).train(rows, training, round_id=1, dp=dp)


def test_one_row_a_record_cut_and_padded_without_loss(tiny) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny
    tokenizer = LoraTrainer(path, LORA).tokenizer
    short, long = "the quick fox", " ".join(["lazy dogs sleep"] * 40)
    prompt = Example("Q: " + "x" * 400 + " A:", ((402, 407),), "k")  # its completion lies past the cut
    rows, cut = record_blocks(tokenizer, [Example.plain(short), Example.plain(long), prompt], 16)
    assert len(rows) == 2 and cut == 2  # the prompt's row has nothing to learn: dropped
    ids = tokenizer(short, add_special_tokens=False)["input_ids"]
    n = len(ids)
    assert rows.input_ids[0, :n].tolist() == ids and rows.input_ids[0, n] == tokenizer.eos_token_id
    assert rows.labels[0, : n + 1].tolist() == [*ids, tokenizer.eos_token_id]
    assert (rows.labels[0, n + 1 :] == IGNORE).all()  # padding carries no loss
    assert (rows.labels[1] != IGNORE).all()  # the long record fills its row


def test_epsilon_matches_the_moments_accountant_of_abadi_et_al() -> None:
    """Abadi et al. (2016): q = 0.01, noise 4, 10,000 steps; their moments accountant gave epsilon
    1.26 at delta 1e-5, and RDP with opacus' tighter conversion to (epsilon, delta) 1.04 (so the
    history's order and meaning are right). Splitting the steps into rounds composes to the same
    epsilon; PRV is tighter; less noise costs more."""
    whole = epsilon([Spend(1, 4.0, 0.01, 10_000)], 1e-5, "rdp")
    assert 0.95 < whole < 1.26
    rounds = [Spend(r, 4.0, 0.01, 1000) for r in range(10)]
    assert epsilon(rounds, 1e-5, "rdp") == pytest.approx(whole, rel=1e-9)
    assert epsilon(rounds, 1e-5, "prv") < whole
    assert epsilon([Spend(1, 2.0, 0.01, 10_000)], 1e-5, "rdp") > 2 * whole
    assert epsilon([], 1e-5, "rdp") == 0.0


def test_the_ledger_refuses_the_round_over_the_budget_also_after_a_restart(tmp_path: Path) -> None:
    records, batch, steps = 400, 8, 50
    one = epsilon([Spend(0, 1.0, batch / records, steps)], 1e-5, "rdp")
    two = epsilon([Spend(0, 1.0, batch / records, steps)] * 2, 1e-5, "rdp")
    three = epsilon([Spend(0, 1.0, batch / records, steps)] * 3, 1e-5, "rdp")
    config = DpConfig(enabled=True, noise_multiplier=1.0, max_epsilon=(two + three) / 2, delta=1e-5)
    ledger = PrivacyLedger(tmp_path, config)
    for round_id, want in ((1, one), (2, two)):
        dp = ledger.plan(round_id, records, batch, 1, steps)
        assert dp == DpStep(1.0, config.max_grad_norm, batch / records, float(batch))
        assert ledger.record(round_id, dp, steps) == pytest.approx(want)
    with pytest.raises(PrivacyBudgetSpent, match=f"spent epsilon {two:.3f}.* would take it to {three:.3f}"):
        ledger.plan(3, records, batch, 1, steps)
    restarted = PrivacyLedger(tmp_path, config)  # read back from the state dir
    assert [s.round_id for s in restarted.spends] == [1, 2] and restarted.epsilon == pytest.approx(two)
    with pytest.raises(PrivacyBudgetSpent):
        restarted.plan(3, records, batch, 1, steps)
    two_ranks = PrivacyLedger(tmp_path / "other", DP).plan(1, records, batch, 2, steps)
    assert two_ranks.sample_rate == 2 * batch / records and two_ranks.expected_batch == 2 * batch


def test_the_ledger_remembers_a_refusal_until_the_settings_change(tmp_path: Path) -> None:
    """A refused round is remembered durably with the settings it was planned under (what the
    agent announces at Join); the same settings keep it, other ones (the federation's steps, this
    agent's budget) forget it, and so does a round that fits."""
    records, batch, steps = 400, 8, 50
    config = DpConfig(enabled=True, noise_multiplier=1.0, max_epsilon=0.5, delta=1e-5)
    ledger = PrivacyLedger(tmp_path, config)
    assert ledger.exhausted is None and not ledger.still_exhausted(ledger.settings(records, batch, 1, steps))
    with pytest.raises(PrivacyBudgetSpent) as refused:
        ledger.plan(1, records, batch, 1, steps)
    restarted = PrivacyLedger(tmp_path, config)
    assert restarted.exhausted is not None and restarted.exhausted.refusal == str(refused.value)
    assert restarted.still_exhausted(restarted.settings(records, batch, 1, steps))
    assert PrivacyLedger(tmp_path, config).exhausted is not None  # asking changes nothing
    fewer_steps = restarted.settings(records, batch, 1, 5)
    assert not restarted.still_exhausted(fewer_steps)
    assert restarted.exhausted is None and PrivacyLedger(tmp_path, config).exhausted is None  # durably

    with pytest.raises(PrivacyBudgetSpent):
        restarted.plan(2, records, batch, 1, steps)
    larger = dataclasses.replace(config, max_epsilon=100.0)  # the data owners agreed to a larger budget
    raised = PrivacyLedger(tmp_path, larger)
    assert not raised.still_exhausted(raised.settings(records, batch, 1, steps))
    raised.record(2, raised.plan(2, records, batch, 1, steps), steps)
    assert [s.round_id for s in PrivacyLedger(tmp_path, larger).spends] == [2]


def test_planned_rounds_derive_the_noise_that_fits_them_in_the_budget(tmp_path: Path) -> None:
    config = DpConfig(enabled=True, max_epsilon=3.0, delta=1e-5, planned_rounds=4)
    ledger = PrivacyLedger(tmp_path, config)
    noise = planned_noise(config, 8 / 400, 50)
    assert noise > 0
    for round_id in range(4):
        dp = ledger.plan(round_id, 400, 8, 1, 50)
        assert dp.noise_multiplier == noise
        ledger.record(round_id, dp, 50)
    assert 2.9 < ledger.epsilon <= 3.0  # the planned rounds use (almost) all of the budget
    with pytest.raises(PrivacyBudgetSpent):
        ledger.plan(5, 400, 8, 1, 50)


def test_the_ledger_never_silently_starts_from_zero_and_delta_must_be_small(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, DP)
    ledger.record(1, DpStep(1.0, 1.0, 0.02, 8.0), 10)
    assert json.loads(ledger.path.read_text())["spends"][0]["steps"] == 10
    ledger.path.write_text('{"spends": [{"round_id": 1')  # damaged
    with pytest.raises(DataLoss, match=r"cannot be read.*will not train"):
        PrivacyLedger(tmp_path, DP)
    with pytest.raises(ConfigError, match=r"delta \(1e-05\) must be below 1 / training records \(1/100000\)"):
        PrivacyLedger(tmp_path / "new", DP).released_count(100_000)  # before anything is released
    assert not (tmp_path / "new" / "privacy" / LEDGER).exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_epsilon": 0.0}, "max_epsilon must be > 0"),
        ({"delta": 1.0}, "delta must be between 0 and 1"),
        ({"max_grad_norm": float("nan")}, "max_grad_norm must be > 0"),
        ({"noise_multiplier": -1.0}, "noise_multiplier must be >= 0"),
        ({"noise_multiplier": 0.0}, "set noise_multiplier, or planned_rounds"),
        ({"accountant": "gdp"}, "accountant: expected one of rdp, prv"),
    ],
)
def test_the_config_refuses_a_bad_dp_setting(change: dict[str, object], message: str) -> None:
    config = AgentConfig(privacy=PrivacyConfig(dp=dataclasses.replace(DP, **change)))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=f"privacy.dp.{message}" if "accountant" in message else message):
        config.privacy.validate()


def _aggregator(config: Path, min_agents: int) -> subprocess.Popen[bytes]:
    """The demo's aggregator daemon, running rounds of at least ``min_agents``."""
    env = {"CLOUDFED_ROUNDS_MIN_AGENTS": str(min_agents)}
    return start("server.cli", "--config", str(config), log=config.parent / "aggregator.log", env=env)


def test_an_agent_whose_budget_is_spent_declines_and_the_federation_goes_on(tmp_path: Path) -> None:
    """The real daemons as processes, masked rounds of the demo's three clouds, 2 uploads needed.
    aws trains with DP-SGD and a budget planned for 2 rounds (set through the environment, as an
    operator would): it trains two rounds, records both spends in its ledger before uploading,
    declines the next for its budget, is invited to no round after it, and keeps evaluating new
    versions. The other two clouds carry on (they stay for 8 versions; aws until the test stops it
    after it has evaluated the last one; the first rounds, up to 3 of them on a busy machine, may
    run before aws has joined)."""
    agg_path, agent_paths, health = prepare(tmp_path, rounds=4, secagg=True)
    dp_env = {
        "CLOUDFED_AGENT_MAX_ROUNDS": "0",
        "CLOUDFED_AGENT_PRIVACY_DP_ENABLED": "true",
        "CLOUDFED_AGENT_PRIVACY_DP_MAX_EPSILON": "4",
        "CLOUDFED_AGENT_PRIVACY_DP_PLANNED_ROUNDS": "2",
        "CLOUDFED_AGENT_PRIVACY_DP_DELTA": "1e-4",
        "CLOUDFED_AGENT_LOG_LEVEL": "INFO",
    }
    agg = _aggregator(agg_path, min_agents=2)
    agents = []
    try:
        wait_serving(health)
        for i, path in enumerate(agent_paths):
            env = dp_env if i == 0 else {"CLOUDFED_AGENT_MAX_ROUNDS": "8"}
            agents.append(
                start("agent.cli", "--config", str(path), "run", log=path.parent / "agent.log", env=env)
            )
        codes = [a.wait(timeout=300) for a in agents[1:]]  # each exits after evaluating 8 versions
        evals = agent_paths[0].parent / "state" / "evals.jsonl"
        with sqlite3.connect(tmp_path / "aggregator-state" / "cloudfed.db") as conn:
            (last,) = conn.execute("SELECT MAX(version) FROM versions").fetchone()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (
            evals.exists() and f'"version": {last},' in evals.read_text()
        ):
            time.sleep(0.2)
        codes.insert(0, stop(agents[0]))  # SIGTERM: a clean stop
    finally:
        for proc in [*agents, agg]:
            stop(proc)
    private = agent_paths[0].parent
    log = (private / "agent.log").read_text()
    assert codes == [0, 0, 0], log[-3000:]
    with sqlite3.connect(tmp_path / "aggregator-state" / "cloudfed.db") as conn:
        rows = conn.execute("SELECT round_id, agent, status FROM participants ORDER BY round_id").fetchall()
    rounds: dict[int, dict[str, str]] = {}
    for round_id, agent, state in rows:
        rounds.setdefault(round_id, {})[agent.split("/")[-3]] = state  # spiffe://d/cloud/<cloud>/agent/<n>
    aws = [(r, by_cloud["aws"]) for r, by_cloud in rounds.items() if "aws" in by_cloud]
    assert [state for _, state in aws] == ["uploaded", "uploaded", "declined"], rounds
    declined = aws[-1][0]
    later = [r for r in rounds if r > declined]
    assert later, rounds  # rounds went on without aws, which was invited to none of them
    assert all(list(rounds[r].values()).count("uploaded") == 2 for r in [declined, *later[:1]]), rounds
    ledger = json.loads((private / "state" / "privacy" / "dp-ledger.json").read_text())
    assert [s["round_id"] for s in ledger["spends"]] == [r for r, _ in aws[:2]]
    assert 3.0 < epsilon([Spend(**s) for s in ledger["spends"]], 1e-4, "rdp") <= 4.0
    history = [
        json.loads(line)["version"] for line in (private / "state" / "evals.jsonl").read_text().splitlines()
    ]
    with sqlite3.connect(tmp_path / "aggregator-state" / "cloudfed.db") as conn:
        (made_without_it,) = conn.execute(
            "SELECT new_version FROM rounds WHERE round_id = ?", (declined,)
        ).fetchone()
    # each version once, in order, up to the last one made, some of them made after it declined
    assert history == sorted(set(history)) and history[-1] == last, (history, last)
    assert made_without_it in history, history
    assert f"round {declined}: not taking part: privacy budget spent" in log


@pytest.mark.slow
def test_two_ranks_give_the_private_gradient_of_all_their_records_with_the_noise_once(
    tiny, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Under torchrun with 2 CPU ranks (gloo), each rank taking half the records: the all-reduced
    clipped sum equals one process's over all records, both ranks step on the same gradient, and
    the ranks' noise shares add up to the stated deviation once (not once per rank)."""
    path, rows = tiny
    single = _private(path)
    start = single.adapter()
    save_file(start, str(tmp_path / "start.safetensors"))
    save_file({"input_ids": rows.input_ids, "labels": rows.labels}, str(tmp_path / "rows.safetensors"))
    clip, expected = 0.05, 6.0
    assert single.private is not None
    single.private.step(rows, DpStep(0.0, clip, 1.0, expected), micro_batch=7)
    want = [p.grad for p in single.private.params]
    files = [str(tmp_path / name) for name in ("rows.safetensors", "start.safetensors", "grads")]
    run = torchrun("tests/torchrun_dp_gradient.py", path, *files, str(clip), str(expected))
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    ranks = [load_file(str(tmp_path / f"grads-{r}.safetensors")) for r in (0, 1)]
    for got in ranks:
        for i, w in enumerate(want):
            torch.testing.assert_close(got[f"exact.{i}"], w, rtol=1e-4, atol=1e-7)
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    noise = torch.cat([ranks[0][f"noise.{i}"].flatten() for i in range(len(want))])
    assert abs(float(noise.std()) / (2.0 * clip / expected) - 1) < 0.05


def test_check_describes_the_budget_spent(tmp_path: Path) -> None:
    assert describe(DpConfig(), tmp_path).startswith("off:")
    ledger = PrivacyLedger(tmp_path, DP)
    spent = ledger.record(1, DpStep(1.0, 1.0, 0.02, 8.0), 50)
    assert describe(DP, tmp_path) == (
        f"DP-SGD: epsilon {spent:.3f} of 8 spent over 1 rounds (delta 1e-05, rdp accountant,"
        " records clipped to 1)"
    )


def test_an_agent_whose_delta_is_too_large_for_its_data_exits_before_training(tmp_path: Path) -> None:
    """delta must be below 1 / training records: the daemon joins, loads its data, and exits with
    the reason (status 2) before any round, having sent nothing."""
    agg_path, agent_paths, health = prepare(tmp_path, rounds=1, secagg=False)
    agg = _aggregator(agg_path, min_agents=1)
    try:
        wait_serving(health)
        env = {"CLOUDFED_AGENT_PRIVACY_DP_ENABLED": "true", "CLOUDFED_AGENT_PRIVACY_DP_DELTA": "0.01"}
        env["CLOUDFED_AGENT_PRIVACY_DP_NOISE_MULTIPLIER"] = "1"
        done = run_cli("agent.cli", "--config", str(agent_paths[0]), "run", env=env, timeout=120)
    finally:
        stop(agg)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "privacy.dp.delta (0.01) must be below 1 / training records (1/1" in done.stderr
    assert not (agent_paths[0].parent / "state" / "privacy" / "dp-ledger.json").exists()
    assert not list((agent_paths[0].parent / "audit").glob("round-*"))


async def test_a_spent_agent_says_so_at_join_until_its_budget_or_the_settings_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The real agent daemon (DP-SGD, budget for one round) against three aggregators in turn, in
    plain rounds. 1: it trains round 1 and declines round 2 for its budget. 2: restarted, it
    announces the spent budget at Join, so the aggregator counts it out of every round from the
    start (no invitation to decline). 3: restarted with a larger budget agreed, the remembered
    refusal no longer holds; it joins again without it, is invited, and trains."""
    agg_path, agent_paths, _ = prepare(tmp_path, rounds=1, secagg=False)
    uri = "spiffe://demo.cloudfed/cloud/aws/agent/agent-1"
    budget = {
        "CLOUDFED_AGENT_PRIVACY_DP_ENABLED": "true",
        "CLOUDFED_AGENT_PRIVACY_DP_MAX_EPSILON": "2",
        "CLOUDFED_AGENT_PRIVACY_DP_PLANNED_ROUNDS": "1",
        "CLOUDFED_AGENT_PRIVACY_DP_DELTA": "1e-4",
        "CLOUDFED_AGENT_MAX_ROUNDS": "0",
    }

    def aggregator(run: int) -> AggregatorConfig:
        config = load(AggregatorConfig, agg_path, env={"CLOUDFED_ROUNDS_MIN_AGENTS": "1"})
        return dataclasses.replace(config, metrics_listen="", state_dir=tmp_path / f"aggregator-{run}")

    def agent(**env: str) -> Agent:
        config = load(AgentConfig, agent_paths[0], env={**budget, **env})
        return Agent(dataclasses.replace(config, metrics_listen=""))

    async def until(check: Callable[[], object], seconds: float = 120) -> None:
        async with asyncio.timeout(seconds):
            while not check():  # noqa: ASYNC110 (state in other tasks: polled, bounded)
                await asyncio.sleep(0.1)

    caplog.set_level(logging.INFO)
    async with in_process(aggregator(1), agent()) as first:
        rounds = first.agg.rounds
        await until(lambda: uri in rounds.agents and rounds.agents[uri].budget_spent)
    assert (
        "round 1 trained" in caplog.text and "round 2: not taking part: privacy budget spent" in caplog.text
    )
    ledger = PrivacyLedger(
        agent_paths[0].parent / "state", load(AgentConfig, agent_paths[0], env=budget).privacy.dp
    )
    assert [s.round_id for s in ledger.spends] == [1] and ledger.exhausted is not None
    caplog.clear()

    async with in_process(aggregator(2), agent()) as second:
        rounds = second.agg.rounds
        await until(lambda: uri in rounds.connected)
        assert rounds.agents[uri].budget_spent == ledger.exhausted.refusal  # announced, not declined
        assert rounds.trainable == []
        await until(lambda: "global version 0: eval loss" in caplog.text)  # after the Join
        assert second.agg.rounds.state.round_id == 0  # no round started: it would wait for a trainable agent
    assert "declin" not in caplog.text and "joining again" not in caplog.text
    caplog.clear()

    larger = {
        "CLOUDFED_AGENT_PRIVACY_DP_MAX_EPSILON": "100",
        "CLOUDFED_AGENT_PRIVACY_DP_PLANNED_ROUNDS": "10",
    }
    async with (
        in_process(aggregator(3), agent(**larger, CLOUDFED_AGENT_MAX_ROUNDS="1")) as third,
        asyncio.timeout(120),
    ):
        await third.agents[0]  # it trains round 1, evaluates version 1 and stops
    assert "joining again to be invited" in caplog.text and "round 1 trained" in caplog.text
    raised = PrivacyLedger(
        ledger.path.parent.parent, load(AgentConfig, agent_paths[0], env={**budget, **larger}).privacy.dp
    )
    assert [s.round_id for s in raised.spends] == [1, 1] and raised.exhausted is None
