"""``eigen``: each LoRA factor's update projected onto its layer's calibration eigenspaces. Linear.

In the spirit of EoRA: the directions worth keeping are the ones the layer actually uses. For an
adapted linear layer y = W x, ``lora_A`` (r x in) acts on x, so its rows are projected onto the
top eigenvectors of E[x x^T]; ``lora_B`` (out x r) writes into y, so its columns are projected
onto the top eigenvectors of E[g g^T], g = dL/dy the gradient of the next-token loss at the
layer's output: the directions of y the loss responds to (K-FAC's two Kronecker factors of the
layer's Fisher). The output's own covariance E[y y^T] was measured worse for ``lora_B`` (0.14
nats at 4x in ``bench.quality``): what a layer outputs most is not what the loss needs changed.
Both covariances come from public calibration text through the frozen base model (adapters off),
so every party can compute, or be sent, the same bases. Keeping k = dim / ratio directions per
factor compresses by ``ratio``; the basis is fixed, so what it drops is dropped on purpose (no
error feedback: a fixed subspace would let the residual grow without bound). Other tensors pass
through unchanged.

Bases are stored in float16 by default (``stored_bases``): half the file every agent downloads
and half the memory, the arithmetic still float32; the rounding moves a decoded sum by about 3e-4
of its size on the demo's model, well below what fixed-point masking rounds off.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np
import torch

from common.codecs.base import Codec
from common.errors import ConfigError, InvalidArgument
from common.layout import ParamLayout

NAME = "eigen"
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
BASES_DTYPES: dict[str, type[np.floating[Any]]] = {"float16": np.float16, "float32": np.float32}
"""How bases may be stored (computed in float32 either way)."""
DEFAULT_BASES_DTYPE = "float16"


def _module_of(tensor_name: str) -> str | None:
    for suffix in (A_SUFFIX, B_SUFFIX):
        if tensor_name.endswith(suffix):
            return tensor_name[: -len(suffix)]
    return None


def adapted_layers(model: Any) -> dict[str, Any]:
    """The LoRA-adapted layers of a peft model, in forward order, by the module name the
    adapter's tensors carry (``base_model.model. ...``)."""
    return {
        name if name.startswith("base_model.") else f"base_model.model.{name}": module
        for name, module in model.named_modules()
        if getattr(module, "base_layer", None) is not None and hasattr(module, "lora_A")
    }


def covariance_bytes(layer: Any) -> int:
    """Bytes of one layer's two float64 covariances (input, and loss gradient at the output)."""
    return 8 * (int(layer.in_features) ** 2 + int(layer.out_features) ** 2)


def plan_passes(model: Any, memory_bytes: int) -> list[list[str]]:
    """The adapted layers in groups, in forward order, whose covariances each fit in
    ``memory_bytes`` (a layer larger than that gets a pass of its own): one pass over the
    calibration text per group, so the whole model's covariances are never held at once. One
    layer's products are in flight besides (float32, then float64: 12 max(in, out)^2 bytes), and
    the activations a batch's backward needs from the pass's first layer on."""
    passes: list[list[str]] = []
    held = 0
    for name, layer in adapted_layers(model).items():
        size = covariance_bytes(layer)
        if not passes or held + size > memory_bytes:
            passes.append([])
            held = 0
        passes[-1].append(name)
        held += size
    return passes


