"""What record- and user-level differential privacy cost: eval loss and local training time of
FedAvg rounds with DP-SGD at several budgets, against the same rounds without it, in one run.

    python -m bench.dp [--rounds 8] [--steps 25] [--batch 8] [--repeats 2] [--epsilons 8,2]
                       [--documents 1000] [--user-records 0] [--name dp]

4 agents with non-IID text (``--documents`` each, 15% held out), the real trainer and its DP-SGD
(``agent.dp_sgd``), the budget planned over the run's rounds (``privacy.dp.planned_rounds``) as an
agent would, delta 1e-6, clip 1.0. Schemes: ``plain`` (packed blocks, as without privacy.dp),
``rows, no noise`` (one row a record, clipped, no noise: what the row layout and clipping cost
alone), then each epsilon; with ``--user-records k`` each agent's records also belong to users
of k records each (records dealt to users in turn) and every epsilon is run user-level too
(``privacy.dp.unit = "user"``, ``--batch`` users a step, all k records of a sampled user).
Noise is drawn from the OS, so repeats differ: medians and ranges.
Results go to bench/results/<name>.json; a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from agent.data import Example, TokenBlocks, pack_records, record_blocks, split
from agent.dp_budget import PrivacyLedger
from agent.dp_sgd import DpStep
from agent.dp_units import PrivacyUnits
from agent.trainer import LocalTraining, LoraSpec, LoraTrainer, initial_adapter
from common.config import DpConfig
from common.layout import ParamLayout
from common.tinylm import DOMAINS, build_tiny_lm, domain_corpus

RESULTS = Path(__file__).resolve().parent / "results"
LORA = LoraSpec(8, 16.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
BLOCK, LR, DELTA, CLIP = 64, 5e-3, 1e-6, 1.0


@dataclass(frozen=True)
class Scheme:
    label: str
    epsilon: float | None  # None: no noise
    private: bool  # one row a record, DP-SGD's clipping
    unit: str = "record"  # what DP-SGD samples and clips: records, or users


@dataclass(frozen=True)
class Run:
    eval_loss: list[float]
    """Mean over agents, before round 1 and after each round."""
    train_seconds: float
    noise_multiplier: float
    """The largest over the agents (the smallest agent samples the most of its records)."""
    epsilon: float | None


class World:
    """The model, and each agent's training data both ways (packed, one row a record) and eval blocks."""

    def __init__(self, root: Path, documents: int, user_records: int) -> None:
        public = [doc for domain in DOMAINS for doc in domain_corpus(domain, 100, seed=99)]
        self.model = str(build_tiny_lm(root / "model", public))
        tokenizer = LoraTrainer(self.model, LORA).tokenizer
        self.packed: dict[str, TokenBlocks] = {}
        self.rows: dict[str, TokenBlocks] = {}
        self.eval: dict[str, TokenBlocks] = {}
        self.users: dict[str, PrivacyUnits] = {}
        for i, domain in enumerate([*DOMAINS, DOMAINS[0]][:4]):
            docs = [Example.plain(d) for d in domain_corpus(domain, documents, seed=10 + i)]
            train, held = split(docs, 0.15)
            self.packed[f"a{i}"] = pack_records(tokenizer, train, BLOCK)
            self.rows[f"a{i}"] = record_blocks(tokenizer, train, BLOCK)[0]
            self.eval[f"a{i}"] = pack_records(tokenizer, held, BLOCK)
            if user_records:
                rows = len(self.rows[f"a{i}"])
                owners = np.arange(rows) % max(1, rows // user_records)
                self.users[f"a{i}"] = PrivacyUnits.grouped(np.arange(rows), owners)


def run(
    world: World, scheme: Scheme, rounds: int, steps: int, batch: int, seed: int, user_records: int
) -> Run:
    """FedAvg over ``rounds``; eval loss (mean over agents) after each, seconds of local training."""
    plain = LoraTrainer(world.model, LORA)
    private = LoraTrainer(world.model, LORA, private=True) if scheme.private else None
    adapter = initial_adapter(world.model, LORA, seed)
    layout = ParamLayout.from_tensors(adapter)
    training = LocalTraining(steps, LR, batch, BLOCK, seed)
    ledgers = {}
    if scheme.epsilon is not None:
        config = DpConfig(
            enabled=True,
            max_epsilon=scheme.epsilon,
            delta=DELTA,
            planned_rounds=rounds,
            unit=scheme.unit,
            records_per_user=max(1, user_records),
        )
        ledgers = {name: PrivacyLedger(Path(tempfile.mkdtemp()), config) for name in world.rows}

    def eval_loss() -> float:
        plain.set_adapter(adapter)
        return float(np.mean([plain.evaluate(b)[0] for b in world.eval.values()]))

    losses, seconds, noise = [eval_loss()], 0.0, 0.0
    for round_id in range(1, rounds + 1):
        total, weight = np.zeros(layout.numel), 0.0
        for name in world.rows:
            (private or plain).set_adapter(adapter)
            dp = None
            units = world.users[name] if scheme.unit == "user" else None
            if private is not None:  # planned and recorded as the agent does, outside the timing
                n = len(world.rows[name]) if units is None else len(units)
                dp = DpStep(0.0, CLIP, batch / n, float(batch))
                if name in ledgers:  # as the agent: the rate is over the count it announces
                    dp = ledgers[name].plan(round_id, ledgers[name].released_count(n), batch, 1, steps)
                    ledgers[name].record(round_id, dp, steps)
                    noise = max(noise, dp.noise_multiplier)
            began = time.perf_counter()
            if private is None:
                delta, _ = plain.train(world.packed[name], training, round_id)
            else:
                delta, _ = private.train(world.rows[name], training, round_id, dp, units)
            seconds += time.perf_counter() - began
            examples = len(world.rows[name])
            if name in ledgers:  # the FedAvg weight an agent under DP announces: its released count
                examples = ledgers[name].released_count(examples if units is None else len(units))
            total += examples * layout.flatten(delta).astype(np.float64)
            weight += examples
        adapter = layout.unflatten(layout.flatten(adapter) + (total / weight).astype(np.float32))
        losses.append(eval_loss())
    spent = max((ledger.epsilon for ledger in ledgers.values()), default=None)
    return Run(losses, seconds, noise, spent)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--documents", type=int, default=1000)
    p.add_argument("--epsilons", default="8,2")
    p.add_argument(
        "--batch", type=int, default=8, help="records (users) a step samples on average with DP-SGD"
    )
    p.add_argument("--user-records", type=int, default=0, help="records of each user: adds user-level runs")
    p.add_argument("--name", default="dp", help="results file name (bench/results/<name>.json)")
    args = p.parse_args()
    torch.set_num_threads(2)
    schemes = [Scheme("plain", None, False), Scheme("rows, no noise", None, True)]
    schemes += [Scheme(f"DP-SGD epsilon {e}", float(e), True) for e in args.epsilons.split(",")]
    if args.user_records:
        schemes += [
            Scheme(f"user-level DP-SGD epsilon {e}", float(e), True, "user") for e in args.epsilons.split(",")
        ]
    with tempfile.TemporaryDirectory() as tmp:
        world = World(Path(tmp), args.documents, args.user_records)
        records = {name: len(rows) for name, rows in world.rows.items()}
        results: dict[str, list[Run]] = {s.label: [] for s in schemes}
        for repeat in range(args.repeats):  # interleaved: machine noise hits every scheme alike
            for scheme in schemes:
                done = run(world, scheme, args.rounds, args.steps, args.batch, repeat, args.user_records)
                results[scheme.label].append(done)
                print(f"{scheme.label} repeat {repeat}: final eval loss {done.eval_loss[-1]:.4f}", flush=True)
    plain_time = statistics.median(r.train_seconds for r in results["plain"])
    plain_loss = statistics.median(r.eval_loss[-1] for r in results["plain"])
    print(
        f"\n{args.rounds} FedAvg rounds of {args.steps} local steps of {args.batch} records, 4 agents,"
        f" {records} training records,"
        f" delta {DELTA:g}, clip {CLIP:g}, {args.repeats} repeats\n"
    )
    print(
        "| scheme | noise multiplier | epsilon spent | final eval loss (median, range) | gap | train time |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    summary = {}
    for label, runs in results.items():
        finals = [r.eval_loss[-1] for r in runs]
        loss = statistics.median(finals)
        took = statistics.median(r.train_seconds for r in runs) / plain_time
        spent = runs[0].epsilon
        summary[label] = {"final_eval_loss": loss, "range": [min(finals), max(finals)], "time_ratio": took}
        print(
            f"| {label} | {runs[0].noise_multiplier:.3f} | {'-' if spent is None else f'{spent:.2f}'} |"
            f" {loss:.3f} ({min(finals):.3f}-{max(finals):.3f}) | {loss - plain_loss:+.3f} | {took:.2f}x |"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{args.name}.json"
    meta = {
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "records": records,
        "users": {name: len(units) for name, units in world.users.items()},
        **vars(args),
    }
    runs_out = {label: [asdict(r) for r in runs] for label, runs in results.items()}
    out.write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs_out}, indent=1))
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
