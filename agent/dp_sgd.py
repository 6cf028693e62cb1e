"""DP-SGD (Abadi et al. 2016) for the agent's local training: record- or user-level differential
privacy.

Each step samples every unit (``agent.dp_units``: a record, or a user) independently with
probability ``sample_rate`` (Poisson sampling, which the accountants in ``agent.dp_budget``
assume), takes each sampled record's gradient of its own loss (opacus' per-sample gradient hooks),
averages a user's over their records (user-level sampling, as in Charles et al. 2024, "Fine-tuning
large language models with user-level differential privacy"), clips each unit's to
``max_grad_norm``, sums, adds Gaussian noise of standard deviation ``noise_multiplier *
max_grad_norm`` and divides by the expected batch of units.
Under torchrun each rank samples its own shard, the ranks' clipped sums are added
(``all_reduce``) and each rank adds an independent share of the noise, so the sum carries it once.

Sampling and noise are drawn from generators seeded by the operating system's entropy, never from
the federation's seed: the aggregator knows that seed, and the guarantee needs both secret.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from agent.causal_loss import CausalLoss
from agent.data import TokenBlocks
from agent.distributed import DistContext
from agent.dp_units import PrivacyUnits, micro_batches
from common.errors import TrainingFailed


@dataclass
class _Seen:
    """What a step's rows gave: their summed loss, and whether every loss was finite."""

    loss: float = 0.0
    finite: bool = True

    def add(self, losses: torch.Tensor) -> None:
        self.finite &= bool(torch.isfinite(losses).all())
        self.loss += float(losses.detach().sum())


@dataclass(frozen=True)
class DpStep:
    """A round's DP-SGD settings, decided by rank 0 (``agent.dp_budget``) and used by every rank."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch: float
    """Units (records or users) a step samples on average over all ranks (the divisor of the
    noisy sum)."""
    records_per_unit: int = 1
    """The most rows of a sampled unit a step takes (users; a record is one row)."""


class PrivateGradients:
    """Noisy clipped gradients of a model's trainable parameters, one DP-SGD step at a time."""

    def __init__(self, model: Any, ctx: DistContext, loss: CausalLoss) -> None:
        from opacus import GradSampleModule

        self.module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        self.loss = loss
        """``model``'s losses, each row's taken (in chunks of positions where the model allows:
        ``agent.causal_loss``)."""
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ctx = ctx
        device = self.params[0].device
        self.sampler = torch.Generator().manual_seed(secrets.randbits(63))
        self.noise = torch.Generator(device=device).manual_seed(secrets.randbits(63))

    def step(
        self, blocks: TokenBlocks, dp: DpStep, micro_batch: int, units: PrivacyUnits | None = None
    ) -> tuple[float, int, bool]:
        """Set each parameter's ``.grad`` to this step's private gradient: a Poisson draw of
        ``units`` (default: each row its own unit, a record), each drawn unit's mean gradient over
        at most ``dp.records_per_unit`` of its rows, clipped, summed, noised, over the expected
        batch. At most ``micro_batch`` rows' gradients are held at once (a draw may be larger).
        Returns the mean loss of the rows this rank drew (nan if none), how many it drew, and
        whether every loss and gradient here was finite."""
        units = PrivacyUnits.records(len(blocks)) if units is None else units
        chosen = (torch.rand(len(units), generator=self.sampler) < dp.sample_rate).nonzero().flatten()
        rows, sizes = units.draw(chosen, dp.records_per_unit, self.sampler)
        summed = [torch.zeros_like(p) for p in self.params]
        seen = _Seen()
        for per_unit in self._unit_gradients(blocks, rows, sizes, micro_batch, seen):
            self._add_clipped(summed, per_unit, dp.max_grad_norm)
        finite = seen.finite and all(bool(torch.isfinite(s).all()) for s in summed)
        std = dp.noise_multiplier * dp.max_grad_norm / math.sqrt(self.ctx.world_size)
        for s in summed:  # each rank's share; the all-reduced sum has std noise_multiplier * C
            s.add_(torch.normal(0.0, std, s.shape, generator=self.noise, device=s.device))
        for p, s in zip(self.params, self._over_ranks(summed), strict=True):
            p.grad = s / dp.expected_batch
        count = len(rows)
        return (seen.loss / count if count else math.nan), count, finite

    def _unit_gradients(
        self, blocks: TokenBlocks, rows: torch.Tensor, sizes: torch.Tensor, micro_batch: int, seen: _Seen
    ) -> Iterator[list[torch.Tensor]]:
        """For each micro-batch of whole units (``micro_batches``), each unit's mean gradient over
        its ``rows`` (``sizes[u]`` consecutive rows a unit), one tensor a parameter."""
        offsets = [0, *torch.cumsum(sizes, 0).tolist()]
        for first, end in micro_batches(sizes, micro_batch):
            group = rows[offsets[first] : offsets[end]]
            owner = torch.repeat_interleave(torch.arange(end - first), sizes[first:end])
            weight = 1.0 / sizes[first:end][owner].double()
            per_unit: list[torch.Tensor] | None = None
            for part in torch.split(torch.arange(len(group)), micro_batch):  # one, unless a unit is larger
                losses, grads = self._row_gradients(blocks[group[part]])
                seen.add(losses)
                if len(group) == end - first:  # one row a unit: the rows' gradients are the units'
                    per_unit = grads
                    continue
                if per_unit is None:
                    per_unit = [g.new_zeros(end - first, *g.shape[1:]) for g in grads]
                for acc, g in zip(per_unit, grads, strict=True):
                    w = weight[part].to(g.device, g.dtype).view(-1, *[1] * (g.dim() - 1))
                    acc.index_add_(0, owner[part].to(g.device), g * w)
            assert per_unit is not None
            yield per_unit

    def _over_ranks(self, summed: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ranks' sums added up (all-reduced in one flat tensor); these under one process."""
        if not self.ctx.enabled:
            return summed
        flat = torch.cat([s.flatten() for s in summed])
        dist.all_reduce(flat)
        ends = torch.cumsum(torch.tensor([s.numel() for s in summed]), 0).tolist()
        return [flat[end - s.numel() : end].view_as(s) for s, end in zip(summed, ends, strict=True)]

    def _row_gradients(self, rows: TokenBlocks) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Each row's loss and its gradient of that loss (opacus' per-sample gradients)."""
        batch = rows.to(str(self.params[0].device))
        losses = self.loss.per_record(batch.input_ids, batch.labels)
        with warnings.catch_warnings():  # opacus' hooks fire on frozen inputs by design
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            torch.autograd.backward(losses.sum())
        grads = [p.grad_sample for p in self.params]
        missing = sum(g is None for g in grads)
        for p in self.params:  # opacus would otherwise add the next batch's samples to these
            p.grad_sample = None
            p.grad = None
        if missing:  # e.g. under activation checkpointing (refused by the config)
            raise TrainingFailed(f"DP-SGD: {missing} trainable tensors got no per-record gradient")
        return losses, [g for g in grads if g is not None]

    @staticmethod
    def _add_clipped(summed: list[torch.Tensor], per_unit: list[torch.Tensor], max_norm: float) -> None:
        """Add each unit's gradient, scaled to at most ``max_norm`` (L2 over all parameters)."""
        n = len(per_unit[0])
        norms = torch.stack([g.reshape(n, -1).norm(dim=1) for g in per_unit]).norm(dim=0)
        factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for s, g in zip(summed, per_unit, strict=True):
            s.add_(torch.einsum("i,i...->...", factor.to(g.dtype), g))
