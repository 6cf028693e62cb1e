"""server.aggregation: from a round's sum to a committed version, on a real checkpoint store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.codecs import identity, registry
from common.codecs.registry import CodecSettings
from common.config import SecAggConfig
from common.errors import InvalidArgument
from common.layout import ParamLayout
from common.secagg.clips import SegmentClips
from server.aggregation import Aggregation
from server.checkpoints import CheckpointStore
from server.optimizer import FedAvg


def _seeded(tmp_path: Path) -> tuple[CheckpointStore, ParamLayout]:
    store = CheckpointStore(tmp_path / "checkpoints")
    tensors = {
        "a.lora_A.weight": torch.linspace(-1, 1, 24).reshape(4, 6),
        "a.lora_B.weight": torch.zeros(6, 4),
    }
    store.save(0, tensors, parent=None)
    return store, ParamLayout.from_tensors(tensors)


def test_a_plain_sum_commits_the_weighted_mean_as_the_next_version(tmp_path: Path) -> None:
    store, layout = _seeded(tmp_path)
    aggregation = Aggregation(store, layout, FedAvg(), CodecSettings())
    aggregation.start_round(1)
    assert aggregation.round_codec is None and aggregation.plain_sum_length == layout.numel + 1
    rng = np.random.default_rng(0)
    updates = [(rng.normal(size=layout.numel).astype(np.float32), w) for w in (1.0, 3.0)]
    total = sum(np.frombuffer(identity.encode(u, w), dtype=identity.WIRE_DTYPE) for u, w in updates)
    manifest = aggregation.commit_plain(np.asarray(total), 0, ["a", "b"])
    expected = layout.flatten(store.load(0)) + (updates[0][0] + 3 * updates[1][0]) / 4
    assert manifest.version == 1 and manifest.participants == ["a", "b"]
    assert manifest.metrics["total_weight"] == 4.0
    np.testing.assert_allclose(layout.flatten(store.load(1)), expected, rtol=1e-6, atol=1e-6)


def test_a_non_finite_aggregate_is_refused_and_commits_nothing(tmp_path: Path) -> None:
    store, layout = _seeded(tmp_path)
    aggregation = Aggregation(store, layout, FedAvg(), CodecSettings())
    aggregation.start_round(1)
    mean = np.zeros(layout.numel, dtype=np.float32)
    mean[3] = np.nan
    with pytest.raises(InvalidArgument, match="not finite"):
        aggregation.commit_masked(mean, 2.0, 0, ["a", "b"], None)
    assert store.versions() == [0]


def test_adaptive_clips_come_from_the_last_committed_aggregate(tmp_path: Path) -> None:
    store, layout = _seeded(tmp_path)
    sa = SecAggConfig(enabled=True, clip=0.25, adaptive_clip=2.0, clip_segment=16)
    aggregation = Aggregation(store, layout, FedAvg(), CodecSettings(), keep_aggregates=True)
    aggregation.start_round(1)
    first = aggregation.round_clips(sa, 0, aggregation.secure_coordinates)
    assert first is not None
    np.testing.assert_array_equal(first.bounds, SegmentClips.uniform(layout.numel, 16, 0.25).bounds)
    scaled = np.random.default_rng(1).uniform(-1, 1, layout.numel).astype(np.float32)
    aggregation.commit_masked(scaled, 2.0, 0, ["a", "b"], first)
    mean = first.scale_up(scaled)  # what was applied, and kept for the next bounds
    np.testing.assert_allclose(layout.flatten(store.load(1)) - layout.flatten(store.load(0)), mean, atol=1e-6)
    aggregation.start_round(2)
    second = aggregation.round_clips(sa, 1, aggregation.secure_coordinates)
    assert second is not None
    np.testing.assert_allclose(second.bounds, SegmentClips.from_aggregate(mean, 16, 2.0).bounds)
    gone = aggregation.round_clips(sa, 7, aggregation.secure_coordinates)  # no aggregate made 7
    assert gone is not None
    np.testing.assert_array_equal(gone.bounds, first.bounds)


def test_without_adaptive_clipping_there_are_no_bounds(tmp_path: Path) -> None:
    store, layout = _seeded(tmp_path)
    aggregation = Aggregation(store, layout, FedAvg(), CodecSettings())
    aggregation.start_round(1)
    assert aggregation.round_clips(SecAggConfig(enabled=True), 0, layout.numel) is None
    assert aggregation.codec_state("00" * 32) is None


def test_an_encoded_plain_upload_is_decoded_on_arrival_and_a_bad_one_refused(tmp_path: Path) -> None:
    store, layout = _seeded(tmp_path)
    aggregation = Aggregation(store, layout, FedAvg(), CodecSettings("quantize", bits=8, clip=1.0))
    aggregation.start_round(1)
    assert aggregation.round_codec is not None
    update = np.linspace(-0.5, 0.5, layout.numel, dtype=np.float32)
    payload = registry.encode_plain(aggregation.round_codec, update, 2.0)
    assert len(payload) == aggregation.payload_bytes
    decoded = aggregation.decode_upload(payload)
    assert decoded is not None
    weighted, weight = decoded
    assert weight == 2.0
    np.testing.assert_allclose(weighted / weight, update, atol=2.0 / 255 + 1e-6)
    with pytest.raises(InvalidArgument):
        aggregation.decode_upload(payload[:-3])
