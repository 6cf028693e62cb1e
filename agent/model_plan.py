"""What a base model's weights will take on the agent's device, from its config alone (the model is
built on the meta device: nothing is loaded), for ``cloudfed-agent check``.

NF4 (``precision = "nf4"``) quantizes every linear layer but the LM head to 4-bit codes in blocks
of 64, each block's absmax in 8 bits with a float32 scale per 256 blocks (double quantization):
``NF4_BITS`` a weight, and each layer keeps two small code books (``CODE_BOOK_BYTES``). The rest
(embeddings, norms, head) stays in the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
"""Bits a quantized weight takes with its share of the scales."""
CODE_BOOK_BYTES = (16 + 256) * 4
"""A quantized layer's NF4 code book and its absmax code book, float32."""
DENSE = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""The unquantized precisions by name."""
ADAPTER_BYTES_A_PARAMETER = 16
"""A float32 LoRA weight, its gradient and AdamW's two moments."""


@dataclass(frozen=True)
class WeightPlan:
    """A base model's parameters, split by what NF4 quantizes."""

    quantizable: int
    """Parameters of the linear layers NF4 quantizes (every one but the LM head)."""
    other: int
    """Everything else: embeddings, norms, the head (a head tied to the embeddings once)."""
    layers: int = 0
    """Linear layers NF4 quantizes."""

    @property
    def parameters(self) -> int:
        return self.quantizable + self.other

    def weight_bytes(self, precision: str, compute_dtype: torch.dtype) -> int:
        """Bytes of the base's weights loaded at ``precision`` ('fp32', 'bf16' or 'nf4'; 'auto'
        resolved to one of the first two: ``compute_dtype``)."""
        dense = torch.finfo(compute_dtype).bits // 8
        if precision == "nf4":
            codes = round(self.quantizable * NF4_BITS / 8) + self.layers * CODE_BOOK_BYTES
            return codes + self.other * dense
        return self.parameters * dense


def weight_plan(model: str) -> WeightPlan:
    """Count ``model``'s parameters (a local directory or a hub id in the cache: nothing is
    downloaded) from its config, building it on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model, local_files_only=True)
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    head = built.get_output_embeddings()
    quantizable = other = layers = 0
    counted: set[int] = set()
    for module in built.modules():
        linear = isinstance(module, torch.nn.Linear) and module is not head
        layers += linear
        for p in module.parameters(recurse=False):
            if id(p) in counted:  # a head tied to the embeddings is one tensor
                continue
            counted.add(id(p))
            if linear and p is module.weight:
                quantizable += p.numel()
            else:
                other += p.numel()  # biases stay in the compute dtype too
    return WeightPlan(quantizable, other, layers)


def describe(model: str, precision: str, compute_dtype: torch.dtype, device: str, adapter: int) -> str:
    """One line for ``check``: the weights at this precision (and at the others), the adapter's
    training state, and the device's free memory, with a warning when the weights alone do not
    fit in it."""
    plan = weight_plan(model)
    mine = plan.weight_bytes(precision, compute_dtype)
    named = "nf4" if precision == "nf4" else next(p for p, t in DENSE.items() if t == compute_dtype)
    others = ", ".join(
        f"{p}: {_gb(plan.weight_bytes(p, DENSE.get(p, torch.bfloat16)))}"  # nf4 computed in bf16 on a GPU
        for p in ("fp32", "bf16", "nf4")
        if p != named
    )
    trained = adapter * ADAPTER_BYTES_A_PARAMETER
    line = (
        f"{Path(model).name or model}: {_count(plan.parameters)} parameters; base weights"
        f" {_gb(mine)} in {named} on {device} ({others}); the adapter trains with {_gb(trained)}"
        " (weights, gradients, AdamW)"
    )
    free = free_bytes(device)
    if free is None:
        return line
    line += f"; {_gb(free)} free"
    if mine + trained > free:
        line += f"\n                WARNING: the weights alone do not fit in the {_gb(free)} free on {device}"
        if precision != "nf4":
            line += f" (nf4 would take {_gb(plan.weight_bytes('nf4', compute_dtype))})"
    return line


def free_bytes(device: str) -> int | None:
    """Free memory of a CUDA device, or the memory Linux says is available for a CPU (None if
    neither is known)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _count(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def _gb(size: float) -> str:
    return f"{size / 1e9:.3g} GB" if size >= 1e8 else f"{size / 1e6:.3g} MB"
