"""Secure aggregation throughput and memory, 10 agents and 10,000,000 float32 parameters.

    python -m bench.secagg [--params 10000000] [--agents 10] [--repeats 3]

For the full graph and k = 3 (and, with 4 agents, side by side: 2-bit codes one to a ring
element, the same codes packed, ternary codes packed; ``ring.round_layout``; and sparse
coverage, 3 or 2 of the 4 agents sending each element, ``coverage``, 2 of 4 also with no rank
table, ``coverage.TABLE_MAX_BYTES``) it times, per
agent, quantise (clip, weight, stochastic rounding into Z_2^32; codes of up to 8 bits with the
agents' stratified dithers, ``strata``, and ternary also with independent ones) + mask
(self mask and pairwise AES-256-CTR masks) + pack; and at the aggregator, the unmask (Shamir
reconstruction, mask removal from the ring sum) + decode (fixed point back to float, divided by
the summed weight) with 0 and 1 dropout. Shamir share/reconstruct times are per secret. Peak
aggregator memory is traced (numpy reports to tracemalloc) from the empty sum to the decoded
float32 mean, as a multiple of one float32 update (4 bytes a parameter). Medians of
``--repeats`` runs; results go to bench/results/secagg.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import tracemalloc
from pathlib import Path

import numpy as np

import common.secagg.coverage
from common.secagg import shamir
from common.secagg.agent import AgentRound
from common.secagg.local import Federation
from common.secagg.params import SecAggParams
from common.secagg.server import ServerRound
from common.secagg.strata import Uniforms

RESULTS = Path(__file__).resolve().parent / "results" / "secagg.json"
TARGETS = {"mask_full_mps": 40.0, "mask_k3_mps": 70.0, "unmask_mps": 40.0, "peak_x_update": 3.0}


def median_time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(
    params: int,
    agents: int,
    neighbours: int,
    threshold: int,
    repeats: int,
    levels: int = 1 << 16,
    pack: bool = True,
    stratified: bool = True,
    coverage: int = 0,
    dropouts: tuple[int, ...] = (0, 1),
) -> dict[str, float]:
    fed = Federation.create(agents)
    ids = sorted(fed.agents)
    # 16 bits: 16 + ceil(log2 agents) bits a coordinate, codes over the ring's full range;
    # fewer levels: codes packed several to an element (``pack``), or one an element
    sa = SecAggParams.for_round(
        threshold, neighbours, 0.05, 16, agents, levels=levels, pack=pack, coverage=coverage
    )
    sa = sa.check(agents)
    width = sa.ring_bits
    fp = sa.fixed_point
    length = fp.masked_length(params)  # the update's codes, then the weight's digits (not with coverage)
    rng = np.random.default_rng(0)
    delta = (rng.standard_normal(params) * 1e-2).astype(np.float32)
    seed = b"bench-seed"

    def setup(round_id: int):  # type: ignore[no-untyped-def]
        rounds = {a: fed.agent_round(a, round_id, sa, seed) for a in ids}
        server = ServerRound(round_id, sa, length, seed)
        for r in rounds.values():
            server.add_advertisement(r.advertise())
        roster = server.roster()
        for a in ids:
            server.add_shares(a, rounds[a].share_keys(roster))
        for a in ids:
            rounds[a].receive_shares(server.shares_for(a))
        return rounds, server

    rounds, sum_probe = setup(1)
    me = rounds[ids[0]]
    weight = 0.75
    codes_out = np.empty(length, dtype=np.uint32)

    def dithers(agent: AgentRound) -> Uniforms:  # the agents' stratified dithers, or independent ones
        return agent.rounding(rng, length) if stratified else rng

    def quantise_and_mask() -> None:
        fp.encode_weighted(delta, weight, dithers(me), out=codes_out)
        wire.append(fp.to_wire(me.mask_codes(codes_out)))  # with coverage: the elements it sends

    wire: list[bytes] = []
    mask_s = median_time(quantise_and_mask, repeats)
    sum_probe.start_sum()
    sent = sum_probe.upload_length(ids[0])
    block = 1 << 18

    def unpack_and_add() -> None:  # the aggregator's work per arriving upload, block by block
        data = wire[-1]
        for start in range(0, sent, block):
            count = min(block, sent - start)
            first = start * width // 8
            sum_probe.add_masked(
                ids[0], fp.from_wire(data[first : first + fp.wire_bytes(count)], count), start
            )

    add_s = median_time(unpack_and_add, repeats)
    results: dict[str, float] = {
        "ring_bits": width,
        "bits_a_coordinate": fp.coordinate_bits,
        "mask_mps": params / mask_s / 1e6,
        "mask_s": mask_s,
        "unpack_add_mps": params / add_s / 1e6,
        "upload_bits_a_coordinate": fp.ring_bits * sent / params,
    }
    for dropped in dropouts:
        times, peaks = [], []
        for rep in range(repeats):
            rounds, server = setup(10 + rep)
            masked = {}
            for a in ids[dropped:]:
                upload = rounds[a].mask_codes(fp.encode_weighted(delta, weight, dithers(rounds[a])))
                masked[a] = fp.from_wire(fp.to_wire(upload), upload.size)
            tracemalloc.start()
            server.start_sum()
            for a, m in masked.items():
                for start in range(0, m.size, 1 << 18):  # chunk by chunk, as uploads arrive
                    server.add_masked(a, m[start : start + (1 << 18)], start)
                server.finish_upload(a)
            survivors, gone = server.unmask_request()
            reveals = {a: rounds[a].unmask(survivors, gone) for a in survivors}
            t = time.perf_counter()
            for a, shares in reveals.items():
                server.add_reveal(a, shares)
            total = server.unmasked_sum()
            if coverage:
                mean = server.covered_mean(total, dict.fromkeys(survivors, weight), params)
            else:
                mean, _ = fp.decode_weighted_mean(total, len(survivors), params)
            times.append(time.perf_counter() - t)
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
            expected = delta.astype(np.float64)
            err = float(np.max(np.abs(mean - expected)))
            assert err < 2 * fp.step / weight, err  # the decoded mean is the true mean up to rounding
        s = statistics.median(times)
        results[f"unmask_{dropped}_dropout_mps"] = params / s / 1e6
        results[f"unmask_{dropped}_dropout_s"] = s
        results[f"peak_{dropped}_dropout_x_update"] = max(peaks) / (params * 4)  # of float32
    return results


def shamir_times(agents: int, threshold: int, repeats: int) -> dict[str, float]:
    """One 32-byte mask key (the larger of an agent's two secrets) split and recovered."""
    secret = os.urandom(32)
    xs = list(range(1, agents + 1))
    split_s = median_time(lambda: shamir.split(secret, threshold, xs), repeats * 20)
    shares = shamir.split(secret, threshold, xs)
    rec_s = median_time(lambda: shamir.reconstruct(shares, threshold, len(secret)), repeats * 20)
    return {"shamir_split_ms": split_s * 1e3, "shamir_reconstruct_ms": rec_s * 1e3}


def redrawn(params: int, repeats: int) -> dict[str, float]:
    """The 2-of-4 coverage row with no rank table: every pass over the elements redraws their
    senders from the keystream (what rounds past ``coverage.TABLE_MAX_BYTES`` do)."""
    kept = common.secagg.coverage.TABLE_MAX_BYTES
    common.secagg.coverage.TABLE_MAX_BYTES = 0
    try:
        return run(params, 4, 0, 3, repeats, levels=5, coverage=2, dropouts=(0,))
    finally:
        common.secagg.coverage.TABLE_MAX_BYTES = kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=10_000_000)
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    full = run(args.params, args.agents, 0, args.agents // 2 + 1, args.repeats)
    k3 = run(args.params, args.agents, 3, 3, args.repeats)
    packing = {  # the same work side by side: 2-bit codes one an element and packed, ternary packed
        "2bit_one_code": run(args.params, 4, 0, 3, args.repeats, levels=4, pack=False),
        "2bit_packed": run(args.params, 4, 0, 3, args.repeats, levels=4),
        "ternary_packed": run(args.params, 4, 0, 3, args.repeats, levels=3),
        "ternary_packed_independent": run(args.params, 4, 0, 3, args.repeats, levels=3, stratified=False),
        # sparse coverage: 3 (or 2) of the 4 agents send each element
        "2bit_coverage_3": run(args.params, 4, 0, 3, args.repeats, levels=4, coverage=3),
        "5_levels_coverage_2": run(args.params, 4, 0, 3, args.repeats, levels=5, coverage=2, dropouts=(0,)),
        "5_levels_coverage_2_redrawn": redrawn(args.params, args.repeats),
    }
    report = {
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
        "params": args.params,
        "agents": args.agents,
        "full_graph": full,
        "k3": k3,
        "packing_4_agents": packing,
        **shamir_times(args.agents, args.agents // 2 + 1, args.repeats),
        "targets": TARGETS,
    }
    report["meets"] = {
        "mask_full": full["mask_mps"] >= TARGETS["mask_full_mps"],
        "mask_k3": k3["mask_mps"] >= TARGETS["mask_k3_mps"],
        "unmask": min(full["unmask_0_dropout_mps"], full["unmask_1_dropout_mps"]) >= TARGETS["unmask_mps"],
        "peak": max(full["peak_1_dropout_x_update"], k3["peak_1_dropout_x_update"])
        <= TARGETS["peak_x_update"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    rows = [("full graph", full), ("k = 3", k3)] + [(f"4: {k}", r) for k, r in packing.items()]
    for name, r in rows:
        dropped = "unmask_1_dropout_mps" in r
        one = f"{r['unmask_1_dropout_mps']:6.1f}" if dropped else "     -"
        print(
            f"{name:10s}  {r['upload_bits_a_coordinate']:.2f} bits a coordinate uploaded  "
            f"agent quantise+mask+pack {r['mask_mps']:6.1f} M params/s   "
            f"aggregator unpack+add {r['unpack_add_mps']:6.1f}   "
            f"aggregator unmask+decode {r['unmask_0_dropout_mps']:6.1f} (0 dropped) "
            f"{one} (1 dropped) M params/s   "
            f"peak {r[f'peak_{int(dropped)}_dropout_x_update']:.2f}x update"
        )
    print(
        f"shamir split {report['shamir_split_ms']:.2f} ms,"
        f" reconstruct {report['shamir_reconstruct_ms']:.2f} ms"
    )
    print(f"targets {TARGETS} -> {report['meets']}")
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
