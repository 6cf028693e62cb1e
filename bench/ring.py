"""Masked bytes and rounding error per fleet size: three ways to lay out a masked round.

    python -m bench.ring [--coordinates 200000] [--max-agents 1000]

For each fleet size n and code levels L (3, and 2^bits for 2, 4 and 8 bits), side by side on
the same random updates (uniform in the clip range, one per agent):
- ``max_agents``: one code an element in the ring for ``max_agents`` (before wire revision 3);
- ``one_code``: one code an element in the least ring for the n invited agents, codes filling
  it (wire revision 3);
- ``packed``: several codes an element as base-(n * max_code + 1) digits (``ring.round_layout``,
  wire revision 4, what the daemons run), the secure sum's bound log2(n (L - 1) + 1) within 1%.
Each reports bits per coordinate on the wire, the codes' levels, and the RMS error of the decoded
mean against the true mean (masks cancel exactly in the ring and packing changes no number, so
both are left out here; tests/test_secagg.py checks them through the real protocol). Results go
to bench/results/ring.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common.secagg.params import SecAggParams
from common.secagg.ring import coordinate_bits, levels_bits

RESULTS = Path(__file__).resolve().parent / "results" / "ring.json"
FLEETS = (3, 4, 5, 10, 20, 50)
LEVELS = (3, 4, 16, 256)  # ternary, then 2, 4 and 8 bits


def mean_error(params: SecAggParams, updates: np.ndarray, rng: np.random.Generator) -> float:
    """RMS error of the decoded mean of ``updates`` (one row an agent) through the fixed point."""
    fp = params.fixed_point
    total = np.zeros(updates.shape[1], dtype=np.uint32)
    for row in updates:
        total += fp.encode(row, rng)
    mean = fp.decode_sum(total, len(updates)) / len(updates)
    return float(np.sqrt(np.mean((mean - updates.mean(axis=0, dtype=np.float64)) ** 2)))


def run(agents: int, levels: int, coordinates: int, max_agents: int) -> dict[str, float]:
    """The three layouts for one fleet and code range."""
    rng = np.random.default_rng([agents, levels])
    updates = rng.uniform(-1, 1, (agents, coordinates)).astype(np.float32)
    t, bits = agents // 2 + 1, levels_bits(levels)
    widest = coordinate_bits(levels, max_agents)
    layouts = {
        "max_agents": SecAggParams(t, 0, 1.0, bits, widest, levels - 1),
        "one_code": SecAggParams.for_round(t, 0, 1.0, bits, agents, levels=levels, pack=False),
        "packed": SecAggParams.for_round(t, 0, 1.0, bits, agents, levels=levels),
    }
    out: dict[str, float] = {"secure_sum_bound_bits": float(np.log2(agents * (levels - 1) + 1))}
    for name, params in layouts.items():
        params.check(agents)
        fp = params.fixed_point
        out[f"{name}_bits"] = fp.coordinate_bits
        out[f"{name}_codes_per_element"] = fp.group
        out[f"{name}_levels"] = fp.levels + 1
        out[f"{name}_rmse"] = mean_error(params, updates, rng)
    out["packed_bytes_vs_max_agents"] = out["packed_bits"] / out["max_agents_bits"]
    out["packed_bytes_vs_one_code"] = out["packed_bits"] / out["one_code_bits"]
    out["packed_rmse_vs_one_code"] = out["packed_rmse"] / out["one_code_rmse"]
    # mean squared error per bit on the wire, packed against one code (lower: packed spends better)
    out["packed_rmse2_bits_vs_one_code"] = (
        out["packed_rmse_vs_one_code"] ** 2 * out["packed_bytes_vs_one_code"]
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coordinates", type=int, default=200_000)
    p.add_argument("--max-agents", type=int, default=1000, help="the config default")
    args = p.parse_args()
    began = time.monotonic()
    rows = []
    print(f"{'agents':>6} {'levels':>6} | bits a code: max_agents, one code, packed (bound) | levels | RMSE")
    for agents in FLEETS:
        for levels in LEVELS:
            r = run(agents, levels, args.coordinates, args.max_agents)
            rows.append({"agents": agents, "levels": levels, **r})
            print(
                f"{agents:>6} {levels:>6} | {r['max_agents_bits']:>5.2f} {r['one_code_bits']:>5.2f} "
                f"{r['packed_bits']:>5.2f} ({r['secure_sum_bound_bits']:.2f}) | "
                f"{r['one_code_levels']:.0f} -> {r['packed_levels']:.0f} | "
                f"{r['packed_rmse_vs_one_code']:.2f}x",
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
