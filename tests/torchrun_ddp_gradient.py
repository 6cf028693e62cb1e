"""torchrun entry for tests/test_causal_loss.py: one DDP step's gradient on each rank's shard of
the rows (every other row), the loss taken ``chunk`` positions at a time, the base in 4 bits if
``nf4`` follows (tests/test_qlora.py; then the adapter targets q, k, v and o). Each rank writes
its gradients after DDP's all-reduce to ``<out>-<rank>.safetensors``."""

from __future__ import annotations

import sys

from safetensors.torch import load_file, save_file

from agent.data import TokenBlocks
from agent.distributed import init_from_env, shutdown
from agent.trainer import LoraSpec, LoraTrainer


def main(model: str, rows_path: str, start_path: str, out: str, chunk: int, nf4: bool) -> None:
    ctx = init_from_env("cpu")
    targets = ("q_proj", "k_proj", "v_proj", "o_proj") if nf4 else ("q_proj", "v_proj")
    trainer = LoraTrainer(model, LoraSpec(4, 8.0, targets), "cpu", ctx, nf4=nf4)
    assert trainer.ddp is not None
    trainer.set_adapter(load_file(start_path))
    trainer.model.train()
    rows = TokenBlocks(**load_file(rows_path))[ctx.rank :: ctx.world_size]
    trainer.losses.chunk_logits = chunk * len(rows) * trainer.losses.vocabulary
    trainer.ddp(rows.input_ids, rows.labels).backward()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    save_file({str(i): p.grad.clone() for i, p in enumerate(params)}, f"{out}-{ctx.rank}.safetensors")
    shutdown(ctx, clean=True)


if __name__ == "__main__":
    model, rows_path, start_path, out, chunk = sys.argv[1:6]
    main(model, rows_path, start_path, out, int(chunk), sys.argv[6:] == ["nf4"])
