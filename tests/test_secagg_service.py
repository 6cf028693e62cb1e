"""Secure aggregation through the real aggregator and client over mTLS: phases, dropouts, refusals."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import Message
from prometheus_client import REGISTRY

from agent import uplink
from agent.client import AggregatorClient
from agent.privacy import announced
from agent.revocations import AgentRevocations
from agent.secure import SecureParticipation, Signer
from common.config import AgentTlsConfig, PrivacyConfig, SecAggConfig
from common.errors import ConfigError, FailedPrecondition
from common.layout import ParamLayout
from common.pki import build_crl, create_ca, revoked_entry
from common.secagg.agent import AgentRound
from common.secagg.keys import RosterError, sign_advertisement, verify_advertisement
from common.secagg.local import Federation
from common.secagg.params import SecAggParams
from common.secagg.ring import ring_bits
from common.secagg_pb import (
    advertise_request,
    advertisement_from_pb,
    advertisement_to_pb,
    reveals_from_pb,
    sealed_from_pb,
)
from protos.cloudfed.v1 import federation_pb2 as pb
from tests.agentsim import Watcher
from tests.conftest import Pki, aggregator_config, small_adapter

NUMEL = 1000
SECAGG = SecAggConfig(enabled=True, clip=1.0, bits=20, key_deadline_s=5.0)


def secure_config(pki: Pki, state: Path, **rounds: object):  # type: ignore[no-untyped-def]
    base = aggregator_config(pki, state, **rounds)
    return dataclasses.replace(base, secagg=SECAGG).validate()


def ternary_config(pki: Pki, state: Path):  # type: ignore[no-untyped-def]
    """4 agents, all uploading, ternary codes clipped at 0.1 (code step 0.1)."""
    base = aggregator_config(pki, state, min_agents=4, min_uploads=4, upload_deadline_s=8.0)
    return dataclasses.replace(base, secagg=dataclasses.replace(SECAGG, clip=0.1, levels=3)).validate()


async def play_agent(
    run,
    name: str,
    delta: np.ndarray,
    examples: int,
    tmp: Path,
    upload: bool = True,
    rings: dict[str, tuple[int, int, int, int]] | None = None,
    protocols: dict[str, AgentRound] | None = None,
    sent: list[tuple[str, Message]] | None = None,
    privacy: PrivacyConfig | None = None,
    ready: asyncio.Event | None = None,
) -> tuple[str, float]:  # type: ignore[no-untyped-def]
    """One agent through the real client and the agent's SecureParticipation (``rings``: its
    round's element bits, largest code, Join's widest code and codes an element, by name;
    ``sent``: every request message it hands gRPC, with its method; ``ready``: set before it
    advertises its keys)."""
    files = run.pki.agent(name)
    async with run.client(name) as client:
        if sent is not None:
            client.stub = RecordingStub(client.stub, sent)  # type: ignore[assignment]
        policy = None if privacy is None else announced(privacy)
        join = await client.join(num_examples=examples, privacy=policy)
        watcher = Watcher(client)
        try:
            event = await watcher.until(pb.ROUND_PHASE_ADVERTISE_KEYS)
            assert event.participant
            part = SecureParticipation(
                client, Signer.load(files), join.agent_id, join.settings.secagg, event.round_id, 60, privacy
            )
            if ready is not None:
                await ready.wait()
            await part.keys()
            if rings is not None:
                fp = part.protocol.params.fixed_point
                rings[name] = (fp.ring_bits, fp.levels, join.settings.secagg.ring_bits, fp.group)
            weight = part.weight(examples)
            if protocols is not None:
                protocols[name] = part.protocol
            if not upload:
                return join.agent_id, weight  # shared keys, then vanished
            payload = tmp / f"{name}.bin"
            payload.write_bytes(part.mask(delta, weight))
            digest = ParamLayout.from_tensors(small_adapter(NUMEL)).digest
            header = uplink.upload_header(
                event.round_id,
                join.settings.codec,
                digest,
                event.global_version,
                weight,
                payload.read_bytes(),
            )
            await client.upload(payload, header, new=True)
            await part.unmask()
            await watcher.until(pb.ROUND_PHASE_COMPLETED)
            return join.agent_id, weight
        finally:
            await watcher.close()


async def test_aggregator_raises_the_threshold_for_an_agents_colluders(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    """One of 3 agents announces at Join that 1 agent may collude with the aggregator: the round's
    threshold is 3 (2t > 3 + 1), not the 2 of a majority, so that agent takes part (it would sit
    out a round at t = 2) and the masked round completes with everyone."""
    run = await start_aggregator(config=secure_config(pki, tmp_path / "agg0", min_agents=3))
    names = [f"col{i}" for i in range(3)]
    wary = PrivacyConfig(min_agents_per_sum=3, colluders=1).validate()
    protocols: dict[str, AgentRound] = {}
    rng = np.random.default_rng(9)
    results = await asyncio.gather(
        *(
            play_agent(
                run,
                n,
                rng.uniform(-0.1, 0.1, NUMEL).astype(np.float32),
                10,
                tmp_path,
                protocols=protocols,
                privacy=wary if n == names[0] else None,
            )
            for n in names
        )
    )
    assert len(results) == 3
    assert {p.params.threshold for p in protocols.values()} == {3}
    wary_id = next(a for a in run.agg.rounds.agents if a.endswith("/col0"))
    assert run.agg.rounds.agents[wary_id].colluders == 1
    assert run.agg.rounds.state.global_version == 1


class RecordingStub:
    """A client stub that notes each request message (streamed ones too) before gRPC sends it."""

    def __init__(self, stub: object, sent: list[tuple[str, Message]]) -> None:
        self._stub, self._sent = stub, sent

    def __getattr__(self, method: str) -> Callable[..., object]:
        call = getattr(self._stub, method)

        def record(request: object, *args: object, **kwargs: object) -> object:
            if isinstance(request, Message):
                self._sent.append((method, request))
                return call(request, *args, **kwargs)

            async def tee() -> AsyncIterator[Message]:
                async for message in request:  # type: ignore[attr-defined]
                    self._sent.append((method, message))
                    yield message

            return call(tee(), *args, **kwargs)

        return record


async def test_uplink_accounting_is_what_the_agent_sends_and_the_aggregator_receives(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    """``agent.uplink`` (how bench.quality counts a round's uplink) sizes exactly the messages the
    agent's client hands gRPC in a masked round (header and chunks of a new upload, with no status
    probe, whose payload the aggregator's transfer metric counts; advertisement, shares, phase
    waits)."""
    run = await start_aggregator(config=secure_config(pki, tmp_path / "agg0", min_agents=3))
    names = [f"acct{i}" for i in range(3)]
    sent: dict[str, list[tuple[str, Message]]] = {name: [] for name in names}
    rng = np.random.default_rng(5)
    results = await asyncio.gather(
        *(
            play_agent(run, n, rng.uniform(-0.1, 0.1, NUMEL).astype(np.float32), 10, tmp_path, sent=sent[n])
            for n in names
        )
    )
    roster = sorted(agent_id for agent_id, _ in results)
    key_methods = ("AdvertiseKeys", "ShareKeys", "GetSecAggState", "RevealShares")
    for name in names:
        keys = [m for method, m in sent[name] if method in key_methods]
        first = {method: m for method, m in reversed(sent[name])}
        advertise, share, reveal = first["AdvertiseKeys"], first["ShareKeys"], first["RevealShares"]
        assert [method for method, _ in sent[name] if method == "GetSecAggState"] == ["GetSecAggState"] * 3
        assert not advertise.advertisement.agent_id and not advertise.advertisement.certificate_pem
        counted = uplink.secagg_key_bytes(
            share.round_id,
            advertisement_from_pb(advertise.advertisement),
            sealed_from_pb(share.shares, roster),
            reveals_from_pb(reveal.shares, roster),
            roster,
        )
        assert counted == uplink.message_bytes(*keys) == sum(m.ByteSize() for m in keys) + 5 * len(keys)
        labels = {"cloud": "aws", "agent": name}
        upload = [m for method, m in sent[name] if method in ("GetUploadStatus", "UploadUpdate")]
        assert [m.WhichOneof("message") for m in upload] == ["header", "chunk"]
        header = upload[0].header
        assert uplink.upload_bytes(header) == uplink.message_bytes(*upload)
        assert len(header.layout_sha256) == 32 and len(advertise.advertisement.signature) == 64
        chunks = REGISTRY.get_sample_value(
            "cloudfed_transfer_bytes_total", {"direction": "received", "kind": "update", **labels}
        )
        assert chunks == header.total_bytes == len(upload[1].chunk.data)


async def test_masked_round_over_grpc_recovers_a_dropout_and_yields_the_weighted_mean(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    run = await start_aggregator(
        config=secure_config(pki, tmp_path / "agg0", min_agents=4, min_uploads=3, upload_deadline_s=8.0)
    )
    rng = np.random.default_rng(3)
    deltas = {f"s{i}": (rng.standard_normal(NUMEL) * 0.05).astype(np.float32) for i in range(4)}
    examples = {"s0": 100, "s1": 300, "s2": 50, "s3": 200}
    rings: dict[str, tuple[int, int, int, int]] = {}
    results = await asyncio.gather(
        *(play_agent(run, n, deltas[n], examples[n], tmp_path, n != "s3", rings) for n in deltas)
    )
    # The round's ring is sized for its 4 invited agents (22 bits), not Join's max_agents bound,
    # and the codes fill it; the aggregator took uploads of exactly that size.
    widest = ring_bits(SECAGG.bits, run.agg.config.rounds.max_agents)
    assert set(rings.values()) == {(22, (2**22 - 1) // 4, widest, 1)} and widest > 22
    weights = {name: w for name, (_, w) in zip(deltas, results, strict=True)}
    assert weights["s1"] == 1.0 and weights["s2"] == pytest.approx(50 / 300)  # scaled by the largest count
    store = run.agg.rounds.store
    layout = ParamLayout.from_tensors(store.load(0))
    step = layout.flatten(store.load(1)).astype(np.float64) - layout.flatten(store.load(0))
    survivors = ["s0", "s1", "s2"]
    expected = sum(weights[n] * deltas[n].astype(np.float64) for n in survivors) / sum(
        weights[n] for n in survivors
    )
    # Fixed point: 20 bits over [-1, 1], so each agent's coordinate is off by < 2e-6 before the division.
    np.testing.assert_allclose(step, expected, atol=2e-5)
    assert sorted(store.manifest(1).participants) == sorted(
        r[0] for n, r in zip(deltas, results, strict=True) if n != "s3"
    )
    statuses = run.agg.rounds.db.participant_status(1)
    assert sorted(statuses.values()) == ["dropped", "uploaded", "uploaded", "uploaded"]


def wrong_shares(agent: str, role: str) -> float:
    labels = {"cloud": "aws", "agent": agent, "role": role}
    return REGISTRY.get_sample_value("cloudfed_secagg_wrong_shares_total", labels) or 0.0


async def test_a_wrong_revealed_share_is_left_out_and_counted_for_holder_and_owner(
    start_aggregator, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 agents (t = 2), all upload; s0 reveals a corrupted share of s1's self-mask seed. The
    aggregator rebuilds the seed from s1's and s2's shares, the step is the exact weighted mean,
    and the dispute is counted for both parties, since the aggregator cannot tell a lying holder
    from an owner that dealt it a wrong share: s0 as revealed, s1 as dealt."""
    run = await start_aggregator(
        config=secure_config(pki, tmp_path / "agg0", min_agents=3, min_uploads=3, upload_deadline_s=30.0)
    )
    honest_unmask = AgentRound.unmask

    def lying_unmask(self: AgentRound, survivors, dropped):  # type: ignore[no-untyped-def]
        out = honest_unmask(self, survivors, dropped)
        if self.agent_id.endswith("/agent/s0"):
            victim = next(a for a in out if a.endswith("/agent/s1"))
            kind, share = out[victim]
            out[victim] = (kind, share[:-1] + bytes([share[-1] ^ 0x5A]))
        return out

    monkeypatch.setattr(AgentRound, "unmask", lying_unmask)
    before = {(a, r): wrong_shares(a, r) for a in ("s0", "s1", "s2") for r in ("revealed", "dealt")}
    rng = np.random.default_rng(8)
    deltas = {f"s{i}": (rng.standard_normal(NUMEL) * 0.05).astype(np.float32) for i in range(3)}
    results = await asyncio.wait_for(
        asyncio.gather(*(play_agent(run, n, deltas[n], 10, tmp_path) for n in deltas)), 120
    )
    store = run.agg.rounds.store
    layout = ParamLayout.from_tensors(store.load(0))
    step = layout.flatten(store.load(1)).astype(np.float64) - layout.flatten(store.load(0))
    np.testing.assert_allclose(step, sum(d.astype(np.float64) for d in deltas.values()) / 3, atol=2e-5)
    assert sorted(store.manifest(1).participants) == sorted(agent for agent, _ in results)
    counted = {key: wrong_shares(*key) - value for key, value in before.items()}
    assert counted == {key: float(key in (("s0", "revealed"), ("s1", "dealt"))) for key in before}


