"""Local LoRA training with transformers + peft: load, set the global adapter, train, evaluate.

The aggregator uses ``initial_adapter`` from here to seed version 0, so both
sides build the adapter the same way and agree on its parameter layout.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from agent.causal_loss import CHUNK_LOGITS, CausalLoss, MeanLoss
from agent.data import TokenBlocks
from agent.distributed import DistContext
from agent.dp_sgd import DpStep, PrivateGradients
from agent.dp_units import PrivacyUnits
from common.config import check_nf4_available
from common.errors import ConfigError, InvalidArgument, TrainingFailed

log = logging.getLogger(__name__)
# bitsandbytes' CPU backend, which peft imports whenever it is installed, looks for an optional
# kernel on the Hugging Face hub and warns at import when the package that fetches it is missing:
# an agent downloads nothing at run time, and bitsandbytes' own CPU path computes the same.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage()
)


@dataclass(frozen=True)
class LoraSpec:
    """The shared adapter's shape (sent by the aggregator in Join)."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    dropout: float = 0.0


@dataclass(frozen=True)
class HeldOutLosses:
    """A version's evaluation over held-out units (records, or users), summed over the ranks."""

    loss: float
    """Mean token loss over every learned token (what stays in the cloud)."""
    tokens: int
    clipped_sum: float
    """Each unit's mean token loss clipped to a bound, summed."""
    units: int
    capped_tokens: int
    """Each unit's learned tokens up to a cap, summed."""


@dataclass(frozen=True)
class LocalTraining:
    """One round of local training (sent by the aggregator in Join)."""

    steps: int
    learning_rate: float
    batch_size: int
    sequence_length: int
    seed: int = 0


def build_adapter_model(
    model_path: str,
    lora: LoraSpec,
    device: str,
    dtype: torch.dtype | str = torch.float32,
    checkpointing: bool = False,
    per_record: bool = False,
    nf4: bool = False,
) -> Any:
    """The base model in ``dtype`` (frozen; "auto": the dtype it was saved in) with the LoRA adapter;
    peft keeps the adapter in float32. ``per_record``: the model will be wrapped for per-record
    gradients (DP-SGD), which changes how activations are checkpointed. ``nf4``: QLoRA, the
    base's linear layers quantized to 4-bit NormalFloat as they load (``nf4_config``) and
    computed in ``dtype``; the embeddings and the LM head stay in ``dtype``."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    quantized: dict[str, Any] = {}
    if nf4:  # quantized on the device it loads to (bitsandbytes' models are not moved after)
        quantized = {"quantization_config": nf4_config(dtype), "device_map": {"": device}}
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **quantized)
    if nf4:
        _keep_4bit_layers_differentiable(base)
    if checkpointing:
        _enable_checkpointing(base, reentrant=per_record)
    # autocast_adapter_dtype: a bf16 base gets float32 LoRA weights (what the optimizer steps).
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model = get_peft_model(base, lora_config(lora), autocast_adapter_dtype=True)
    if checkpointing and per_record:  # a reentrant segment passes gradients only to inputs needing them
        model.enable_input_require_grads()  # (transformers 5 does it too; 4.x only for its own peft)
    return model if nf4 else model.to(device)


def nf4_config(compute_dtype: torch.dtype | str) -> Any:
    """transformers' bitsandbytes settings for QLoRA (Dettmers et al. 2023): 4-bit NormalFloat
    weights in blocks of 64 with double quantization (their scales quantized too: about 4.1 bits
    a weight in all), dequantized to ``compute_dtype`` for each matmul. ConfigError if
    bitsandbytes is not installed."""
    from transformers import BitsAndBytesConfig

    check_nf4_available()
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype if isinstance(compute_dtype, torch.dtype) else torch.float32,
    )


def _keep_4bit_layers_differentiable(model: Any) -> None:
    """bitsandbytes (0.50) repacks a 4-bit layer's weights for a faster CPU kernel at the layer's
    first forward in eval mode, and from then on multiplies through that kernel, which has no
    backward: training after an evaluation would take no gradient through the base's layers
    (autograd only warns). Keep every layer on the path that has one (a CPU's; GPUs never
    repack)."""
    from bitsandbytes.nn.modules import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def lora_config(lora: LoraSpec, base_model: str | None = None) -> Any:
    """peft's ``LoraConfig`` for the shared adapter (also what an export's adapter_config.json holds)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft takes any number: scaling = alpha / r
        target_modules=list(lora.target_modules),
        lora_dropout=lora.dropout,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def _enable_checkpointing(base: Any, reentrant: bool = False) -> None:
    """Activation checkpointing per decoder layer. Non-reentrant by default (gradients reach the
    LoRA weights whatever the inputs). ``reentrant`` for per-record gradients: its forward runs
    without autograd, so opacus' hooks capture each layer's activations only when the backward
    recomputes them, right before that layer's gradients, as without checkpointing. (Under
    non-reentrant checkpointing opacus 1.6 leaves every per-record gradient unset: its hooks see
    the layer's forward twice.)"""
    kwargs = {"use_reentrant": reentrant}
    base.config.use_cache = False  # no KV cache in training; transformers warns if it is on
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's tensors as float32 CPU copies, in peft's order."""
    from peft import get_peft_model_state_dict

    return {
        k: v.detach().to("cpu", torch.float32).clone() for k, v in get_peft_model_state_dict(model).items()
    }


def initial_adapter(model_path: str, lora: LoraSpec, seed: int) -> dict[str, torch.Tensor]:
    """Version 0 of the global adapter: peft's initialisation (B = 0) under a fixed seed."""
    torch.manual_seed(seed)
    return adapter_state(build_adapter_model(model_path, lora, "cpu"))


