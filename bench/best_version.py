"""Which version ``export --version best`` takes when the agents' eval losses carry DP noise: the
aggregator's rule (``server.version_ranking.best``: each contender's loss averaged with its
neighbouring versions') against the lowest noisy loss, on simulated federations whose true loss
is known. Figure: regret, the true loss of the version taken minus the lowest true loss, in nats
(mean over trials; both rules see the same draws).

    python -m bench.best_version [--trials 2000] [--versions 30]

Curves: the loss falls as 5 + exp(-v / tau), fast (tau 3) or slow (tau 8), and from version 12
may rise again (overfitting, + c (v - 12)^2). Two agents report each version, each with DP noise
of the given deviation (the federation's loss then carries 0.71 of it). Results go to
bench/results/best_version.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from server.version_ranking import AgentEval, best

RESULTS = Path(__file__).resolve().parent / "results"
CURVES = {f"tau {tau}, overfit {c:g}": (tau, c) for tau in (3, 8) for c in (0.0, 0.0005, 0.002)}
NOISE = (0.01, 0.03, 0.1)


def true_losses(tau: float, overfit: float, versions: int) -> np.ndarray:
    """The federation's loss by version, before noise."""
    v = np.arange(versions)
    losses: np.ndarray = 5.0 + np.exp(-v / tau) + overfit * np.maximum(0, v - 12) ** 2
    return losses


def regrets(truth: np.ndarray, stddev: float, trials: int, seed: int) -> dict[str, float]:
    """Mean regret of each rule over ``trials`` noisy draws."""
    rng = np.random.default_rng(seed)
    versions = list(range(len(truth)))
    lowest_draw, rule = [], []
    for _ in range(trials):
        draws = truth[:, None] + rng.normal(0.0, stddev, (len(truth), 2))
        evals = {
            v: {a: AgentEval(float(draws[v, i]), 100, stddev) for i, a in enumerate("ab")} for v in versions
        }
        lowest_draw.append(truth[int(np.argmin(draws.mean(axis=1)))] - truth.min())
        chosen = best(versions, evals)
        assert chosen is not None
        rule.append(truth[chosen[0]] - truth.min())
    return {"lowest_draw": float(np.mean(lowest_draw)), "aggregator": float(np.mean(rule))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=2000)
    p.add_argument("--versions", type=int, default=30)
    args = p.parse_args(argv)
    rows: list[dict[str, object]] = []
    ratios: list[float] = []
    print(f"{'curve':<22} {'noise':>6} {'lowest draw':>12} {'aggregator':>11} {'ratio':>6}")
    for seed, (name, (tau, overfit)) in enumerate(CURVES.items()):
        truth = true_losses(tau, overfit, args.versions)
        for stddev in NOISE:
            r = regrets(truth, stddev, args.trials, seed)
            ratio = r["aggregator"] / r["lowest_draw"] if r["lowest_draw"] else math.nan
            rows.append({"curve": name, "agent_noise": stddev, **r, "ratio": ratio})
            ratios.append(ratio)
            print(f"{name:<22} {stddev:>6g} {r['lowest_draw']:>12.4f} {r['aggregator']:>11.4f} {ratio:>6.2f}")
    print(
        f"regret of the aggregator's rule / the lowest draw's: median {np.median(ratios):.2f},"
        f" worst {max(ratios):.2f}"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "best_version.json"
    out.write_text(json.dumps({"trials": args.trials, "versions": args.versions, "rows": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
