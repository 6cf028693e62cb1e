"""QLoRA (``precision = "nf4"``): the base's linear layers in 4-bit NormalFloat (bitsandbytes, on
CPU here; the same code runs on CUDA), the federation's float32 adapter trained over them: the
same adapter layout as the aggregator's, losses and gradients close to full precision, chunks and
checkpointing exact, DP-SGD, and the real agent daemon training a round."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from agent.daemon import Agent
from agent.data import Example, TokenBlocks, record_blocks
from agent.demo import prepare
from agent.dp_sgd import DpStep
from agent.model_plan import describe as describe_model
from agent.model_plan import weight_plan
from agent.trainer import LocalTraining, LoraSpec, LoraTrainer, initial_adapter, pick_dtype
from common.config import AgentConfig, AggregatorConfig, load
from common.errors import ConfigError
from common.layout import ParamLayout
from common.tinylm import DOMAINS, build_tiny_lm, domain_corpus
from tests.agentsim import in_process
from tests.daemons import torchrun
from tests.test_faults import query

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")

LORA = LoraSpec(4, 8.0, ("q_proj", "k_proj", "v_proj", "o_proj"))
BLOCK = 48


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, TokenBlocks, dict[str, torch.Tensor]]:
    """A tiny Llama on disk, 16 records of one domain a row each, and an adapter with B != 0 (so
    that every LoRA weight has a gradient)."""
    docs = [doc for domain in DOMAINS for doc in domain_corpus(domain, 12, seed=1)]
    path = str(build_tiny_lm(tmp_path_factory.mktemp("qlora") / "model", docs))
    rows, _ = record_blocks(
        LoraTrainer(path, LORA).tokenizer, [Example.plain(d) for d in domain_corpus(DOMAINS[1], 16)], BLOCK
    )
    noise = torch.Generator().manual_seed(1)
    start = {
        k: v + 0.02 * torch.randn(v.shape, generator=noise) for k, v in initial_adapter(path, LORA, 3).items()
    }
    return path, rows, start


def _trainer(tiny: tuple[str, TokenBlocks, dict[str, torch.Tensor]], **kwargs: object) -> LoraTrainer:
    path, _, start = tiny
    trainer = LoraTrainer(path, LORA, **kwargs)  # type: ignore[arg-type]
    trainer.set_adapter(start)
    return trainer


def _gradients(trainer: LoraTrainer, rows: TokenBlocks) -> torch.Tensor:
    trainer.model.zero_grad()
    trainer.model.train()
    trainer.losses.mean(rows.input_ids.long(), rows.labels.long(), None).backward()
    return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])


def test_the_base_is_4_bit_and_the_adapter_is_the_federations(tiny) -> None:  # type: ignore[no-untyped-def]
    """Every linear layer of the decoder is bitsandbytes' 4-bit layer, holding about an eighth of
    its float32 bytes; the embeddings and the head stay float32 (CPU computes in float32), and so
    does the LoRA adapter, whose layout is the one the aggregator seeds (an unquantized model's)."""
    from bitsandbytes.nn import Linear4bit

    path, _, _ = tiny
    nf4, full = LoraTrainer(path, LORA, nf4=True), LoraTrainer(path, LORA)
    decoder = nf4.model.base_model.model.model
    linears = [m for name, m in decoder.named_modules() if isinstance(m, Linear4bit)]
    assert len(linears) == 7 * len(decoder.layers)  # q, k, v, o, gate, up, down
    assert decoder.embed_tokens.weight.dtype == torch.float32
    assert nf4.model.base_model.model.lm_head.weight.dtype == torch.float32
    packed = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    dense = sum(math.prod(m.weight.quant_state.shape) * 4 for m in linears)  # float32, as saved
    assert packed == dense // 8  # two 4-bit codes a byte (scales apart)
    assert ParamLayout.from_tensors(nf4.adapter()).digest == ParamLayout.from_tensors(full.adapter()).digest
    assert all(t.dtype == torch.float32 for t in nf4.adapter().values())
    assert pick_dtype("nf4", "cpu") == torch.float32


def test_losses_and_gradients_are_close_to_full_precision_and_chunks_exact(tiny) -> None:  # type: ignore[no-untyped-def]
    """The same adapter over the 4-bit base: its loss within 0.02 nats of the float32 base's and
    its LoRA gradient pointing the same way (cosine over 0.98; 4-bit rounding of a tiny model's
    base moves it 14%); the loss in chunks equals the model's own from full logits, gradients
    included."""
    _, rows, _ = tiny
    ids, labels = rows.input_ids.long(), rows.labels.long()
    nf4, chunked_off, full = (
        _trainer(tiny, nf4=True),
        _trainer(tiny, nf4=True, chunk_logits=0),
        _trainer(tiny),
    )
    with torch.no_grad():
        quantized, exact = nf4.losses.mean(ids, labels, None), full.losses.mean(ids, labels, None)
        assert float(quantized) != float(exact)  # the base did run in 4 bits
        assert abs(float(quantized) - float(exact)) < 0.02
        torch.testing.assert_close(
            quantized, chunked_off.losses.mean(ids, labels, None), rtol=1e-5, atol=1e-6
        )
    g4, g32 = _gradients(nf4, rows), _gradients(full, rows)
    assert _cosine(g4, g32) > 0.98 and 0.8 < float(g4.norm() / g32.norm()) < 1.25  # measured: 0.99, 0.99
    torch.testing.assert_close(_gradients(chunked_off, rows), g4, rtol=1e-4, atol=1e-7)


def test_an_evaluation_leaves_the_gradients_of_the_next_training_as_they_were(tiny) -> None:  # type: ignore[no-untyped-def]
    """bitsandbytes repacks a 4-bit layer for a CPU kernel without a backward at its first forward
    in eval mode; the agent evaluates every version between rounds, so the trainer keeps its layers
    on the differentiable path: the gradients after an evaluation are those of a fresh trainer
    (without that, this CPU's were 90% off)."""
    _, rows, _ = tiny
    evaluated = _trainer(tiny, nf4=True)
    evaluated.model.eval()
    with torch.no_grad():
        evaluated.losses.mean(rows.input_ids.long(), rows.labels.long(), None)
    torch.testing.assert_close(_gradients(evaluated, rows), _gradients(_trainer(tiny, nf4=True), rows))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_activation_checkpointing_gives_the_same_gradients(tiny) -> None:  # type: ignore[no-untyped-def]
    _, rows, _ = tiny
    plain, recomputed = _trainer(tiny, nf4=True), _trainer(tiny, nf4=True, checkpointing=True)
    torch.testing.assert_close(_gradients(recomputed, rows), _gradients(plain, rows), rtol=1e-5, atol=1e-8)


def test_training_lowers_the_loss_and_leaves_the_base_as_it_was(tiny) -> None:  # type: ignore[no-untyped-def]
    """20 steps over the 4-bit base lower the loss on the rows trained on; the delta is the
    adapter's change, and the model's output at the start adapter is the same afterwards."""
    _, rows, start = tiny
    trainer = _trainer(tiny, nf4=True)
    ids, labels = rows.input_ids.long(), rows.labels.long()
    with torch.no_grad():
        before = float(trainer.losses.mean(ids, labels, None))
    delta, _ = trainer.train(
        rows, LocalTraining(steps=20, learning_rate=3e-3, batch_size=8, sequence_length=BLOCK), 1
    )
    assert all(torch.isfinite(d).all() for d in delta.values()) and any(
        d.abs().sum() > 0 for d in delta.values()
    )
    trained = trainer.adapter()
    assert all(torch.allclose(trained[k], start[k] + delta[k], atol=1e-6) for k in delta)
    with torch.no_grad():
        after = float(trainer.losses.mean(ids, labels, None))
        trainer.set_adapter(start)
        again = float(trainer.losses.mean(ids, labels, None))
    assert after < before - 0.05, (before, after)
    assert again == pytest.approx(before, abs=1e-6)


def test_dp_sgd_over_the_4_bit_base(tiny) -> None:  # type: ignore[no-untyped-def]
    """DP-SGD's private gradient (no noise, every record, clipped) over the 4-bit base: opacus
    takes per-record gradients of the LoRA weights beside bitsandbytes' layers; with reentrant
    checkpointing and chunks it is the same, and it points as the float32 base's does."""
    _, rows, _ = tiny
    grads = []
    for nf4, checkpointing, chunk in ((True, False, 0), (True, True, 5), (False, False, 0)):
        trainer = _trainer(tiny, nf4=nf4, private=True, checkpointing=checkpointing)
        assert trainer.private is not None
        trainer.model.train()
        trainer.losses.chunk_logits = chunk * 8 * trainer.losses.vocabulary
        loss, count, finite = trainer.private.step(rows, DpStep(0.0, 1.0, 1.0, 10.0), micro_batch=8)
        assert count == len(rows) and finite and math.isfinite(loss)
        grads.append(torch.cat([p.grad.flatten() for p in trainer.private.params]))  # type: ignore[union-attr]
    plain, recomputed, full = grads
    torch.testing.assert_close(recomputed, plain, rtol=1e-4, atol=1e-7)
    assert not torch.equal(plain, full) and _cosine(plain, full) > 0.98


@pytest.mark.slow
def test_ddp_on_two_ranks_all_reduces_the_gradient_over_the_4_bit_base(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Under torchrun (gloo), DDP over a 4-bit base: each rank's LoRA gradient after the backward
    is the mean of the two shards' gradients taken in one process."""
    path, rows, start = tiny
    start_path, rows_path = tmp_path / "start.safetensors", tmp_path / "rows.safetensors"
    save_file(start, str(start_path))
    save_file({"input_ids": rows.input_ids.long(), "labels": rows.labels.long()}, str(rows_path))
    single = _trainer(tiny, nf4=True)
    shards = [_gradients(single, rows[r::2]) for r in (0, 1)]
    want = (shards[0] + shards[1]) / 2
    run = torchrun(
        "tests/torchrun_ddp_gradient.py",
        path,
        str(rows_path),
        str(start_path),
        str(tmp_path / "g"),
        "7",
        "nf4",
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    for rank in (0, 1):
        got = load_file(str(tmp_path / f"g-{rank}.safetensors"))
        flat = torch.cat([got[str(i)].flatten() for i in range(len(got))])
        torch.testing.assert_close(flat, want, rtol=1e-4, atol=1e-8)


def test_the_weight_plan_counts_what_loading_holds(tiny) -> None:  # type: ignore[no-untyped-def]
    """``check``'s model line, from the config on the meta device: the parameters and the fp32
    bytes are exactly what the loaded model holds; the NF4 bytes are within 2% of the 4-bit
    model's state dict (each layer's quantization state, in words, is left out); the line says what the
    other precisions would take, and warns when the weights do not fit in the memory free."""
    from bitsandbytes.nn.modules import Linear4bit

    path, _, _ = tiny
    plan = weight_plan(path)
    full, nf4 = LoraTrainer(path, LORA), LoraTrainer(path, LORA, nf4=True)
    base = [p for p in full.model.parameters() if not p.requires_grad]
    assert plan.parameters == sum(p.numel() for p in base)
    assert plan.weight_bytes("fp32", torch.float32) == sum(p.numel() * 4 for p in base)
    assert plan.quantizable == sum(
        math.prod(m.weight.quant_state.shape) for m in nf4.model.modules() if isinstance(m, Linear4bit)
    )
    tensors = {t.data_ptr(): t for k, t in nf4.model.state_dict().items() if "lora_" not in k}  # tied: once
    held = sum(t.numel() * t.element_size() for t in tensors.values())
    assert abs(plan.weight_bytes("nf4", torch.float32) / held - 1) < 0.02
    line = describe_model(path, "nf4", torch.float32, "cpu", 1000)
    mine = plan.weight_bytes("nf4", torch.float32) / 1e6
    assert f"base weights {mine:.3g} MB in nf4 on cpu (fp32: " in line and "bf16: " in line
    assert "the adapter trains with 0.016 MB" in line and " free" in line and "WARNING" not in line
    assert "WARNING: the weights alone do not fit" in describe_model(
        path, "fp32", torch.float32, "cpu", 10**12
    )


def test_the_config_takes_nf4_and_says_what_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    config = load(AgentConfig, None, env={"CLOUDFED_AGENT_PRECISION": "nf4"})
    assert config.precision == "nf4"
    with pytest.raises(ConfigError, match="expected 'auto', 'fp32', 'bf16' or 'nf4', got 'int3'"):
        dataclasses.replace(config, precision="int3").validate()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(
        ConfigError, match=r"precision 'nf4' needs bitsandbytes: pip install 'cloudfed\[qlora\]'"
    ):
        config.validate()


async def test_the_agent_daemon_trains_a_round_over_a_4_bit_base(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The real aggregator and agent daemon in process, the agent with ``precision = "nf4"``: it
    says so, trains round 1, its update is committed as version 1 and it reports that version's
    eval loss."""
    agg_path, agent_paths, _ = prepare(tmp_path, rounds=1, secagg=False)
    env = {"CLOUDFED_AGENT_PRECISION": "nf4", "CLOUDFED_AGENT_MAX_ROUNDS": "1"}
    config = dataclasses.replace(load(AgentConfig, agent_paths[0], env=env), metrics_listen="")
    agg = dataclasses.replace(
        load(AggregatorConfig, agg_path, env={"CLOUDFED_ROUNDS_MIN_AGENTS": "1"}), metrics_listen=""
    )
    caplog.set_level(logging.INFO)
    async with in_process(agg, Agent(config)) as run, asyncio.timeout(120):
        await run.agents[0]  # trains round 1, evaluates version 1 and stops
    assert "base weights 4-bit NF4 computed in torch.float32" in caplog.text
    assert "round 1 trained" in caplog.text
    db = agg.state_dir / "cloudfed.db"
    assert query(db, "SELECT version FROM versions ORDER BY version") == [(0,), (1,)]
    assert [v for (v,) in query(db, "SELECT version FROM evals ORDER BY version")] == [0, 1]
