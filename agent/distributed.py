"""torchrun support: rank 0 talks to the aggregator and drives the other ranks.

Under ``torchrun --nproc_per_node=N``, every rank loads the model and its shard
of the local data; rank 0 broadcasts a small command (init, train, eval, stop)
and all ranks run it together: training is DistributedDataParallel (gloo on
CPU, nccl on GPU), evaluation sums losses over the ranks.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from common.errors import ConfigError

log = logging.getLogger(__name__)
IDLE_TIMEOUT = dt.timedelta(hours=24)
LEAVE_TIMEOUT = dt.timedelta(seconds=30)
"""How long a rank leaving cleanly waits for the others before the process group goes."""
"""Ranks > 0 wait in a broadcast while rank 0 waits for rounds; that can take hours."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job (world size 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one rank."""
        return self.world_size > 1

    @property
    def is_leader(self) -> bool:
        """Rank 0: the one that talks to the aggregator."""
        return self.rank == 0

    def device(self, requested: str) -> str:
        """The device of this rank: cuda:<local_rank> on GPU jobs."""
        if requested.startswith("cuda") and self.enabled:
            return f"cuda:{self.local_rank}"
        return requested

    def broadcast(self, command: dict[str, Any] | None = None) -> dict[str, Any]:
        """Rank 0 sends ``command``; every rank returns it."""
        if not self.enabled:
            assert command is not None
            return command
        box = [command]
        dist.broadcast_object_list(box, src=0)
        assert box[0] is not None
        return box[0]

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return [float(v) for v in t.cpu()]


def init_from_env(device: str) -> DistContext:
    """Join the torchrun process group if WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"torchrun started local rank {local_rank}, but only {torch.cuda.device_count()} GPU(s) "
                "are visible: --nproc_per_node must be at most the GPUs on the node"
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=IDLE_TIMEOUT)
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank)
    log.info("rank %d of %d (%s)", ctx.rank, ctx.world_size, backend)
    return ctx


def shutdown(ctx: DistContext, clean: bool = False) -> None:
    """Leave the process group. ``clean``: this rank finished normally (rank 0 released the
    others), so all ranks first meet in a barrier: one rank tearing its connections down while
    another still finishes its last collective made that one abort (std::terminate) at exit."""
    if not (ctx.enabled and dist.is_initialized()):
        return
    if clean:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=LEAVE_TIMEOUT)
            else:
                dist.barrier()
        except RuntimeError as exc:  # another rank left uncleanly: leave anyway
            log.warning("rank %d: ranks did not all leave together: %s", ctx.rank, exc)
    dist.destroy_process_group()
