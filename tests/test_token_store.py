"""The agent's token store: records streamed, split and counted once, tokenized once into
memory-mapped blocks that equal the in-memory packers' output; a changed file, tokenizer or
setting builds a new entry, a damaged or half-built one is rebuilt, bad data is refused at start."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from agent import token_store
from agent.cli import check
from agent.daemon import Agent
from agent.data import (
    BlockStream,
    Example,
    collect,
    encoded,
    iter_records,
    load_records,
    pack_records,
    record_blocks,
    split,
)
from agent.demo import prepare
from agent.token_store import Corpus, TokenStore, open_entry
from common.config import AgentConfig, AggregatorConfig, load
from common.errors import ConfigError
from common.tinylm import DOMAINS, build_tiny_lm, domain_corpus
from server.app import build_aggregator
from server.cli import seed
from tests.agentsim import in_process

BLOCK = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [doc for domain in DOMAINS for doc in domain_corpus(domain, 10, seed=2)]
    return build_tiny_lm(tmp_path_factory.mktemp("store") / "model", texts)


@pytest.fixture(scope="module")
def tokenizer(model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def write_corpus(path: Path, documents: int = 120) -> Path:
    """A directory with a .txt file of plain documents and a .jsonl file of mixed records."""
    path.mkdir(parents=True, exist_ok=True)
    docs = [d for domain in DOMAINS for d in domain_corpus(domain, documents // len(DOMAINS), seed=5)]
    half = len(docs) // 2
    (path / "a.txt").write_text("\n\n".join(docs[:half]) + "\n")
    lines = []
    for i, doc in enumerate(docs[half:]):
        cut = len(doc) // 3
        record = {"text": doc} if i % 2 else {"prompt": doc[:cut], "completion": doc[cut:]}
        lines.append(json.dumps(record))
    (path / "sub").mkdir(exist_ok=True)
    (path / "sub" / "b.jsonl").write_text("\n".join(lines) + "\n")
    return path


def stored_corpus(tmp_path: Path) -> tuple[TokenStore, Corpus]:
    """A store under ``tmp_path/tokens`` and the counted corpus of ``write_corpus``."""
    store = TokenStore(tmp_path / "tokens")
    return store, store.corpus(write_corpus(tmp_path / "data"), 0.2)


def counting_encoder(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the records the store tokenizes."""
    calls: list[int] = []

    def counted(tokenizer: Any, records: Any) -> Any:
        for item in encoded(tokenizer, records):
            calls.append(1)
            yield item

    monkeypatch.setattr(token_store, "encoded", counted)
    return calls


def same(a: Any, b: Any) -> bool:
    """The same ids, labels and record starts (none for rows of one record each)."""
    starts = (a.starts is None and b.starts is None) or (
        a.starts is not None and b.starts is not None and torch.equal(a.starts, b.starts)
    )
    return torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels) and starts


@pytest.mark.parametrize("per_record", [False, True], ids=["packed", "one-row-a-record"])
def test_the_store_holds_what_the_in_memory_packers_make(
    tokenizer: Any, tmp_path: Path, per_record: bool
) -> None:
    store, corpus = stored_corpus(tmp_path)
    data = corpus.path
    train, evaluation = split(load_records(data), 0.2)
    assert (corpus.train_records, corpus.eval_records) == (len(train), len(evaluation))

    blocks = open_entry(store.prepare(corpus, tokenizer, BLOCK, per_record), BLOCK)

    if per_record:  # held-out records too, as each is a unit of the eval losses' release
        rows, cut = record_blocks(tokenizer, train, BLOCK)
        assert same(blocks.train, rows)
        assert blocks.cut == cut > 0  # of the training records
        assert same(blocks.eval, record_blocks(tokenizer, evaluation, BLOCK)[0])
    else:
        assert same(blocks.train, pack_records(tokenizer, train, BLOCK))
        assert same(blocks.eval, pack_records(tokenizer, evaluation, BLOCK))
        assert blocks.cut == 0
    assert blocks.train.input_ids.dtype == torch.int32


