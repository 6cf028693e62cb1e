"""The next-token loss taken in chunks of positions (agent.causal_loss): the same losses and
gradients as transformers' ``.loss`` from the full logits, without keeping those logits, and
without recomputing them when the LM head is frozen; also under DDP on 2 ranks."""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM

from agent.causal_loss import CHUNK_LOGITS, HEAD_ONLY, CausalLoss
from agent.data import IGNORE, Example, TokenBlocks, pack_records, record_blocks
from agent.trainer import LoraSpec, LoraTrainer, initial_adapter
from common.tinylm import DOMAINS, build_tiny_lm, domain_corpus
from tests.daemons import torchrun

pytestmark = [  # peft on LoRA over a tied head: true, and beside the point here
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`"),
]

LORA = LoraSpec(4, 8.0, ("q_proj", "v_proj"))
LORA_ON_HEAD = LoraSpec(4, 8.0, ("q_proj", "v_proj", "lm_head"))
LENGTH = 40  # 39 targets a row


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    docs = [doc for domain in DOMAINS for doc in domain_corpus(domain, 12, seed=1)]
    return str(build_tiny_lm(tmp_path_factory.mktemp("loss") / "model", docs))


def _rows(vocab: int, count: int = 4, seed: int = 0) -> TokenBlocks:
    """Random token rows, some of their positions not learned (a prompt, a padded tail)."""
    ids = torch.randint(0, vocab, (count, LENGTH), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :10] = IGNORE
    labels[min(2, count - 1), 25:] = IGNORE
    return TokenBlocks(ids, labels)


def _trainer(path: str, lora: LoraSpec = LORA, dtype: torch.dtype = torch.float32) -> LoraTrainer:
    """A trainer whose LoRA B is not zero, so that every adapter weight has a gradient."""
    trainer = LoraTrainer(path, lora, dtype=dtype)
    noise = torch.Generator().manual_seed(1)
    trainer.set_adapter(
        {
            k: v + 0.01 * torch.randn(v.shape, generator=noise)
            for k, v in initial_adapter(path, lora, 3).items()
        }
    )
    return trainer


def _in_chunks(losses: CausalLoss, positions: int, rows: int) -> None:
    """Have ``losses`` take ``positions`` positions of ``rows`` rows at a time (0: the full logits)."""
    losses.chunk_logits = positions * rows * losses.vocabulary
    assert positions == 0 or losses.positions(rows) == positions


def _gradients(trainer: LoraTrainer, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [p for p in trainer.model.parameters() if p.requires_grad]))


def _transformers_loss(trainer: LoraTrainer, rows: TokenBlocks) -> torch.Tensor:
    out: torch.Tensor = trainer.model(input_ids=rows.input_ids, labels=rows.labels).loss
    return out


def _held_for_backward(forward: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``forward()`` and the bytes of the distinct storages its graph keeps for the backward
    (what is saved and still alive once the forward returns)."""
    saved: list[weakref.ref[torch.Tensor]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    storages = {}
    for ref in saved:
        t = ref()
        if t is not None:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return out, sum(storages.values())


@pytest.mark.parametrize("lora", [LORA, LORA_ON_HEAD], ids=["frozen-head", "lora-on-head"])
def test_the_mean_loss_and_its_gradient_are_transformers_whatever_the_chunks(
    model_path: str, lora: LoraSpec
) -> None:
    trainer = _trainer(model_path, lora)
    losses = trainer.losses
    assert losses.chunked and losses.head_frozen == (lora is LORA)
    rows = _rows(trainer.model.config.vocab_size)
    want = _transformers_loss(trainer, rows)
    want_grads = _gradients(trainer, want)
    for chunk in (0, 1, 7, 38, 39, 256):
        _in_chunks(losses, chunk, len(rows))
        got = losses.mean(rows.input_ids, rows.labels)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for g, w in zip(_gradients(trainer, got), want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-8)
        per_record = losses.per_record(rows.input_ids, rows.labels)
        for i in range(len(rows)):  # each row's loss is its own, over its own learned tokens
            torch.testing.assert_close(
                per_record[i], _transformers_loss(trainer, rows[i : i + 1]), rtol=1e-5, atol=1e-6
            )


def test_the_chunks_keep_no_logits_and_a_frozen_head_recomputes_none(model_path: str) -> None:
    """What the graph keeps after the forward is smaller than with the full logits by at least the
    logits (float32); with a frozen head the forward and backward together cost no more
    multiply-adds than from the full logits, while a trainable head's chunks are recomputed. By
    default this small vocabulary's logits fit in one chunk, which a frozen head still does not
    keep."""
    vocab_logits = {}
    for lora in (LORA, LORA_ON_HEAD):
        trainer = _trainer(model_path, lora)
        rows = _rows(trainer.model.config.vocab_size, count=8)
        logits = len(rows) * (LENGTH - 1) * trainer.model.config.vocab_size * 4
        held, flops = {}, {}
        trainer.losses.chunk_logits = CHUNK_LOGITS
        assert trainer.losses.positions(len(rows)) > LENGTH
        for chunk in (-1, 0, 7):  # -1: the default
            if chunk >= 0:
                _in_chunks(trainer.losses, chunk, len(rows))
            with FlopCounterMode(display=False) as counter:
                forward = functools.partial(trainer.losses.mean, rows.input_ids, rows.labels)
                loss, held[chunk] = _held_for_backward(forward)
                loss.backward()
            flops[chunk] = counter.get_total_flops()
        assert held[0] - held[7] >= logits, (lora, held, logits)
        if lora is LORA:
            assert held[0] - held[-1] >= logits and flops[-1] <= flops[0], (held, flops)
        else:  # one chunk, taken as a whole: its logits kept, none recomputed
            assert held[0] - held[-1] < logits / 2 and flops[-1] <= flops[0], (held, flops)
        vocab_logits[lora.target_modules] = flops
    head_forward = 2 * 8 * (LENGTH - 1) * trainer.model.config.hidden_size * trainer.model.config.vocab_size
    frozen, trainable = vocab_logits[LORA.target_modules], vocab_logits[LORA_ON_HEAD.target_modules]
    assert frozen[7] <= frozen[0], frozen
    assert trainable[7] >= trainable[0] + head_forward, (trainable, head_forward)


def test_bf16_chunks_are_as_close_to_float32_as_the_full_logits(model_path: str) -> None:
    """A bf16 base: the chunked gradient differs from the float32 one no more than transformers'
    bf16 gradient does (to within a few bf16 roundings)."""
    rows = _rows(512)
    reference = _gradients(exact := _trainer(model_path), _transformers_loss(exact, rows))
    bf16 = _trainer(model_path, dtype=torch.bfloat16)

    def error(grads: list[torch.Tensor]) -> float:
        return max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(grads, reference, strict=True))

    full = error(_gradients(bf16, _transformers_loss(bf16, rows)))
    _in_chunks(bf16.losses, 7, len(rows))
    chunked = error(_gradients(bf16, bf16.losses.mean(rows.input_ids, rows.labels)))
    assert 0 < full < 0.05 and chunked < 2 * full, (chunked, full)


def test_evaluation_takes_the_loss_in_chunks_without_a_graph(model_path: str) -> None:
    trainer = _trainer(model_path)
    rows = _rows(trainer.model.config.vocab_size, count=6)
    with torch.no_grad():
        want = sum(
            float(_transformers_loss(trainer, rows[i : i + 1])) * int((rows.labels[i, 1:] != IGNORE).sum())
            for i in range(6)
        )
    _in_chunks(trainer.losses, 7, 4)  # evaluated 4 rows at a time
    mean, tokens = trainer.evaluate(rows, batch_size=4)
    assert tokens == int((rows.labels[:, 1:] != IGNORE).sum())
    assert mean == pytest.approx(want / tokens, rel=1e-5)
    with torch.no_grad():
        summed, _ = trainer.losses.rows(rows.input_ids, rows.labels)
    assert not summed.requires_grad


@pytest.mark.parametrize("chunk", [0, 5])
def test_records_packed_in_one_row_are_trained_and_evaluated_as_if_alone(model_path: str, chunk: int) -> None:
    """Records packed into one row (``pack_records``) give the loss, the gradient and the eval
    loss of the same records one a row (``record_blocks``): each attends to itself only, from
    position 0, and its first token is learned in neither. Without the positions they differ."""
    trainer = _trainer(model_path)
    texts = domain_corpus(DOMAINS[1], 5, seed=3)
    records = [Example.plain(t) for t in texts]
    lengths = [len(trainer.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]
    packed = pack_records(trainer.tokenizer, records, sum(lengths))
    alone, _ = record_blocks(trainer.tokenizer, records, max(lengths))
    assert len(packed) == 1 and len(alone) == len(records) and packed.learned_tokens == alone.learned_tokens
    packed, alone = packed.to("cpu"), alone.to("cpu")
    _in_chunks(trainer.losses, chunk, 1)
    positions = packed.position_ids()
    want = trainer.losses.mean(alone.input_ids, alone.labels)
    got = trainer.losses.mean(packed.input_ids, packed.labels, positions)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(_gradients(trainer, got), _gradients(trainer, want), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    assert trainer.evaluate(packed) == pytest.approx(trainer.evaluate(alone), rel=1e-5)
    crossed = trainer.losses.mean(packed.input_ids, packed.labels)  # every record sees those before
    assert abs(float(crossed.detach()) - float(want.detach())) > 1e-3


@pytest.mark.parametrize("model_type", sorted(HEAD_ONLY))
def test_every_model_type_taken_in_chunks_gives_transformers_loss_and_gradient(model_type: str) -> None:
    """Each model type listed as taking its loss in chunks, built tiny from its own config with
    every weight but the embeddings and the head trainable: its chunked loss and gradients are
    transformers' own."""
    config = AutoConfig.for_model(
        model_type,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=97,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    frozen = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    params = [p.requires_grad_(id(p) not in frozen) for p in model.parameters()]
    params = [p for p in params if p.requires_grad]
    rows = _rows(97, count=3)
    want = model(input_ids=rows.input_ids, labels=rows.labels).loss
    losses = CausalLoss(model, chunk_logits=7 * len(rows) * 97)
    assert losses.chunked and losses.head_frozen
    got = losses.mean(rows.input_ids, rows.labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("model_type", ["gemma2", "cohere", "granite", "mixtral"])
def test_a_model_whose_loss_is_more_than_its_heads_logits_takes_them_whole(
    model_path: str, model_type: str
) -> None:
    """A final logit soft-cap (Gemma 2), a logit scale (Cohere, Granite), a router loss (Mixtral)."""
    trainer = _trainer(model_path)
    trainer.model.get_base_model().config.model_type = model_type
    assert not CausalLoss(trainer.model).chunked


@pytest.mark.slow
def test_ddp_on_two_ranks_all_reduces_the_chunked_gradient(model_path: str, tmp_path: Path) -> None:
    """Under torchrun, DDP wraps the chunked loss: each rank's gradient after the backward is the
    mean over ranks of their shards' gradients from the full logits."""
    trainer = _trainer(model_path)
    rows = _rows(trainer.model.config.vocab_size, count=6)
    start, rows_path = tmp_path / "start.safetensors", tmp_path / "rows.safetensors"
    save_file(trainer.adapter(), str(start))
    save_file({"input_ids": rows.input_ids, "labels": rows.labels}, str(rows_path))
    shards = [rows[r::2] for r in (0, 1)]
    want = [
        sum(g) / 2
        for g in zip(*(_gradients(trainer, _transformers_loss(trainer, s)) for s in shards), strict=True)
    ]
    run = torchrun(
        "tests/torchrun_ddp_gradient.py", model_path, str(rows_path), str(start), str(tmp_path / "grads"), "7"
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    for rank in (0, 1):
        got = load_file(str(tmp_path / f"grads-{rank}.safetensors"))
        assert len(got) == len(want)
        for i, w in enumerate(want):
            torch.testing.assert_close(got[str(i)], w, rtol=1e-4, atol=1e-8)


def test_the_agent_config_sets_the_chunk_size(model_path: str) -> None:
    """``loss_chunk_logits`` (the agent's config, default ``CHUNK_LOGITS``) is the trainer's chunk
    size; 0 takes the model's own forward; a negative size is refused naming the field."""
    from common.config import AgentConfig
    from common.errors import ConfigError

    default = AgentConfig()
    assert default.loss_chunk_logits == CHUNK_LOGITS
    with pytest.raises(ConfigError, match="loss_chunk_logits must be >= 0, got -1"):
        dataclasses.replace(default, loss_chunk_logits=-1).validate()
    small = LoraTrainer(model_path, LORA, chunk_logits=4 * 7 * 533)
    vocab = small.losses.vocabulary
    assert small.losses.positions(4) == max(1, 4 * 7 * 533 // (4 * vocab))
    assert small.losses.describe() == f"the loss in chunks of at most {4 * 7 * 533} logits"
    whole = LoraTrainer(model_path, LORA, chunk_logits=0)
    assert whole.losses.describe() == "the loss from the model's full logits (loss_chunk_logits = 0)"
    rows = _rows(vocab)
    with torch.no_grad():
        for trainer in (small, whole):
            trainer.set_adapter(initial_adapter(model_path, LORA, 3))
        a, b = (t.losses.mean(rows.input_ids, rows.labels) for t in (small, whole))
    torch.testing.assert_close(a, b)
