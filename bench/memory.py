"""Training memory: activation checkpointing and the loss taken in chunks of positions, with or
without DP-SGD, same model, same records.

    python -m bench.memory [--dp] [--device auto] [--hidden 512] [--layers 8] [--sequence 512]
                           [--batch 8] [--steps 2] [--repeats 2] [--head-vocab 0]

Builds a Llama from a config (nothing downloaded), its vocabulary widened to ``--head-vocab``
if given (the logits grow with it), with the federation's kind of LoRA adapter (rank 16 on every
attention and MLP projection) and runs ``--steps`` steps of the agent's trainer, three ways.

- Plain training, ``--batch`` rows a step: the full logits kept for the backward; the loss taken
  ``agent.causal_loss.CHUNK_LOGITS`` logits at a time (the agent's default); and that with
  activation checkpointing.
- ``--dp``: DP-SGD on ``2 x --batch`` records, every record drawn and no noise, in micro-batches
  of ``--batch``: each layer's activations and the full logits kept; the activations recomputed
  (reentrant activation checkpointing); and also the loss in chunks (the agent's default).

Every variant must send the same update. Each runs in a fresh process, interleaved over
``--repeats``. Memory is what training adds to the process: on a GPU the peak allocated, on a
CPU the peak resident set (``ru_maxrss``) over the resident set before the first step. Also the
time a step and each update's cosine to the first variant's. Results go to bench/results/
[dp-]memory-<device>-h<hidden>-l<layers>[-v<head vocab>].json.
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
from transformers import AutoTokenizer

from agent.causal_loss import CHUNK_LOGITS
from agent.data import TokenBlocks
from agent.dp_sgd import DpStep
from agent.trainer import LocalTraining, LoraTrainer, initial_adapter, pick_device
from bench.trainer import LORA, build_model, flat_delta, model_arguments

RESULTS = Path(__file__).resolve().parent / "results"
PLAIN = {  # name: (activation checkpointing, logits held at once; 0: all, by the model's forward)
    "full logits": (False, 0),
    "chunked loss": (False, CHUNK_LOGITS),
    "ckpt, chunked loss": (True, CHUNK_LOGITS),
}
PRIVATE = {
    "dp, full logits": (False, 0),
    "dp+ckpt, full logits": (True, 0),
    "dp+ckpt, chunked loss": (True, CHUNK_LOGITS),
}
VARIANTS = PLAIN | PRIVATE


def _widen_vocabulary(path: Path, size: int) -> None:
    """Give the saved model ``size`` embedding rows (and so logits), the new ones random."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    model.resize_token_embeddings(size, mean_resizing=False)
    model.save_pretrained(path)


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
    checkpointing, chunk_logits = VARIANTS[args.child]
    private = args.child in PRIVATE
    trainer = LoraTrainer(str(work / "model"), LORA, device, private=private, checkpointing=checkpointing)
    trainer.losses.chunk_logits = chunk_logits  # DP-SGD's too
    trainer.set_adapter(torch.load(work / "start.pt"))
    ids = torch.load(work / "records.pt")
    records = TokenBlocks(ids, ids.clone())
    # DP: every record, no noise (a deterministic update); plain: the same seeded draws
    dp = DpStep(0.0, 1.0, 1.0, float(len(records))) if private else None
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
    out = work / f"delta-{list(VARIANTS).index(args.child)}.pt"
    torch.save(delta, out)
    print(json.dumps({"seconds_per_step": seconds, "added_bytes": added, "delta": str(out)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(p, hidden=512, layers=8, sequence=512)
    p.add_argument(
        "--batch", type=int, default=8, help="micro-batch: records whose gradients are held at once"
    )
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--head-vocab", type=int, default=0, help="widen the vocabulary to this many tokens")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dp", action="store_true", help="DP-SGD's variants (default: plain training's)")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    device = pick_device(args.device)
    variants = PRIVATE if args.dp else PLAIN
    first_name = next(iter(variants))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = build_model(work / "model", args)
        if args.head_vocab:
            _widen_vocabulary(Path(path), args.head_vocab)
        start = initial_adapter(path, LORA, seed=0)
        noise = torch.Generator().manual_seed(1)  # B != 0, so that every LoRA weight has a gradient
        torch.save(
            {k: v + 0.01 * torch.randn(v.shape, generator=noise) for k, v in start.items()}, work / "start.pt"
        )
        # token 0 is the builder's pad/EOS (a zero embedding row): leave it out, as bench.trainer does
        vocab = len(AutoTokenizer.from_pretrained(path))  # ids the tokenizer makes (a wider head has more)
        vocab_size = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
        ids = torch.randint(
            1, vocab, (2 * args.batch, args.sequence), generator=torch.Generator().manual_seed(0)
        )
        torch.save(ids.to(torch.int32), work / "records.pt")
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        flat: dict[str, torch.Tensor] = {}
        for _ in range(args.repeats):
            for name in variants:
                command = [sys.executable, "-m", "bench.memory", "--child", name, "--dir", tmp]
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
    first, base = flat[first_name], medians[first_name]
    memory = {n: m["added_bytes"] / base["added_bytes"] for n, m in medians.items()}
    seconds = {n: m["seconds_per_step"] / base["seconds_per_step"] for n, m in medians.items()}
    cosine = {n: float(f @ first / (f.norm() * first.norm())) for n, f in flat.items()}
    difference = {n: float((f - first).abs().max()) for n, f in flat.items()}
    cuda = device.startswith("cuda")
    report = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "args": vars(args),
        "vocabulary": vocab_size,
        "memory": "peak allocated" if cuda else "peak resident set over the one before training",
        "runs": runs,
        "medians": medians,
        "memory_ratio_vs_first": memory,
        "time_ratio_vs_first": seconds,
        "update_cosine_vs_first": cosine,
        "update_max_abs_difference_vs_first": difference,
    }
    print(
        f"{report['device']}: {args.layers} layers of {args.hidden}, vocabulary {vocab_size},"
        f" {args.sequence} tokens a record, {'micro-' if args.dp else ''}batches of {args.batch}"
    )
    for name, m in medians.items():
        added = m["added_bytes"] / 2**20
        print(
            f"  {name:22s} {m['seconds_per_step']:6.2f} s a step ({seconds[name]:.2f}x), training adds"
            f" {added:7,.0f} MiB ({memory[name]:.2f}x); update cosine {cosine[name]:.6f}, largest"
            f" difference {difference[name]:.1e}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    kind = "cuda" if cuda else "cpu"
    wide = f"-v{args.head_vocab}" if args.head_vocab else ""
    out = RESULTS / f"{'dp-' if args.dp else ''}memory-{kind}-h{args.hidden}-l{args.layers}{wide}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
