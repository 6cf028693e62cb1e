"""Codec state (eigen bases) through the real aggregator: served by digest, resumable, refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from common.codecs.projection import random_basis
from common.codecs.state import CodecState, save_state
from common.config import AggregatorConfig
from common.errors import ConfigError
from protos.cloudfed.v1 import federation_pb2 as pb
from server.app import build_aggregator
from tests.conftest import Pki, aggregator_config, seed_store

ADAPTER = {"m.lora_A.weight": torch.zeros(4, 64), "m.lora_B.weight": torch.zeros(32, 4)}


def bases_file(path: Path, a_dim: int = 64) -> Path:
    save_file(
        {"m.lora_A.weight": random_basis(a_dim, 16, 1), "m.lora_B.weight": random_basis(32, 8, 2)}, path
    )
    return path


def eigen_config(pki: Pki, state: Path, bases: Path | None) -> AggregatorConfig:
    base = aggregator_config(pki, state)
    return dataclasses.replace(
        base, federation=dataclasses.replace(base.federation, codec="eigen", codec_state=bases)
    )


async def test_agents_fetch_the_bases_by_digest_and_resume_a_partial_download(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    bases = bases_file(tmp_path / "bases.safetensors")
    run = await start_aggregator(
        adapter=ADAPTER, config=eigen_config(pki, tmp_path / "agg0", bases).validate()
    )
    digest = CodecState.of(bases).sha256
    async with run.client("a1") as client:
        join = await client.join(num_examples=1)
        assert join.settings.codec.name == "eigen"
        assert dict(join.settings.codec.params) == {"state_sha256": digest}  # uploads must echo it
        dest = tmp_path / "fetched.safetensors"
        dest.with_name(dest.name + ".part").write_bytes(bases.read_bytes()[:100])  # a broken earlier try
        header = await client.download_codec_state(digest, dest)
        assert dest.read_bytes() == bases.read_bytes() and header.total_bytes == bases.stat().st_size
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await client.download_codec_state("00" * 32, tmp_path / "other.safetensors")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        late = [
            m
            async for m in client.stub.DownloadCodecState(
                pb.DownloadCodecStateRequest(sha256=bytes.fromhex(digest), offset=bases.stat().st_size - 10)
            )
        ]
        assert late[0].header.sha256.hex() == digest and late[1].chunk.data == bases.read_bytes()[-10:]


def test_missing_or_mismatched_bases_are_refused_at_start(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="codec_state"):
        eigen_config(pki, tmp_path / "agg0", None).validate()
    with pytest.raises(ConfigError, match="codec_state"):
        eigen_config(pki, tmp_path / "agg0", tmp_path / "absent.safetensors").validate()
    seed_store(tmp_path / "agg1", ADAPTER)
    wrong = bases_file(tmp_path / "wrong.safetensors", a_dim=48)  # lora_A acts on 64 inputs, not 48
    with pytest.raises(ConfigError, match="does not fit"):
        build_aggregator(eigen_config(pki, tmp_path / "agg1", wrong).validate())
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="not a safetensors"):
        build_aggregator(eigen_config(pki, tmp_path / "agg1", garbage).validate())


def test_equal_tensors_are_stored_once_and_bad_aliases_are_refused(pki: Pki, tmp_path: Path) -> None:
    """``save_state`` stores a tensor equal to another (dtype, shape, values) once and names the
    repeat in the metadata; reading gives every name back, the repeats as one array. A file whose
    aliases name no stored tensor is refused, by the aggregator at start too."""
    basis = random_basis(64, 16, 1)
    tensors = {
        "m.lora_B.weight": random_basis(32, 8, 2),
        "m.lora_A.weight": basis,
        "n.lora_A.weight": basis.copy(),  # equal: stored once
        "o.lora_A.weight": basis.astype(np.float16),  # another dtype: stored
        "p.lora_A.weight": basis[:, ::-1].copy(),  # another order: stored
    }
    path = tmp_path / "state.safetensors"
    assert save_state(path, tensors, {"ratio": "4"}) == 1
    with safe_open(str(path), framework="np") as f:
        assert sorted(f.keys()) == [f"{m}.lora_{ab}.weight" for m, ab in ("mA", "mB", "oA", "pA")]
        assert json.loads(f.metadata()["aliases"]) == {"n.lora_A.weight": "m.lora_A.weight"}
        assert f.metadata()["ratio"] == "4"
    loaded = CodecState.of(path).tensors()
    assert loaded.keys() == tensors.keys() and loaded["n.lora_A.weight"] is loaded["m.lora_A.weight"]
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        np.testing.assert_array_equal(loaded[name], tensor)
    assert not path.with_name(path.name + ".part").exists()

    stored = {"m.lora_A.weight": basis, "m.lora_B.weight": random_basis(32, 8, 2)}
    shadowing = '{"m.lora_B.weight": "m.lora_A.weight"}'  # a stored name
    for aliases in ('{"x.lora_A.weight": "absent"}', shadowing, "[1]", '{"x": [1]}', "{"):
        bad = tmp_path / "bad.safetensors"
        save_file(stored, str(bad), metadata={"aliases": aliases})
        with pytest.raises(ConfigError, match="bad aliases"):
            CodecState.of(bad).tensors()
    seed_store(tmp_path / "agg", ADAPTER)
    with pytest.raises(ConfigError, match="bad aliases"):
        build_aggregator(eigen_config(pki, tmp_path / "agg", bad).validate())
