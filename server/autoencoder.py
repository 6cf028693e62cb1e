"""The CG-FedLLM schedule at the aggregator: full warm-up rounds, TGAP, encoded rounds, FAF refreshes.

Rounds run full (identity) until ``warmup`` mean updates are collected; TGAP then pre-trains the
block autoencoder on that window, and later rounds are encoded with it. After ``refresh - 1``
encoded rounds one round is full again, and FAF fine-tunes the same network on the window with
that round's mean added. The aggregator only ever sees round means (under secure aggregation it
could not see more), and every full round counts in the uplink like any other.

Each trained network is saved as a codec state (safetensors, named by sha256) that agents download.
Snapshots, the current state and the count of encoded rounds are kept under ``root`` and survive a
restart.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from common.codecs.autoencoder import (
    Autoencoder,
    BlockAutoencoder,
    load_autoencoder,
    save_autoencoder,
    train_autoencoder,
)
from common.codecs.registry import CodecSettings
from common.codecs.state import CodecState

log = logging.getLogger(__name__)

IDENTITY = CodecSettings("identity")


@dataclass(frozen=True)
class AutoencoderPlan:
    """Shape of the network and the schedule (from the federation config)."""

    ratio: float
    block: int = 64
    hidden: int = 128
    linear: bool = True
    warmup: int = 2
    refresh: int = 3
    window: int = 8
    tgap_steps: int = 400
    faf_steps: int = 150
    seed: int = 0


class AutoencoderSchedule:
    """Which codec the next round uses, and learning from the full rounds' mean updates."""

    def __init__(self, plan: AutoencoderPlan, numel: int, root: Path) -> None:
        self.plan, self.numel, self.root = plan, numel, root
        (root / "snapshots").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._states: dict[str, CodecState] = {}
        self.codec: Autoencoder | None = None
        self.encoded_since = 0
        progress = root / "progress.json"
        if progress.exists():  # a restart: the network and the count come back
            saved = json.loads(progress.read_text())
            self.encoded_since = int(saved["encoded_since"])
            if saved.get("state"):
                self._adopt(CodecState.of(root / saved["state"]))

    def settings(self, base: CodecSettings) -> CodecSettings:
        """The next round's codec: identity while warming up or when a refresh is due."""
        with self._lock:
            refresh_due = self.plan.refresh > 0 and self.encoded_since >= self.plan.refresh - 1
            if self.codec is None or refresh_due:
                return IDENTITY
            return replace(base, state_sha256=self.codec_digest)

    @property
    def codec_digest(self) -> str:
        """sha256 of the current network's file ('' before TGAP)."""
        return next(reversed(self._states)) if self._states else ""

    def state(self, sha256: str) -> CodecState | None:
        """A network file agents may still ask for, by digest."""
        with self._lock:
            return self._states.get(sha256)

    def observe(self, settings: CodecSettings, updates: Sequence[np.ndarray]) -> None:
        """After a committed round: count an encoded round, or learn from a full round's updates (the
        daemon: the round mean; a trusted setting could pass each agent's update)."""
        if settings.name != "identity":
            with self._lock:
                self.encoded_since += 1
                self._save_progress()
            return
        for update in updates:
            snapshots = self._add_snapshot(update)
        if self.codec is None and len(snapshots) < self.plan.warmup * len(updates):
            return
        model = (
            BlockAutoencoder(self.plan.block, self._code(), self.plan.hidden, self.plan.linear)
            if self.codec is None
            else load_autoencoder(self._state_path(self.codec_digest))  # FAF continues the same network
        )
        torch.manual_seed(self.plan.seed + len(snapshots))
        steps = self.plan.faf_steps if self.codec is not None else self.plan.tgap_steps
        error = train_autoencoder(model, [np.load(s) for s in snapshots], steps, self.plan.seed)
        if not math.isfinite(error):  # never hand agents a broken network: keep the previous one
            log.error("autoencoder training diverged (error %s); %s", error, self._fallback())
            with self._lock:
                self.encoded_since = 0
                self._save_progress()
            return
        tmp = self.root / "autoencoder.safetensors"
        save_autoencoder(model, tmp)
        state = CodecState.of(tmp)
        os.replace(tmp, self._state_path(state.sha256))
        with self._lock:
            self._adopt(CodecState.of(self._state_path(state.sha256)))
            self.encoded_since = 0
            self._save_progress()
        log.info(
            "autoencoder %s on %d snapshots: relative reconstruction error %.3f (state %s)",
            "fine-tuned (FAF)" if steps == self.plan.faf_steps else "pre-trained (TGAP)",
            len(snapshots),
            error,
            state.sha256[:16],
        )

    def _fallback(self) -> str:
        return "rounds stay full" if self.codec is None else "encoding goes on with the previous network"

    def _code(self) -> int:
        return max(1, round(self.plan.block / self.plan.ratio))

    def _state_path(self, sha256: str) -> Path:
        return self.root / f"autoencoder-{sha256}.safetensors"

    def _adopt(self, state: CodecState) -> None:
        self._states[state.sha256] = state
        while len(self._states) > 2:  # agents still encoding with the previous network may fetch it
            del self._states[next(iter(self._states))]
        self.codec = Autoencoder(self.numel, load_autoencoder(state.path))

    def _add_snapshot(self, mean: np.ndarray) -> list[Path]:
        folder = self.root / "snapshots"
        existing = sorted(folder.glob("*.npy"))
        index = int(existing[-1].stem) + 1 if existing else 0
        tmp = folder / f"{index:08d}.tmp.npy"
        np.save(tmp, mean.astype(np.float32))
        os.replace(tmp, folder / f"{index:08d}.npy")
        kept = sorted(folder.glob("[0-9]*.npy"))
        for old in kept[: -self.plan.window]:
            old.unlink()
        return kept[-self.plan.window :]

    def _save_progress(self) -> None:
        state = self._state_path(self.codec_digest).name if self.codec_digest else ""
        tmp = self.root / "progress.json.tmp"
        tmp.write_text(json.dumps({"encoded_since": self.encoded_since, "state": state}))
        os.replace(tmp, self.root / "progress.json")
