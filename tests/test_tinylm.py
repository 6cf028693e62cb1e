"""common.tinylm: the local tiny model, and pretraining it for benchmarks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from agent.data import pack
from common.tinylm import DOMAINS, build_tiny_lm, domain_corpus, pretrain_tiny_lm


def test_pretraining_lowers_the_loss_and_saves_a_loadable_model(tmp_path: Path) -> None:
    docs = [doc for domain in DOMAINS for doc in domain_corpus(domain, 20, seed=5)]
    model_dir = build_tiny_lm(tmp_path / "model", docs)
    blocks = pack(AutoTokenizer.from_pretrained(model_dir), docs, 32)
    out, before, after = pretrain_tiny_lm(model_dir, blocks, 30, tmp_path / "pretrained", batch_size=8)
    assert after < before - 1.0  # templated text: a few steps learn most of it
    model = AutoModelForCausalLM.from_pretrained(out)
    model.eval()
    with torch.no_grad():
        losses = [float(model(input_ids=c, labels=c).loss) for c in torch.split(blocks, 8)]
    reloaded = sum(losses) / len(losses)
    assert reloaded == pytest.approx(after, rel=1e-5)
    assert AutoTokenizer.from_pretrained(out).vocab == AutoTokenizer.from_pretrained(model_dir).vocab
    original = AutoModelForCausalLM.from_pretrained(model_dir)  # the random base is left as it was
    with torch.no_grad():
        assert float(original(input_ids=blocks[:8], labels=blocks[:8]).loss) > after + 1.0


def test_pretraining_needs_a_step(tmp_path: Path) -> None:
    docs = domain_corpus("weather", 5)
    model_dir = build_tiny_lm(tmp_path / "model", docs)
    blocks = pack(AutoTokenizer.from_pretrained(model_dir), docs, 32)
    with pytest.raises(ValueError, match="at least one step"):
        pretrain_tiny_lm(model_dir, blocks, 0, tmp_path / "out")
