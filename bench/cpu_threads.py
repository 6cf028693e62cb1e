"""Local training under a CPU quota: torch's threads sized to the quota against one a CPU seen.

    python -m bench.cpu_threads [--quota 1] [--repeats 3] [--steps 6]   (root; cgroup v1 or v2)

A container's ``limits.cpu`` or a unit's ``CPUQuota=`` caps CPU time, not the CPUs torch sees.
This makes a child cgroup with the quota, and in it times ``LoraTrainer.train`` on a tiny Llama
(rank-16 LoRA on every projection) in fresh processes, interleaved over ``--repeats``: with the
threads the daemons now pick (``common.cpu_threads``: the quota's whole CPUs) and with one
thread a CPU of the affinity, which is what torch did before. Tokens per second (medians) and
their ratio go to bench/results/cpu_threads.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
CGROUP = Path("/sys/fs/cgroup")


def _cpu_controller() -> tuple[Path, str, int] | None:
    """Where to make a child cgroup with a CPU quota: (mount, quota file, period in us)."""
    control = CGROUP / "cgroup.subtree_control"
    if control.exists() and "cpu" in control.read_text().split():
        return CGROUP, "cpu.max", 100_000
    if (CGROUP / "cpu" / "cpu.cfs_quota_us").exists():
        return CGROUP / "cpu", "cpu.cfs_quota_us", int((CGROUP / "cpu" / "cpu.cfs_period_us").read_text())
    return None


@contextlib.contextmanager
def child_cgroup(cpus: float) -> Iterator[Path]:
    """A new cgroup with a CPU quota of ``cpus``, removed on exit (its processes must have ended).
    Raises PermissionError where none can be made (not root, no writable cpu controller)."""
    found = _cpu_controller()
    if found is None:
        raise PermissionError("no cgroup cpu controller under /sys/fs/cgroup")
    mount, quota_file, period = found
    group = mount / f"cloudfed-bench-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        quota = round(cpus * period)
        (group / quota_file).write_text(f"{quota} {period}" if quota_file == "cpu.max" else str(quota))
        yield group
    finally:
        group.rmdir()


def run_in(
    group: Path, argv: list[str], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as a process that joins ``group`` before it starts."""
    return subprocess.run(
        ["sh", "-c", f'echo $$ > "{group}/cgroup.procs" && exec "$@"', "sh", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


def _worker(model: str, threads: int, steps: int, batch: int, sequence: int) -> None:
    """In the cgroup: train ``steps`` steps (after a warm-up) with ``threads``; print tokens/s."""
    import torch

    from agent.trainer import LocalTraining, LoraSpec, LoraTrainer

    torch.set_num_threads(threads)
    lora = LoraSpec(16, 32.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    trainer = LoraTrainer(model, lora, "cpu")
    vocab = trainer.model.config.vocab_size
    blocks = torch.randint(1, vocab, (batch * 8, sequence), generator=torch.Generator().manual_seed(0))
    trainer.train(blocks, LocalTraining(2, 1e-4, batch, sequence), 0)
    began = time.perf_counter()
    trainer.train(blocks, LocalTraining(steps, 1e-4, batch, sequence, seed=0), 1)
    rate = steps * batch * sequence / (time.perf_counter() - began)
    print(json.dumps({"threads": torch.get_num_threads(), "tokens_per_s": rate}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quota", type=float, help="CPUs of the quota (default: half the affinity, at least 1)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sequence", type=int, default=128)
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "THREADS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args.worker[0], int(args.worker[1]), args.steps, args.batch, args.sequence)
        return

    from common.cpu_threads import cpu_budget
    from common.tinylm import DOMAINS, build_tiny_lm, domain_corpus

    affinity = len(os.sched_getaffinity(0))
    quota = args.quota or max(1.0, affinity / 2)
    if affinity < 2 or quota >= affinity:
        raise SystemExit(f"needs a quota below the {affinity} CPU(s) of the affinity")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    with tempfile.TemporaryDirectory() as tmp:
        texts = [doc for domain in DOMAINS for doc in domain_corpus(domain, 200, seed=0)]
        model = str(build_tiny_lm(Path(tmp) / "model", texts, hidden_size=256, layers=4, heads=8))
        rates: dict[str, list[float]] = {"planned": [], "one a CPU": []}
        try:
            with child_cgroup(quota) as group:
                threads = {"planned": _planned_in(group, env), "one a CPU": affinity}
                for _ in range(args.repeats):
                    for name, n in threads.items():
                        argv = [sys.executable, "-m", "bench.cpu_threads", "--worker", model, str(n)]
                        argv += ["--steps", str(args.steps), "--batch", str(args.batch)]
                        done = run_in(group, [*argv, "--sequence", str(args.sequence)], env, 900)
                        if done.returncode != 0:
                            raise SystemExit(done.stderr[-2000:])
                        rates[name].append(json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"])
        except PermissionError as exc:
            raise SystemExit(f"cannot make a cgroup with a CPU quota here (root needed): {exc}") from exc
    median = {name: statistics.median(r) for name, r in rates.items()}
    report = {
        "machine": platform.processor() or platform.machine(),
        "affinity_cpus": affinity,
        "quota_cpus": quota,
        "outside_the_cgroup": cpu_budget().describe(),
        "threads": threads,
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "tokens_per_s": median,
        "runs_tokens_per_s": rates,
        "planned_vs_one_a_cpu": median["planned"] / median["one a CPU"],
    }
    print(
        f"quota {quota:g} of {affinity} CPUs; tiny Llama h256 l4, LoRA r16;"
        f" batch {args.batch}x{args.sequence}"
    )
    for name, rate in median.items():
        print(f"  {name:10s} {threads[name]:>3d} threads {rate:>9,.0f} tokens/s")
    print(f"  planned threads: {report['planned_vs_one_a_cpu']:.2f}x the tokens/s of one thread a CPU")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_threads.json").write_text(json.dumps(report, indent=2) + "\n")


def _planned_in(group: Path, env: dict[str, str]) -> int:
    """The threads ``common.cpu_threads`` plans for a process in ``group``."""
    code = "from common.cpu_threads import *; print(plan_threads(0, cpu_budget(), 1, {}).threads)"
    probe = run_in(group, [sys.executable, "-c", code], env, 120)
    if probe.returncode != 0:
        raise SystemExit(probe.stderr[-2000:])
    return int(probe.stdout.strip())


if __name__ == "__main__":
    main()