def pick_device(requested: str = "auto") -> str:
    """'cuda' when available under 'auto'; 'cuda'/'cuda:N' only if torch sees that device."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            cuda = torch.version.cuda
            build = "a CPU-only build" if cuda is None else f"built for CUDA {cuda}"
            raise ConfigError(
                f"device: {requested!r} asked for, but torch {torch.__version__} ({build}) sees no GPU"
            )
        index, count = int(requested.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"device: {requested!r} asked for, but only {count} GPU(s) are visible")
    return requested


def pick_dtype(precision: str, device: str) -> torch.dtype:
    """The base model's dtype (with 'nf4', the dtype its 4-bit weights are computed in): 'auto'
    and 'nf4' are bfloat16 on a GPU that supports it, else float32."""
    if precision == "bf16":
        return torch.bfloat16
    if (
        precision in ("auto", "nf4")
        and device.startswith("cuda")
        and torch.cuda.is_bf16_supported(including_emulation=False)
    ):
        return torch.bfloat16
    return torch.float32


class LoraTrainer:
    """A causal LM with the federation's LoRA adapter, trained locally each round."""

    def __init__(
        self,
        model_path: str,
        lora: LoraSpec,
        device: str = "cpu",
        ctx: DistContext | None = None,
        dtype: torch.dtype = torch.float32,
        checkpointing: bool = False,
        private: bool = False,
        chunk_logits: int = CHUNK_LOGITS,
        nf4: bool = False,
    ) -> None:
        """``private``: train with DP-SGD (``agent.dp_sgd``); the ranks then sum the clipped,
        noised gradients themselves instead of through DDP. ``chunk_logits``: the most logits
        the loss holds at once (``agent.causal_loss``; 0: the model's own forward). ``nf4``:
        QLoRA, the base's linear layers in 4 bits, computed in ``dtype``."""
        from transformers import AutoTokenizer

        self.device = device
        self.dtype = dtype
        self.ctx = ctx or DistContext()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = build_adapter_model(
            model_path, lora, device, dtype, checkpointing, per_record=private, nf4=nf4
        )
        self.losses = CausalLoss(self.model, chunk_logits)
        """The model's losses (in chunks of positions where it allows: ``agent.causal_loss``)."""
        self.ddp: Any = None
        self.private: PrivateGradients | None = None
        if private:
            self.private = PrivateGradients(self.model, self.ctx, self.losses)
        elif self.ctx.enabled:  # every rank trains its shard; DDP all-reduces the LoRA gradients
            from torch.nn.parallel import DistributedDataParallel

            ids = [torch.device(device).index] if device.startswith("cuda") else None
            self.ddp = DistributedDataParallel(MeanLoss(self.losses), device_ids=ids)

    def adapter(self) -> dict[str, torch.Tensor]:
        """Current adapter tensors."""
        return adapter_state(self.model)

    def set_adapter(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load the global adapter; its names and shapes must match exactly."""
        from peft import set_peft_model_state_dict

        mine = self.adapter()
        if set(mine) != set(tensors):
            missing, extra = sorted(set(mine) - set(tensors)), sorted(set(tensors) - set(mine))
            raise InvalidArgument(
                f"global adapter does not match the local model: missing {missing[:3]}, "
                f"unexpected {extra[:3]}"
            )
        for name, t in tensors.items():
            if tuple(t.shape) != tuple(mine[name].shape):
                raise InvalidArgument(f"{name}: shape {tuple(t.shape)} != local {tuple(mine[name].shape)}")
        set_peft_model_state_dict(self.model, {k: v.to(self.device) for k, v in tensors.items()})

    def train(
        self,
        blocks: torch.Tensor | TokenBlocks,
        training: LocalTraining,
        round_id: int,
        dp: DpStep | None = None,
        units: PrivacyUnits | None = None,
    ) -> tuple[dict[str, torch.Tensor], float]:
        """Train ``training.steps`` steps from the current adapter; return (delta, mean train loss).
        ``blocks``: token blocks with their labels, or plain token ids (every token learned); with
        ``dp`` (a trainer made ``private``), one record a row, sampled by ``units`` (default: each
        row its own unit)."""
        blocks = TokenBlocks.of(blocks)
        start = self.adapter()
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=0.0)
        if dp is not None:
            if self.private is None:
                raise ConfigError("DP-SGD asked of a trainer not made private")
            self.model.train()
            units = PrivacyUnits.records(len(blocks)) if units is None else units
            return self._train_private(blocks, units, training, round_id, dp, optimizer, start)
        generator = torch.Generator().manual_seed(
            (training.seed * 1_000_003 + round_id) * 131 + self.ctx.rank
        )
        forward = self.ddp if self.ddp is not None else self.losses.mean
        self.model.train()
        losses = []
        progress = _progress(training.steps, f"round {round_id} local training")
        began = time.monotonic()
        for step in range(training.steps):
            idx = torch.randint(len(blocks), (min(training.batch_size, len(blocks)),), generator=generator)
            batch = blocks[idx].to(self.device)
            loss = forward(batch.input_ids, batch.labels, batch.position_ids())
            diverged = self._ranks_diverged(loss)
            if diverged:
                raise TrainingFailed(
                    f"training diverged at step {step}: the loss is not finite on {diverged} of "
                    f"{self.ctx.world_size} rank(s) (here {loss.item():.6g})"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            progress(step + 1, losses[-1], began)
        end = self.adapter()
        return {k: end[k] - start[k] for k in start}, sum(losses) / len(losses)

    def _train_private(
        self,
        blocks: TokenBlocks,
        units: PrivacyUnits,
        training: LocalTraining,
        round_id: int,
        dp: DpStep,
        optimizer: torch.optim.Optimizer,
        start: dict[str, torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], float]:
        """DP-SGD steps: the optimizer steps on noisy clipped gradients only."""
        assert self.private is not None
        losses = []
        progress = _progress(training.steps, f"round {round_id} local training (DP-SGD)")
        began = time.monotonic()
        for step in range(training.steps):
            optimizer.zero_grad(set_to_none=True)
            loss, count, finite = self.private.step(blocks, dp, training.batch_size, units)
            total, sampled, bad = self.ctx.all_sum([0.0 if count == 0 else loss * count, count, not finite])
            if bad:
                raise TrainingFailed(
                    f"training diverged at step {step}: a loss or gradient is not finite on {round(bad)} "
                    f"of {self.ctx.world_size} rank(s)"
                )
            optimizer.step()
            if sampled:
                losses.append(total / sampled)
            progress(step + 1, losses[-1] if losses else math.nan, began)
        end = self.adapter()
        mean = sum(losses) / len(losses) if losses else math.nan
        return {k: end[k] - start[k] for k in start}, mean

    def _ranks_diverged(self, loss: torch.Tensor) -> int:
        """On how many ranks this step's loss is not finite, decided by all ranks together: a rank
        that stopped alone would leave the others waiting in DDP's gradient all-reduce."""
        return round(self.ctx.all_sum([0.0 if torch.isfinite(loss) else 1.0])[0])

    @torch.no_grad()
    def evaluate(self, blocks: torch.Tensor | TokenBlocks, batch_size: int = 16) -> tuple[float, int]:
        """Mean next-token cross-entropy over the learned tokens of ``blocks`` and their number."""
        blocks = TokenBlocks.of(blocks)
        self.model.eval()
        total, tokens = 0.0, 0
        for i in range(0, len(blocks), batch_size):
            batch = blocks[i : i + batch_size].to(self.device)
            losses, learned = self.losses.rows(batch.input_ids, batch.labels, batch.position_ids())
            total += float(losses.sum())
            tokens += int(learned.sum())
        total, summed = self.ctx.all_sum([total, float(tokens)])
        return total / summed, int(summed)

    @torch.no_grad()
    def evaluate_units(
        self, blocks: TokenBlocks, units: PrivacyUnits, clip: float, token_cap: int, batch_size: int = 16
    ) -> HeldOutLosses:
        """``evaluate`` over the rows of ``units`` (held-out records, or users), and what a
        differentially private release needs: each unit's mean token loss clipped to ``clip``,
        summed, and each unit's learned tokens up to ``token_cap``, summed; over every rank."""
        self.model.eval()
        order = units.order
        sums = torch.zeros(len(order), dtype=torch.float64)
        counts = torch.zeros(len(order), dtype=torch.float64)
        for i in range(0, len(order), batch_size):
            batch = blocks[order[i : i + batch_size]].to(self.device)
            losses, learned = self.losses.rows(batch.input_ids, batch.labels, batch.position_ids())
            sums[i : i + len(losses)] = losses.detach().to("cpu", torch.float64)
            counts[i : i + len(losses)] = learned.to("cpu", torch.float64)
        owner = torch.repeat_interleave(torch.arange(len(units)), units.starts.diff())
        unit_sums = torch.zeros(len(units), dtype=torch.float64).index_add_(0, owner, sums)
        unit_tokens = torch.zeros(len(units), dtype=torch.float64).index_add_(0, owner, counts)
        learns = unit_tokens > 0  # rows with nothing to learn are not stored: every unit learns
        means = unit_sums[learns] / unit_tokens[learns]
        summed = self.ctx.all_sum(
            [
                float(sums.sum()),
                float(counts.sum()),
                float(means.clamp(max=clip).sum()),
                float(learns.sum()),
                float(unit_tokens.clamp(max=token_cap).sum()),
            ]
        )
        total, tokens, clipped, held_out, capped = summed
        loss = total / tokens if tokens else math.nan  # no rank held a unit
        return HeldOutLosses(loss, int(tokens), clipped, round(held_out), round(capped))


def _progress(total: int, label: str) -> Any:
    """A tqdm bar on a terminal, else a log line every ~10% of the steps."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=label, leave=False)

        def update_bar(step: int, loss: float, began: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if step == total:
                bar.close()

        return update_bar
    every = max(1, math.ceil(total / 10))

    def update_log(step: int, loss: float, began: float) -> None:
        if step % every == 0 or step == total:
            log.info("%s: step %d/%d loss %.4f (%.1fs)", label, step, total, loss, time.monotonic() - began)

    return update_log
