"""DP-SGD (Abadi et al. 2016) for the agent's local training: record-level differential privacy.

Each step samples every record independently with probability ``sample_rate`` (Poisson sampling,
which the accountants in ``agent.dp_budget`` assume), takes each sampled record's gradient of its
own loss (opacus' per-sample gradient hooks), clips it to ``max_grad_norm``, sums, adds Gaussian
noise of standard deviation ``noise_multiplier * max_grad_norm`` and divides by the expected batch.
Under torchrun each rank samples its own shard, the ranks' clipped sums are added
(``all_reduce``) and each rank adds an independent share of the noise, so the sum carries it once.

Sampling and noise are drawn from generators seeded by the operating system's entropy, never from
the federation's seed: the aggregator knows that seed, and the guarantee needs both secret.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from agent.data import IGNORE, TokenBlocks
from agent.distributed import DistContext
from common.errors import TrainingFailed


@dataclass(frozen=True)
class DpStep:
    """A round's DP-SGD settings, decided by rank 0 (``agent.dp_budget``) and used by every rank."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch: float
    """Records a step samples on average over all ranks (the divisor of the noisy sum)."""


def per_record_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's mean next-token cross-entropy over its own learned tokens: a record's loss
    depends on that record alone (a batch mean over all tokens would not)."""
    targets = labels[:, 1:]
    flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    ce = torch.nn.functional.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="none")
    learned = (targets != IGNORE).sum(dim=1).clamp(min=1)
    return ce.view(targets.shape).sum(dim=1) / learned


class PrivateGradients:
    """Noisy clipped gradients of a model's trainable parameters, one DP-SGD step at a time."""

    def __init__(self, model: Any, ctx: DistContext) -> None:
        from opacus import GradSampleModule

        self.module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ctx = ctx
        device = self.params[0].device
        self.sampler = torch.Generator().manual_seed(secrets.randbits(63))
        self.noise = torch.Generator(device=device).manual_seed(secrets.randbits(63))

    def step(self, blocks: TokenBlocks, dp: DpStep, micro_batch: int) -> tuple[float, int, bool]:
        """Set each parameter's ``.grad`` to this step's private gradient, holding the per-record
        gradients of at most ``micro_batch`` records at once (a Poisson draw may be larger).
        Returns the mean loss of the records this rank sampled (nan if none), how many it sampled,
        and whether every loss and gradient here was finite."""
        chosen = (torch.rand(len(blocks), generator=self.sampler) < dp.sample_rate).nonzero().flatten()
        summed = [torch.zeros_like(p) for p in self.params]
        total_loss, finite = 0.0, True
        for part in torch.split(chosen, micro_batch) if len(chosen) else ():  # bounded memory
            batch = blocks[part].to(str(self.params[0].device))
            losses = per_record_loss(self.module(input_ids=batch.input_ids).logits, batch.labels)
            with warnings.catch_warnings():  # opacus' hooks fire on frozen inputs by design
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                torch.autograd.backward(losses.sum())
            finite &= bool(torch.isfinite(losses).all())
            self._add_clipped(summed, len(part), dp.max_grad_norm)
            total_loss += float(losses.detach().sum())
        finite &= all(bool(torch.isfinite(s).all()) for s in summed)
        std = dp.noise_multiplier * dp.max_grad_norm / math.sqrt(self.ctx.world_size)
        for s in summed:  # each rank's share; the all-reduced sum has std noise_multiplier * C
            s.add_(torch.normal(0.0, std, s.shape, generator=self.noise, device=s.device))
        if self.ctx.enabled:
            flat = torch.cat([s.flatten() for s in summed])
            dist.all_reduce(flat)
            sizes = [s.numel() for s in summed]
            summed = [flat[sum(sizes[:i]) : sum(sizes[: i + 1])].view_as(s) for i, s in enumerate(summed)]
        for p, s in zip(self.params, summed, strict=True):
            p.grad = s / dp.expected_batch
        count = len(chosen)
        return (total_loss / count if count else math.nan), count, finite

    def _add_clipped(self, summed: list[torch.Tensor], n: int, max_norm: float) -> None:
        """Add each record's gradient, scaled to at most ``max_norm`` (L2 over all parameters)."""
        samples = [p.grad_sample for p in self.params]
        if any(g is None for g in samples):  # e.g. under activation checkpointing (refused by the config)
            raise TrainingFailed(
                f"DP-SGD: {sum(g is None for g in samples)} trainable tensors got no per-record gradient"
            )
        norms = torch.stack([g.reshape(n, -1).norm(dim=1) for g in samples]).norm(dim=0)
        factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for s, g in zip(summed, samples, strict=True):
            s.add_(torch.einsum("i,i...->...", factor.to(g.dtype), g))
        for p in self.params:  # opacus would otherwise add the next batch's samples to these
            p.grad_sample = None
            p.grad = None
