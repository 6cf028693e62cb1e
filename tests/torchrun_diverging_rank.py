"""torchrun entry for tests/test_torchrun.py: the real agent CLI, except that on rank 1 the loss of
round 1 is NaN (its frozen embeddings are NaN while it trains that round, as if one GPU's numerics
broke). Only that rank sees a bad loss, so the ranks must decide together to give the round up."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from agent import cli
from agent.trainer import LoraTrainer

POISONED_ROUND = 1


def _poisoned(train: Any) -> Any:
    def poisoned_train(
        self: LoraTrainer, blocks: torch.Tensor, training: Any, round_id: int, *rest: Any
    ) -> Any:
        if round_id != POISONED_ROUND:
            return train(self, blocks, training, round_id, *rest)
        weight = self.model.get_input_embeddings().weight
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.fill_(float("nan"))
        try:
            return train(self, blocks, training, round_id, *rest)
        finally:
            with torch.no_grad():
                weight.copy_(saved)

    return poisoned_train


if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        LoraTrainer.train = _poisoned(LoraTrainer.train)  # type: ignore[method-assign]
    sys.exit(cli.main())
