"""Make the ``eigen`` codec's bases: ``python -m agent.eigen_bases --config aggregator.toml
--calibration public.txt --ratio 8 --out bases.safetensors``.

Runs public calibration text through the frozen base model with the federation's LoRA layout,
collects each adapted layer's covariances (of its input, and of the loss gradient at its
output) and writes the top eigenvectors per LoRA tensor (float16 unless ``--dtype float32``;
the bases of layers that read one input, e.g. q, k and v's lora_A, once). The operator points
``federation.codec_state`` at the file; the aggregator serves it to the agents by digest.
Nothing private goes in: only text every party may see.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

from agent.data import load_texts, pack
from agent.trainer import LoraSpec, LoraTrainer, pick_device, pick_dtype
from common.codecs.eigen import (
    A_SUFFIX,
    B_SUFFIX,
    BASES_DTYPES,
    DEFAULT_BASES_DTYPE,
    Eigen,
    bases_dtype,
    calibrated_bases,
    stored_bases,
)
from common.codecs.state import save_state
from common.config import PRECISIONS, AggregatorConfig, load
from common.errors import ConfigError
from common.layout import ParamLayout

log = logging.getLogger("cloudfed.eigen_bases")
GIB = 1 << 30


def make_bases(
    config: AggregatorConfig,
    model: str,
    calibration: Path,
    ratio: float,
    sequence_length: int,
    out: Path,
    device: str = "cpu",
    precision: str = "fp32",
    memory_bytes: int = 8 * GIB,
    batch_size: int = 8,
    dtype: str = DEFAULT_BASES_DTYPE,
) -> Eigen:
    """Compute and save the bases (as ``dtype``); return the codec they make (checked against the
    layout). The base model loads on ``device`` at ``precision`` (as an agent's does: 'auto',
    'fp32', 'bf16' or 'nf4'); the layers' covariances are taken in passes that each hold at most
    about ``memory_bytes`` of them, ``batch_size`` blocks at a time."""
    bases_dtype(dtype)  # refused before the model loads
    if precision not in PRECISIONS:  # (without bitsandbytes, 'nf4' is refused as the model loads)
        raise ConfigError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = pick_device(device)
    f = config.federation
    trainer = LoraTrainer(
        model,
        LoraSpec(f.lora_rank, f.lora_alpha, f.target_modules, f.lora_dropout),
        device,
        dtype=pick_dtype(precision, device),
        nf4=precision == "nf4",
    )
    blocks = pack(trainer.tokenizer, load_texts(calibration), sequence_length)
    layout = ParamLayout.from_tensors(trainer.adapter())
    started = time.monotonic()

    def progress(done: int, passes: int, layers: list[str]) -> None:
        log.info(
            "pass %d/%d: %s up to %s (%.0f s)",
            done,
            passes,
            "1 layer" if len(layers) == 1 else f"{len(layers)} layers",
            layers[-1].removeprefix("base_model.model."),
            time.monotonic() - started,
        )

    kept: dict[str, float] = {}
    bases = stored_bases(
        calibrated_bases(trainer.model, layout, blocks, ratio, memory_bytes, batch_size, progress, kept),
        dtype,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"ratio": str(ratio), "model": model, "blocks": str(len(blocks)), "dtype": dtype}
    metadata["kept"] = kept_summary(kept)
    repeats = save_state(out, bases, metadata)
    log.info("%d of %d bases stored once for layers that read the same input", repeats, len(bases))
    log.info("the bases keep %s", metadata["kept"])
    return Eigen(layout, bases)


def kept_summary(kept: dict[str, float]) -> str:
    """What the bases keep of their covariances' variance, per factor: the median and the least."""
    parts = []
    for suffix, of in ((A_SUFFIX, "the input's"), (B_SUFFIX, "the loss gradient's")):
        shares = {name: share for name, share in kept.items() if name.endswith(suffix)}
        if shares:
            least = min(shares, key=shares.__getitem__)
            where = least.removeprefix("base_model.model.").removesuffix(".weight")
            parts.append(
                f"{statistics.median(shares.values()):.0%} of {of} variance in {suffix.split('.')[1]}"
                f" (median; least {shares[least]:.0%}, {where})"
            )
    return "; ".join(parts) or "nothing (no LoRA tensor)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="the aggregator's config (LoRA settings)")
    p.add_argument("--calibration", type=Path, required=True, help="public .txt/.jsonl file or directory")
    p.add_argument("--ratio", type=float, default=8.0, help="directions kept: dim / ratio per factor")
    p.add_argument("--model", help="base model path (default: federation.model_id)")
    p.add_argument("--sequence-length", type=int, default=128)
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:N' or 'auto' (default: cpu)")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="the base's, as an agent's (default: fp32)",
    )
    p.add_argument(
        "--memory-gb",
        type=float,
        default=8.0,
        help="covariances held at once; more takes fewer passes over the text (default: 8)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="calibration blocks a forward (default: 8)")
    p.add_argument(
        "--dtype",
        default=DEFAULT_BASES_DTYPE,
        choices=BASES_DTYPES,
        help=f"how the bases are stored (default: {DEFAULT_BASES_DTYPE}, half float32's size)",
    )
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if not args.memory_gb > 0 or args.batch_size < 1:
            raise ConfigError("--memory-gb must be > 0 and --batch-size >= 1")
        config = load(AggregatorConfig, args.config)
        codec = make_bases(
            config,
            args.model or config.federation.model_id,
            args.calibration,
            args.ratio,
            args.sequence_length,
            args.out,
            args.device,
            args.precision,
            int(args.memory_gb * GIB),
            args.batch_size,
            args.dtype,
        )
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    numel = codec.layout.numel
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB): {len(codec.bases)} bases; "
        f"updates {codec.ratio(numel):.1f}x smaller than float32"
    )


if __name__ == "__main__":
    main()
