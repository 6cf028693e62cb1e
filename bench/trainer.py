"""Local training throughput and memory: fp32, bf16 and 4-bit NF4 (QLoRA) base weights, with and
without activation checkpointing, same model, same run.

    python -m bench.trainer [--device auto] [--hidden 256] [--layers 4] [--steps 10] [--variants ...]

Builds a Llama of the given size from a config (nothing downloaded), adds the
federation's kind of LoRA adapter (rank 16 on every attention and MLP
projection) and times ``LoraTrainer.train`` on random token blocks, once per
variant (fp32 base, bf16 base, NF4 base computed in bf16 on a GPU and fp32 on a
CPU, each of the last two also with activation checkpointing), interleaved over
``--repeats``: tokens per second (medians), the bytes of the variant's weights
(its state dict: 4-bit codes and their scales for NF4), peak accelerator memory
(those weights plus what its training adds), and the cosine of each variant's
update to the fp32 one from the same start (how much it changes what an agent
sends). Results go to bench/results/trainer-<device>-h<hidden>-l<layers>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from agent.trainer import LocalTraining, LoraSpec, LoraTrainer, initial_adapter, pick_device, pick_dtype
from common.tinylm import DOMAINS, build_tiny_lm, domain_corpus

RESULTS = Path(__file__).resolve().parent / "results"
LORA = LoraSpec(16, 32.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
VARIANTS = {  # name: (base weights, activation checkpointing)
    "fp32": ("fp32", False),
    "bf16": ("bf16", False),
    "bf16+ckpt": ("bf16", True),
    "nf4": ("nf4", False),
    "nf4+ckpt": ("nf4", True),
}


def state_bytes(trainer: LoraTrainer) -> int:
    """Bytes of the model's weights as held (its state dict: base, adapter, quantization scales)."""
    return sum(t.numel() * t.element_size() for t in trainer.model.state_dict().values())


def flat_delta(delta: dict[str, torch.Tensor]) -> torch.Tensor:
    """An update as one float64 vector, tensors in name order."""
    return torch.cat([delta[k].flatten() for k in sorted(delta)]).double()


def model_arguments(p: argparse.ArgumentParser, hidden: int, layers: int, sequence: int) -> None:
    """The device and the Llama a benchmark builds (``build_model``), with these defaults."""
    p.add_argument("--device", default="auto")
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--sequence", type=int, default=sequence)


def build_model(out_dir: Path, args: argparse.Namespace) -> str:
    """A Llama of ``model_arguments``' size with its tokenizer, built from a config into ``out_dir``
    (nothing downloaded)."""
    texts = [doc for domain in DOMAINS for doc in domain_corpus(domain, 200, seed=0)]
    path = build_tiny_lm(
        out_dir,
        texts,
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        layers=args.layers,
        heads=args.heads,
        max_positions=args.sequence,
    )
    return str(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(p, hidden=256, layers=4, sequence=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--variants",
        help=f"comma-separated of {', '.join(VARIANTS)} (default: all on a GPU, fp32,bf16,nf4 on a CPU)",
    )
    args = p.parse_args()
    device = pick_device(args.device)
    cuda = device.startswith("cuda")
    names = (args.variants or (",".join(VARIANTS) if cuda else "fp32,bf16,nf4")).split(",")
    if names[0] != "fp32" or not set(names) <= set(VARIANTS):
        raise SystemExit(f"--variants: fp32 first, then any of {list(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(tmp) / "model", args)
        start = initial_adapter(path, LORA, seed=0)
        trainers = {
            name: LoraTrainer(
                path,
                LORA,
                device,
                dtype=pick_dtype(VARIANTS[name][0], device),
                checkpointing=VARIANTS[name][1],
                nf4=VARIANTS[name][0] == "nf4",
            )
            for name in names
        }
        weights = {name: state_bytes(trainer) for name, trainer in trainers.items()}
        vocab = trainers["fp32"].model.config.vocab_size
        # Token 0 is the builder's pad/EOS, whose embedding row is zero (padding_idx): a block that
        # starts with it keeps an exactly zero hidden state, and at 16 layers the RMSNorm gradients
        # (x1000 each at eps 1e-6) overflow. Real checkpoints have no such row; leave it out here.
        blocks = torch.randint(
            1, vocab, (args.batch * 16, args.sequence), generator=torch.Generator().manual_seed(0)
        )
        training = LocalTraining(args.steps, 1e-4, args.batch, args.sequence, seed=0)
        tokens = args.steps * args.batch * args.sequence
        rates: dict[str, list[float]] = {name: [] for name in names}
        peaks: dict[str, int] = {}
        deltas: dict[str, torch.Tensor] = {}
        for trainer in trainers.values():  # warm-up: kernels, allocator
            trainer.set_adapter(start)
            trainer.train(blocks, LocalTraining(2, 1e-4, args.batch, args.sequence), 0)
        for repeat in range(args.repeats):
            for name, trainer in trainers.items():
                trainer.set_adapter(start)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    resident = torch.cuda.memory_allocated()  # every variant's weights
                began = time.perf_counter()
                delta, _ = trainer.train(blocks, training, round_id=1)
                if cuda:
                    torch.cuda.synchronize()
                rates[name].append(tokens / (time.perf_counter() - began))
                if cuda:  # this variant's weights + what its training added on top
                    peak = weights[name] + torch.cuda.max_memory_allocated() - resident
                    peaks[name] = max(peaks.get(name, 0), peak)
                if repeat == 0:
                    deltas[name] = flat_delta(delta)
        model = trainers["fp32"].model
        params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = deltas["fp32"]
    report = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "args": vars(args),
        "base_parameters": params,
        "adapter_parameters": adapter,
        "tokens_per_s": {name: statistics.median(r) for name, r in rates.items()},
        "runs_tokens_per_s": rates,
        "weights_bytes": weights,
        "weights_ratio_vs_fp32": {n: weights[n] / weights["fp32"] for n in names},
        "peak_memory_bytes": peaks,
        "speedup_vs_fp32": {n: statistics.median(rates[n]) / statistics.median(rates["fp32"]) for n in names},
        "update_cosine_vs_fp32": {
            n: float(deltas[n] @ base / (deltas[n].norm() * base.norm())) for n in names
        },
        "update_norm_ratio_vs_fp32": {n: float(deltas[n].norm() / base.norm()) for n in names},
    }
    print(f"{report['device']}: {params / 1e6:.1f}M base parameters, {adapter / 1e6:.2f}M LoRA")
    for name in names:
        at_peak = f", peak {peaks[name] / 2**30:.2f} GiB" if peaks else ""
        print(
            f"  {name:10s} {report['tokens_per_s'][name]:>9,.0f} tokens/s "
            f"({report['speedup_vs_fp32'][name]:.2f}x fp32), weights {weights[name] / 2**20:,.1f} MiB"
            f" ({weights[name] / weights['fp32']:.2f}x){at_peak}; update cosine to fp32 "
            f"{report['update_cosine_vs_fp32'][name]:.4f}, "
            f"norm ratio {report['update_norm_ratio_vs_fp32'][name]:.3f}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"trainer-{'cuda' if cuda else 'cpu'}-h{args.hidden}-l{args.layers}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
