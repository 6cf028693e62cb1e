"""``autoencoder``: a learned update compressor in the CG-FedLLM design (encoder at the agent,
decoder at the aggregator).

The update is cut into blocks of ``block`` values; each block is scaled by the update's RMS ``s``
(a scalar only the agent knows) and encoded to ``block / ratio`` numbers: code = s * E(x / s).

- Linear decoder (``linear=True``): D is one matrix, so D(sum of codes) = sum of s_i D(E(x_i / s_i)):
  sums decode, and the codec runs under secure aggregation. The encoder may stay nonlinear.
- Nonlinear decoder: an MLP, decoded per agent, so a trusted aggregator only; the payload carries
  ``s`` and D sees the unscaled code.

Training (``train_autoencoder``): TGAP pre-trains on a temporal window of update snapshots the
aggregator collected in warm-up rounds (full updates, or under secure aggregation their sums);
FAF fine-tunes the same network on the snapshots of later refresh rounds. The aggregator ships the
encoder's weights to the agents with the round; both ends agree on them by digest.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from common.codecs.base import Codec
from common.errors import ConfigError, InvalidArgument

NAME = "autoencoder"


class BlockAutoencoder(nn.Module):
    """Encoder block -> hidden -> code (GELU); decoder linear (code -> block) or an MLP."""

    def __init__(self, block: int, code: int, hidden: int, linear_decoder: bool) -> None:
        super().__init__()
        self.block, self.code, self.hidden, self.linear_decoder = block, code, hidden, linear_decoder
        self.encoder = nn.Sequential(nn.Linear(block, hidden), nn.GELU(), nn.Linear(hidden, code))
        self.decoder: nn.Module = (
            nn.Linear(code, block, bias=False)
            if linear_decoder
            else nn.Sequential(nn.Linear(code, hidden), nn.GELU(), nn.Linear(hidden, block))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.decoder(self.encoder(x))
        return out


def save_autoencoder(model: BlockAutoencoder, path: Path) -> None:
    """Weights and shape in one safetensors file (the codec state agents download), atomically."""
    meta = {
        "block": model.block,
        "code": model.code,
        "hidden": model.hidden,
        "linear": int(model.linear_decoder),
    }
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    os.replace(tmp, path)


def load_autoencoder(path: Path) -> BlockAutoencoder:
    """The network saved by ``save_autoencoder``; ConfigError if the file is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        model = BlockAutoencoder(
            int(meta["block"]), int(meta["code"]), int(meta["hidden"]), meta["linear"] == "1"
        )
        model.load_state_dict(tensors)
    except (KeyError, ValueError, RuntimeError, OSError) as exc:
        raise ConfigError(f"{path} is not a saved autoencoder: {exc}") from exc
    model.eval()
    return model


def _blocks(vector: np.ndarray, block: int) -> np.ndarray:
    flat = vector.reshape(-1).astype(np.float32, copy=False)
    padded = np.zeros(-(-flat.size // block) * block, dtype=np.float32)
    padded[: flat.size] = flat
    return padded.reshape(-1, block)


def _rms(vector: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(vector, dtype=np.float64)))) or 1.0


TRAINING_ROWS = 1 << 15
"""Blocks drawn from each snapshot for training: memory stays bounded whatever the model's size
(TGAP and FAF take 400 and 150 steps of 256 blocks)."""
_CHUNK = 1 << 20


def _training_rows(snapshot: np.ndarray, block: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """RMS-normalised blocks of ``snapshot`` (all of them, or ``cap`` drawn at random); reads a
    memory-mapped snapshot chunk by chunk and only the drawn blocks."""
    flat = snapshot.reshape(-1)
    squares = sum(
        float(np.square(flat[i : i + _CHUNK], dtype=np.float64).sum()) for i in range(0, flat.size, _CHUNK)
    )
    rms = float(np.sqrt(squares / max(flat.size, 1))) or 1.0
    rows = -(-flat.size // block)
    if rows <= cap:
        return _blocks(np.asarray(flat, dtype=np.float32) / np.float32(rms), block)
    picked = np.sort(rng.choice(rows, cap, replace=False))
    index = picked[:, None] * block + np.arange(block)
    inside = index < flat.size
    out = np.zeros((cap, block), dtype=np.float32)
    out[inside] = flat[index[inside]]
    out /= np.float32(rms)
    return out


def train_autoencoder(
    model: BlockAutoencoder, snapshots: Sequence[np.ndarray], steps: int, seed: int, lr: float = 3e-3
) -> float:
    """Fit ``model`` to reconstruct the blocks of RMS-normalised ``snapshots`` (TGAP when it starts
    from scratch, FAF when it continues a trained model); returns the final relative error on the
    blocks it trained on. Snapshots may be memory-mapped: at most TRAINING_ROWS blocks of each
    are read."""
    if not snapshots:
        raise ConfigError("the autoencoder needs at least one update snapshot to train on")
    draw = np.random.default_rng(seed)
    data = torch.from_numpy(
        np.concatenate([_training_rows(s, model.block, TRAINING_ROWS, draw) for s in snapshots])
    )
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    batch = min(256, data.shape[0])
    for _ in range(steps):
        rows = data[torch.randint(0, data.shape[0], (batch,), generator=generator)]
        loss = torch.mean((model(rows) - rows) ** 2)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return float(torch.sum((model(data) - data) ** 2) / torch.sum(data**2))


class Autoencoder(Codec):
    """The codec around a trained BlockAutoencoder (its weights frozen for the round)."""

    name = NAME
    biased = False  # its outputs span a fixed set: error feedback would grow without bound outside it

    def __init__(self, numel: int, model: BlockAutoencoder) -> None:
        self.numel, self.model = numel, model
        self.linear = model.linear_decoder
        self.blocks = -(-numel // model.block)
        self.length = self.blocks * model.code + (0 if self.linear else 1)

    def digest(self) -> str:
        """sha256 of the weights: agents and aggregator must hold the same network."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().numpy().tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def encode(self, vector: np.ndarray) -> np.ndarray:
        """s * E(x / s) per block; the nonlinear variant appends s."""
        if vector.size != self.numel:
            raise InvalidArgument(f"{vector.size} values given; the codec was built for {self.numel}")
        scale = _rms(vector)
        codes = self.model.encoder(torch.from_numpy(_blocks(vector / scale, self.model.block))).numpy()
        out: np.ndarray = codes.reshape(-1).astype(np.float32)
        if self.linear:
            return out * np.float32(scale)
        return np.concatenate([out, np.array([scale], np.float32)])

    @torch.no_grad()
    def decode(self, payload: np.ndarray) -> np.ndarray:
        """D(codes) (linear: also of a sum of codes), times s for the nonlinear variant."""
        if payload.size != self.length:
            raise InvalidArgument(f"autoencoder payload of {payload.size} values, expected {self.length}")
        flat = payload.reshape(-1).astype(np.float32)
        scale = 1.0 if self.linear else float(flat[-1])
        codes = torch.from_numpy(np.ascontiguousarray(flat[: self.blocks * self.model.code]))
        decoded = self.model.decoder(codes.reshape(self.blocks, self.model.code)).numpy().reshape(-1)
        out: np.ndarray = (decoded[: self.numel] * np.float32(scale)).astype(np.float32)
        return out

    def coordinates(self, numel: int) -> int:
        """Codes of every block (and the scale, nonlinear variant)."""
        return self.length

    def payload_bytes(self, numel: int) -> int:
        """float32 codes (and the scale)."""
        return 4 * self.length
