"""torchrun entry for tests/test_dp.py: DP-SGD's private gradient taken by each rank on its shard of
the records, with no noise and every record sampled, then the noise alone (no record sampled).
Each rank writes what it set as the gradients to ``<out>-<rank>.safetensors``."""

from __future__ import annotations

import sys

from safetensors.torch import load_file, save_file

from agent.data import TokenBlocks
from agent.distributed import init_from_env, shutdown
from agent.dp_sgd import DpStep
from agent.trainer import LoraSpec, LoraTrainer


def main(model: str, rows_path: str, start_path: str, out: str, clip: float, expected: float) -> None:
    ctx = init_from_env("cpu")
    lora = LoraSpec(4, 8.0, ("q_proj", "v_proj"))
    trainer = LoraTrainer(model, lora, "cpu", ctx, private=True)
    assert trainer.private is not None and trainer.ddp is None  # the ranks add gradients themselves
    trainer.set_adapter(load_file(start_path))
    trainer.model.train()
    rows = TokenBlocks(**load_file(rows_path))[ctx.rank :: ctx.world_size]
    got = {}
    for name, dp in (
        ("exact", DpStep(0.0, clip, 1.0, expected)),
        ("noise", DpStep(2.0, clip, 0.0, expected)),
    ):
        trainer.private.step(rows, dp, micro_batch=4)
        got.update({f"{name}.{i}": p.grad.clone() for i, p in enumerate(trainer.private.params)})  # type: ignore[union-attr]
    save_file(got, f"{out}-{ctx.rank}.safetensors")
    shutdown(ctx, clean=True)


if __name__ == "__main__":
    model, rows_path, start_path, out, clip, expected = sys.argv[1:7]
    main(model, rows_path, start_path, out, float(clip), float(expected))
