"""Local training data: plain text, prompt/completion pairs or chat conversations; a deterministic
train/eval split; token blocks whose labels carry loss only where the model should learn.

Files: ``.txt`` (documents separated by blank lines) or ``.jsonl`` with one record a line,
either ``{"text": ...}`` (every token is learned), ``{"prompt": ..., "completion": ...}``
(only the completion and the end-of-text token are learned) or ``{"messages": [{"role": ...,
"content": ...}, ...]}`` (rendered with the tokenizer's chat template; only the assistant turns
are learned). Eval losses count the learned tokens only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import ConfigError

IGNORE = -100
"""Label of a token that carries no loss (transformers' ignore index)."""


@dataclass(frozen=True)
class Example:
    """A document and the character spans of it the model learns (all of plain text)."""

    text: str
    learned: tuple[tuple[int, int], ...]
    key: str
    """What the train/eval split hashes (the text itself for plain text)."""

    @classmethod
    def plain(cls, text: str) -> Example:
        return cls(text, ((0, len(text)),), text)


@dataclass(frozen=True)
class Conversation:
    """Chat turns, rendered with the tokenizer's chat template when the model is known."""

    messages: tuple[tuple[str, str], ...]
    key: str

    def render(self, tokenizer: Any) -> Example:
        """The conversation as the template renders it, the assistant turns learned. A template
        that does not render a conversation as the concatenation of its turns is refused."""
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "data: chat records ('messages') need a model whose tokenizer has a chat template; "
                "this one has none (use prompt/completion records instead)"
            )
        turns = [{"role": role, "content": content} for role, content in self.messages]
        try:
            text = tokenizer.apply_chat_template(turns, tokenize=False)
            learned = []
            for i, (role, _) in enumerate(self.messages):
                if role != "assistant":
                    continue
                before = tokenizer.apply_chat_template(turns[:i], tokenize=False, add_generation_prompt=True)
                through = tokenizer.apply_chat_template(turns[: i + 1], tokenize=False)
                if not (text.startswith(through) and through.startswith(before)):
                    raise ConfigError(
                        "data: the chat template does not render a conversation as the sum of its turns, "
                        "so its assistant turns cannot be told apart; use prompt/completion records"
                    )
                learned.append((len(before), len(through)))
        except ConfigError:
            raise
        except Exception as exc:  # jinja errors: the template refuses this conversation
            raise ConfigError(f"data: the chat template cannot render a conversation: {exc}") from None
        return Example(text, tuple(learned), self.key)


Record = Example | Conversation


def load_records(path: Path) -> list[Record]:
    """Records from a file or directory of ``.txt`` and ``.jsonl`` files (module docstring)."""
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ConfigError(f"data: no .txt or .jsonl files at {path}")
    records: list[Record] = []
    for f in files:
        if f.suffix == ".jsonl":
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if line.strip():
                    records.append(_record(line, f"{f}:{n}"))
        else:
            records.extend(Example.plain(d.strip()) for d in f.read_text().split("\n\n") if d.strip())
    if not records:
        raise ConfigError(f"data: {path} holds no documents")
    return records


def _record(line: str, where: str) -> Record:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"data: {where}: invalid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise ConfigError(f"data: {where}: not a JSON object")
    if isinstance(record.get("text"), str):
        return Example.plain(record["text"])
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str) and completion:
        text = prompt + completion
        return Example(text, ((len(prompt), len(text)),), json.dumps([prompt, completion]))
    messages = record.get("messages")
    if isinstance(messages, list) and messages:
        turns = []
        for m in messages:
            if not (isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("role", "content"))):
                raise ConfigError(f"data: {where}: each message needs string 'role' and 'content'")
            turns.append((m["role"], m["content"]))
        if not any(role == "assistant" for role, _ in turns):
            raise ConfigError(f"data: {where}: a conversation with no assistant turn has nothing to learn")
        return Conversation(tuple(turns), json.dumps(turns))
    raise ConfigError(
        f"data: {where}: a record needs a string 'text', a 'prompt' with a non-empty 'completion', "
        "or a list of 'messages'"
    )


def load_texts(path: Path) -> list[str]:
    """The plain text of every record that has one (calibration text, benchmarks)."""
    return [r.text for r in load_records(path) if isinstance(r, Example)]


def split(docs: Sequence[Any], eval_fraction: float) -> tuple[list[Any], list[Any]]:
    """(train, eval) by a hash of each document (a string or a record's ``key``): stable across
    runs, restarts and file order."""
    train: list[Any] = []
    held_out: list[Any] = []
    for doc in docs:
        key = doc if isinstance(doc, str) else doc.key
        bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") / 2**32
        (held_out if bucket < eval_fraction else train).append(doc)
    if not train or not held_out:
        raise ConfigError(
            f"data: {len(docs)} documents are too few to split with eval_fraction={eval_fraction}"
        )
    return train, held_out


