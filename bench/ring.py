"""Masked bytes and rounding error per fleet size: the round's ring against max_agents' ring.

    python -m bench.ring [--coordinates 200000] [--max-agents 1000]

For each fleet size n and code width, three ways to size a masked round, side by side on the
same random updates (uniform in the clip range, one per agent): the ring for ``max_agents``
with codes 0 .. 2^bits - 1 (before wire revision 3), the ring for n with the same codes, and
the ring for n with codes over all of it (``SecAggParams.for_round``, what the daemons run).
Each reports bits per coordinate on the wire and the RMS error of the decoded mean against
the true mean (masks cancel exactly in the ring, so they are left out here; tests/test_secagg.py
checks that through the real protocol). Results go to bench/results/ring.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common.secagg.params import SecAggParams
from common.secagg.ring import ring_bits

RESULTS = Path(__file__).resolve().parent / "results" / "ring.json"
FLEETS = (3, 4, 5, 10, 20, 50)
BITS = (2, 4, 8)


def mean_error(params: SecAggParams, updates: np.ndarray, rng: np.random.Generator) -> float:
    """RMS error of the decoded mean of ``updates`` (one row an agent) through the fixed point."""
    fp = params.fixed_point
    total = np.zeros(updates.shape[1], dtype=np.uint32)
    for row in updates:
        total += fp.encode(row, rng)
    mean = fp.decode_sum(total, len(updates)) / len(updates)
    return float(np.sqrt(np.mean((mean - updates.mean(axis=0, dtype=np.float64)) ** 2)))


def run(agents: int, bits: int, coordinates: int, max_agents: int) -> dict[str, float]:
    """The three sizings for one fleet and code width."""
    rng = np.random.default_rng([agents, bits])
    updates = rng.uniform(-1, 1, (agents, coordinates)).astype(np.float32)
    sizings = {
        "max_agents": SecAggParams(agents // 2 + 1, 0, 1.0, bits, ring_bits(bits, max_agents)),
        "round": SecAggParams.for_round(agents // 2 + 1, 0, 1.0, bits, agents, fill=False),
        "round_full": SecAggParams.for_round(agents // 2 + 1, 0, 1.0, bits, agents),
    }
    out: dict[str, float] = {}
    for name, params in sizings.items():
        params.check(agents)
        out[f"{name}_ring_bits"] = params.ring_bits
        out[f"{name}_levels"] = params.fixed_point.levels + 1
        out[f"{name}_rmse"] = mean_error(params, updates, rng)
    out["bytes_saved_vs_max_agents"] = 1 - out["round_full_ring_bits"] / out["max_agents_ring_bits"]
    out["rmse_ratio_full_vs_round"] = out["round_full_rmse"] / out["round_rmse"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coordinates", type=int, default=200_000)
    p.add_argument("--max-agents", type=int, default=1000, help="the config default")
    args = p.parse_args()
    began = time.monotonic()
    rows = []
    print(f"{'agents':>6} {'bits':>4} | {'ring bits':>17} | {'levels':>11} | {'RMSE ratio':>10}")
    for agents in FLEETS:
        for bits in BITS:
            r = run(agents, bits, args.coordinates, args.max_agents)
            rows.append({"agents": agents, "bits": bits, **r})
            print(
                f"{agents:>6} {bits:>4} | "
                f"{r['max_agents_ring_bits']:>4.0f} -> {r['round_full_ring_bits']:>2.0f} "
                f"({100 * r['bytes_saved_vs_max_agents']:>3.0f}% less) | "
                f"{r['round_levels']:>4.0f} -> {r['round_full_levels']:>4.0f} | "
                f"{r['rmse_ratio_full_vs_round']:>10.2f}",
                flush=True,
            )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"coordinates": args.coordinates, "max_agents": args.max_agents, "rows": rows}, indent=1)
        + "\n"
    )
    print(f"saved {RESULTS} in {time.monotonic() - began:.0f}s")


if __name__ == "__main__":
    main()
