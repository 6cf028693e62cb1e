"""The agent's corpus on disk: records streamed from the data path, split and counted once, and
tokenized once into memory-mapped token blocks under ``<state_dir>/tokens/``.

Memory does not grow with the corpus: records are read a line at a time, tokenized in batches and
written out a chunk at a time, and training reads the blocks it samples from the page cache. A
restart, or a federation that resumes, opens the blocks in milliseconds instead of tokenizing
again. An entry is keyed by what its tokens depend on (the data files' names, sizes,
modification and change times, the split, the user field, the tokenizer, the block length,
packed or one row a record): a changed file, model or setting builds a new entry and the old
ones are removed. Entries appear whole (built beside, then renamed into place); a damaged one is
logged and built again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent.data import (
    BlockStream,
    Record,
    TokenBlocks,
    check_split,
    data_files,
    encoded,
    held_out,
    iter_records,
    user_key,
)
from common.durable import build_dir_beside, put_in_place, replace_durably
from common.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = 3
"""Version of the store's layout and of the tokenization it holds; a new one rebuilds every entry
(2: packed parts keep where each record starts, and a record's first token is not learned;
3: one row a record holds the held-out records too, with their users)."""

PARTS = ("train", "eval")
CHUNK_TOKENS = 1 << 20
"""Tokens written at a time (``BlockStream``): what tokenizing holds in memory."""


@dataclass(frozen=True)
class Corpus:
    """The records of a data path, split by ``held_out`` and counted."""

    path: Path
    eval_fraction: float
    fingerprint: str
    """sha256 of what the records depend on: the files' names, sizes, modification times and
    change times (a file rewritten with its old modification time, as ``cp -p`` and ``rsync -t``
    do, still has a new change time, which no one can set back)."""
    train_records: int
    eval_records: int
    user_field: str = ""
    """Where each record names its user (user-level privacy); the split then holds out users."""
    user_records: tuple[tuple[int, int], ...] = ()
    """With ``user_field``: how many training records users hold, as (records, users holding
    that many) pairs."""
    eval_user_records: tuple[tuple[int, int], ...] = ()
    """With ``user_field``: the same of the held-out records."""

    @property
    def train_users(self) -> int:
        """The distinct users of the training records (0 without ``user_field``)."""
        return sum(users for _, users in self.user_records)

    @property
    def train_units(self) -> int:
        """What one DP unit counts in the training side: its users with ``user_field``, else
        its records."""
        return self.train_users if self.user_field else self.train_records

    @property
    def eval_units(self) -> int:
        """What one DP unit counts in the held-out side: its users with ``user_field``, else its
        records."""
        return sum(users for _, users in self.eval_user_records) if self.user_field else self.eval_records

    def capped_records(self, cap: int) -> int:
        """Training records, each user's counted up to ``cap`` (with ``user_field``)."""
        return sum(min(records, cap) * users for records, users in self.user_records)

    def records(self, part: str) -> Iterator[Record]:
        """The records of one side of the split (``train`` or ``eval``), streamed."""
        want_held_out = part == "eval"
        for record in iter_records(self.path, self.user_field):
            if held_out(record.key, self.eval_fraction) == want_held_out:
                yield record


@dataclass(frozen=True)
class TokenizedCorpus:
    """A corpus' token blocks, memory-mapped: both parts packed, or both one row a record (for
    differential privacy, where a record, or a user's records, is a unit of the training and of
    the eval releases alike)."""

    train: TokenBlocks
    eval: TokenBlocks
    cut: int
    """Training records longer than a block (one row a record only)."""
    train_users: np.ndarray | None = None
    """Each training row's user (``agent.data.user_key``), with a corpus' ``user_field``."""
    eval_users: np.ndarray | None = None
    """Each held-out row's user, likewise."""


