"""Local training data: text or JSONL files, a deterministic train/eval split, token blocks."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common.errors import ConfigError


def load_texts(path: Path) -> list[str]:
    """Documents from a file or directory: ``.txt`` (blank-line separated) or ``.jsonl`` (``text`` field)."""
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ConfigError(f"data: no .txt or .jsonl files at {path}")
    docs: list[str] = []
    for f in files:
        if f.suffix == ".jsonl":
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"data: {f}:{n}: invalid JSON: {exc}") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ConfigError(f"data: {f}:{n}: no string field 'text'")
                docs.append(record["text"])
        else:
            docs.extend(d.strip() for d in f.read_text().split("\n\n") if d.strip())
    if not docs:
        raise ConfigError(f"data: {path} holds no documents")
    return docs


def split(docs: Sequence[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """(train, eval) by a hash of each document: stable across runs, restarts and file order."""
    train: list[str] = []
    held_out: list[str] = []
    for doc in docs:
        bucket = int.from_bytes(hashlib.sha256(doc.encode()).digest()[:4], "big") / 2**32
        (held_out if bucket < eval_fraction else train).append(doc)
    if not train or not held_out:
        raise ConfigError(
            f"data: {len(docs)} documents are too few to split with eval_fraction={eval_fraction}"
        )
    return train, held_out


def pack(tokenizer: Any, docs: Sequence[str], block: int) -> torch.Tensor:
    """Tokenize, join with EOS and cut into ``[n, block]`` token blocks (the tail is dropped)."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // block
    if n == 0:
        raise ConfigError(f"data: only {len(ids)} tokens, fewer than one block of {block}")
    return torch.tensor(ids[: n * block], dtype=torch.long).view(n, block)