@dataclass(frozen=True)
class TokenBlocks:
    """``[n, block]`` token ids and their labels (``IGNORE`` where a token carries no loss)."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def of(cls, blocks: torch.Tensor | TokenBlocks) -> TokenBlocks:
        """Blocks as they are, or a plain tensor of ids whose every token carries loss."""
        return blocks if isinstance(blocks, TokenBlocks) else cls(blocks, blocks)

    @classmethod
    def empty(cls) -> TokenBlocks:
        """No blocks (before the model is loaded, and after it is released)."""
        return cls.of(torch.empty(0, 1, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: Any) -> TokenBlocks:
        return TokenBlocks(self.input_ids[index], self.labels[index])

    def to(self, device: str) -> TokenBlocks:
        """On ``device``, as the int64 ids and labels the model takes."""
        return TokenBlocks(self.input_ids.to(device, torch.long), self.labels.to(device, torch.long))

    @property
    def learned_tokens(self) -> int:
        """Tokens a loss is computed on (the model shifts labels: no block's first token)."""
        return int((self.labels[:, 1:] != IGNORE).sum())


TOKENIZE_BATCH = 512
"""Documents a tokenizer call takes (fast tokenizers encode a batch in parallel)."""


def pack_records(tokenizer: Any, records: Sequence[Record], block: int) -> TokenBlocks:
    """Tokenize each record (conversations through the chat template), join them with EOS, cut
    into ``[n, block]`` blocks (the tail is dropped) and drop blocks with nothing to learn. A token
    is learned if it lies wholly in a learned span; EOS is learned after a learned ending. Records
    are tokenized in batches and kept as int32 (8 bytes a token with its label, not Python ints)."""
    ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for doc_ids, doc_labels in _encoded(tokenizer, records):
        ids.append(doc_ids)
        labels.append(doc_labels)
    flat_ids, flat_labels = np.concatenate(ids), np.concatenate(labels)
    del ids, labels  # the per-document arrays: only the joined ones are needed now
    n = len(flat_ids) // block
    if n == 0:
        raise ConfigError(f"data: only {len(flat_ids)} tokens, fewer than one block of {block}")
    blocks = TokenBlocks(  # int32 while held (a corpus stays resident); batches go out as int64
        torch.from_numpy(flat_ids[: n * block]).view(n, block),
        torch.from_numpy(flat_labels[: n * block]).view(n, block),
    )
    return _learning(blocks)


def record_blocks(tokenizer: Any, records: Sequence[Record], block: int) -> tuple[TokenBlocks, int]:
    """One ``block``-long row per record, for record-level differential privacy (a record is then
    exactly one example): its tokens and EOS, cut at ``block`` and padded with EOS that carries no
    loss (the model is causal: no real token sees the padding). Rows with nothing to learn are
    dropped. Returns the rows and how many records were cut."""
    rows = len(records)
    ids = np.full((rows, block), tokenizer.eos_token_id, dtype=np.int32)
    labels = np.full((rows, block), IGNORE, dtype=np.int32)
    cut = 0
    for row, (doc_ids, doc_labels) in enumerate(_encoded(tokenizer, records)):
        n = min(len(doc_ids), block)
        cut += len(doc_ids) > block
        ids[row, :n], labels[row, :n] = doc_ids[:n], doc_labels[:n]
    return _learning(TokenBlocks(torch.from_numpy(ids), torch.from_numpy(labels))), cut


def _encoded(tokenizer: Any, records: Sequence[Record]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each record's (ids, labels) as int32, EOS appended, tokenized in batches."""
    eos = np.array([tokenizer.eos_token_id], dtype=np.int32)
    unlearned = np.array([IGNORE], dtype=np.int32)
    for first in range(0, len(records), TOKENIZE_BATCH):
        batch = [
            r.render(tokenizer) if isinstance(r, Conversation) else r
            for r in records[first : first + TOKENIZE_BATCH]
        ]
        for ex, (doc_ids, doc_labels) in zip(batch, _tokenize(tokenizer, batch), strict=True):
            ends_learned = bool(ex.learned) and ex.learned[-1][1] == len(ex.text)
            last = eos if ends_learned else unlearned
            yield np.concatenate([doc_ids, eos]), np.concatenate([doc_labels, last])


def _learning(blocks: TokenBlocks) -> TokenBlocks:
    """The blocks that hold a token to learn (ConfigError if none does)."""
    keep = (blocks.labels[:, 1:] != IGNORE).any(dim=1)
    if not bool(keep.any()):
        raise ConfigError("data: no block holds a token to learn (completions, assistant turns)")
    return blocks if bool(keep.all()) else blocks[keep]


def _tokenize(tokenizer: Any, batch: Sequence[Example]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, labels) of each example: plain text learns every token; otherwise a token is learned
    if its characters lie wholly inside a learned span."""
    texts = [ex.text for ex in batch]
    spans = any(ex.learned != ((0, len(ex.text)),) for ex in batch)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=spans)
    out = []
    for i, ex in enumerate(batch):
        doc = np.asarray(enc["input_ids"][i], dtype=np.int32)
        if ex.learned == ((0, len(ex.text)),):
            out.append((doc, doc))
            continue
        offsets = np.asarray(enc["offset_mapping"][i], dtype=np.int64).reshape(-1, 2)
        inside = np.zeros(len(doc), dtype=bool)
        for a, b in ex.learned:
            inside |= (offsets[:, 0] >= a) & (offsets[:, 1] <= b)
        out.append((doc, np.where(inside, doc, np.int32(IGNORE)).astype(np.int32)))
    return out


def pack(tokenizer: Any, docs: Sequence[str], block: int) -> torch.Tensor:
    """Plain texts as ``[n, block]`` int64 token ids (every token learned)."""
    return pack_records(tokenizer, [Example.plain(d) for d in docs], block).input_ids.long()