class TokenStore:
    """``<state_dir>/tokens``: the corpus' counts (``corpus.json``) and its tokenized entry
    (``blocks/<key>/``: ids and labels of each part as raw int32, a packed part's record starts as
    packed bits (``TokenBlocks.starts``), with user-level privacy each row's user as raw int64,
    ``meta.json``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def corpus(self, path: Path, eval_fraction: float, remember: bool = True, user_field: str = "") -> Corpus:
        """The corpus at ``path``: counted from the store when its files have not changed, else
        read through once (every record is parsed, so a bad one is refused here, at start) and,
        if ``remember``, its counts stored. ``user_field``: every record names its user there."""
        fingerprint = _fingerprint(path, eval_fraction, user_field)
        counts_file = self.root / "corpus.json"
        try:
            counts = json.loads(counts_file.read_text())
            by_user = {"user_records", "eval_user_records"}  # an older store counted only the first
            fresh = counts["fingerprint"] == fingerprint and (not user_field or by_user <= counts.keys())
            train, evaluation = int(counts["train"]), int(counts["eval"])
            users = tuple((int(k), int(n)) for k, n in counts.get("user_records", []))
            eval_users = tuple((int(k), int(n)) for k, n in counts.get("eval_user_records", []))
        except FileNotFoundError:
            fresh = False
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("token store: %s is damaged (%s); counting the corpus again", counts_file, exc)
            fresh = False
        if not fresh:
            train, evaluation, users, eval_users = _count(path, eval_fraction, user_field)
            counts = {
                "fingerprint": fingerprint,
                "train": train,
                "eval": evaluation,
                "user_records": users,
                "eval_user_records": eval_users,
            }
            if remember:
                replace_durably(counts_file, json.dumps(counts).encode())
        check_split(train, evaluation, eval_fraction)
        return Corpus(path, eval_fraction, fingerprint, train, evaluation, user_field, users, eval_users)

    def prepare(self, corpus: Corpus, tokenizer: Any, block: int, per_record: bool) -> Path:
        """The corpus' entry for this tokenizer and block, tokenized into the store first unless
        a sound one is there; ConfigError when the corpus gives no block to learn from."""
        entry = self.root / "blocks" / _entry_key(corpus, tokenizer, block, per_record)
        if entry.exists():
            try:
                opened = open_entry(entry, block)
                log.info(
                    "token store: %d training and %d evaluation blocks of %d tokens, tokenized before (%s)",
                    len(opened.train),
                    len(opened.eval),
                    block,
                    entry,
                )
                return entry
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("token store: entry %s is damaged (%s); tokenizing again", entry.name, exc)
        self._build(entry, corpus, tokenizer, block, per_record)
        return entry

    def describe(self, corpus: Corpus) -> str:
        """One line for ``cloudfed-agent check``: the corpus' counts and what the store holds."""
        entries = [e for e in (self.root / "blocks").glob("[0-9a-f]*") if e.is_dir()]
        stored = sum(f.stat().st_size for e in entries for f in e.iterdir())
        held = f"tokenized in {self.root} ({stored / 1e6:.1f} MB)" if entries else "not tokenized yet"
        return (
            f"{corpus.train_records} training and {corpus.eval_records} evaluation records from"
            f" {corpus.path}; {held}"
        )

    def _build(self, entry: Path, corpus: Corpus, tokenizer: Any, block: int, per_record: bool) -> None:
        if entry.parent.exists():  # other entries (data or settings now gone), crashed builds
            for old in entry.parent.iterdir():
                shutil.rmtree(old, ignore_errors=True)
        building = build_dir_beside(entry)
        try:
            users = per_record and bool(corpus.user_field)
            meta: dict[str, Any] = {"format": FORMAT, "block": block, "per_record": per_record}
            meta["users"] = users
            for part in PARTS:
                stream = BlockStream(block, tokenizer.eos_token_id, per_record, CHUNK_TOKENS)
                _write_part(building, part, stream, tokenizer, corpus.records(part), users)
                try:
                    stream.check()
                except ConfigError as exc:
                    raise ConfigError(f"{exc} ({part} records)") from None
                meta[part] = {
                    "blocks": stream.blocks,
                    "records": stream.records,
                    "tokens": stream.tokens,
                    "cut": stream.cut,
                }
            meta["cut"] = meta["train"]["cut"]
            (building / "meta.json").write_text(json.dumps(meta, indent=1))
            put_in_place(building, entry)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        log.info(
            "token store: tokenized %d training and %d evaluation records into %d and %d blocks of %d"
            " tokens (%s)",
            meta["train"]["records"],
            meta["eval"]["records"],
            meta["train"]["blocks"],
            meta["eval"]["blocks"],
            block,
            entry,
        )


