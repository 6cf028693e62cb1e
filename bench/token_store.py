"""An agent's corpus from disk to training blocks, three ways in one run (ratios, since the machines
are shared): in memory as the agent did before the token store (every record read into a list,
split, packed), the store's first start (records streamed, counted, tokenized into memory-mapped
files) and a restart (the store's entry opened). Figures: seconds, and the peak of Python and
numpy allocations (tracemalloc; file pages the kernel maps are not allocations), with the blocks
checked equal (tokens, labels and record starts).

    python -m bench.token_store [--documents 30000] [--repeat 4]

Each document is written ``--repeat`` times (different numbering) to make the corpus larger than
the tiny tokenizer's training text. Results go to bench/results/token_store.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from agent.data import TokenBlocks, load_records, pack_records, split
from agent.token_store import TokenStore, open_entry
from common.tinylm import DOMAINS, build_tiny_lm, domain_corpus

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = 128
EVAL_FRACTION = 0.1


def measured(
    run: Callable[[], tuple[TokenBlocks, TokenBlocks]],
) -> tuple[tuple[TokenBlocks, TokenBlocks], dict[str, float]]:
    tracemalloc.start()
    began = time.perf_counter()
    blocks = run()
    seconds = time.perf_counter() - began
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return blocks, {"seconds": seconds, "peak_mb": peak / 1e6}


def in_memory(data: Path, tokenizer: Any) -> tuple[TokenBlocks, TokenBlocks]:
    train, evaluation = split(load_records(data), EVAL_FRACTION)
    return pack_records(tokenizer, train, BLOCK), pack_records(tokenizer, evaluation, BLOCK)


def from_store(data: Path, tokens: Path, tokenizer: Any) -> tuple[TokenBlocks, TokenBlocks]:
    store = TokenStore(tokens)
    blocks = open_entry(store.prepare(store.corpus(data, EVAL_FRACTION), tokenizer, BLOCK, False), BLOCK)
    return blocks.train, blocks.eval


def same_blocks(a: TokenBlocks, b: TokenBlocks) -> bool:
    """The same tokens, labels and record starts (where each packed record begins)."""
    starts = (a.starts is None and b.starts is None) or (
        a.starts is not None and b.starts is not None and torch.equal(a.starts, b.starts)
    )
    return starts and torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--documents", type=int, default=30000)
    p.add_argument("--repeat", type=int, default=4)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    from transformers import AutoTokenizer

    docs = [d for domain in DOMAINS for d in domain_corpus(domain, args.documents // len(DOMAINS), seed=1)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = AutoTokenizer.from_pretrained(build_tiny_lm(root / "model", docs[:300]))
        data = root / "data.jsonl"
        with open(data, "w") as f:
            for copy in range(args.repeat):
                for i, doc in enumerate(docs):
                    f.write(json.dumps({"text": f"{copy}.{i}: {doc}"}) + "\n")
        before, memory = measured(lambda: in_memory(data, tokenizer))
        first, cold = measured(lambda: from_store(data, root / "tokens", tokenizer))
        again, warm = measured(lambda: from_store(data, root / "tokens", tokenizer))
        pairs = [(a, b) for x, y in ((before, first), (before, again)) for a, b in zip(x, y, strict=True)]
        equal = all(same_blocks(a, b) for a, b in pairs)
        on_disk = sum(f.stat().st_size for f in (root / "tokens").rglob("*") if f.is_file())
        result = {
            "records": len(docs) * args.repeat,
            "corpus_bytes": data.stat().st_size,
            "tokens": int(before[0].input_ids.numel() + before[1].input_ids.numel()),
            "block": BLOCK,
            "in_memory": memory,
            "store_first_start": cold,
            "store_restart": warm,
            "store_bytes_on_disk": on_disk,
            "first_start_vs_in_memory": {
                "time": cold["seconds"] / memory["seconds"],
                "peak": cold["peak_mb"] / memory["peak_mb"],
            },
            "restart_speedup": memory["seconds"] / warm["seconds"],
            "blocks_equal": equal,
        }
    print(
        f"{result['records']} records ({result['corpus_bytes'] / 1e6:.1f} MB,"
        f" {result['tokens'] / 1e6:.2f} M tokens):"
        f" in memory {memory['seconds']:.2f} s, peak {memory['peak_mb']:.0f} MB;"
        f" store first start {cold['seconds']:.2f} s, peak {cold['peak_mb']:.0f} MB;"
        f" restart {warm['seconds']:.3f} s, peak {warm['peak_mb']:.1f} MB"
        f" ({result['restart_speedup']:.0f}x faster than in memory); blocks equal: {equal}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "token_store.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
