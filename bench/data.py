"""Tokenizing an agent's corpus: the batched int32 packer (agent.data.pack_records) against the
per-document Python-list packer it replaced, on the same records, in one run (ratios, since the
machines are shared): seconds and peak Python/numpy memory per million tokens, the bytes a token
held for training, and equal outputs.

    python -m bench.data [--documents 12000] [--kind plain|completion]

Results go to bench/results/data-<kind>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent.data import IGNORE, Conversation, Example, Record, TokenBlocks, pack_records
from common.tinylm import DOMAINS, build_tiny_lm, domain_corpus

RESULTS = Path(__file__).resolve().parent / "results"


def per_document_pack(tokenizer: Any, records: Sequence[Record], block: int) -> TokenBlocks:
    """The packer before batching: one tokenizer call a document, Python lists of ints (with the
    record starts the batched one has kept since: a record's first token is not learned)."""
    ids: list[int] = []
    labels: list[int] = []
    starts: list[int] = []
    for record in records:
        ex = record.render(tokenizer) if isinstance(record, Conversation) else record
        starts.append(len(ids))
        if ex.learned == ((0, len(ex.text)),):
            tokens = tokenizer(ex.text, add_special_tokens=False)["input_ids"]
            ids.extend(tokens)
            labels.extend(tokens)
        else:
            enc = tokenizer(ex.text, add_special_tokens=False, return_offsets_mapping=True)
            for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
                ids.append(token)
                labels.append(token if any(a <= start and end <= b for a, b in ex.learned) else IGNORE)
        ids.append(tokenizer.eos_token_id)
        ends_learned = bool(ex.learned) and ex.learned[-1][1] == len(ex.text)
        labels.append(tokenizer.eos_token_id if ends_learned else IGNORE)
    n = len(ids) // block
    begins = torch.zeros(n * block, dtype=torch.bool)
    for i in starts:  # every start lies inside the ids (each record has its EOS at least)
        labels[i] = IGNORE
        if i < n * block:
            begins[i] = True
    begins[::block] = True  # each block starts a piece
    blocks = TokenBlocks(
        torch.tensor(ids[: n * block], dtype=torch.long).view(n, block),
        torch.tensor(labels[: n * block], dtype=torch.long).view(n, block),
        torch.from_numpy(np.packbits(begins.view(n, block).numpy(), axis=1)),
    )
    keep = (blocks.labels[:, 1:] != IGNORE).any(dim=1)
    return blocks if bool(keep.all()) else blocks[keep]


def records_of(kind: str, documents: int) -> list[Example]:
    docs = [d for domain in DOMAINS for d in domain_corpus(domain, documents // len(DOMAINS), seed=1)]
    if kind == "plain":
        return [Example.plain(d) for d in docs]
    return [
        Example(f"Q{i}: " + d, ((len(f"Q{i}: "), len(f"Q{i}: ") + len(d)),), str(i))
        for i, d in enumerate(docs)
    ]


def measure(
    pack: Callable[..., TokenBlocks], tokenizer: Any, records: Sequence[Record]
) -> tuple[TokenBlocks, dict[str, float]]:
    tracemalloc.start()
    began = time.perf_counter()
    blocks = pack(tokenizer, records, 128)
    seconds = time.perf_counter() - began
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    millions = blocks.input_ids.numel() / 1e6
    return blocks, {
        "seconds": seconds,
        "s_per_mtoken": seconds / millions,
        "peak_mb_per_mtoken": peak / 1e6 / millions,  # Python and numpy allocations (not torch's)
        "resident_bytes_per_token": _bytes_a_token(blocks),
    }


def _bytes_a_token(blocks: TokenBlocks) -> float:
    """What training holds a token: its id, its label and its share of the record starts."""
    held = float(blocks.input_ids.element_size() + blocks.labels.element_size())
    if blocks.starts is not None:
        held += blocks.starts.numel() * blocks.starts.element_size() / blocks.input_ids.numel()
    return held


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--documents", type=int, default=12000)
    p.add_argument("--kind", choices=("plain", "completion"), default="plain")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    from transformers import AutoTokenizer

    records = records_of(args.kind, args.documents)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(
            build_tiny_lm(Path(tmp) / "model", [r.text for r in records[:300]])
        )
    old, old_figures = measure(per_document_pack, tokenizer, records)
    new, new_figures = measure(pack_records, tokenizer, records)
    same = torch.equal(old.input_ids, new.input_ids.long()) and torch.equal(old.labels, new.labels.long())
    same = same and old.starts is not None and new.starts is not None and torch.equal(old.starts, new.starts)
    result = {
        "kind": args.kind,
        "documents": len(records),
        "tokens": int(new.input_ids.numel()),
        "per_document": old_figures,
        "batched": new_figures,
        "speedup": old_figures["seconds"] / new_figures["seconds"],
        "memory_ratio": old_figures["peak_mb_per_mtoken"] / new_figures["peak_mb_per_mtoken"],
        "outputs_equal": same,
    }
    before, after = old_figures, new_figures
    print(
        f"{args.kind}: {result['documents']} documents, {result['tokens']} tokens; per document "
        f"{before['s_per_mtoken']:.2f} s and {before['peak_mb_per_mtoken']:.0f} MB a million tokens, "
        f"batched {after['s_per_mtoken']:.2f} s and {after['peak_mb_per_mtoken']:.0f} MB: "
        f"{result['speedup']:.1f}x faster, {result['memory_ratio']:.1f}x less peak memory; held "
        f"{before['resident_bytes_per_token']:.2f} -> {after['resident_bytes_per_token']:.2f} bytes a token; "
        f"outputs equal: {same}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"data-{args.kind}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