def _write_part(
    building: Path,
    part: str,
    stream: BlockStream,
    tokenizer: Any,
    records: Iterator[Record],
    users: bool,
) -> None:
    """One part's ids and labels (and packed, its record starts; with ``users``, a
    one-row-a-record stream's, each row's user) as raw arrays."""
    owners = _Owners()
    with (
        open(building / f"{part}.ids", "wb") as ids,
        open(building / f"{part}.labels", "wb") as labels,
        open(building / f"{part}.starts", "wb") if not stream.per_record else contextlib.nullcontext() as at,
        open(building / f"{part}.users", "wb") if users else contextlib.nullcontext() as by,
    ):
        for chunk_ids, chunk_labels, starts, ordinals in stream.rows(
            encoded(tokenizer, owners.follow(records) if by else records)
        ):
            ids.write(chunk_ids.tobytes())
            labels.write(chunk_labels.tobytes())
            if at:
                assert starts is not None
                at.write(starts.tobytes())
            if by:
                by.write(owners.take(ordinals).tobytes())


class _Owners:
    """The user of each record streamed through ``follow``, kept until ``take`` has read it: at
    most a tokenizer batch and a chunk of records, whatever the corpus."""

    def __init__(self) -> None:
        self.keys: list[int] = []
        self.first = 0
        """The ordinal of ``keys[0]``."""

    def follow(self, records: Iterator[Record]) -> Iterator[Record]:
        for record in records:
            self.keys.append(user_key(record.user))
            yield record

    def take(self, ordinals: np.ndarray) -> np.ndarray:
        """The users of these records (ascending ordinals); earlier ones are forgotten."""
        users = np.asarray(self.keys[: int(ordinals[-1]) + 1 - self.first], dtype=np.int64)
        taken: np.ndarray = users[ordinals - self.first]
        del self.keys[: len(users)]
        self.first += len(users)
        return taken


