"""A causal LM's next-token loss, without a batch's whole logits where the model allows.

A causal LM's logits are rows x tokens x vocabulary: for a 128k vocabulary, 2,048 tokens and 8
rows that is 8.4 GB in float32, and the softmax the cross-entropy keeps for the backward as much
again. For the models whose logits are the LM head applied to the decoder's last hidden state
and nothing more (``HEAD_ONLY``: Llama, Mistral, Qwen 2/3, Gemma, Phi-3, OLMo, ...), the loss
is taken a few positions at a time, as many as keep ``chunk_logits`` logits at once (64 Mi,
256 MiB in float32: for 8 rows and a 128k vocabulary, 64 positions; for a small vocabulary
the whole batch at once):

- a frozen head (LoRA leaves it alone): each chunk's gradient with respect to its hidden states
  is taken in the forward, right after its loss, and the backward only scales it (nothing else
  needs a gradient), so one chunk's logits are held at a time and none are recomputed;
- a head with trainable weights (LoRA on ``lm_head``): each chunk's head and cross-entropy are
  checkpointed, their logits recomputed in the backward.

Either way the losses and gradients are those of the full logits. Other models (a final logit
soft-cap, a logit scale, ...) take the loss from their full logits.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from agent.data import IGNORE

HEAD_ONLY = frozenset(
    {
        "gemma",
        "gpt_neox",
        "llama",
        "mistral",
        "olmo",
        "olmo2",
        "phi3",
        "qwen2",
        "qwen3",
        "smollm3",
        "stablelm",
        "starcoder2",
    }
)
"""``model_type``s whose causal LM computes its logits as ``lm_head(last_hidden_state)`` and its
loss from them alone (no logit soft-cap or scale as Gemma 2/3, Cohere, Granite; no router loss as
the mixtures of experts)."""
CHUNK_LOGITS = 2**26
"""Logits held at once (rows x positions x vocabulary)."""


def per_record_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's mean next-token cross-entropy over its own learned tokens: a record's loss
    depends on that record alone (a batch mean over all tokens would not)."""
    targets = labels[:, 1:]
    return summed_loss(logits[:, :-1], targets) / learned_tokens(targets).clamp(min=1)


def summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's summed cross-entropy (in float32) over its learned ``targets``."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    ce = torch.nn.functional.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="none")
    return ce.view(targets.shape).sum(dim=1)


def learned_tokens(targets: torch.Tensor) -> torch.Tensor:
    """Each row's number of learned ``targets``."""
    return (targets != IGNORE).sum(dim=1)


def _head_loss(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return summed_loss(head(hidden), targets)


class _FrozenHeadLoss(torch.autograd.Function):
    """Each row's summed loss of a frozen linear head over its hidden states, chunk by chunk;
    the gradient with respect to the hidden states is taken in the forward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        positions: int,
    ) -> torch.Tensor:
        total = hidden.new_zeros(len(targets), dtype=torch.float32)
        grads = torch.empty_like(hidden)
        for start in range(0, targets.shape[1], positions):
            part = slice(start, start + positions)
            with torch.enable_grad():
                h = hidden[:, part].detach().requires_grad_()
                loss = summed_loss(torch.nn.functional.linear(h, weight, bias), targets[:, part])
                (grads[:, part],) = torch.autograd.grad(loss.sum(), h)  # rows are independent
            total += loss.detach()
        ctx.save_for_backward(grads)
        return total

    @staticmethod
    def backward(ctx: Any, grad_rows: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grads,) = ctx.saved_tensors
        scale = grad_rows.view(-1, *[1] * (grads.dim() - 1))
        return (grads.float() * scale).to(grads.dtype), None, None, None, None


class CausalLoss:
    """Next-token losses of a (peft-wrapped) causal LM on token ids, in chunks where it can."""

    def __init__(self, model: Any, chunk_logits: int = CHUNK_LOGITS) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.model = model
        self.chunk_logits = chunk_logits
        """0: always from the full logits, through the model's own forward."""
        chunked = getattr(base.config, "model_type", "") in HEAD_ONLY
        self.decoder = base.get_decoder() if chunked else None
        self.head = base.get_output_embeddings() if chunked else None
        self.vocabulary: int = base.config.vocab_size

    @property
    def chunked(self) -> bool:
        """Whether the model's loss can be taken in chunks (``HEAD_ONLY``)."""
        return self.decoder is not None

    def describe(self) -> str:
        """How the loss is taken, in words (for the agent's log)."""
        if not self.chunked:
            return "the loss from the model's full logits (its type takes no chunks)"
        if self.chunk_logits <= 0:
            return "the loss from the model's full logits (loss_chunk_logits = 0)"
        return f"the loss in chunks of at most {self.chunk_logits} logits"

    @property
    def head_frozen(self) -> bool:
        """Whether the head is a plain linear layer with nothing to train (its chunks then need no
        recomputation)."""
        return type(self.head) is torch.nn.Linear and not any(p.requires_grad for p in self.head.parameters())

    def per_record(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each row's mean loss over its own learned tokens (see ``per_record_loss``)."""
        summed, learned = self.rows(input_ids, labels, position_ids)
        return summed / learned.clamp(min=1)

    def mean(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The mean loss over all learned tokens of the batch (transformers' ``.loss``; 0, not nan,
        for a batch with none)."""
        summed, learned = self.rows(input_ids, labels, position_ids)
        return summed.sum() / learned.sum().clamp(min=1)

    def positions(self, rows: int) -> int:
        """Positions a chunk of ``rows`` rows takes (``chunk_logits`` of their logits, at least 1)."""
        return max(1, self.chunk_logits // (rows * self.vocabulary))

    def rows(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's summed loss over its learned tokens (float32), and their number.
        ``position_ids``: packed rows' (``TokenBlocks.position_ids``), each piece attended alone."""
        targets = labels[:, 1:]
        learned = learned_tokens(targets)
        if self.decoder is None or self.chunk_logits <= 0:
            # no KV cache: with one, transformers would not take the positions' pieces apart
            logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
            return summed_loss(logits[:, :-1], targets), learned
        out = self.decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        hidden: torch.Tensor = out.last_hidden_state[:, :-1]
        step = self.positions(len(targets))
        grad = torch.is_grad_enabled() and hidden.requires_grad  # else evaluating: nothing to keep
        if grad and self.head_frozen:  # even in one chunk: no logits kept for the backward
            head = self.head
            summed = _FrozenHeadLoss.apply(hidden, head.weight, head.bias, targets, step)  # type: ignore[union-attr, no-untyped-call]
            return summed, learned
        chunk_loss = functools.partial(_head_loss, self.head)
        if step >= targets.shape[1]:  # one chunk: nothing to recompute
            return chunk_loss(hidden, targets), learned
        total = hidden.new_zeros(len(targets), dtype=torch.float32)
        for start in range(0, targets.shape[1], step):
            part = hidden[:, start : start + step], targets[:, start : start + step]
            loss: torch.Tensor = (
                checkpoint(chunk_loss, *part, use_reentrant=False) if grad else chunk_loss(*part)
            )
            total = total + loss
        return total, learned


class MeanLoss(torch.nn.Module):
    """A causal LM as a module whose forward is ``CausalLoss.mean``: what DDP wraps, so that its
    gradients are all-reduced whichever way the loss is taken."""

    def __init__(self, losses: CausalLoss) -> None:
        super().__init__()
        self.model = losses.model
        self.losses = losses

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.losses.mean(input_ids, labels, position_ids)
