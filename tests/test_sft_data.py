"""Instruction data: prompt/completion and chat records learn only the completion and the
assistant turns; plain text learns every token as before; bad records are refused naming the line;
the real agent daemon trains and evaluates on such data."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from agent.daemon import Agent
from agent.data import (
    IGNORE,
    TOKENIZE_BATCH,
    Conversation,
    Example,
    load_records,
    pack,
    pack_records,
    split,
)
from agent.demo import prepare
from agent.trainer import LocalTraining, LoraSpec, LoraTrainer
from bench.data import per_document_pack
from common.config import AgentConfig, AggregatorConfig, load
from common.errors import ConfigError
from common.tinylm import DOMAINS, build_tiny_lm, domain_corpus
from tests.agentsim import in_process

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PAIRS = [
    ("Question: what is the weather in Oslo?\nAnswer:", " cold and windy"),
    ("Question: what should I cook tonight?\nAnswer:", " a mushroom risotto"),
    ("Question: who won the match?\nAnswer:", " the home side, two to one"),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [doc for domain in DOMAINS for doc in domain_corpus(domain, 10, seed=2)]
    return build_tiny_lm(tmp_path_factory.mktemp("sft") / "model", texts + [p + c for p, c in PAIRS])


def tokenizer_of(model: Path, template: str | None = None) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = template
    return tok


def learned_text(tok: Any, blocks: Any) -> str:
    ids = blocks.labels.flatten()
    return str(tok.decode(ids[ids != IGNORE]))


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompt_completion_records_learn_the_completion_and_its_end(model: Path, tmp_path: Path) -> None:
    tok = tokenizer_of(model)
    records = load_records(
        write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    )
    filler = Example.plain(" ".join(domain_corpus(DOMAINS[1], 3, seed=4)))  # the cut tail is filler
    blocks = pack_records(tok, [*records, filler], 32)
    learned = learned_text(tok, blocks)
    for _, completion in PAIRS:
        assert completion.strip() in learned
        assert "Question" not in learned and "Answer" not in learned
    assert learned.count(tok.eos_token) >= len(PAIRS)  # each completion's end is learned
    read_only = str(tok.decode(blocks.input_ids[blocks.labels == IGNORE]))
    assert "Question" in read_only and "Answer:" in read_only  # the model reads the prompts


def test_plain_text_learns_every_token_but_each_records_first(model: Path) -> None:
    """Packed plain text learns every token except where a record starts (nothing of its own
    precedes it there); positions restart at each record and at each block."""
    tok = tokenizer_of(model)
    docs = [p + c for p, c in PAIRS]
    blocks = pack_records(tok, [Example.plain(d) for d in docs], 8)
    assert torch.equal(pack(tok, docs, 8), blocks.input_ids)
    lengths = [len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs]  # EOS appended
    begins = torch.zeros(blocks.input_ids.numel(), dtype=torch.bool)
    begins[[sum(lengths[:i]) for i in range(len(docs)) if sum(lengths[:i]) < len(begins)]] = True
    begins = begins.view_as(blocks.input_ids)
    assert torch.equal(blocks.labels, torch.where(begins, IGNORE, blocks.input_ids))
    positions = blocks.position_ids()
    assert positions is not None
    expected = torch.zeros_like(positions)
    for row in range(len(blocks)):
        for j in range(1, blocks.input_ids.shape[1]):
            expected[row, j] = 0 if begins[row, j] else expected[row, j - 1] + 1
    assert torch.equal(positions, expected)
    assert 0 < int((positions == 0).sum()) - len(blocks) < len(docs)  # records begin mid-block too


def test_chat_records_learn_the_assistant_turns_only(model: Path, tmp_path: Path) -> None:
    chat = {
        "messages": [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "Cold."},
            {"role": "user", "content": "And tomorrow?"},
            {"role": "assistant", "content": "Windy."},
        ]
    }
    records = load_records(write_jsonl(tmp_path / "chat.jsonl", [chat] * 4))
    assert all(isinstance(r, Conversation) for r in records)
    tok = tokenizer_of(model, TEMPLATE)
    blocks = pack_records(tok, records, 8)
    learned = learned_text(tok, blocks)
    assert learned == ("Cold.<|end|>\nWindy.<|end|>\n" + tok.eos_token) * 4
    with pytest.raises(ConfigError, match="chat template"):
        pack_records(tokenizer_of(model), records, 8)
    numbered = "{{ messages | length }}" + TEMPLATE  # the header changes with every turn
    with pytest.raises(ConfigError, match="sum of its turns"):
        pack_records(tokenizer_of(model, numbered), records, 8)


def test_bad_records_are_refused_naming_the_line(tmp_path: Path) -> None:
    cases = {
        '{"text": 3}': "a record needs a string 'text'",
        '{"prompt": "Q", "completion": ""}': "a record needs",
        '{"messages": [{"role": "user"}]}': "each message needs string 'role' and 'content'",
        '{"messages": [{"role": "user", "content": "hi"}]}': "no assistant turn",
        "[1, 2]": "not a JSON object",
        "{oops": "invalid JSON",
    }
    for line, words in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text('{"text": "fine"}\n' + line + "\n")
        with pytest.raises(ConfigError, match=f"bad.jsonl:2: .*{words}".replace("[", r"\[")):
            load_records(path)


def test_the_trainer_scores_and_learns_only_the_completions(model: Path) -> None:
    tok = tokenizer_of(model)
    records = [Example(p + c, ((len(p), len(p + c)),), p + c) for p, c in PAIRS * 6]
    blocks = pack_records(tok, records, 16)
    trainer = LoraTrainer(str(model), LoraSpec(4, 8.0, ("q_proj", "v_proj")))
    loss, tokens = trainer.evaluate(blocks)
    assert tokens == blocks.learned_tokens
    with torch.no_grad():  # by hand: cross-entropy over the learned positions only
        logits = trainer.model(input_ids=blocks.input_ids).logits[:, :-1]
        targets = blocks.labels[:, 1:].long()
        by_hand = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    assert loss == pytest.approx(by_hand.item(), rel=1e-5)
    all_tokens, _ = trainer.evaluate(blocks.input_ids)  # the same blocks with every token learned
    assert abs(all_tokens - loss) > 1e-3
    trainer.train(blocks, LocalTraining(30, 1e-2, 4, 16, seed=0), round_id=1)
    after, _ = trainer.evaluate(blocks)
    assert after < loss - 0.1, (loss, after)


async def test_the_agent_daemon_trains_and_evaluates_on_prompt_completion_data(tmp_path: Path) -> None:
    """The real agent daemon and aggregator (the demo's tiny model, one process, plain rounds) with
    one cloud's data as prompt/completion records: a round completes and the agent's eval counts
    only the completions' tokens of its held-out records."""
    agg_path, agent_paths, _ = prepare(tmp_path, rounds=1, secagg=False)
    agg_config = dataclasses.replace(
        load(AggregatorConfig, agg_path, env={"CLOUDFED_ROUNDS_MIN_AGENTS": "1"}), metrics_listen=""
    )
    agent_config = dataclasses.replace(load(AgentConfig, agent_paths[0], env={}), metrics_listen="")
    docs = domain_corpus(DOMAINS[0], 60, seed=5)
    records = [{"prompt": f"Forecast {i}:", "completion": " " + doc} for i, doc in enumerate(docs)]
    write_jsonl(agent_config.data, records)
    async with in_process(agg_config, Agent(agent_config)) as run, asyncio.timeout(120):
        await run.agents[0]  # max_rounds = 1: it stops once it has evaluated version 1
    history = [json.loads(line) for line in (agent_config.state_dir / "evals.jsonl").read_text().splitlines()]
    assert [r["version"] for r in history] == [0, 1]
    _, held_out = split(load_records(agent_config.data), agent_config.eval_fraction)
    expected = pack_records(tokenizer_of(agent_config.data.parent.parent / "model"), held_out, 64)
    assert all(r["tokens"] == expected.learned_tokens for r in history)
    assert expected.learned_tokens < expected.input_ids.numel() - len(expected)
    assert history[1]["eval_loss"] < history[0]["eval_loss"]


def test_the_batched_packer_matches_the_per_document_one(model: Path) -> None:
    """The batched int32 packer (agent.data) gives exactly the blocks and labels of the
    per-document packer it replaced (kept in bench/data.py), over a mix of every kind of record
    that spans several tokenizer batches."""
    tok = tokenizer_of(model, TEMPLATE)
    chat = Conversation((("user", "Weather?"), ("assistant", "Cold.")), "c")
    texts = [doc for domain in DOMAINS for doc in domain_corpus(domain, 250, seed=7)]
    records: list[Any] = []
    for i, text in enumerate(texts):
        kind = i % 3
        if kind == 0:
            records.append(Example.plain(text))
        elif kind == 1:
            records.append(Example(f"Q{i}: " + text, ((len(f"Q{i}: "), len(f"Q{i}: " + text)),), str(i)))
        else:
            records.append(chat)
    assert len(records) > 1.4 * TOKENIZE_BATCH
    ours, theirs = pack_records(tok, records, 24), per_document_pack(tok, records, 24)
    assert ours.input_ids.dtype == torch.int32  # held as int32; batches go out as int64
    assert torch.equal(ours.input_ids.long(), theirs.input_ids) and torch.equal(
        ours.labels.long(), theirs.labels
    )
    assert ours.starts is not None and theirs.starts is not None and torch.equal(ours.starts, theirs.starts)
    assert ours[:2].to("cpu").input_ids.dtype == torch.long