def _fingerprint(path: Path, eval_fraction: float, user_field: str) -> str:
    files = data_files(path)
    base = path if path.is_dir() else path.parent
    listing = []
    for f in files:
        st = f.stat()
        listing.append([str(f.relative_to(base)), st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    material: dict[str, Any] = {"format": FORMAT, "eval_fraction": eval_fraction, "files": listing}
    if user_field:  # keys without it are those of the stores made before user-level privacy
        material["user_field"] = user_field
    return hashlib.sha256(json.dumps(material).encode()).hexdigest()


Histogram = tuple[tuple[int, int], ...]
"""(records, users holding that many) pairs."""


def _count(path: Path, eval_fraction: float, user_field: str) -> tuple[int, int, Histogram, Histogram]:
    """Training records, evaluation records and (with ``user_field``) how many training records
    users hold (``Corpus.user_records``), and held-out ones."""
    train = evaluation = 0
    users, eval_users = _UserRecords(), _UserRecords()
    for record in iter_records(path, user_field):
        if held_out(record.key, eval_fraction):
            evaluation += 1
            if user_field:
                eval_users.add(record.user)
        else:
            train += 1
            if user_field:
                users.add(record.user)
    if train + evaluation == 0:
        raise ConfigError(f"data: {path} holds no documents")
    return train, evaluation, users.histogram(), eval_users.histogram()


class _UserRecords:
    """Each user's records, counted by their 64-bit keys: 16 bytes a user, plus a batch."""

    BATCH = 1 << 20

    def __init__(self) -> None:
        self.keys = np.empty(0, dtype=np.int64)
        self.records = np.empty(0, dtype=np.int64)
        self.pending: list[int] = []

    def add(self, user: str) -> None:
        self.pending.append(user_key(user))
        if len(self.pending) >= self.BATCH:
            self._merge()

    def histogram(self) -> tuple[tuple[int, int], ...]:
        """(records, users holding that many) pairs, fewest records first."""
        self._merge()
        held, users = np.unique(self.records, return_counts=True)
        return tuple((int(k), int(n)) for k, n in zip(held, users, strict=True))

    def _merge(self) -> None:
        if self.pending:
            keys = np.concatenate([self.keys, np.asarray(self.pending, dtype=np.int64)])
            weights = np.concatenate([self.records, np.ones(len(self.pending), dtype=np.int64)])
            self.keys, owner = np.unique(keys, return_inverse=True)
            self.records = np.bincount(owner, weights=weights, minlength=len(self.keys)).astype(np.int64)
            self.pending = []


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of everything a tokenizer's output depends on: its full definition (a fast
    tokenizer's serialized pipeline, else its vocabulary), chat template and end-of-text token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = (
        backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    material = json.dumps(
        [
            type(tokenizer).__name__,
            definition,
            getattr(tokenizer, "chat_template", None),
            tokenizer.eos_token_id,
        ]
    )
    return hashlib.sha256(material.encode()).hexdigest()


def _entry_key(corpus: Corpus, tokenizer: Any, block: int, per_record: bool) -> str:
    material = json.dumps([FORMAT, corpus.fingerprint, tokenizer_fingerprint(tokenizer), block, per_record])
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def open_entry(entry: Path, block: int) -> TokenizedCorpus:
    """An entry's blocks, memory-mapped; ValueError (or OSError) if it is damaged."""
    meta = json.loads((entry / "meta.json").read_text())
    if meta["format"] != FORMAT or meta["block"] != block:
        raise ValueError(f"format {meta['format']}, block {meta['block']}")
    packed = not meta["per_record"]
    parts = {part: _mapped(entry, part, int(meta[part]["blocks"]), block, packed) for part in PARTS}
    users = {
        part: _users(entry, part, int(meta[part]["blocks"])) if meta["users"] else None for part in PARTS
    }
    return TokenizedCorpus(parts["train"], parts["eval"], int(meta["cut"]), users["train"], users["eval"])


def _users(entry: Path, part: str, blocks: int) -> np.ndarray:
    """Each row's user key of one part, memory-mapped read-only."""
    path = entry / f"{part}.users"
    size = os.path.getsize(path)
    if size != blocks * 8:
        raise ValueError(f"{path.name} holds {size} bytes, not the users of {blocks} rows")
    users: np.ndarray = np.memmap(path, dtype=np.int64, mode="r", shape=(blocks,))
    return users


def _mapped(entry: Path, part: str, blocks: int, block: int, packed: bool) -> TokenBlocks:
    """One part's blocks, memory-mapped copy-on-write (writable for torch, never written back)."""
    arrays = []
    for name in (f"{part}.ids", f"{part}.labels"):
        path = entry / name
        size = os.path.getsize(path)
        if size != blocks * block * 4 or blocks == 0:
            raise ValueError(f"{name} holds {size} bytes, not {blocks} blocks of {block} int32 tokens")
        arrays.append(torch.from_numpy(np.memmap(path, dtype=np.int32, mode="c", shape=(blocks, block))))
    if not packed:
        return TokenBlocks(arrays[0], arrays[1])
    path, row = entry / f"{part}.starts", (block + 7) // 8
    size = os.path.getsize(path)
    if size != blocks * row:
        raise ValueError(f"{path.name} holds {size} bytes, not the record starts of {blocks} blocks")
    starts = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", shape=(blocks, row)))
    return TokenBlocks(arrays[0], arrays[1], starts)
