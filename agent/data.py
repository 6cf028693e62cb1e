"""Local training data: plain text, prompt/completion pairs or chat conversations; a deterministic
train/eval split; token blocks whose labels carry loss only where the model should learn.

Files: ``.txt`` (documents separated by blank lines) or ``.jsonl`` with one record a line,
either ``{"text": ...}`` (every token is learned), ``{"prompt": ..., "completion": ...}``
(only the completion and the end-of-text token are learned) or ``{"messages": [{"role": ...,
"content": ...}, ...]}`` (rendered with the tokenizer's chat template; only the assistant turns
are learned). Eval losses count the learned tokens only. With user-level differential privacy
every JSONL record also names its user (``user_field``: a string or integer id), and the split
holds out whole users.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
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
    user: str = ""
    """The user the record belongs to (read only for user-level differential privacy)."""

    @classmethod
    def plain(cls, text: str, user: str = "") -> Example:
        return cls(text, ((0, len(text)),), text, user)


@dataclass(frozen=True)
class Conversation:
    """Chat turns, rendered with the tokenizer's chat template when the model is known."""

    messages: tuple[tuple[str, str], ...]
    key: str
    user: str = ""

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
        return Example(text, tuple(learned), self.key, self.user)


Record = Example | Conversation


def data_files(path: Path) -> list[Path]:
    """The ``.txt`` and ``.jsonl`` files of a data path (a file, or a directory searched deeply),
    in a stable order."""
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ConfigError(f"data: no .txt or .jsonl files at {path}")
    return files


def iter_records(path: Path, user_field: str = "") -> Iterator[Record]:
    """Records from a file or directory of ``.txt`` and ``.jsonl`` files (module docstring), read
    a line at a time: memory does not grow with the corpus. With ``user_field`` every record must
    name its user there (so plain-text files are refused)."""
    for f in data_files(path):
        with open(f, encoding="utf-8") as lines:
            if f.suffix == ".jsonl":
                for n, line in enumerate(lines, 1):
                    if line.strip():
                        yield _record(line, f"{f}:{n}", user_field)
                continue
            if user_field:
                raise ConfigError(
                    f"data: {f}: plain-text documents name no user; with user-level privacy give the"
                    f" records as JSONL, each with its user id in {user_field!r}"
                )
            document: list[str] = []
            for line in itertools.chain(
                lines, ["\n"]
            ):  # a blank line ends a document, and so does the file's end
                if line.rstrip("\n"):
                    document.append(line)
                elif text := "".join(document).strip():
                    document = []
                    yield Example.plain(text)
                else:
                    document = []


def load_records(path: Path) -> list[Record]:
    """Every record of ``path`` in memory (small files: calibration text, benchmarks, tests)."""
    records = list(iter_records(path))
    if not records:
        raise ConfigError(f"data: {path} holds no documents")
    return records


def _record(line: str, where: str, user_field: str = "") -> Record:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"data: {where}: invalid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise ConfigError(f"data: {where}: not a JSON object")
    parsed = _content(record, where)
    if not user_field:
        return parsed
    user = _user(record, user_field, where)  # a user's records are all trained on or all held out
    return dataclasses.replace(parsed, user=user, key=json.dumps(["user", user]))


def _content(record: dict[str, Any], where: str) -> Record:
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


def _user(record: dict[str, Any], field: str, where: str) -> str:
    """The record's user id: a non-empty string or an integer (``7`` and ``"7"`` are one user),
    at ``field`` or, when the record has no such key, at its dotted path (``meta.user_id``)."""
    user: Any = record.get(field)
    if field not in record and "." in field:
        user = record
        for key in field.split("."):
            user = user.get(key) if isinstance(user, dict) else None
    if isinstance(user, bool) or not isinstance(user, (str, int)) or user == "":
        raise ConfigError(
            f"data: {where}: user-level privacy needs each record's user id in {field!r} (a non-empty"
            f" string or an integer), got {user!r}"
        )
    return str(user)


