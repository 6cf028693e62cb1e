"""Make the ``eigen`` codec's bases: ``python -m agent.eigen_bases --config aggregator.toml
--calibration public.txt --ratio 8 --out bases.safetensors``.

Runs public calibration text through the frozen base model with the federation's LoRA layout,
collects each adapted layer's activation covariances and writes the top eigenvectors per LoRA
tensor. The operator points ``federation.codec_state`` at the file; the aggregator serves it to
the agents by digest. Nothing private goes in: only text every party may see.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.numpy import save_file

from agent.data import load_texts, pack
from agent.trainer import LoraSpec, LoraTrainer
from common.codecs.eigen import Eigen, activation_covariances, eigen_bases
from common.config import AggregatorConfig, load
from common.layout import ParamLayout


def make_bases(
    config: AggregatorConfig, model: str, calibration: Path, ratio: float, sequence_length: int, out: Path
) -> Eigen:
    """Compute and save the bases; return the codec they make (checked against the layout)."""
    f = config.federation
    trainer = LoraTrainer(model, LoraSpec(f.lora_rank, f.lora_alpha, f.target_modules, f.lora_dropout))
    blocks = pack(trainer.tokenizer, load_texts(calibration), sequence_length)
    layout = ParamLayout.from_tensors(trainer.adapter())
    bases = eigen_bases(layout, activation_covariances(trainer.model, blocks), ratio)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(bases, str(out), metadata={"ratio": str(ratio), "model": model, "blocks": str(len(blocks))})
    return Eigen(layout, bases)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="the aggregator's config (LoRA settings)")
    p.add_argument("--calibration", type=Path, required=True, help="public .txt/.jsonl file or directory")
    p.add_argument("--ratio", type=float, default=8.0, help="directions kept: dim / ratio per factor")
    p.add_argument("--model", help="base model path (default: federation.model_id)")
    p.add_argument("--sequence-length", type=int, default=128)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    config = load(AggregatorConfig, args.config)
    codec = make_bases(
        config,
        args.model or config.federation.model_id,
        args.calibration,
        args.ratio,
        args.sequence_length,
        args.out,
    )
    numel = codec.layout.numel
    print(
        f"wrote {args.out}: {len(codec.bases)} bases; updates {codec.ratio(numel):.1f}x smaller than float32"
    )


if __name__ == "__main__":
    main()