async def test_ternary_codes_travel_packed_five_to_a_16_bit_element_and_decode_unbiased(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    """secagg.levels = 3 with 4 agents: their sums take 9 values, so the round packs 5 codes into
    16 bits (3.2 a coordinate, log2 9 = 3.17) instead of 4 bits a code; the aggregator accepts
    uploads of that size and the step is the weighted mean within ternary rounding's error."""
    config = ternary_config(pki, tmp_path / "agg0")
    run = await start_aggregator(config=config)
    rng = np.random.default_rng(5)
    deltas = {f"t{i}": (rng.standard_normal(NUMEL) * 0.03).astype(np.float32) for i in range(4)}
    examples = {"t0": 100, "t1": 300, "t2": 50, "t3": 200}
    rings: dict[str, tuple[int, int, int, int]] = {}
    results = await asyncio.gather(
        *(play_agent(run, n, deltas[n], examples[n], tmp_path, True, rings) for n in deltas)
    )
    widest = (2 * config.rounds.max_agents).bit_length()
    assert set(rings.values()) == {(16, 2, widest, 5)}
    weights = {name: w for name, (_, w) in zip(deltas, results, strict=True)}
    store = run.agg.rounds.store
    layout = ParamLayout.from_tensors(store.load(0))
    step = layout.flatten(store.load(1)).astype(np.float64) - layout.flatten(store.load(0))
    total = sum(weights.values())
    expected = sum(weights[n] * deltas[n].astype(np.float64) for n in deltas) / total
    # each agent's code of w * delta is off by at most one step (0.1), with variance <= 0.1^2 / 4
    bound = np.sqrt(4 * 0.1**2 / 4) / total
    error = step - expected
    assert float(np.sqrt(np.mean(error**2))) < bound
    assert abs(float(np.mean(error))) < 4 * bound / np.sqrt(NUMEL)  # stochastic rounding: unbiased
    assert np.corrcoef(step, expected)[0, 1] > 0.5


async def test_coverage_sends_three_of_four_elements_and_survives_a_dropout(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    """secagg.coverage = 3 with 4 agents: each agent uploads only the elements it sends (about 3/4),
    codes sum over 3 agents (a narrower ring than 4 agents'), an agent gone after sharing keys
    leaves every element 2 senders, and the step is each element's senders' weighted mean."""
    base = aggregator_config(pki, tmp_path / "agg0", min_agents=4, min_uploads=3, upload_deadline_s=8.0)
    config = dataclasses.replace(base, secagg=dataclasses.replace(SECAGG, coverage=3)).validate()
    run = await start_aggregator(config=config)
    rng = np.random.default_rng(9)
    deltas = {f"c{i}": (rng.standard_normal(NUMEL) * 0.05).astype(np.float32) for i in range(4)}
    examples = {"c0": 100, "c1": 300, "c2": 50, "c3": 200}
    rings: dict[str, tuple[int, int, int, int]] = {}
    protocols: dict[str, AgentRound] = {}
    results = await asyncio.gather(
        *(play_agent(run, n, deltas[n], examples[n], tmp_path, n != "c3", rings, protocols) for n in deltas)
    )
    ids = {n: r[0] for n, r in zip(deltas, results, strict=True)}
    weights = {n: r[1] for n, r in zip(deltas, results, strict=True)}
    assert {r[0] for r in rings.values()} == {ring_bits(SECAGG.bits, 3)}  # 3 codes a sum, not 4
    coverage = protocols["c0"].covered
    assert coverage is not None and coverage.members == sorted(ids.values())
    senders = coverage.senders(0, coverage.elements)
    assert np.all(senders.sum(axis=1) == 3)
    for n in ("c0", "c1", "c2"):
        assert abs(coverage.sent(ids[n]) / coverage.elements - 0.75) < 0.08
    store = run.agg.rounds.store
    layout = ParamLayout.from_tensors(store.load(0))
    step = layout.flatten(store.load(1)).astype(np.float64) - layout.flatten(store.load(0))
    num, den = np.zeros(NUMEL), np.zeros(NUMEL)
    for n in ("c0", "c1", "c2"):  # c3's elements are summed over the two others that send them
        sends = senders[: coverage.elements, coverage.position(ids[n])][:NUMEL]
        num += np.where(sends, weights[n] * deltas[n], 0)
        den += np.where(sends, weights[n], 0)
    np.testing.assert_allclose(step, num / den, atol=2e-5)
    statuses = run.agg.rounds.db.participant_status(1)
    assert sorted(statuses.values()) == ["dropped", "uploaded", "uploaded", "uploaded"]


async def test_agents_round_the_same_update_to_a_sum_within_one_code_step(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    """The agents stratify their dithers over the roster with the aggregator's round seed
    (``strata``): four equal ternary updates sum to within one code step of the exact sum, so the
    mean is off by less than a quarter step everywhere (independent dithers: up to two steps)."""
    config = ternary_config(pki, tmp_path / "agg0")
    run = await start_aggregator(config=config)
    delta = np.random.default_rng(8).uniform(-0.1, 0.1, NUMEL).astype(np.float32)
    await asyncio.gather(*(play_agent(run, f"e{i}", delta, 100, tmp_path) for i in range(4)))
    store = run.agg.rounds.store
    layout = ParamLayout.from_tensors(store.load(0))
    step = layout.flatten(store.load(1)).astype(np.float64) - layout.flatten(store.load(0))
    code_step = 2 * 0.1 / 2
    assert float(np.max(np.abs(step - delta))) < code_step / 4 + 1e-6


async def test_advertising_for_someone_else_or_out_of_phase_is_refused(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    run = await start_aggregator(config=secure_config(pki, tmp_path / "agg0", min_agents=2))
    federation = Federation.create(1, trust_domain="test.cloudfed")
    async with run.client("m1") as client:
        join = await client.join(num_examples=10)
        # No round is open yet (one agent of two): the phase is wrong.
        own = federation.agent_round(next(iter(federation.agents)), 1, SecAggParams(threshold=2), b"")
        adv = sign_advertisement(1, join.agent_id, own.cipher, own.mask, b"", own.signing_key)
        with pytest.raises(grpc.aio.AioRpcError) as wrong_phase:
            await client.advertise_keys(pb.AdvertiseKeysRequest(advertisement=advertisement_to_pb(adv)))
        assert wrong_phase.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        other = dataclasses.replace(adv, agent_id="spiffe://test.cloudfed/cloud/aws/agent/someone-else")
        with pytest.raises(grpc.aio.AioRpcError) as impersonation:
            await client.advertise_keys(pb.AdvertiseKeysRequest(advertisement=advertisement_to_pb(other)))
        assert impersonation.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_impossible_secagg_settings_are_refused_at_start(pki: Pki, tmp_path: Path) -> None:
    base = aggregator_config(pki, tmp_path, min_agents=3)
    with pytest.raises(ConfigError, match=r"above rounds\.min_agents"):
        dataclasses.replace(base, secagg=dataclasses.replace(SECAGG, threshold=4)).validate()
    with pytest.raises(ConfigError, match="headroom"):
        dataclasses.replace(base, secagg=dataclasses.replace(SECAGG, bits=24)).validate()  # 1000 agents
    with pytest.raises(ConfigError, match="must be more than half"):
        dataclasses.replace(base, secagg=dataclasses.replace(SECAGG, neighbours=4, threshold=2)).validate()
    with pytest.raises(ConfigError, match="must be more than half of every round's agents"):
        dataclasses.replace(base, secagg=dataclasses.replace(SECAGG, threshold=3)).validate()  # up to 16
    few = dataclasses.replace(base, rounds=dataclasses.replace(base.rounds, max_agents=5))
    dataclasses.replace(few, secagg=dataclasses.replace(SECAGG, threshold=3)).validate()  # 3 of 3 to 5
    with pytest.raises(ConfigError, match=r"plus secagg\.colluders \(1\)"):  # 2 * 3 <= 5 + 1
        dataclasses.replace(few, secagg=dataclasses.replace(SECAGG, threshold=3, colluders=1)).validate()
    with pytest.raises(ConfigError, match=r"secagg\.colluders must be in 0\.\.rounds\.min_agents - 2 \(1\)"):
        dataclasses.replace(base, secagg=dataclasses.replace(SECAGG, colluders=2)).validate()
    with pytest.raises(ConfigError, match=r"secagg\.coverage \(2\) must be at least secagg\.colluders \+ 2"):
        dataclasses.replace(base, secagg=dataclasses.replace(SECAGG, coverage=2, colluders=1)).validate()
    sparse = dataclasses.replace(SECAGG, neighbours=4, threshold=3, colluders=1)
    with pytest.raises(ConfigError, match="and 1 colluding with the aggregator"):
        dataclasses.replace(base, secagg=sparse).validate()
    with pytest.raises(ConfigError, match="min_agents >= 2"):
        dataclasses.replace(aggregator_config(pki, tmp_path, min_agents=1), secagg=SECAGG).validate()
    for levels, why in (
        (1, r"secagg\.levels must be"),
        (2**31, r"secagg\.levels must be"),
        (2**22, "headroom"),
    ):
        with pytest.raises(ConfigError, match=why):
            dataclasses.replace(base, secagg=dataclasses.replace(SECAGG, levels=levels)).validate()
    with pytest.raises(ConfigError, match=r"secagg\.bits must be in 1\.\.30"):
        dataclasses.replace(base, secagg=dataclasses.replace(SECAGG, bits=0)).validate()
    ternary = dataclasses.replace(base, secagg=dataclasses.replace(SECAGG, levels=3)).validate().secagg
    assert (ternary.code_levels, ternary.weight_bits) == (3, 1)  # bits is ignored
    assert ternary.ring_bits(base.rounds.max_agents) == (2 * base.rounds.max_agents).bit_length()
    for coverage, why in ((1, "at least 2"), (-1, "at least 2")):
        with pytest.raises(ConfigError, match=why):
            dataclasses.replace(base, secagg=dataclasses.replace(SECAGG, coverage=coverage)).validate()
    with pytest.raises(ConfigError, match="neighbours = 0"):
        dataclasses.replace(base, secagg=dataclasses.replace(SECAGG, coverage=2, neighbours=2)).validate()
    covered = dataclasses.replace(base, secagg=dataclasses.replace(SECAGG, coverage=2)).validate().secagg
    assert covered.ring_bits(base.rounds.max_agents) == ring_bits(SECAGG.bits, 2)  # sums of 2 codes


@pytest.mark.parametrize(("codec", "why"), [("topk", "nonlinear decoder"), ("quantize", "quantise twice")])
def test_codecs_that_cannot_be_masked_are_refused_at_start(
    pki: Pki, tmp_path: Path, codec: str, why: str
) -> None:
    base = aggregator_config(pki, tmp_path, min_agents=3)
    federation = dataclasses.replace(base.federation, codec=codec)
    with pytest.raises(ConfigError, match=why):
        dataclasses.replace(base, federation=federation, secagg=SECAGG).validate()
    dataclasses.replace(base, federation=federation).validate()  # fine with a trusted aggregator


class ScriptedClient:
    """Answers a SecureParticipation's waits with one roster; keeps what it was sent."""

    def __init__(self, state: pb.GetSecAggStateResponse) -> None:
        self.state, self.sent = state, []  # type: ignore[var-annotated]

    async def advertise_keys(self, request: pb.AdvertiseKeysRequest) -> None:
        self.sent.append(request)

    async def share_keys(self, request: pb.ShareKeysRequest) -> None:
        self.sent.append(request)

    async def secagg_state(self, round_id: int, phase: int, wait_s: float) -> pb.GetSecAggStateResponse:
        return self.state


async def test_agent_refuses_a_roster_out_of_agent_id_order(pki: Pki) -> None:
    """Shares name peers by roster position, so the roster must be the canonical one (sorted ids):
    an agent given another order shares nothing."""
    settings = pb.SecAggSettings(enabled=True, threshold=2, clip=1.0, bits=20, ring_bits=22, levels=2**20)
    state = pb.GetSecAggStateResponse(round_id=7, threshold=2, ring_bits=21, max_code=(2**21 - 1) // 2)
    for name in ("r3", "r2"):
        state.roster.add(agent_id=f"spiffe://test.cloudfed/cloud/aws/agent/{name}")
    client = ScriptedClient(state)
    signer = Signer.load(pki.agent("r2"))
    part = SecureParticipation(client, signer, "spiffe://test.cloudfed/cloud/aws/agent/r2", settings, 7, 1.0)  # type: ignore[arg-type]
    with pytest.raises(RosterError, match="not ordered by agent id"):
        await part.keys()
    assert [type(m) for m in client.sent] == [pb.AdvertiseKeysRequest]  # advertised, shared nothing


def offline_participation(
    pki: Pki, name: str, settings: pb.SecAggSettings, policy: PrivacyConfig | None = None
) -> SecureParticipation:
    """Agent ``name``'s part in round 7, with no client: for checks of the round's parameters."""
    return SecureParticipation(
        None,  # type: ignore[arg-type]  # no RPC is made
        Signer.load(pki.agent(name)),
        f"spiffe://test.cloudfed/cloud/aws/agent/{name}",
        settings,
        7,
        1.0,
        policy,
    )


@pytest.mark.parametrize(
    ("ring", "top", "base", "group", "roster", "message"),
    [
        (0, 0, 0, 0, 0, "allows up to 22 bits a code"),
        (23, 0, 0, 0, 0, "allows up to 22 bits a code"),
        (33, 2**20, 2**21, 2, 0, "allows up to 22 bits a code"),  # 16.5 a code, but no 33-bit element
        (20, 2**20, 0, 0, 0, "do not fit a 20-bit ring"),
        (21, 2**20, 0, 0, 2, "can wrap"),  # one agent's codes fit, two agents' sum wraps
        (30, 2**20, 2**20 + 1, 2, 0, "do not fit a 30-bit element"),  # two digits need 41 bits
        (32, 2**20, 2**20, 2, 0, "do not fit"),  # a digit must exceed the largest code
        (21, 2**20 - 2, 0, 0, 0, "fewer than the federation's"),
    ],
)
def test_agent_refuses_a_round_layout_outside_what_join_allowed(
    pki: Pki, ring: int, top: int, base: int, group: int, roster: int, message: str
) -> None:
    settings = pb.SecAggSettings(enabled=True, threshold=2, clip=1.0, bits=20, ring_bits=22, levels=2**20)
    part = offline_participation(pki, "r1", settings)
    state = pb.GetSecAggStateResponse(
        round_id=7, threshold=2, ring_bits=ring, max_code=top, code_base=base, codes_per_element=group
    )
    for _ in range(roster):
        state.roster.add()
    with pytest.raises(FailedPrecondition, match=message):
        part._round_params(state)
    good = part._round_params(roster_of(3, threshold=2, ring_bits=22, max_code=2**20))
    assert (good.ring_bits, good.fixed_point.levels) == (22, 2**20)
    part.settings = pb.SecAggSettings(enabled=True, threshold=2, clip=1.0, bits=1, ring_bits=4, levels=3)
    ternary = roster_of(4, threshold=3, ring_bits=16, max_code=2, code_base=9, codes_per_element=5)
    packed = part._round_params(ternary)  # 4 agents' ternary codes: 5 to 16 bits
    assert (packed.group, packed.fixed_point.coordinate_bits, packed.fixed_point.levels) == (5, 3.2, 2)
    # coverage is the federation's: an aggregator cannot narrow a round's sums below what Join said
    with pytest.raises(FailedPrecondition, match="joined with all"):
        part._round_params(
            pb.GetSecAggStateResponse(
                threshold=2, ring_bits=16, max_code=2, code_base=9, codes_per_element=5, coverage=2
            )
        )
    part.settings = pb.SecAggSettings(
        enabled=True, threshold=2, clip=1.0, bits=1, ring_bits=4, levels=3, coverage=3
    )
    with pytest.raises(FailedPrecondition, match="2 agents an element, but this federation joined with 3"):
        part._round_params(
            pb.GetSecAggStateResponse(
                threshold=2, ring_bits=16, max_code=2, code_base=9, codes_per_element=5, coverage=2
            )
        )
    covered = roster_of(
        5, threshold=3, ring_bits=13, max_code=2, code_base=7, codes_per_element=4, coverage=3
    )
    params = part._round_params(covered)  # 5 agents, 3 an element: 7 values a sum, 4 codes in 13 bits
    assert (params.coverage, params.fixed_point.weight_digits, params.senders(5)) == (3, 0, 3)


def roster_of(agents: int, **fields: int) -> pb.GetSecAggStateResponse:
    """A SHARE_KEYS state with ``agents`` (blank) advertisements in its roster."""
    state = pb.GetSecAggStateResponse(**fields)
    for _ in range(agents):
        state.roster.add()
    return state


@pytest.mark.parametrize(
    ("agents", "neighbours", "threshold", "refused"),
    [
        (4, 0, 1, True),
        (4, 0, 2, True),
        (4, 0, 3, False),
        (5, 0, 2, True),
        (5, 0, 3, False),
        (7, 3, 2, True),
        (7, 3, 3, False),
    ],
)
def test_agent_refuses_a_round_threshold_short_of_a_majority_of_its_share_holders(
    pki: Pki, agents: int, neighbours: int, threshold: int, refused: bool
) -> None:
    """Each holder reveals one kind of share for a peer, as its survivor list says: with t at most
    half of the k + 1 holders, an aggregator sending holders different lists would get t shares of
    both of an agent's secrets. The round's threshold comes from the aggregator, so agents check it."""
    settings = pb.SecAggSettings(
        enabled=True, threshold=0, neighbours=neighbours, clip=1.0, bits=8, ring_bits=11, levels=256
    )
    part = offline_participation(pki, "t1", settings)
    state = roster_of(agents, threshold=threshold, ring_bits=11, max_code=(2**11 - 1) // agents)
    if refused:
        with pytest.raises(FailedPrecondition, match="must be more than half"):
            part._round_params(state)
    else:
        assert part._round_params(state).threshold == threshold


@pytest.mark.parametrize(
    ("agents", "threshold", "colluders", "least", "message"),
    [
        (5, 3, 1, 3, "more than half of the 5 agents holding each agent's shares and 1 colluding"),
        (5, 4, 1, 3, ""),
        (4, 3, 1, 3, ""),  # 2t = 6 > 4 holders + 1 colluder
        (6, 4, 2, 4, "at least 5"),
        (3, 2, 0, 4, r"3 agents, fewer than privacy\.min_agents_per_sum \(4\)"),
        (4, 3, 0, 4, ""),
    ],
)
def test_agent_policy_sets_the_least_threshold_and_the_smallest_sum(
    pki: Pki, agents: int, threshold: int, colluders: int, least: int, message: str
) -> None:
    """``privacy.colluders`` c: a round's threshold must satisfy 2t > n + c, else the aggregator and
    the colluders could collect both of this agent's secrets; ``privacy.min_agents_per_sum``: a
    round with fewer agents is refused before any key is shared."""
    settings = pb.SecAggSettings(enabled=True, clip=1.0, bits=8, ring_bits=11, levels=256)
    policy = PrivacyConfig(min_agents_per_sum=least, colluders=colluders).validate()
    part = offline_participation(pki, "p1", settings, policy)
    assert part.protocol.min_sum == least  # and unmask requests are held to it
    state = roster_of(agents, threshold=threshold, ring_bits=11, max_code=(2**11 - 1) // agents)
    if message:
        with pytest.raises(FailedPrecondition, match=message):
            part._round_params(state)
    else:
        assert part._round_params(state).threshold == threshold


async def test_roster_carries_the_certificate_of_each_tls_session_not_the_one_in_the_message(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    """Agents need not upload their certificate every round (it came with the TLS handshake); a
    certificate put in the message, here each agent claiming the other's, is not what peers see."""
    run = await start_aggregator(config=secure_config(pki, tmp_path / "agg0", min_agents=2))
    names = ("c1", "c2")
    files = {name: pki.agent(name) for name in names}  # issued once: the TLS sessions use these
    own = {name: Signer.load(files[name]) for name in names}
    connect = {name: AggregatorClient(run.target, files[name], server_name="localhost") for name in names}
    async with connect["c1"] as c1, connect["c2"] as c2:
        clients = dict(zip(names, (c1, c2), strict=True))
        joins = {name: await clients[name].join(num_examples=10) for name in names}
        watchers = [Watcher(c) for c in clients.values()]
        try:
            event = await watchers[0].until(pb.ROUND_PHASE_ADVERTISE_KEYS)
            for name, other in zip(names, reversed(names), strict=True):
                signer = own[name]
                keys = AgentRound(
                    event.round_id,
                    joins[name].agent_id,
                    SecAggParams(threshold=2),
                    signer.cas,
                    own[other].certificate_pem,  # the other agent's (valid, CA-issued) certificate
                    signer.key,
                    b"",
                )
                await clients[name].advertise_keys(
                    pb.AdvertiseKeysRequest(advertisement=advertisement_to_pb(keys.advertise()))
                )
            state = await c1.secagg_state(event.round_id, pb.ROUND_PHASE_SHARE_KEYS, 30)
            # Shares name peers by roster position: one past the roster, or one named twice, is refused.
            for peers, why in (((1, 2), "roster position 2"), ((1, 1), "two sealed shares")):
                bad = pb.ShareKeysRequest(
                    round_id=event.round_id,
                    shares=[pb.SealedShare(peer=p, ciphertext=b"x" * 94) for p in peers],
                )
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await c1.share_keys(bad)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert why in str(refused.value.details())
        finally:
            for watcher in watchers:
                await watcher.close()
    roster = {adv.agent_id: adv for adv in map(advertisement_from_pb, state.roster)}
    assert sorted(roster) == sorted(j.agent_id for j in joins.values())
    for name in names:
        adv = roster[joins[name].agent_id]
        sent = x509.load_pem_x509_certificate(own[name].certificate_pem)
        assert x509.load_pem_x509_certificate(adv.certificate_pem) == sent
        verify_advertisement(adv, own[name].cas, event.round_id, dt.datetime.now(dt.UTC))


async def test_aggregator_refuses_an_advertisement_its_peers_would_refuse(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    """A forged advertisement (a key swapped after signing) would make every honest agent refuse
    the roster, and so the round: the aggregator refuses it alone, with INVALID_ARGUMENT, keeps
    nothing of it, and takes the agent's real one."""
    run = await start_aggregator(config=secure_config(pki, tmp_path / "agg0", min_agents=2))
    files = run.pki.agent("m1")  # the client reissues these: load the signer after it
    async with run.client("m1") as client, run.client("m2") as other:
        join = await client.join(num_examples=10)
        await other.join(num_examples=10)
        watchers = [Watcher(client), Watcher(other)]
        try:
            event = await watchers[0].until(pb.ROUND_PHASE_ADVERTISE_KEYS)
            part = SecureParticipation(
                client, Signer.load(files), join.agent_id, join.settings.secagg, event.round_id, 60
            )
            adv = part.protocol.advertise()
            forged = dataclasses.replace(adv, mask_public=bytes(range(32)))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.advertise_keys(advertise_request(forged))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "does not verify" in (refused.value.details() or "")
            secure = run.agg.rounds._secure
            assert secure is not None and secure.advertisements == {}
            await client.advertise_keys(advertise_request(adv))
            assert list(secure.advertisements) == [join.agent_id]
        finally:
            for w in watchers:
                await w.close()


async def test_an_agent_with_a_crl_refuses_a_roster_naming_a_revoked_peer(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    """An aggregator that does not enforce revocation (no tls.crl: misconfigured, or colluding with
    whoever holds a revoked key) lets 'revoked' into a masked round. An agent given the CA's CRL
    that lists it, as GetRevocationList serves it, refuses the roster, naming the certificate,
    before it deals any share; its own tls.crl gives the same verdict, and with a CRL that does
    not verify it refuses, as it cannot check the roster."""
    run = await start_aggregator(config=secure_config(pki, tmp_path / "agg0", min_agents=3))
    rng = np.random.default_rng(5)
    others = [
        asyncio.create_task(play_agent(run, name, rng.normal(size=NUMEL), 10, tmp_path))
        for name in ("revoked", "honest")
    ]
    files = run.pki.agent("wary")
    async with run.client("wary") as client:
        join = await client.join(num_examples=10)
        watcher = Watcher(client)
        try:
            event = await watcher.until(pb.ROUND_PHASE_ADVERTISE_KEYS)
            # every agent is connected once the round starts: 'revoked' holds its certificate now
            revoked_cert = x509.load_pem_x509_certificate(
                pki.dir.cert("aws-revoked-test_cloudfed").read_bytes()
            )
            crl = tmp_path / "crl.pem"
            entry = revoked_entry(revoked_cert.serial_number, x509.ReasonFlags.key_compromise)
            crl.write_bytes(build_crl(pki.dir.load_ca(), [entry], 1).public_bytes(serialization.Encoding.PEM))
            # the list as an aggregator serves it (one that serves it but does not enforce it)
            served = AgentRevocations(tmp_path / "wary", AgentTlsConfig(ca=files.ca))
            signer = Signer.load(files, served.for_round(crl.read_bytes()))
            part = SecureParticipation(
                client, signer, join.agent_id, join.settings.secagg, event.round_id, 60
            )
            with pytest.raises(
                RosterError, match=r"certificate of \S+/agent/revoked is revoked: .*keyCompromise"
            ):
                await part.keys()
            assert part.protocol.held == {} and not part.protocol.my_neighbours  # no share was dealt

            # the agent's own tls.crl gives the same verdict
            local = AgentRevocations(tmp_path / "wary-local", AgentTlsConfig(ca=files.ca, crl=crl))
            own = local.for_round(None)
            assert own is not None and own.lookup(revoked_cert) == signer.revocations.lookup(revoked_cert)  # type: ignore[union-attr]

            crl.write_bytes(build_crl(create_ca("other"), [], 1).public_bytes(serialization.Encoding.PEM))
            with pytest.raises(RosterError, match=r"cannot check peers' certificates against tls\.crl"):
                local.for_round(None)
        finally:
            await watcher.close()
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
