"""Shared fixtures: a PKI made in the test, an aggregator on 127.0.0.1:0, clients."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import torch

from agent.client import AggregatorClient
from common.config import (
    AggregatorConfig,
    AggregatorTlsConfig,
    FederationConfig,
    LimitsConfig,
    RoundsConfig,
)
from common.identity import SpiffeId
from common.pki import PkiDir, issue_agent, issue_server
from common.tls import TlsFiles
from server.app import Aggregator, build_aggregator
from server.checkpoints import CheckpointStore

TRUST_DOMAIN = "test.cloudfed"


@dataclasses.dataclass
class Pki:
    """A CA and helpers to issue files for tests."""

    dir: PkiDir

    def agent(self, name: str, cloud: str = "aws", domain: str = TRUST_DOMAIN, **kw: object) -> TlsFiles:
        ca = self.dir.load_ca()
        key = f"{cloud}-{name}-{domain}".replace(".", "_")
        cert, k = self.dir.save(key, issue_agent(ca, SpiffeId(domain, cloud, name), **kw))  # type: ignore[arg-type]
        return TlsFiles(cert, k, self.dir.ca_cert)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = PkiDir(tmp_path_factory.mktemp("pki"))
    ca = d.init("cloudfed test CA")
    d.save("aggregator", issue_server(ca, ["localhost"], ["127.0.0.1"]))
    return Pki(d)


def seed_store(state_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    CheckpointStore(state_dir / "checkpoints").save(0, tensors, parent=None)


def small_adapter(numel: int = 1000) -> dict[str, torch.Tensor]:
    """A stand-in global adapter of about ``numel`` float32 parameters."""
    half = numel // 2
    return {"layer.lora_A.weight": torch.zeros(half), "layer.lora_B.weight": torch.zeros(numel - half)}


def aggregator_config(pki: Pki, state_dir: Path, **rounds: object) -> AggregatorConfig:
    d = pki.dir
    return AggregatorConfig(
        listen="127.0.0.1:0",
        health_listen="127.0.0.1:0",
        metrics_listen="",
        state_dir=state_dir,
        trust_domain=TRUST_DOMAIN,
        tls=AggregatorTlsConfig(d.cert("aggregator"), d.key("aggregator"), d.ca_cert),
        limits=LimitsConfig(max_chunk_bytes=1024 * 1024, max_update_bytes=512 * 1024 * 1024),
        rounds=dataclasses.replace(
            RoundsConfig(min_agents=1, upload_deadline_s=60, retry_delay_s=0.2), **rounds
        ),
        federation=FederationConfig(model_id="tiny"),
    ).validate()


@dataclasses.dataclass
class Running:
    """An aggregator started by a test."""

    agg: Aggregator
    pki: Pki
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.agg.port}"

    def client(self, name: str = "a1", port: int | None = None, **kw: object) -> AggregatorClient:
        target = f"127.0.0.1:{port}" if port else self.target
        return AggregatorClient(target, self.pki.agent(name), server_name="localhost", **kw)  # type: ignore[arg-type]


StartAggregator = Callable[..., "asyncio.Future[Running]"]


@pytest.fixture
async def start_aggregator(pki: Pki, tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    """Factory: start an aggregator seeded with an adapter; stopped after the test."""
    running: list[Running] = []

    async def start(
        adapter: dict[str, torch.Tensor] | None = None,
        config: AggregatorConfig | None = None,
        **rounds: object,
    ) -> Running:
        state = tmp_path / f"agg{len(running)}"
        seed_store(state, adapter if adapter is not None else small_adapter())
        cfg = config or aggregator_config(pki, state, **rounds)
        agg = build_aggregator(cfg)
        await agg.start()
        stop = asyncio.Event()
        task = asyncio.create_task(agg.rounds.run(stop))
        r = Running(agg, pki, stop, task)
        running.append(r)
        return r

    yield start
    for r in running:
        r.stop.set()
        await r.agg.stop(0)
        r.task.cancel()
        await asyncio.gather(r.task, return_exceptions=True)
