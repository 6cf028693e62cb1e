"""The trainer's devices and precisions: bf16 base weights, CUDA parity with the CPU, clear errors.

The CUDA tests run where torch sees a GPU (they skip on the CPU-only CI machines).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agent.data import pack
from agent.trainer import LocalTraining, LoraSpec, LoraTrainer, initial_adapter, pick_device, pick_dtype
from common.errors import ConfigError
from common.tinylm import DOMAINS, build_tiny_lm, domain_corpus

LORA = LoraSpec(4, 8.0, ("q_proj", "v_proj", "down_proj"))
TRAINING = LocalTraining(steps=12, learning_rate=5e-3, batch_size=8, sequence_length=32, seed=7)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, torch.Tensor, torch.Tensor]:
    """A tiny Llama on disk, training blocks of one domain and held-out blocks."""
    root: Path = tmp_path_factory.mktemp("trainer")
    docs = [doc for domain in DOMAINS for doc in domain_corpus(domain, 12, seed=1)]
    path = str(build_tiny_lm(root / "model", docs))
    trainer = LoraTrainer(path, LORA)
    local = domain_corpus(DOMAINS[0], 40, seed=5)
    return path, pack(trainer.tokenizer, local[:32], 32), pack(trainer.tokenizer, local[32:], 32)


def _round(
    trainer: LoraTrainer, start: dict[str, torch.Tensor], blocks: torch.Tensor
) -> dict[str, torch.Tensor]:
    trainer.set_adapter(start)
    delta, _ = trainer.train(blocks, TRAINING, round_id=1)
    return delta


def _cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    x = torch.cat([a[k].flatten() for k in sorted(a)]).double()
    y = torch.cat([b[k].flatten() for k in sorted(a)]).double()
    return float(x @ y / (x.norm() * y.norm()))


def test_bf16_base_trains_a_float32_adapter_close_to_the_fp32_run(model) -> None:  # type: ignore[no-untyped-def]
    path, train, held = model
    start = initial_adapter(path, LORA, seed=3)
    fp32 = LoraTrainer(path, LORA, dtype=torch.float32)
    bf16 = LoraTrainer(path, LORA, dtype=torch.bfloat16)
    frozen = [p for p in bf16.model.parameters() if not p.requires_grad]
    trained = [p for p in bf16.model.parameters() if p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert trained and all(p.dtype == torch.float32 for p in trained)  # the optimizer steps float32
    bf16.set_adapter(start)
    before, _ = bf16.evaluate(held)
    delta_bf16, delta_fp32 = _round(bf16, start, train), _round(fp32, start, train)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in delta_bf16.values())
    assert set(delta_bf16) == set(start)
    assert _cosine(delta_bf16, delta_fp32) > 0.9
    after, _ = bf16.evaluate(held)  # the adapter now holds start + delta
    assert after < before - 0.05


def _saved_for_backward(trainer: LoraTrainer, blocks: torch.Tensor) -> int:
    """Bytes autograd holds from the forward pass until the backward pass (one batch)."""
    held = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal held
        held += t.numel() * t.element_size()
        return t

    trainer.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer.model(input_ids=blocks[:8], labels=blocks[:8]).loss
    loss.backward()
    trainer.model.zero_grad(set_to_none=True)
    return held


def test_activation_checkpointing_holds_less_and_sends_the_same_update(model) -> None:  # type: ignore[no-untyped-def]
    path, train, _ = model
    start = initial_adapter(path, LORA, seed=3)
    plain = LoraTrainer(path, LORA)
    checkpointed = LoraTrainer(path, LORA, checkpointing=True)
    held_plain, held_checkpointed = (
        _saved_for_backward(plain, train),
        _saved_for_backward(checkpointed, train),
    )
    assert held_checkpointed < 0.5 * held_plain, (held_checkpointed, held_plain)
    a, b = _round(plain, start, train), _round(checkpointed, start, train)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-7)


def test_precision_and_device_choices() -> None:
    assert pick_dtype("fp32", "cuda") == torch.float32
    assert pick_dtype("bf16", "cpu") == torch.bfloat16
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert pick_device("auto") == "cpu"
        with pytest.raises(ConfigError, match=r"'cuda' asked for, but torch .* sees no GPU"):
            pick_device("cuda")
    else:
        assert pick_device("auto") == "cuda"
        assert pick_dtype("auto", "cuda") == (
            torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
        )
        count = torch.cuda.device_count()
        with pytest.raises(ConfigError, match=f"only {count} GPU"):
            pick_device(f"cuda:{count}")


@cuda
def test_cuda_training_matches_the_cpu(model) -> None:  # type: ignore[no-untyped-def]
    path, train, held = model
    start = initial_adapter(path, LORA, seed=3)
    cpu = LoraTrainer(path, LORA, "cpu")
    gpu = LoraTrainer(path, LORA, "cuda")
    assert all(p.device.type == "cuda" for p in gpu.model.parameters())
    delta_cpu, delta_gpu = _round(cpu, start, train), _round(gpu, start, train)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in delta_gpu.values())
    assert _cosine(delta_cpu, delta_gpu) > 0.999
    ratio = sum(float(t.norm()) for t in delta_gpu.values()) / sum(
        float(t.norm()) for t in delta_cpu.values()
    )
    assert abs(ratio - 1) < 0.01
    loss_cpu, tokens_cpu = cpu.evaluate(held)
    loss_gpu, tokens_gpu = gpu.evaluate(held)
    assert tokens_cpu == tokens_gpu and abs(loss_cpu - loss_gpu) < 1e-3


@cuda
def test_cuda_bf16_training_lowers_the_loss(model) -> None:  # type: ignore[no-untyped-def]
    path, train, held = model
    gpu = LoraTrainer(path, LORA, "cuda", dtype=torch.bfloat16)
    gpu.set_adapter(initial_adapter(path, LORA, seed=3))
    before, _ = gpu.evaluate(held)
    for round_id in (1, 2):
        gpu.train(train, TRAINING, round_id)
    after, _ = gpu.evaluate(held)
    assert after < before - 0.1


@cuda
def test_cuda_nf4_training_follows_the_fp32_update_and_lowers_the_loss(model) -> None:  # type: ignore[no-untyped-def]
    """QLoRA on the GPU (bitsandbytes' CUDA kernels, computed in bf16 where the GPU has it): the
    weights are 4-bit on the device, the update is the one the CPU's 4-bit base gives (the same
    quantization; bf16 arithmetic moved bf16's update by a cosine of 0.998 in bench.trainer), and
    two rounds lower the held-out loss."""
    pytest.importorskip("bitsandbytes")
    path, train, held = model
    start = initial_adapter(path, LORA, seed=3)
    cpu = LoraTrainer(path, LORA, "cpu", nf4=True)
    gpu = LoraTrainer(path, LORA, "cuda", dtype=pick_dtype("nf4", "cuda"), nf4=True)
    assert all(p.device.type == "cuda" for p in gpu.model.parameters())
    assert any(p.dtype == torch.uint8 for p in gpu.model.parameters())  # packed 4-bit codes
    assert _cosine(_round(cpu, start, train), _round(gpu, start, train)) > 0.98
    gpu.set_adapter(start)
    before, _ = gpu.evaluate(held)
    for round_id in (1, 2):
        gpu.train(train, TRAINING, round_id)
    after, _ = gpu.evaluate(held)
    assert after < before - 0.1


@cuda
@pytest.mark.slow
def test_agent_daemons_train_on_the_gpu_under_masking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The main job with every agent on CUDA (bf16 base, 'auto' precision): masked rounds, loss down."""
    from agent.demo import CLOUDS, run_federation

    monkeypatch.setenv("CLOUDFED_AGENT_LOG_LEVEL", "INFO")
    table = run_federation(tmp_path, 2, show=False, timeout_s=300, device="cuda")
    logs = {cloud: (tmp_path / f"{cloud}-agent-1" / "agent.log").read_text() for cloud in CLOUDS}
    assert all(set(table.get(v, {})) == set(CLOUDS) for v in (0, 1, 2)), (table, logs)
    expected = "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float32"
    for cloud, log in logs.items():
        assert f"rank 0: training on cuda, base weights torch.{expected}" in log, (cloud, log[-2000:])
    before, after = (sum(table[v].values()) / len(CLOUDS) for v in (0, 2))
    assert after < before - 0.05, (before, after)
