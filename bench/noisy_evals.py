"""What DP noise on the agents' eval losses does to the aggregator's choices, on simulated
federations whose true loss is known (the real ``server.version_ranking.best`` and
``server.stopping.finish_reason``; every rule sees the same draws):

1. ``export --version best``: the aggregator's rule (each contender's loss averaged with its
   neighbouring versions') against the version with the lowest noisy loss. Regret: the true loss
   of the version taken minus the lowest true loss, in nats.
2. Early stopping (``rounds.early_stop_patience``, ``early_stop_noise_sigmas``): the version it
   stops at, and the regret of the version ``best`` then takes (against the lowest true loss over
   the whole horizon).

    python -m bench.noisy_evals [--trials 2000] [--versions 30] [--stop-trials 300]

Curves: the loss falls as 5 + exp(-v / tau), fast (tau 3) or slow (tau 8), and from version 12
may rise again (overfitting, + c (v - 12)^2). Two agents report each version, each with DP noise
of the given deviation (the federation's loss then carries 0.71 of it). Results go to
bench/results/noisy_evals.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from common.config import RoundsConfig
from server.stopping import finish_reason
from server.version_ranking import AgentEval, Evals, best

RESULTS = Path(__file__).resolve().parent / "results"
CURVES = {f"tau {tau}, overfit {c:g}": (tau, c) for tau in (3, 8) for c in (0.0, 0.0005, 0.002)}
NOISE = (0.01, 0.03, 0.1)
STOP_CURVES = {f"tau {tau}, overfit {c:g}": (tau, c) for tau in (3, 8) for c in (0.0, 0.002)}
STOP_NOISE = (0.0, 0.03, 0.1)
STOP_RULES = ((3, 0.0), (3, 2.0), (5, 0.0), (8, 0.0))
"""(early_stop_patience, early_stop_noise_sigmas)"""
HORIZON = 60
"""Versions early stopping may run to."""


def true_losses(tau: float, overfit: float, versions: int) -> np.ndarray:
    """The federation's loss by version, before noise."""
    v = np.arange(versions)
    losses: np.ndarray = 5.0 + np.exp(-v / tau) + overfit * np.maximum(0, v - 12) ** 2
    return losses


def reports(draws: np.ndarray, stddev: float) -> dict[int, Evals]:
    """Two agents' evaluations of each version: ``draws`` is [versions, 2]."""
    return {
        v: {a: AgentEval(float(row[i]), 100, stddev) for i, a in enumerate("ab")}
        for v, row in enumerate(draws)
    }


def best_regrets(truth: np.ndarray, stddev: float, trials: int, seed: int) -> dict[str, float]:
    """Mean regret of each rule for the best version over ``trials`` noisy draws."""
    rng = np.random.default_rng(seed)
    versions = list(range(len(truth)))
    lowest_draw, rule = [], []
    for _ in range(trials):
        draws = truth[:, None] + rng.normal(0.0, stddev, (len(truth), 2))
        lowest_draw.append(truth[int(np.argmin(draws.mean(axis=1)))] - truth.min())
        chosen = best(versions, reports(draws, stddev))
        assert chosen is not None
        rule.append(truth[chosen[0]] - truth.min())
    return {"lowest_draw": float(np.mean(lowest_draw)), "aggregator": float(np.mean(rule))}


def stopping(
    truth: np.ndarray, stddev: float, rounds: RoundsConfig, trials: int, seed: int
) -> dict[str, float]:
    """Mean version early stopping stops at (the horizon's last if it never does), and the mean
    regret of the best version then."""
    rng = np.random.default_rng(seed)
    stops, regrets = [], []
    for _ in range(trials):
        evals = reports(truth[:, None] + rng.normal(0.0, stddev, (len(truth), 2)), stddev)
        stop = next(
            (v for v in range(len(truth)) if finish_reason(v, {u: evals[u] for u in range(v + 1)}, rounds)),
            len(truth) - 1,
        )
        chosen = best(list(range(stop + 1)), evals)
        assert chosen is not None
        stops.append(stop)
        regrets.append(truth[chosen[0]] - truth.min())
    return {"stop_version": float(np.mean(stops)), "regret": float(np.mean(regrets))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=2000)
    p.add_argument("--versions", type=int, default=30)
    p.add_argument("--stop-trials", type=int, default=300)
    args = p.parse_args(argv)
    rows: list[dict[str, object]] = []
    ratios: list[float] = []
    print("1. the best version: regret (nats)")
    print(f"{'curve':<22} {'noise':>6} {'lowest draw':>12} {'aggregator':>11} {'ratio':>6}")
    for seed, (name, (tau, overfit)) in enumerate(CURVES.items()):
        truth = true_losses(tau, overfit, args.versions)
        for stddev in NOISE:
            r = best_regrets(truth, stddev, args.trials, seed)
            ratio = r["aggregator"] / r["lowest_draw"] if r["lowest_draw"] else math.nan
            rows.append({"curve": name, "agent_noise": stddev, **r, "ratio": ratio})
            ratios.append(ratio)
            print(f"{name:<22} {stddev:>6g} {r['lowest_draw']:>12.4f} {r['aggregator']:>11.4f} {ratio:>6.2f}")
    print(
        f"regret of the aggregator's rule / the lowest draw's: median {np.median(ratios):.2f},"
        f" worst {max(ratios):.2f}"
    )
    print(f"\n2. early stopping within {HORIZON} versions: version it stops at, regret of the best then")
    header = " | ".join(f"patience {p}, sigmas {k:g}" for p, k in STOP_RULES)
    print(f"{'curve':<22} {'noise':>6}  {header}")
    stops: list[dict[str, object]] = []
    for seed, (name, (tau, overfit)) in enumerate(STOP_CURVES.items()):
        truth = true_losses(tau, overfit, HORIZON)
        for stddev in STOP_NOISE:
            cells = []
            for patience, sigmas in STOP_RULES:
                rounds = RoundsConfig(early_stop_patience=patience, early_stop_noise_sigmas=sigmas)
                r = stopping(truth, stddev, rounds, args.stop_trials, seed)
                stops.append(
                    {"curve": name, "agent_noise": stddev, "patience": patience, "sigmas": sigmas, **r}
                )
                cells.append(f"{r['stop_version']:5.1f} {r['regret']:.4f}".ljust(len("patience 3, sigmas 0")))
            print(f"{name:<22} {stddev:>6g}  " + " | ".join(cells))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "noisy_evals.json"
    out.write_text(
        json.dumps(
            {
                "trials": args.trials,
                "versions": args.versions,
                "best": rows,
                "stop_trials": args.stop_trials,
                "horizon": HORIZON,
                "stopping": stops,
            },
            indent=2,
        )
    )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