def covariance_tensors(
    model: Any, blocks: torch.Tensor, layers: Collection[str] | None = None, batch_size: int = 1
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """E[x x^T] of the input and E[g g^T] of the loss gradient at the output (float64, on the
    model's device) of the base linear map of each adapted layer in ``layers`` (default: all),
    over ``blocks`` ([n, length] token ids, also the labels) run ``batch_size`` at a time with the
    adapters disabled; g is per token (the gradient of the summed loss). Each batch's products are
    taken in float32 and summed in float64 (an input several layers read, once). The backward
    reaches no further than the first layer wanted: the graph starts at its output."""
    found = adapted_layers(model)
    asked = set(found if layers is None else layers)
    if missing := asked - found.keys():
        raise ConfigError(f"no adapted layer {sorted(missing)[0]} in the model")
    wanted = [name for name in found if name in asked]
    if not len(blocks) or not wanted:
        return {}
    device = next(model.parameters()).device
    sums: dict[str, list[Any]] = {}
    last_input: list[Any] = [None, None]  # q, k and v (gate and up) read one input: its product once
    start: list[torch.Tensor] = []  # this batch's zero leaf: the graph's only input

    def accumulate(key: str, at: int, product: torch.Tensor, rows: int) -> None:
        if key not in sums:
            sums[key] = [None, None, 0]
        sums[key][at] = product.clone() if sums[key][at] is None else sums[key][at].add_(product)
        if at == 0:
            sums[key][2] += rows

    def hook(key: str, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        if last_input[0] is not inputs[0]:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            last_input[:] = inputs[0], (x.T @ x).double()
        accumulate(key, 0, last_input[1], output.numel() // output.shape[-1])
        if not start:
            start.append(torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True))
        traced = output + start[0]  # equal values; the backward flows to here and no further

        def gradient(g: torch.Tensor) -> None:
            flat = g.reshape(-1, g.shape[-1]).float()
            accumulate(key, 1, (flat.T @ flat).double(), 0)

        traced.register_hook(gradient)  # type: ignore[no-untyped-call]
        return traced

    hooks = [
        found[name].base_layer.register_forward_hook(lambda _m, i, o, key=name: hook(key, i, o))
        for name in wanted
    ]
    training = model.training
    try:
        with torch.enable_grad(), model.disable_adapter():
            model.eval()
            for at in range(0, len(blocks), batch_size):
                ids = blocks[at : at + batch_size].to(device)
                loss = model(input_ids=ids, labels=ids).loss * (ids.shape[0] * (ids.shape[1] - 1))
                torch.autograd.grad(loss, start)
                last_input[:] = None, None
                start.clear()
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    return {name: (xx / n, gg / n) for name, (xx, gg, n) in sums.items()}


def calibration_covariances(
    model: Any, blocks: torch.Tensor, layers: Collection[str] | None = None, batch_size: int = 1
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``covariance_tensors`` as numpy arrays, keyed by the adapter's module name."""
    return {
        name: (xx.cpu().numpy(), gg.cpu().numpy())
        for name, (xx, gg) in covariance_tensors(model, blocks, layers, batch_size).items()
    }


def top_eigen(covariance: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, float]:
    """The ``k`` leading eigenvectors (columns, float32, signs fixed so every party agrees;
    computed on the device the covariance is on), and the share of the covariance's trace their
    eigenvalues hold: what a projection onto them keeps of the variance (of the input, or of the
    loss gradient)."""
    values, vectors = torch.linalg.eigh(torch.as_tensor(covariance, dtype=torch.float64))
    order = torch.argsort(values, descending=True)[:k]
    top = vectors[:, order]
    pivots = top[top.abs().argmax(dim=0), torch.arange(k, device=top.device)]
    basis: np.ndarray = (top * torch.sign(pivots)).float().cpu().numpy()
    total = float(values.clamp(min=0).sum())
    return basis, float(values[order].clamp(min=0).sum()) / total if total > 0 else 1.0


def eigen_bases(
    layout: ParamLayout,
    covariances: Mapping[str, tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]],
    ratio: float,
    layers: Collection[str] | None = None,
    kept: dict[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Per LoRA tensor of ``layout`` (of the adapted ``layers`` only, if given): its basis (in x k
    for lora_A, out x k for lora_B); into ``kept``, if given, the share of variance each keeps."""
    if not ratio >= 1:
        raise ConfigError(f"eigen ratio must be >= 1, got {ratio}")
    bases = {}
    for entry in layout.entries:
        module = _module_of(entry.name)
        if module is None or (layers is not None and module not in layers):
            continue
        if module not in covariances:
            raise ConfigError(f"no calibration covariances for {module}")
        cov_in, cov_grad = covariances[module]
        cov = cov_in if entry.name.endswith(A_SUFFIX) else cov_grad
        if not bool(torch.isfinite(torch.as_tensor(cov)).all()):
            raise ConfigError(
                f"{entry.name}: its calibration covariance is not finite (the base model's activations"
                " or loss overflowed; try --precision fp32)"
            )
        bases[entry.name], share = top_eigen(cov, max(1, round(cov.shape[0] / ratio)))
        if kept is not None:
            kept[entry.name] = share
    return bases


def calibrated_bases(
    model: Any,
    layout: ParamLayout,
    blocks: torch.Tensor,
    ratio: float,
    memory_bytes: int,
    batch_size: int = 1,
    progress: Callable[[int, int, list[str]], None] | None = None,
    kept: dict[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Every LoRA tensor's basis from calibration ``blocks``, holding at most about
    ``memory_bytes`` of covariances at once (``plan_passes``); ``progress(done, passes, layers)``
    after each pass, ``kept`` as ``eigen_bases``'."""
    passes = plan_passes(model, memory_bytes)
    bases: dict[str, np.ndarray] = {}
    for done, layers in enumerate(passes, 1):
        covariances = covariance_tensors(model, blocks, layers, batch_size)
        bases.update(eigen_bases(layout, covariances, ratio, layers, kept))
        del covariances
        if progress is not None:
            progress(done, len(passes), layers)
    return bases


def bases_dtype(name: str) -> type[np.floating[Any]]:
    """The numpy type bases are stored as under ``name`` (a key of ``BASES_DTYPES``); ConfigError
    for any other."""
    if name not in BASES_DTYPES:
        raise ConfigError(f"bases dtype: expected one of {', '.join(BASES_DTYPES)}, got {name!r}")
    return BASES_DTYPES[name]


def stored_bases(bases: Mapping[str, np.ndarray], dtype: str = DEFAULT_BASES_DTYPE) -> dict[str, np.ndarray]:
    """``bases`` rounded to ``dtype`` (``bases_dtype``), as the operator's tool stores them."""
    kind = bases_dtype(dtype)
    return {name: np.ascontiguousarray(basis, dtype=kind) for name, basis in bases.items()}


def _float32(basis: np.ndarray) -> np.ndarray:
    return basis.astype(np.float32, copy=False)


class Eigen(Codec):
    """lora_A rows -> rows @ Q_in; lora_B columns -> Q_out^T @ columns; decode multiplies back."""

    name = NAME
    linear = True
    biased = False

    def __init__(self, layout: ParamLayout, bases: Mapping[str, np.ndarray]) -> None:
        self.layout = layout
        self.bases = {  # float16 kept as stored (one array for names stored once), the rest float32
            k: np.ascontiguousarray(v, dtype=np.float16 if v.dtype == np.float16 else np.float32)
            for k, v in bases.items()
        }
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
            if not np.isfinite(basis).all():
                raise ConfigError(f"{entry.name}: its basis holds values that are not finite")
            self.sizes.append(entry.numel // acts_on * basis.shape[1])
        self.length = int(sum(self.sizes))

    def digest(self) -> str:
        """sha256 of the bases (their names, values and, if not float32, dtype)."""
        h = hashlib.sha256()
        for name in sorted(self.bases):
            h.update(name.encode())
            if self.bases[name].dtype != np.float32:
                h.update(self.bases[name].dtype.str.encode())
            h.update(self.bases[name].data)
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
                coords = values.reshape(entry.shape) @ _float32(basis)
            else:
                coords = _float32(basis).T @ values.reshape(entry.shape)
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
                values = coords.reshape(entry.shape[0], -1) @ _float32(basis).T
            else:
                values = _float32(basis) @ coords.reshape(-1, entry.shape[1])
            out[entry.offset : entry.offset + entry.numel] = values.reshape(-1)
        return out

    def coordinates(self, numel: int) -> int:
        """Coordinates of all factors, plus the tensors passed through."""
        return self.length

    def payload_bytes(self, numel: int) -> int:
        """float32 coordinates."""
        return 4 * self.length
