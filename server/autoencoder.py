"""The CG-FedLLM schedule at the aggregator: full warm-up rounds, TGAP, encoded rounds, FAF refreshes.

Rounds run full (identity) until ``warmup`` full rounds are collected; TGAP then pre-trains the
block autoencoder on that window, and later rounds are encoded with it. After ``refresh - 1``
encoded rounds one round is full again, and FAF fine-tunes the same network on the window with
that round added. A trusted aggregator stages each agent's update of a full round (``stage``), as
CG-FedLLM collects update snapshots; under secure aggregation it sees only the round mean, and
learns from that. The window holds the newest ``window`` full rounds; training reads at most
``TRAINING_ROWS`` blocks of each snapshot, so memory stays bounded. Every full round counts in the
uplink like any other.

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
_CHUNK = 1 << 20

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

    def stage(self, update: np.ndarray, scale: float = 1.0) -> None:
        """Keep one agent's update (``update * scale``; it may be memory-mapped: copied chunk by
        chunk) of the running full round; it becomes a snapshot if the round commits (``observe``)
        and is dropped otherwise. A trusted aggregator decodes each agent's update."""
        folder = self.root / "staged"
        folder.mkdir(exist_ok=True)
        with self._lock:
            index = len(_saved(folder))
            tmp = folder / f"{index:04d}.tmp.npy"
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(update.size,))
            flat = update.reshape(-1)
            for start in range(0, flat.size, _CHUNK):
                out[start : start + _CHUNK] = flat[start : start + _CHUNK] * np.float32(scale)
            out.flush()
            del out
            os.replace(tmp, folder / f"{index:04d}.npy")

    def discard_staged(self) -> None:
        """Forget staged updates (a new round starts; the last one did not commit)."""
        for path in (self.root / "staged").glob("*.npy"):
            path.unlink()

    def observe(self, settings: CodecSettings, updates: Sequence[np.ndarray]) -> None:
        """After a committed round: count an encoded round, or learn from a full round, on each
        agent's staged update when there are any (trusted aggregator), else on ``updates`` (the
        round mean under secure aggregation; the benchmark may pass each agent's update)."""
        if settings.name != "identity":
            self.discard_staged()
            with self._lock:
                self.encoded_since += 1
                self._save_progress()
            return
        staged = _saved(self.root / "staged")
        snapshots = self._add_round(staged or updates)
        if not snapshots or (
            self.codec is None and len({_round_of(p) for p in snapshots}) < self.plan.warmup
        ):
            return
        model = (
            BlockAutoencoder(self.plan.block, self._code(), self.plan.hidden, self.plan.linear)
            if self.codec is None
            else load_autoencoder(self._state_path(self.codec_digest))  # FAF continues the same network
        )
        torch.manual_seed(self.plan.seed + len(snapshots))
        steps = self.plan.faf_steps if self.codec is not None else self.plan.tgap_steps
        data = [np.load(s, mmap_mode="r") for s in snapshots]  # read block by block, not whole
        error = train_autoencoder(model, data, steps, self.plan.seed)
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

    def _add_round(self, updates: Sequence[np.ndarray] | Sequence[Path]) -> list[Path]:
        """Save one full round's updates as snapshots ``<round>-<n>.npy`` (staged files are moved);
        keep the newest ``window`` rounds (at least ``warmup``); return the kept snapshots."""
        folder = self.root / "snapshots"
        rounds = sorted({_round_of(p) for p in _saved(folder)})
        index = rounds[-1] + 1 if rounds else 0
        for n, update in enumerate(updates):
            target = folder / f"{index:08d}-{n:03d}.npy"
            if isinstance(update, Path):
                os.replace(update, target)
                continue
            tmp = folder / f"{index:08d}-{n:03d}.tmp.npy"
            np.save(tmp, np.asarray(update, dtype=np.float32))
            os.replace(tmp, target)
        everything = sorted({*rounds, index}) if updates else rounds
        first = everything[max(0, len(everything) - max(self.plan.window, self.plan.warmup))]
        kept = []
        for path in _saved(folder):
            if _round_of(path) < first:
                path.unlink()
            else:
                kept.append(path)
        return kept

    def _save_progress(self) -> None:
        state = self._state_path(self.codec_digest).name if self.codec_digest else ""
        tmp = self.root / "progress.json.tmp"
        tmp.write_text(json.dumps({"encoded_since": self.encoded_since, "state": state}))
        os.replace(tmp, self.root / "progress.json")


def _saved(folder: Path) -> list[Path]:
    """Finished ``.npy`` files in ``folder`` (not the temporary ones), in name order."""
    return sorted(p for p in folder.glob("[0-9]*.npy") if ".tmp" not in p.name)


def _round_of(snapshot: Path) -> int:
    """The full round a snapshot came from: ``<round>-<n>.npy`` (older files: ``<round>.npy``)."""
    return int(snapshot.name.split("-")[0].split(".")[0])
