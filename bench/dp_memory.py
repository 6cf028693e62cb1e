"""DP-SGD's memory with and without activation checkpointing, same model, same records.

    python -m bench.dp_memory [--device auto] [--hidden 512] [--layers 8] [--sequence 512]
                              [--batch 8] [--steps 2] [--repeats 2]

Builds a Llama from a config (nothing downloaded) with the federation's kind of LoRA adapter
(rank 16 on every attention and MLP projection) and runs ``--steps`` DP-SGD steps of the agent's
trainer on ``2 x --batch`` records, every record drawn and no noise (so both variants must send
the same update), in micro-batches of ``--batch``: once with each layer's activations kept for
the backward (and opacus' per-record hooks), once with them recomputed there (reentrant
activation checkpointing). Each variant runs in a fresh process, interleaved over
``--repeats``. Memory is what training adds to the process: on a GPU the peak allocated, on a
CPU the peak resident set (``ru_maxrss``) over the resident set before the first step. Also the
time a step and the cosine between the two updates. Results go to
bench/results/dp-memory-<device>-h<hidden>-l<layers>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from agent.data import TokenBlocks
from agent.dp_sgd import DpStep
from agent.trainer import LocalTraining, LoraTrainer, initial_adapter, pick_device
from bench.trainer import LORA, flat_delta
from common.tinylm import DOMAINS, build_tiny_lm, domain_corpus

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"dp": False, "dp+ckpt": True}  # name: activation checkpointing


def _resident_bytes() -> int:
    """This process' resident set now (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def child(args: argparse.Namespace) -> None:
    """One variant in this process: print its step time, memory and where its update is."""
    work = Path(args.dir)
    device = pick_device(args.device)
    cuda = device.startswith("cuda")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    trainer = LoraTrainer(str(work / "model"), LORA, device, private=True, checkpointing=VARIANTS[args.child])
    trainer.set_adapter(torch.load(work / "start.pt"))
    ids = torch.load(work / "records.pt")
    records = TokenBlocks(ids, ids.clone())
    dp = DpStep(0.0, 1.0, 1.0, float(len(records)))  # every record, no noise: a deterministic update
    training = LocalTraining(args.steps, 1e-3, args.batch, args.sequence)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _resident_bytes()
    began = time.perf_counter()
    delta, _ = trainer.train(records, training, round_id=1, dp=dp)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - began) / args.steps
    if cuda:
        added = torch.cuda.max_memory_allocated() - before
    else:
        added = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    out = work / f"delta-{args.child}.pt"
    torch.save(delta, out)
    print(json.dumps({"seconds_per_step": seconds, "added_bytes": added, "delta": str(out)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--sequence", type=int, default=512)
    p.add_argument(
        "--batch", type=int, default=8, help="micro-batch: records whose gradients are held at once"
    )
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        texts = [doc for domain in DOMAINS for doc in domain_corpus(domain, 200, seed=0)]
        path = build_tiny_lm(
            work / "model",
            texts,
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            layers=args.layers,
            heads=args.heads,
            max_positions=args.sequence,
        )
        start = initial_adapter(str(path), LORA, seed=0)
        noise = torch.Generator().manual_seed(1)  # B != 0, so that every LoRA weight has a gradient
        torch.save(
            {k: v + 0.01 * torch.randn(v.shape, generator=noise) for k, v in start.items()}, work / "start.pt"
        )
        # token 0 is the builder's pad/EOS (a zero embedding row): leave it out, as bench.trainer does
        vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]  # the tokenizer's
        ids = torch.randint(
            1, vocab, (2 * args.batch, args.sequence), generator=torch.Generator().manual_seed(0)
        )
        torch.save(ids.to(torch.int32), work / "records.pt")
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
        flat: dict[str, torch.Tensor] = {}
        for _ in range(args.repeats):
            for name in VARIANTS:
                command = [sys.executable, "-m", "bench.dp_memory", "--child", name, "--dir", tmp]
                command += ["--device", device, "--batch", str(args.batch), "--steps", str(args.steps)]
                command += ["--sequence", str(args.sequence)]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                runs[name].append(result)
                flat[name] = flat_delta(torch.load(result["delta"]))
    medians = {
        name: {key: statistics.median(r[key] for r in rs) for key in ("seconds_per_step", "added_bytes")}
        for name, rs in runs.items()
    }
    plain, ckpt = flat["dp"], flat["dp+ckpt"]
    report = {
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "args": vars(args),
        "memory": "peak allocated"
        if device.startswith("cuda")
        else "peak resident set over the one before training",
        "runs": runs,
        "medians": medians,
        "memory_ratio_ckpt_vs_plain": medians["dp+ckpt"]["added_bytes"] / medians["dp"]["added_bytes"],
        "time_ratio_ckpt_vs_plain": medians["dp+ckpt"]["seconds_per_step"]
        / medians["dp"]["seconds_per_step"],
        "update_cosine": float(plain @ ckpt / (plain.norm() * ckpt.norm())),
        "update_max_abs_difference": float((plain - ckpt).abs().max()),
    }
    print(
        f"{report['device']}: {args.layers} layers of {args.hidden}, {args.sequence} tokens a record,"
        f" micro-batches of {args.batch}"
    )
    for name, m in medians.items():
        added = m["added_bytes"] / 2**20
        print(f"  {name:8s} {m['seconds_per_step']:.2f} s a step, training adds {added:,.0f} MiB")
    memory, seconds = report["memory_ratio_ckpt_vs_plain"], report["time_ratio_ckpt_vs_plain"]
    print(
        f"  checkpointing: {memory:.2f}x the memory, {seconds:.2f}x the time; update cosine"
        f" {report['update_cosine']:.6f} (largest difference {report['update_max_abs_difference']:.2e})"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    out = RESULTS / f"dp-memory-{kind}-h{args.hidden}-l{args.layers}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
