"""From a round's sum to the next global version.

The round's codec (the federation's, or a full round the autoencoder's schedule picks), the
decoding of per-agent payloads or of a summed one, adaptive clip bounds from the last aggregate,
the server optimizer and the commit; then what learns from committed rounds (the autoencoder's
TGAP and FAF, FetchSGD's momentum and error). No asyncio and no gRPC: the round coordinator
calls it, off the event loop where it is slow.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from common.codecs import identity, registry
from common.codecs.base import Codec
from common.codecs.countsketch import CountSketch
from common.codecs.eigen import Eigen
from common.codecs.registry import CodecSettings
from common.codecs.state import CodecState
from common.config import SecAggConfig
from common.errors import InvalidArgument
from common.layout import ParamLayout
from common.secagg.clips import SegmentClips
from server.aggregates import AggregateStore
from server.autoencoder import AutoencoderPlan, AutoencoderSchedule
from server.checkpoints import CheckpointStore, Manifest
from server.fetchsgd import FetchSGD, FetchSGDPlan
from server.optimizer import ServerOptimizer

log = logging.getLogger(__name__)


class Aggregation:
    """Each round's codec, and the step from its summed uploads to a committed version."""

    def __init__(
        self,
        store: CheckpointStore,
        layout: ParamLayout,
        optimizer: ServerOptimizer,
        codec: CodecSettings,
        codec_state: CodecState | None = None,
        autoencoder: AutoencoderPlan | None = None,
        fetchsgd: FetchSGDPlan | None = None,
        keep_aggregates: bool = False,
    ) -> None:
        """``codec_state``: the eigen bases (checked against ``layout`` now, so a bad file fails at
        start); ``keep_aggregates``: keep each round's mean for the next round's adaptive clip bounds."""
        self.store, self.layout, self.optimizer = store, layout, optimizer
        self.codec_state_file = codec_state
        if codec_state is not None:
            codec = dataclasses.replace(codec, state_sha256=codec_state.sha256)
        self.settings = codec
        """The federation's codec settings (what Join announces)."""
        root = store.root.parent
        self._shared_codec: Codec | None = (
            Eigen(layout, codec_state.tensors()) if codec_state is not None else None
        )
        self._autoencoder = None
        if autoencoder is not None:
            self._autoencoder = AutoencoderSchedule(autoencoder, layout.numel, root / "codec")
        self._fetchsgd: FetchSGD | None = None
        if codec.name == "countsketch":
            plan, sketch = fetchsgd or FetchSGDPlan(), CountSketch(layout.numel, codec.ratio, codec.seed)
            k = max(1, round(plan.topk * sketch.cols))
            self._fetchsgd = FetchSGD(sketch, k, plan.momentum, root / "fetchsgd")
        self._aggregates = AggregateStore(root / "aggregates") if keep_aggregates else None
        self.round_settings = codec
        """This round's codec settings (an autoencoder federation's full rounds have none)."""
        self.round_codec: Codec | None = None

    def start_round(self, round_id: int) -> None:
        """Fix this round's codec settings (the autoencoder's schedule may pick a full round) and codec."""
        shared = self._autoencoder.codec if self._autoencoder is not None else self._shared_codec
        if self._autoencoder is not None:
            self.round_settings = self._autoencoder.settings(self.settings)
            self._autoencoder.discard_staged()
        self.round_codec = registry.make(self.round_settings, self.layout.numel, round_id, shared)

    def codec_state(self, sha256: str) -> CodecState | None:
        """A codec state file agents may download, by digest (eigen bases, autoencoder networks)."""
        if self._autoencoder is not None:
            return self._autoencoder.state(sha256)
        if self.codec_state_file is not None and self.codec_state_file.sha256 == sha256:
            return self.codec_state_file
        return None

    @property
    def secure_coordinates(self) -> int:
        """Coordinates of this round's masked uploads (before the weight)."""
        return registry.secure_coordinates(self.round_codec, self.layout.numel)

    @property
    def payload_bytes(self) -> int:
        """Size of this round's plain (unmasked) upload."""
        return registry.payload_bytes(self.round_codec, self.layout.numel)

    @property
    def plain_sum_length(self) -> int:
        """Elements of a plain round's running sum, its weight included: FetchSGD's sketches are
        summed as they are and the sum decoded once; every other payload is decoded on arrival."""
        if self._fetchsgd is not None and self.round_codec is not None:
            return self.round_codec.coordinates(self.layout.numel) + 1
        return self.layout.numel + 1

    def decode_upload(self, data: bytes) -> tuple[np.ndarray, float] | None:
        """A plain encoded upload as (weighted values, weight), refused with INVALID_ARGUMENT if bad;
        None for a float32 upload, which is added to the sum as it is."""
        if self.round_codec is None:
            return None
        decode = registry.weighted_payload if self._fetchsgd is not None else registry.decode_plain
        return decode(self.round_codec, data, self.layout.numel)

    def keep_full_update(self, sender: str, path: Path) -> None:
        """A trusted full round: the autoencoder's schedule keeps ``sender``'s own float32 update
        (best effort: the round does not depend on it)."""
        if self._autoencoder is None or self.round_codec is not None:
            return
        try:
            payload = np.memmap(path, dtype=identity.WIRE_DTYPE, mode="r")
            self._autoencoder.stage(payload[:-1], scale=1.0 / float(payload[-1]))
        except Exception:
            log.exception("could not keep %s's update for the autoencoder; it learns without it", sender)

    def round_clips(self, sa: SecAggConfig, base: int, count: int) -> SegmentClips | None:
        """Adaptive clipping: bounds from the aggregate that produced ``base``, encoded with this
        round's codec (the fixed clip in the first round, or when that aggregate is gone); for
        FetchSGD from the last mean sketch (its applied step is sparse, unlike the agents' sketches).
        None without adaptive clipping."""
        if self._aggregates is None:
            return None
        if self._fetchsgd is not None:  # the same sketch every round: its mean sketch is kept
            coords = self._aggregates.load(base, count)
        else:
            previous = self._aggregates.load(base, self.layout.numel)
            coords = previous
            if previous is not None and self.round_codec is not None:
                coords = self.round_codec.encode(previous)
        if coords is not None and np.any(coords):
            return SegmentClips.from_aggregate(coords, sa.clip_segment, sa.adaptive_clip)
        return SegmentClips.uniform(count, sa.clip_segment, sa.clip)

    def commit_plain(self, total: np.ndarray, base: int, participants: list[str]) -> Manifest:
        """A plain round: its running sum (weighted values, then the weight) to version ``base + 1``."""
        mean, weight = identity.decode_sum(total)
        if self._fetchsgd is not None:  # the mean sketch; per-agent payloads were not decoded
            mean = self._fetchsgd.step(mean, base + 1)
        return self._commit(mean, weight, base, participants)

    def commit_masked(
        self, mean: np.ndarray, weight: float, base: int, participants: list[str], clips: SegmentClips | None
    ) -> Manifest:
        """A masked round: its unmasked mean in the codec's coordinates (scaled down by ``clips``)
        to version ``base + 1``; an encoded mean is decoded once (the codec is linear)."""
        if clips is not None:
            mean = clips.scale_up(mean)
        kept = mean  # for the next round's clip bounds: FetchSGD's mean sketch, else the mean update
        if self._fetchsgd is not None:
            mean = self._fetchsgd.step(mean, base + 1)
        elif self.round_codec is not None:
            mean = kept = self.round_codec.decode(mean)
        if self._aggregates is not None:  # before the commit: the next round's clips need it
            self._aggregates.save(base + 1, kept)
        return self._commit(mean, weight, base, participants)

    def _commit(self, mean: np.ndarray, weight: float, base: int, participants: list[str]) -> Manifest:
        """Step the server optimizer with the mean update and commit the next version; then the
        autoencoder's schedule learns from it (TGAP, FAF), before the round is announced complete."""
        if not np.all(np.isfinite(mean)):
            raise InvalidArgument("aggregate is not finite")
        current = self.layout.flatten(self.store.load(base))
        version = base + 1
        new = self.layout.unflatten(self.optimizer.step(current, mean, version))
        manifest = self.store.save(
            version,
            new,
            parent=base,
            participants=participants,
            metrics={"total_weight": weight, "update_norm": float(np.linalg.norm(mean))},
        )
        if self._autoencoder is not None:  # learning is best effort: the committed round stands
            try:
                self._autoencoder.observe(self.round_settings, [mean])
            except Exception:
                log.exception("autoencoder schedule could not learn from this round; it goes on as before")
        return manifest
