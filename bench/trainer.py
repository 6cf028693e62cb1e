"""Local training throughput and memory: fp32 beside bf16 base weights, same model, same run.

    python -m bench.trainer [--device auto] [--hidden 256] [--layers 4] [--steps 20]

Builds a Llama of the given size from a config (nothing downloaded), adds the
federation's kind of LoRA adapter (rank 16 on every attention and MLP
projection) and times ``LoraTrainer.train`` on random token blocks, once per
precision, interleaved over ``--repeats``: tokens per second (medians),
peak accelerator memory, and the cosine between the two precisions' updates
from the same start (how much bf16 changes what an agent sends). Results go to
bench/results/trainer-<device>-h<hidden>-l<layers>.json.
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

from agent.trainer import LocalTraining, LoraSpec, LoraTrainer, initial_adapter, pick_device
from common.tinylm import DOMAINS, build_tiny_lm, domain_corpus

RESULTS = Path(__file__).resolve().parent / "results"
LORA = LoraSpec(16, 32.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _flat(delta: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([delta[k].flatten() for k in sorted(delta)]).double()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--sequence", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device = pick_device(args.device)
    cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        texts = [doc for domain in DOMAINS for doc in domain_corpus(domain, 200, seed=0)]
        path = str(
            build_tiny_lm(
                Path(tmp) / "model",
                texts,
                vocab_size=args.vocab,
                hidden_size=args.hidden,
                layers=args.layers,
                heads=args.heads,
                max_positions=args.sequence,
            )
        )
        start = initial_adapter(path, LORA, seed=0)
        trainers = {name: LoraTrainer(path, LORA, device, dtype=dtype) for name, dtype in PRECISIONS.items()}
        vocab = trainers["fp32"].model.config.vocab_size
        # Token 0 is the builder's pad/EOS, whose embedding row is zero (padding_idx): a block that
        # starts with it keeps an exactly zero hidden state, and at 16 layers the RMSNorm gradients
        # (x1000 each at eps 1e-6) overflow. Real checkpoints have no such row; leave it out here.
        blocks = torch.randint(
            1, vocab, (args.batch * 16, args.sequence), generator=torch.Generator().manual_seed(0)
        )
        training = LocalTraining(args.steps, 1e-4, args.batch, args.sequence, seed=0)
        tokens = args.steps * args.batch * args.sequence
        rates: dict[str, list[float]] = {name: [] for name in PRECISIONS}
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
                began = time.perf_counter()
                delta, _ = trainer.train(blocks, training, round_id=1)
                if cuda:
                    torch.cuda.synchronize()
                rates[name].append(tokens / (time.perf_counter() - began))
                if cuda:
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
                if repeat == 0:
                    deltas[name] = _flat(delta)
        model = trainers["fp32"].model
        params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    a, b = deltas["fp32"], deltas["bf16"]
    report = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "args": vars(args),
        "base_parameters": params,
        "adapter_parameters": adapter,
        "tokens_per_s": {name: statistics.median(r) for name, r in rates.items()},
        "runs_tokens_per_s": rates,
        "peak_memory_bytes": peaks,
        "bf16_speedup": statistics.median(rates["bf16"]) / statistics.median(rates["fp32"]),
        "update_cosine_bf16_vs_fp32": float(a @ b / (a.norm() * b.norm())),
        "update_norm_ratio_bf16_vs_fp32": float(b.norm() / a.norm()),
    }
    print(f"{report['device']}: {params / 1e6:.1f}M base parameters, {adapter / 1e6:.2f}M LoRA")
    for name in PRECISIONS:
        peak = f", peak {peaks[name] / 2**30:.2f} GiB" if peaks else ""
        print(f"  {name}: {report['tokens_per_s'][name]:,.0f} tokens/s{peak}")
    print(
        f"  bf16 / fp32: {report['bf16_speedup']:.2f}x tokens/s; "
        f"update cosine {report['update_cosine_bf16_vs_fp32']:.4f}, norm ratio "
        f"{report['update_norm_ratio_bf16_vs_fp32']:.3f}"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"trainer-{'cuda' if cuda else 'cpu'}-h{args.hidden}-l{args.layers}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