def user_key(user: str) -> int:
    """A user id as a signed 64-bit key (sha256): what the token store keeps a row's owner as."""
    digest = hashlib.sha256(b"cloudfed-user:" + user.encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def load_texts(path: Path) -> list[str]:
    """The plain text of every record that has one (calibration text, benchmarks)."""
    return [r.text for r in load_records(path) if isinstance(r, Example)]


def held_out(key: str, eval_fraction: float) -> bool:
    """Whether the record with split key ``key`` is held out for evaluation: by a hash of the key,
    so stable across runs, restarts and file order."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") / 2**32 < eval_fraction


def split(docs: Sequence[Any], eval_fraction: float) -> tuple[list[Any], list[Any]]:
    """(train, eval) of documents (strings or records) by ``held_out``."""
    train: list[Any] = []
    evaluation: list[Any] = []
    for doc in docs:
        (evaluation if held_out(doc if isinstance(doc, str) else doc.key, eval_fraction) else train).append(
            doc
        )
    check_split(len(train), len(evaluation), eval_fraction)
    return train, evaluation


def check_split(train: int, evaluation: int, eval_fraction: float) -> None:
    """ConfigError unless both sides of a split hold a document."""
    if not train or not evaluation:
        raise ConfigError(
            f"data: {train + evaluation} documents are too few to split with eval_fraction={eval_fraction}"
        )


@dataclass(frozen=True)
class TokenBlocks:
    """``[n, block]`` token ids and their labels (``IGNORE`` where a token carries no loss), and
    for packed blocks where each record starts (``starts``)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    starts: torch.Tensor | None = None
    """``[n, ceil(block / 8)]`` uint8: bit j of row i (numpy's ``packbits`` order) is set where a
    record, or a record's piece, starts at token j. None: each row is one sequence."""

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
        starts = None if self.starts is None else self.starts[index]
        return TokenBlocks(self.input_ids[index], self.labels[index], starts)

    def to(self, device: str) -> TokenBlocks:
        """On ``device``, as the int64 ids and labels the model takes."""
        starts = None if self.starts is None else self.starts.to(device)
        return TokenBlocks(self.input_ids.to(device, torch.long), self.labels.to(device, torch.long), starts)

    @property
    def learned_tokens(self) -> int:
        """Tokens a loss is computed on (the model shifts labels: no block's first token)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def position_ids(self) -> torch.Tensor | None:
        """Each token's position in its record's piece, counted from 0 where it starts; None for
        rows of one sequence each. transformers attends within each piece only, where positions
        restart (packed sequences, without a mask of the batch's size)."""
        if self.starts is None:
            return None
        block = self.input_ids.shape[1]
        bits = torch.arange(7, -1, -1, device=self.starts.device, dtype=torch.uint8)
        starts = ((self.starts.unsqueeze(-1) >> bits) & 1).flatten(1)[:, :block].bool()
        index = torch.arange(block, device=starts.device).expand_as(starts)
        began = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
        return index - began


TOKENIZE_BATCH = 512
"""Documents a tokenizer call takes (fast tokenizers encode a batch in parallel)."""

Chunk = tuple[np.ndarray, np.ndarray]
"""``[k, block]`` int32 token ids and their labels."""
Blocks = tuple[np.ndarray, np.ndarray, np.ndarray | None]
"""A chunk and its rows' record starts (packed: ``TokenBlocks.starts``; one row a record: None)."""
RowChunk = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]
"""``Blocks`` and, for each of its rows, the int64 ordinal of the record it came from."""
_Pending = tuple[np.ndarray, np.ndarray, np.ndarray]
"""Token ids, labels and record starts (bool) not yet cut into blocks."""


class BlockStream:
    """Encoded records as chunks of token blocks, blocks with nothing to learn dropped: packed
    (records joined, each ending in EOS, and cut into blocks, the tail dropped) or, with
    ``per_record``, one row a record (cut at ``block``, padded with EOS that carries no loss: the
    model is causal, so no real token sees the padding). Packed blocks keep where each record,
    or the piece of one a block starts with, begins: the model attends within a piece only and
    its positions restart there, so a record is trained as if alone in its row (its first token,
    which nothing before it predicts, is not learned). Memory is bounded by a chunk whatever the
    corpus; the counts are complete once the chunks are consumed."""

    def __init__(self, block: int, eos: int, per_record: bool = False, chunk_tokens: int = 1 << 20) -> None:
        self.block = block
        self.eos = eos
        self.per_record = per_record
        self.chunk_rows = max(1, chunk_tokens // block)
        self.records = 0
        self.tokens = 0
        self.cut = 0
        """Records longer than a block (``per_record`` only)."""
        self.blocks = 0
        """Blocks kept, each with a token to learn."""

    def chunks(self, encoded: Iterable[Chunk]) -> Iterator[Blocks]:
        """Chunks of blocks (ids, labels, record starts) from each record's 1-D (ids, labels)."""
        for ids, labels, starts, _ in self.rows(encoded):
            yield ids, labels, starts

    def rows(self, encoded: Iterable[Chunk]) -> Iterator[RowChunk]:
        """``chunks`` with a number for each block: with ``per_record``, the ordinal of its
        record in the stream (from 0; rows with nothing to learn are dropped, so ordinals skip);
        packed, the block's own."""
        return self._record_rows(encoded) if self.per_record else self._packed_rows(encoded)

    def _packed_rows(self, encoded: Iterable[Chunk]) -> Iterator[RowChunk]:
        pending: list[_Pending] = []
        held = first = 0  # tokens pending; blocks made before
        for ids, labels in encoded:
            self.records += 1
            self.tokens += len(ids)
            starts = np.zeros(len(ids), dtype=bool)
            starts[:1] = True
            pending.append((ids, labels, starts))
            held += len(ids)
            if held >= self.chunk_rows * self.block:
                chunk, pending = self._packed_blocks(pending)
                held = len(pending[0][0])
                yield from self._kept(chunk, first)
                first += len(chunk[0])
        if pending:
            yield from self._kept(self._packed_blocks(pending)[0], first)

    def _record_rows(self, encoded: Iterable[Chunk]) -> Iterator[RowChunk]:
        pending: list[Chunk] = []
        first = 0  # the ordinal of pending[0]
        for ids, labels in encoded:
            self.records += 1
            self.tokens += len(ids)
            self.cut += len(ids) > self.block
            pending.append((ids[: self.block], labels[: self.block]))
            if len(pending) >= self.chunk_rows:
                yield from self._kept(self._record_blocks(pending), first)
                first += len(pending)
                pending = []
        if pending:
            yield from self._kept(self._record_blocks(pending), first)

    def check(self) -> None:
        """ConfigError when the stream gave no block to learn from (call it after ``chunks``)."""
        if not self.per_record and self.tokens < self.block:
            raise ConfigError(f"data: only {self.tokens} tokens, fewer than one block of {self.block}")
        if self.blocks == 0:
            raise ConfigError("data: no block holds a token to learn (completions, assistant turns)")

    def _record_blocks(self, pending: list[Chunk]) -> Blocks:
        """One row a pending record, padded."""
        ids = np.full((len(pending), self.block), self.eos, dtype=np.int32)
        labels = np.full((len(pending), self.block), IGNORE, dtype=np.int32)
        for row, (doc_ids, doc_labels) in enumerate(pending):
            ids[row, : len(doc_ids)], labels[row, : len(doc_labels)] = doc_ids, doc_labels
        return ids, labels, None

    def _packed_blocks(self, pending: list[_Pending]) -> tuple[Blocks, list[_Pending]]:
        """The blocks the pending records make, and the partial tail left over. A record's first
        token is not learned (nothing of its own precedes it); each block starts a piece."""
        flat_ids = np.concatenate([i for i, _, _ in pending])
        flat_labels = np.concatenate([la for _, la, _ in pending])
        flat_starts = np.concatenate([st for _, _, st in pending])
        flat_labels[flat_starts] = IGNORE
        n = len(flat_ids) // self.block * self.block
        starts = flat_starts[:n].reshape(-1, self.block).copy()
        starts[:, 0] = True
        chunk = (
            flat_ids[:n].reshape(-1, self.block),
            flat_labels[:n].reshape(-1, self.block),
            np.packbits(starts, axis=1),
        )
        return chunk, [(flat_ids[n:].copy(), flat_labels[n:].copy(), flat_starts[n:].copy())]

    def _kept(self, chunk: Blocks, first: int = 0) -> Iterator[RowChunk]:
        """The chunk's blocks that have a token to learn, numbered from ``first``."""
        ids, labels, starts = chunk
        ordinals = np.arange(first, first + len(ids), dtype=np.int64)
        keep = (labels[:, 1:] != IGNORE).any(axis=1)
        if not keep.all():
            ids, labels, ordinals = ids[keep], labels[keep], ordinals[keep]
            starts = None if starts is None else starts[keep]
        self.blocks += len(ids)
        if len(ids):
            yield ids, labels, starts, ordinals


def encoded(tokenizer: Any, records: Iterable[Record]) -> Iterator[Chunk]:
    """Each record's (ids, labels) as int32, EOS appended (learned after a learned ending),
    tokenized in batches (conversations through the chat template). A token is learned if it lies
    wholly in a learned span."""
    eos = np.array([tokenizer.eos_token_id], dtype=np.int32)
    unlearned = np.array([IGNORE], dtype=np.int32)
    records = iter(records)
    while batch := [
        r.render(tokenizer) if isinstance(r, Conversation) else r
        for r in itertools.islice(records, TOKENIZE_BATCH)
    ]:
        for ex, (doc_ids, doc_labels) in zip(batch, _tokenize(tokenizer, batch), strict=True):
            ends_learned = bool(ex.learned) and ex.learned[-1][1] == len(ex.text)
            last = eos if ends_learned else unlearned
            yield np.concatenate([doc_ids, eos]), np.concatenate([doc_labels, last])


def collect(stream: BlockStream, encoded_records: Iterable[Chunk]) -> TokenBlocks:
    """All of a stream's blocks in memory, as int32 (8 bytes a token with its label)."""
    parts = list(stream.chunks(encoded_records))
    stream.check()
    starts = None if stream.per_record else torch.from_numpy(np.concatenate([st for _, _, st in parts]))
    return TokenBlocks(
        torch.from_numpy(np.concatenate([i for i, _, _ in parts])),
        torch.from_numpy(np.concatenate([la for _, la, _ in parts])),
        starts,
    )


def pack_records(tokenizer: Any, records: Iterable[Record], block: int) -> TokenBlocks:
    """Records packed into ``[n, block]`` blocks in memory (``BlockStream``)."""
    return collect(BlockStream(block, tokenizer.eos_token_id), encoded(tokenizer, records))


def record_blocks(tokenizer: Any, records: Iterable[Record], block: int) -> tuple[TokenBlocks, int]:
    """One ``block``-long row per record in memory, for record-level differential privacy (a
    record is then exactly one example); the rows and how many records were cut."""
    stream = BlockStream(block, tokenizer.eos_token_id, per_record=True)
    return collect(stream, encoded(tokenizer, records)), stream.cut


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
