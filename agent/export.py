"""A global version as a standard peft LoRA adapter directory, optionally with merged weights.

The directory loads with ``PeftModel.from_pretrained(base, path)`` and serves with any
runtime that takes peft adapters; ``merged/`` (``--merge``) is a plain transformers
model with the adapter folded into the base weights, and the base's tokenizer.
``cloudfed.json`` says which version it is, where it came from and the sha256 of
every file. Both daemons' ``export`` commands write through here.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from agent.trainer import LoraSpec, adapter_state, build_adapter_model, lora_config
from common.chunks import sha256_file
from common.durable import build_dir_beside, put_in_place, refuse_non_empty
from common.errors import CloudfedError

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""peft's file name for adapter weights (``peft.utils.SAFETENSORS_WEIGHTS_NAME``)."""
PROVENANCE = "cloudfed.json"
MERGED = "merged"
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<half>[AB])\.weight")


class ExportError(CloudfedError):
    """The version cannot be exported as asked; nothing was written."""


def check_adapter(tensors: Mapping[str, torch.Tensor], lora: LoraSpec) -> None:
    """Refuse tensors that are not this LoRA spec's adapter: names, pairs, ranks, finite values."""
    if not tensors:
        raise ExportError("the checkpoint holds no tensors")
    halves: dict[str, set[str]] = {}
    for name, t in tensors.items():
        m = _LORA_KEY.fullmatch(name)
        if m is None:
            raise ExportError(f"{name}: not a LoRA weight (names end in .lora_A.weight or .lora_B.weight)")
        module = m["module"]
        if not any(module == target or module.endswith("." + target) for target in lora.target_modules):
            raise ExportError(f"{name}: not in the federation's target_modules {list(lora.target_modules)}")
        rank = t.shape[0] if m["half"] == "A" else t.shape[-1]
        if t.ndim != 2 or rank != lora.rank:
            raise ExportError(f"{name}: shape {tuple(t.shape)} is not a rank-{lora.rank} LoRA factor")
        if not bool(torch.isfinite(t).all()):
            raise ExportError(f"{name}: holds values that are not finite")
        halves.setdefault(module, set()).add(m["half"])
    unpaired = sorted(module for module, h in halves.items() if h != {"A", "B"})
    if unpaired:
        raise ExportError(f"{unpaired[0]}: has only one of lora_A and lora_B")


def write_export(
    out: Path,
    tensors: Mapping[str, torch.Tensor],
    lora: LoraSpec,
    base_model: str,
    provenance: Mapping[str, Any],
    merge: bool = False,
    force: bool = False,
) -> dict[str, str]:
    """Write the export directory at ``out`` all at once (built beside it, then renamed into place);
    return {file: sha256}. An ``out`` that is not empty is refused unless ``force``."""
    check_adapter(tensors, lora)
    refuse_non_empty(out, force, ExportError)
    tmp = build_dir_beside(out)
    try:
        save_file(
            {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()},
            tmp / ADAPTER_WEIGHTS,
            metadata={"format": "pt"},
        )
        lora_config(lora, base_model).save_pretrained(str(tmp))
        tokenizer = _merge(tmp / MERGED, tensors, lora, base_model) if merge else None
        files = {
            p.relative_to(tmp).as_posix(): sha256_file(p).hexdigest()
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        record = {
            **provenance,
            "base_model": base_model,
            "lora": {
                "rank": lora.rank,
                "alpha": lora.alpha,
                "target_modules": list(lora.target_modules),
                "dropout": lora.dropout,
            },
            "merged": merge,
            "merged_tokenizer": tokenizer,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files,
        }
        (tmp / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
        put_in_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def _merge(dest: Path, tensors: Mapping[str, torch.Tensor], lora: LoraSpec, base_model: str) -> bool:
    """Fold the adapter into the base model (kept in its own dtype) and save it with the base's
    tokenizer; return whether a tokenizer was saved. The adapter as loaded must equal ``tensors``."""
    from peft import set_peft_model_state_dict
    from transformers import AutoTokenizer

    try:
        model = build_adapter_model(base_model, lora, "cpu", dtype="auto")
    except (OSError, ValueError) as exc:
        raise ExportError(f"--merge: cannot load the base model {base_model!r}: {exc}") from None
    try:
        set_peft_model_state_dict(model, dict(tensors))
    except RuntimeError as exc:  # shapes that do not fit the base's layers
        raise ExportError(
            f"--merge: the base model {base_model!r} does not take this adapter: {exc}"
        ) from None
    loaded = adapter_state(model)
    if set(loaded) != set(tensors) or any(not torch.equal(loaded[k], tensors[k].float()) for k in tensors):
        missing = sorted(set(tensors) - set(loaded))[:3]
        raise ExportError(
            f"--merge: the base model {base_model!r} does not take this adapter (e.g. {missing})"
        )
    model.merge_and_unload().save_pretrained(str(dest))
    try:
        AutoTokenizer.from_pretrained(base_model).save_pretrained(str(dest))
    except (OSError, ValueError) as exc:
        log.warning("merged model saved without a tokenizer: %s has none that loads (%s)", base_model, exc)
        return False
    return True