def test_the_blocks_are_memory_mapped_from_the_entry(tokenizer: Any, tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens")
    entry = store.prepare(store.corpus(write_corpus(tmp_path / "data"), 0.2), tokenizer, BLOCK, False)
    blocks = open_entry(entry, BLOCK)
    maps = Path("/proc/self/maps").read_text()
    for part in ("train", "eval"):
        assert str(entry / f"{part}.ids") in maps
        assert str(entry / f"{part}.labels") in maps
        assert str(entry / f"{part}.starts") in maps
    before = (entry / "train.ids").read_bytes()
    blocks.train.input_ids[0, 0] = -7  # torch may write to its copy; the entry is never changed
    assert (entry / "train.ids").read_bytes() == before
    batch = blocks.train[torch.tensor([3, 1])].to("cpu")
    assert batch.input_ids.dtype == torch.long and batch.input_ids.shape == (2, BLOCK)


def test_a_second_start_tokenizes_nothing(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_corpus(tmp_path / "data")
    calls = counting_encoder(monkeypatch)
    first = TokenStore(tmp_path / "tokens")
    entry = first.prepare(first.corpus(data, 0.2), tokenizer, BLOCK, False)
    tokenized = len(calls)
    assert tokenized == 120

    again = TokenStore(tmp_path / "tokens")  # a restart: a new process, the same state directory
    with caplog.at_level(logging.INFO, logger="agent.token_store"):
        assert again.prepare(again.corpus(data, 0.2), tokenizer, BLOCK, False) == entry
    assert len(calls) == tokenized
    assert "tokenized before" in caplog.text


def test_a_changed_file_or_setting_builds_a_new_entry_and_drops_the_old(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, corpus = stored_corpus(tmp_path)
    data = corpus.path
    first = store.prepare(corpus, tokenizer, BLOCK, False)

    longer = store.prepare(corpus, tokenizer, 2 * BLOCK, False)
    assert longer != first and not first.exists()
    rows = store.prepare(corpus, tokenizer, 2 * BLOCK, True)
    assert rows != longer and not longer.exists()

    with open(data / "sub" / "b.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more record about the weather in Oslo"}) + "\n")
    grown = store.corpus(data, 0.2)
    assert grown.fingerprint != corpus.fingerprint
    assert grown.train_records + grown.eval_records == corpus.train_records + corpus.eval_records + 1
    calls = counting_encoder(monkeypatch)
    store.prepare(grown, tokenizer, 2 * BLOCK, True)
    assert len(calls) == 121
    assert len(list((tmp_path / "tokens" / "blocks").iterdir())) == 1

    other = store.corpus(data, 0.3)  # another split
    assert other.fingerprint != grown.fingerprint

    edited = data / "sub" / "b.jsonl"  # rewritten in place, same size, its old mtime put back
    before = edited.stat()
    text = edited.read_text()
    edited.write_text(text.replace("Oslo", "Rome"))
    os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert edited.stat().st_size == before.st_size and edited.stat().st_mtime_ns == before.st_mtime_ns
    assert store.corpus(data, 0.2).fingerprint != grown.fingerprint


def test_another_tokenizer_builds_another_entry(tokenizer: Any, model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    store = TokenStore(tmp_path / "tokens")
    corpus = store.corpus(write_corpus(tmp_path / "data"), 0.2)
    first = store.prepare(corpus, tokenizer, BLOCK, False)
    templated = AutoTokenizer.from_pretrained(model)
    templated.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert store.prepare(corpus, templated, BLOCK, False) != first
    retrained = build_tiny_lm(tmp_path / "other", ["entirely different words " * 20], vocab_size=300)
    other = AutoTokenizer.from_pretrained(retrained)
    entry = store.prepare(corpus, other, BLOCK, False)
    train, _ = split(load_records(corpus.path), 0.2)
    assert same(open_entry(entry, BLOCK).train, pack_records(other, train, BLOCK))


def test_a_damaged_entry_or_count_is_rebuilt(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store, corpus = stored_corpus(tmp_path)
    data = corpus.path
    entry = store.prepare(corpus, tokenizer, BLOCK, False)
    good = open_entry(entry, BLOCK)
    expected = (good.train.input_ids.clone(), good.eval.labels.clone(), good.eval.starts.clone())  # type: ignore[union-attr]

    with open(entry / "eval.starts", "r+b") as f:
        f.truncate(3)
    with pytest.raises(ValueError, match=r"eval\.starts holds 3 bytes"):
        open_entry(entry, BLOCK)
    with open(entry / "train.ids", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"train\.ids holds 100 bytes"):
        open_entry(entry, BLOCK)
    calls = counting_encoder(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="agent.token_store"):
        assert store.prepare(corpus, tokenizer, BLOCK, False) == entry
    assert "is damaged" in caplog.text and len(calls) == 120
    rebuilt = open_entry(entry, BLOCK)
    assert torch.equal(rebuilt.train.input_ids, expected[0]) and torch.equal(rebuilt.eval.labels, expected[1])
    assert rebuilt.eval.starts is not None and torch.equal(rebuilt.eval.starts, expected[2])

    (tmp_path / "tokens" / "corpus.json").write_text("{not json")
    assert store.corpus(data, 0.2) == corpus


def test_a_build_that_crashed_leaves_nothing_behind(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, corpus = stored_corpus(tmp_path)

    def crashing(tokenizer: Any, records: Any) -> Any:
        for n, item in enumerate(encoded(tokenizer, records)):
            if n == 50:
                raise MemoryError("killed in mid-build")
            yield item

    monkeypatch.setattr(token_store, "encoded", crashing)
    with pytest.raises(MemoryError):
        store.prepare(corpus, tokenizer, BLOCK, False)
    assert list((tmp_path / "tokens" / "blocks").iterdir()) == []

    leftover = tmp_path / "tokens" / "blocks" / ".abc.xyz.tmp"  # as a SIGKILL would leave it
    leftover.mkdir()
    (leftover / "train.ids").write_bytes(b"\0" * 64)
    monkeypatch.setattr(token_store, "encoded", encoded)
    entry = store.prepare(corpus, tokenizer, BLOCK, False)
    assert [p.name for p in (tmp_path / "tokens" / "blocks").iterdir()] == [entry.name]


def test_bad_data_is_refused_when_the_corpus_is_counted(tokenizer: Any, tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "data")
    with open(data / "sub" / "b.jsonl", "a") as f:
        f.write('{"prompt": "no completion"}\n')
    with pytest.raises(ConfigError, match=r"b\.jsonl:61: a record needs"):
        TokenStore(tmp_path / "tokens").corpus(data, 0.2)

    few = tmp_path / "few.txt"
    few.write_text("only one document")
    with pytest.raises(ConfigError, match="too few to split"):
        TokenStore(tmp_path / "tokens2").corpus(few, 0.2)

    short = tmp_path / "short.jsonl"  # splits, but the held-out side is shorter than a block
    short.write_text("".join(json.dumps({"text": f"word {i} " * (40 if i else 1)}) + "\n" for i in range(40)))
    store = TokenStore(tmp_path / "tokens3")
    corpus = store.corpus(short, 0.05)
    with pytest.raises(ConfigError, match=r"fewer than one block of 200 \((eval|train) records\)"):
        store.prepare(corpus, tokenizer, 200, False)
    assert list((tmp_path / "tokens3" / "blocks").iterdir()) == []


def test_text_files_are_read_a_line_at_a_time_with_the_same_documents(tmp_path: Path) -> None:
    text = tmp_path / "d.txt"
    text.write_text("first doc\nstill first\n\n\n  \n\nsecond\n \n same second\n\nlast, no newline")
    assert [r.text for r in iter_records(text)] == [
        "first doc\nstill first",
        "second\n \n same second",
        "last, no newline",
    ]


def test_the_block_stream_is_the_same_in_any_chunk_size(tokenizer: Any) -> None:
    docs = [d for domain in DOMAINS for d in domain_corpus(domain, 20, seed=3)]
    records = [
        Example(d, ((len(d) // 2, len(d)),), d) if i % 3 else Example.plain(d) for i, d in enumerate(docs)
    ]
    for per_record in (False, True):
        whole = collect(BlockStream(BLOCK, tokenizer.eos_token_id, per_record), encoded(tokenizer, records))
        for chunk_tokens in (1, 40, 333):
            stream = BlockStream(BLOCK, tokenizer.eos_token_id, per_record, chunk_tokens=chunk_tokens)
            assert same(collect(stream, encoded(tokenizer, records)), whole)
            assert stream.records == len(records)


async def test_the_agent_daemon_tokenizes_its_corpus_once_across_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The real agent daemon, run twice on one state directory (each time one plain round with
    its own aggregator): the first run tokenizes every record into the store, the second trains and
    evaluates on the stored blocks without tokenizing anything."""
    agg_path, agent_paths, _ = prepare(tmp_path, rounds=1, secagg=False)
    agent_config = dataclasses.replace(load(AgentConfig, agent_paths[0], env={}), metrics_listen="")
    records = len(load_records(agent_config.data))
    calls = counting_encoder(monkeypatch)
    for run in (1, 2):
        agg_config = dataclasses.replace(
            load(AggregatorConfig, agg_path, env={"CLOUDFED_ROUNDS_MIN_AGENTS": "1"}),
            metrics_listen="",
            state_dir=tmp_path / f"aggregator-{run}",
        )
        with caplog.at_level(logging.INFO):
            async with in_process(agg_config, Agent(agent_config)) as federation, asyncio.timeout(120):
                await federation.agents[0]  # max_rounds = 1: it stops once it has evaluated version 1
        assert "round 1 trained" in caplog.text
        assert len(calls) == records  # the first run tokenized each record once, the second none
        caplog.clear()
    evals = [json.loads(line) for line in (agent_config.state_dir / "evals.jsonl").read_text().splitlines()]
    assert [e["version"] for e in evals] == [0, 1, 0, 1]
    assert evals[2]["tokens"] == evals[0]["tokens"]  # the same held-out blocks
    assert len(list((agent_config.state_dir / "tokens" / "blocks").iterdir())) == 1


async def test_check_tokenize_builds_the_entry_the_daemon_then_opens(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`cloudfed-agent check --tokenize` learns the federation's model and sequence length at Join
    and tokenizes the corpus into the store; the real agent daemon then trains a round on that
    entry without tokenizing a record. Plain `check` tokenizes nothing."""
    agg_path, agent_paths, _ = prepare(tmp_path, rounds=1, secagg=False)
    agent_config = dataclasses.replace(load(AgentConfig, agent_paths[0], env={}), metrics_listen="")
    agg_config = dataclasses.replace(
        load(AggregatorConfig, agg_path, env={"CLOUDFED_ROUNDS_MIN_AGENTS": "1"}), metrics_listen=""
    )
    records = len(load_records(agent_config.data))
    calls = counting_encoder(monkeypatch)
    seed(agg_config, None)
    agg = build_aggregator(agg_config)
    await agg.start()
    try:
        assert await check(agent_config) == 0
        assert calls == [] and "not tokenized yet" in capsys.readouterr().out
        assert await check(agent_config, tokenize=True) == 0
    finally:
        await agg.stop(0)
    out = capsys.readouterr().out
    assert re.search(r"tokens          \S+/tokens/blocks/[0-9a-f]{32} \(64 tokens a block\)", out), out
    assert "tokenized in" in out
    assert len(calls) == records
    with caplog.at_level(logging.INFO):
        async with in_process(agg_config, Agent(agent_config)) as federation, asyncio.timeout(120):
            await federation.agents[0]
    assert "tokenized before" in caplog.text and "round 1 trained" in caplog.text
    assert len(calls) == records  # nothing tokenized again
