"""Each record's own loss for DP-SGD, without a batch's whole logits where the model allows.

A causal LM's logits are rows x tokens x vocabulary: for a 128k vocabulary, 2,048 tokens and 8
rows that is 8.4 GB in float32, and the softmax the cross-entropy keeps for the backward as much
again. For the models whose logits are the LM head applied to the decoder's last hidden state
and nothing more (``HEAD_ONLY``), the loss is taken ``chunk_tokens`` positions at a time and each
chunk's logits are recomputed in the backward (checkpointing the head and the cross-entropy):
the same losses and gradients, with one chunk's logits held at a time. Other models (a final
logit soft-cap, a logit scale, ...) take the loss from their full logits.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from agent.data import IGNORE

HEAD_ONLY = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""``model_type``s whose causal LM computes its logits as ``lm_head(last_hidden_state)`` only."""
CHUNK_TOKENS = 256
"""Positions whose logits are held at once."""


def per_record_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's mean next-token cross-entropy over its own learned tokens: a record's loss
    depends on that record alone (a batch mean over all tokens would not)."""
    targets = labels[:, 1:]
    learned = (targets != IGNORE).sum(dim=1).clamp(min=1)
    return _summed_loss(logits[:, :-1], targets) / learned


def _summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's summed cross-entropy over its learned ``targets``."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    ce = torch.nn.functional.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="none")
    return ce.view(targets.shape).sum(dim=1)


def _head_loss(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _summed_loss(head(hidden), targets)


class RecordLoss:
    """``per_record_loss`` of a (peft-wrapped) causal LM on token ids, in chunks where it can."""

    def __init__(self, model: Any, chunk_tokens: int = CHUNK_TOKENS) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.model = model
        self.chunk_tokens = chunk_tokens
        """0: always from the full logits (as are rows no longer than one chunk)."""
        chunked = getattr(base.config, "model_type", "") in HEAD_ONLY
        self.decoder = base.get_decoder() if chunked else None
        self.head = base.get_output_embeddings() if chunked else None

    @property
    def chunked(self) -> bool:
        """Whether the model's loss can be taken in chunks (``HEAD_ONLY``)."""
        return self.decoder is not None

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.decoder is None or not 0 < self.chunk_tokens < labels.shape[1] - 1:  # one chunk: no gain
            return per_record_loss(self.model(input_ids=input_ids).logits, labels)
        hidden: torch.Tensor = self.decoder(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        chunk_loss = functools.partial(_head_loss, self.head)
        total = hidden.new_zeros(len(targets), dtype=torch.float32)
        for start in range(0, targets.shape[1], self.chunk_tokens):
            part = slice(start, start + self.chunk_tokens)
            loss: torch.Tensor = checkpoint(
                chunk_loss, hidden[:, part], targets[:, part], use_reentrant=False
            )
            total = total + loss
        learned = (targets != IGNORE).sum(dim=1).clamp(min=1)
        return total / learned
