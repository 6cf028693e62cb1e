"""Build a tiny causal LM and its tokenizer locally (demo and tests; nothing is downloaded).

The tokenizer is a byte-level BPE trained on the given texts; the model is a
small Llama built from a ``transformers`` config with a fixed seed. Both are
saved with ``save_pretrained`` so the real loading code (``AutoTokenizer``,
``AutoModelForCausalLM``) runs on them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

EOS = "<|endoftext|>"


def build_tiny_lm(
    out_dir: Path,
    texts: Iterable[str],
    vocab_size: int = 512,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 512,
    seed: int = 0,
) -> Path:
    """Train a tokenizer on ``texts``, build a small Llama, save both into ``out_dir``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)  # type: ignore[no-untyped-call]
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.eos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def pretrain_tiny_lm(
    model_dir: Path,
    blocks: Any,
    steps: int,
    out_dir: Path,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
) -> tuple[Path, float, float]:
    """Train every parameter of the model in ``model_dir`` for ``steps`` AdamW steps on token
    ``blocks`` (``[n, block]`` ids, every token learned), so that a benchmark can fine-tune a
    base that has learned something; save it with its tokenizer into ``out_dir``. Returns the
    directory and the mean loss over ``blocks`` before and after."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if steps < 1:
        raise ValueError(f"pretraining needs at least one step, got {steps}")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(seed)

    def mean_loss() -> float:
        model.eval()  # type: ignore[no-untyped-call]
        with torch.no_grad():
            losses = [float(model(input_ids=chunk, labels=chunk).loss) for chunk in blocks.split(batch_size)]
        return sum(losses) / len(losses)

    before = mean_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = blocks[torch.randint(len(blocks), (batch_size,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = mean_loss()
    out_dir.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    return out_dir, before, after


_DOMAINS: dict[str, tuple[str, list[list[str]]]] = {
    "weather": (
        "The {0} in {1} will be {2} with {3} winds and a high of {4} degrees.",
        [
            ["forecast", "outlook", "weather"],
            ["Oslo", "Lima", "Perth", "Quebec", "Nairobi"],
            ["sunny", "cloudy", "rainy", "foggy", "stormy"],
            ["light", "strong", "gusty", "calm"],
            ["12", "18", "21", "27", "33"],
        ],
    ),
    "cooking": (
        "To make the {0}, {1} the {2} with {3} and serve it {4}.",
        [
            ["soup", "stew", "curry", "salad", "bread"],
            ["simmer", "roast", "whisk", "bake", "fry"],
            ["onions", "lentils", "tomatoes", "potatoes", "carrots"],
            ["garlic", "ginger", "butter", "lemon"],
            ["warm", "cold", "at once", "with rice"],
        ],
    ),
    "football": (
        "In the {0}, {1} beat {2} {3} after a {4} goal.",
        [
            ["final", "derby", "semifinal", "league match"],
            ["United", "Rovers", "Athletic", "City", "Wanderers"],
            ["Albion", "Rangers", "Town", "County"],
            ["2-1", "3-0", "1-0", "4-2"],
            ["late", "stunning", "penalty", "header"],
        ],
    ),
}
DOMAINS = tuple(_DOMAINS)


def domain_corpus(domain: str, documents: int, seed: int = 0, sentences: int = 4) -> list[str]:
    """Templated documents from one domain: non-IID local data for demo and tests."""
    import random

    template, slots = _DOMAINS[domain]
    rng = random.Random(f"{domain}-{seed}")  # noqa: S311 - sample text, not cryptography
    return [
        " ".join(template.format(*(rng.choice(s) for s in slots)) for _ in range(sentences))
        for _ in range(documents)
    ]
