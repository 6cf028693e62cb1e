"""Join refuses an agent and an aggregator that cannot work together, before any round."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import pytest

from common.errors import FailedPrecondition
from common.grpc_options import channel_options
from common.tls import channel_credentials
from common.wire import WIRE_REVISION, check_aggregator, check_joiner, codecs_needed
from protos.cloudfed.v1 import federation_pb2 as pb
from protos.cloudfed.v1 import federation_pb2_grpc as pb_grpc
from tests.conftest import Pki
from tests.test_codec_rounds import codec_config

ROOT = Path(__file__).resolve().parents[1]


def test_joiner_needs_the_same_revision_and_every_codec_the_federation_uses() -> None:
    check_joiner(WIRE_REVISION, ["identity", "quantize"], "quantize", "0.1.0")
    newer, older = WIRE_REVISION + 1, WIRE_REVISION - 1  # older: before per-round rings
    for revision, said in [
        (0, "no wire revision"),
        (older, f"wire revision {older}"),
        (newer, f"wire revision {newer}"),
    ]:
        with pytest.raises(FailedPrecondition, match=said) as err:
            check_joiner(revision, ["quantize"], "quantize", "0.0.9")
        assert f"this aggregator speaks wire revision {WIRE_REVISION}" in str(err.value)
        assert "0.0.9" in str(err.value)
    with pytest.raises(FailedPrecondition, match="needs projection"):
        check_joiner(WIRE_REVISION, ["identity", "quantize"], "projection", "0.1.0")
    # The autoencoder's warm-up and refresh rounds are full: identity is needed too.
    assert codecs_needed("autoencoder") == ("identity", "autoencoder")
    with pytest.raises(FailedPrecondition, match="needs identity"):
        check_joiner(WIRE_REVISION, ["autoencoder"], "autoencoder", "0.1.0")
    check_aggregator(WIRE_REVISION)
    with pytest.raises(FailedPrecondition, match="aggregator speaks no wire revision"):
        check_aggregator(0)


async def test_an_agent_of_another_revision_is_refused_at_join_and_not_recorded(
    start_aggregator, pki: Pki
) -> None:
    run = await start_aggregator()
    files = pki.agent("old")
    async with grpc.aio.secure_channel(
        run.target, channel_credentials(files), options=channel_options("localhost")
    ) as ch:
        stub = pb_grpc.FederationServiceStub(ch)
        for revision in (0, WIRE_REVISION - 1, WIRE_REVISION + 1):
            request = pb.JoinRequest(supported_codecs=["identity"], num_examples=5, wire_revision=revision)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Join(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"this aggregator speaks wire revision {WIRE_REVISION}" in (err.value.details() or "")
        assert run.agg.rounds.agents == {}
        good = pb.JoinRequest(supported_codecs=["identity"], num_examples=5, wire_revision=WIRE_REVISION)
        reply = await stub.Join(good, timeout=10)
    assert reply.wire_revision == WIRE_REVISION
    assert list(run.agg.rounds.agents) == [reply.agent_id]


async def test_an_agent_without_the_federations_codec_is_refused(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    run = await start_aggregator(config=codec_config(pki, tmp_path / "agg0", "projection", codec_ratio=4))
    async with run.client("narrow") as client:
        with pytest.raises(FailedPrecondition, match="needs projection, which the agent"):
            await client.join(num_examples=1, codecs=("identity", "quantize"))
    assert run.agg.rounds.agents == {}
    async with run.client("full") as client:  # the default: every codec this release encodes
        reply = await client.join(num_examples=1)
    assert reply.settings.codec.name == "projection"


async def test_the_agent_stops_with_one_clear_line_at_an_aggregator_of_another_revision(
    start_aggregator, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.servicer

    monkeypatch.setattr(server.servicer, "WIRE_REVISION", WIRE_REVISION + 1)
    run = await start_aggregator()
    async with run.client("new") as client:
        with pytest.raises(FailedPrecondition, match=f"aggregator speaks wire revision {WIRE_REVISION + 1}"):
            await client.join(num_examples=1)
    files = pki.agent("cli")
    config = tmp_path / "agent.toml"
    config.write_text(
        f'aggregator = "{run.target}"\nserver_name = "localhost"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[tls]\ncert = "{files.cert}"\nkey = "{files.key}"\nca = "{files.ca}"\n'
        "[privacy]\nrequire_masking = false\n"  # a plain aggregator: only the revisions differ
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli",
        "--config",
        str(config),
        "check",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 2, stderr
    lines = stderr.decode().strip().splitlines()
    assert lines[-1].startswith("cloudfed-agent: the aggregator speaks wire revision"), lines
    assert not (tmp_path / "state" / "models").exists()
