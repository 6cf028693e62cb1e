"""``eigen``: each LoRA factor's update projected onto its layer's activation eigenspace. Linear.

In the spirit of EoRA: the directions worth keeping are the ones the layer's activations actually
use. For an adapted linear layer y = W x, ``lora_A`` (r x in) acts on x, so its rows are projected
onto the top eigenvectors of E[x x^T]; ``lora_B`` (out x r) writes into y, so its columns are
projected onto the top eigenvectors of E[y y^T]. Both covariances come from public calibration
text run through the frozen base model (adapters off), so every party can compute, or be sent,
the same bases. Keeping k = dim / ratio directions per factor compresses by ``ratio``; the basis is
fixed, so what it drops is dropped on purpose (no error feedback: a fixed subspace would let the
residual grow without bound). Other tensors pass through unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from common.codecs.base import Codec
from common.errors import ConfigError, InvalidArgument
from common.layout import ParamLayout

NAME = "eigen"
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def _module_of(tensor_name: str) -> str | None:
    for suffix in (A_SUFFIX, B_SUFFIX):
        if tensor_name.endswith(suffix):
            return tensor_name[: -len(suffix)]
    return None


@torch.no_grad()
def activation_covariances(
    model: Any, blocks: Iterable[torch.Tensor]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """E[x x^T] and E[y y^T] (float64) of every LoRA-adapted layer's base linear map, keyed by the
    adapter's module name, over calibration token blocks run with the adapters disabled."""
    sums: dict[str, list[Any]] = {}
    hooks = []
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if base is None or not hasattr(module, "lora_A"):
            continue

        def hook(_mod: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, key: str = name) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            y = output.reshape(-1, output.shape[-1]).double()
            acc = sums.setdefault(key, [0.0, 0.0, 0])
            acc[0] = acc[0] + x.T @ x
            acc[1] = acc[1] + y.T @ y
            acc[2] += x.shape[0]

        hooks.append(base.register_forward_hook(hook))
    try:
        with model.disable_adapter():
            model.eval()
            for block in blocks:
                model(input_ids=block.unsqueeze(0) if block.dim() == 1 else block)
    finally:
        for h in hooks:
            h.remove()
    return {
        f"base_model.model.{name}" if not name.startswith("base_model.") else name: (
            (xx / n).cpu().numpy(),
            (yy / n).cpu().numpy(),
        )
        for name, (xx, yy, n) in sums.items()
    }


def top_eigenvectors(covariance: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` leading eigenvectors (columns, float32), signs fixed so every party agrees."""
    values, vectors = np.linalg.eigh(covariance)
    top = vectors[:, np.argsort(values)[::-1][:k]]
    pivots = top[np.argmax(np.abs(top), axis=0), np.arange(k)]
    basis: np.ndarray = (top * np.sign(pivots)).astype(np.float32)
    return basis


def eigen_bases(
    layout: ParamLayout, covariances: Mapping[str, tuple[np.ndarray, np.ndarray]], ratio: float
) -> dict[str, np.ndarray]:
    """Per LoRA tensor of ``layout``: its basis (in x k for lora_A, out x k for lora_B)."""
    if not ratio >= 1:
        raise ConfigError(f"eigen ratio must be >= 1, got {ratio}")
    bases = {}
    for entry in layout.entries:
        module = _module_of(entry.name)
        if module is None:
            continue
        if module not in covariances:
            raise ConfigError(f"no calibration activations for {module}")
        cov_in, cov_out = covariances[module]
        cov = cov_in if entry.name.endswith(A_SUFFIX) else cov_out
        bases[entry.name] = top_eigenvectors(cov, max(1, round(cov.shape[0] / ratio)))
    return bases


class Eigen(Codec):
    """lora_A rows -> rows @ Q_in; lora_B columns -> Q_out^T @ columns; decode multiplies back."""

    name = NAME
    linear = True
    biased = False

    def __init__(self, layout: ParamLayout, bases: Mapping[str, np.ndarray]) -> None:
        self.layout = layout
        self.bases = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in bases.items()}
        self.sizes = []
        for entry in layout.entries:
            basis = self.bases.get(entry.name)
            if basis is None:
                self.sizes.append(entry.numel)
                continue
            rows, cols = entry.shape
            acts_on = cols if entry.name.endswith(A_SUFFIX) else rows
            if basis.ndim != 2 or basis.shape[0] != acts_on:
                raise ConfigError(f"{entry.name}: basis {basis.shape} does not fit shape {entry.shape}")
            self.sizes.append(entry.numel // acts_on * basis.shape[1])
        self.length = int(sum(self.sizes))

    def digest(self) -> str:
        """sha256 of the bases: uploads and rounds must agree on it."""
        h = hashlib.sha256()
        for name in sorted(self.bases):
            h.update(name.encode())
            h.update(self.bases[name].tobytes())
        return h.hexdigest()

    def encode(self, vector: np.ndarray) -> np.ndarray:
        """Coordinates of every LoRA factor in its basis, other tensors as they are."""
        flat = vector.reshape(-1).astype(np.float32, copy=False)
        if flat.size != self.layout.numel:
            raise InvalidArgument(f"{flat.size} values given; the codec was built for {self.layout.numel}")
        out = np.empty(self.length, dtype=np.float32)
        at = 0
        for entry, size in zip(self.layout.entries, self.sizes, strict=True):
            values = flat[entry.offset : entry.offset + entry.numel]
            basis = self.bases.get(entry.name)
            if basis is None:
                coords = values
            elif entry.name.endswith(A_SUFFIX):
                coords = values.reshape(entry.shape) @ basis
            else:
                coords = basis.T @ values.reshape(entry.shape)
            out[at : at + size] = coords.reshape(-1)
            at += size
        return out

    def decode(self, payload: np.ndarray) -> np.ndarray:
        """Back to parameter space (for a sum of payloads: the sum of decodes)."""
        if payload.size != self.length:
            raise InvalidArgument(f"eigen payload of {payload.size} values, expected {self.length}")
        flat = payload.reshape(-1).astype(np.float32, copy=False)
        out = np.empty(self.layout.numel, dtype=np.float32)
        at = 0
        for entry, size in zip(self.layout.entries, self.sizes, strict=True):
            coords = flat[at : at + size]
            at += size
            basis = self.bases.get(entry.name)
            if basis is None:
                values = coords
            elif entry.name.endswith(A_SUFFIX):
                values = coords.reshape(entry.shape[0], -1) @ basis.T
            else:
                values = basis @ coords.reshape(-1, entry.shape[1])
            out[entry.offset : entry.offset + entry.numel] = values.reshape(-1)
        return out

    def coordinates(self, numel: int) -> int:
        """Coordinates of all factors, plus the tensors passed through."""
        return self.length

    def payload_bytes(self, numel: int) -> int:
        """float32 coordinates."""
        return 4 * self.length
