"""Transport smoke run: a local federation over real mTLS, no model training yet.

    python -m agent.smoke [--rounds 5] [--dir demo-run]

Generates a dev CA and certificates, starts the real aggregator daemon, and runs
three agents (aws, gcp, azure) through the real client. Each agent pulls the
global adapter towards its own private target (a quadratic objective standing in
for local training), uploads, downloads the new version and reports its loss.
FedAvg drives the global adapter to the weighted mean of the targets, so the
federation's loss goes down round by round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from agent.client import AggregatorClient
from common.codecs import identity
from common.health import wait_serving
from common.identity import SpiffeId
from common.layout import ParamLayout
from common.pki import PkiDir, issue_agent, issue_server
from common.tls import TlsFiles
from protos.cloudfed.v1 import federation_pb2 as pb

DOMAIN = "demo.cloudfed"
AGENTS = (("aws", "agent-1", 100), ("gcp", "agent-1", 300), ("azure", "agent-1", 600))
STEP = 0.5


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_pki(root: Path) -> PkiDir:
    """A dev CA, the aggregator's certificate and one per agent."""
    pki = PkiDir(root)
    ca = pki.init("cloudfed demo CA", force=True)
    pki.save("aggregator", issue_server(ca, ["localhost"], ["127.0.0.1"]))
    for cloud, name, _ in AGENTS:
        pki.save(f"{cloud}-{name}", issue_agent(ca, SpiffeId(DOMAIN, cloud, name)))
    return pki


async def run_agent(
    target_addr: str,
    pki: PkiDir,
    cloud: str,
    name: str,
    examples: int,
    rounds: int,
    work: Path,
    report: asyncio.Queue[tuple[str, int, float]],
) -> None:
    """One agent: every round, step towards a private target and upload the delta."""
    files = TlsFiles(pki.cert(f"{cloud}-{name}"), pki.key(f"{cloud}-{name}"), pki.ca_cert)
    async with AggregatorClient(target_addr, files, server_name="localhost") as client:
        join = await client.join(num_examples=examples)
        digest = join.settings.layout.digest
        numel = sum(int(np.prod(p.shape)) for p in join.settings.layout.params)
        private = np.random.default_rng(zlib.crc32(cloud.encode())).normal(1.0, 0.5, numel).astype(np.float32)
        done = 0
        async for event in client.watch_rounds():
            if event.phase == pb.ROUND_PHASE_COMPLETED:
                path = work / f"{cloud}-v{event.global_version}.safetensors"
                await client.download_model(path, event.global_version)
                current = np.concatenate([t.reshape(-1).numpy() for t in load_file(path).values()])
                loss = float(np.mean((current - private) ** 2))
                await client.report_eval(event.global_version, loss, numel)
                await report.put((cloud, event.global_version, loss))
                done += 1
                if done >= rounds:
                    return
            if event.phase != pb.ROUND_PHASE_UPLOAD or not event.participant:
                continue
            path = work / f"{cloud}-v{event.global_version}.safetensors"
            if not path.exists():
                await client.download_model(path, event.global_version)
            current = np.concatenate([t.reshape(-1).numpy() for t in load_file(path).values()])
            delta = STEP * (private - current)
            payload = work / f"{cloud}-r{event.round_id}.bin"
            payload.write_bytes(identity.encode(delta, float(examples)))
            header = pb.UploadHeader(
                round_id=event.round_id,
                upload_id=uuid.uuid4().hex,
                codec=pb.CodecSpec(name=identity.NAME),
                layout_digest=digest,
                base_version=event.global_version,
                weight=float(examples),
            )
            await client.upload(payload, header)


async def federate(addr: str, pki: PkiDir, rounds: int, work: Path) -> list[tuple[int, float]]:
    """Run the agents; print one line per completed round; return (version, mean loss)."""
    report: asyncio.Queue[tuple[str, int, float]] = asyncio.Queue()
    agents = [asyncio.create_task(run_agent(addr, pki, c, n, e, rounds, work, report)) for c, n, e in AGENTS]
    by_version: dict[int, dict[str, float]] = {}
    history: list[tuple[int, float]] = []
    weights = {c: e for c, _, e in AGENTS}
    while len(history) < rounds:
        cloud, version, loss = await asyncio.wait_for(report.get(), timeout=120)
        by_version.setdefault(version, {})[cloud] = loss
        if len(by_version[version]) == len(AGENTS):
            losses = by_version[version]
            mean = sum(weights[c] * v for c, v in losses.items()) / sum(weights.values())
            history.append((version, mean))
            per = "  ".join(f"{c}={v:.4f}" for c, v in sorted(losses.items()))
            print(f"round -> version {version}: weighted loss {mean:.4f}   ({per})", flush=True)
    await asyncio.gather(*agents)
    return history


def main() -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dir", type=Path, default=Path("demo-run"))
    args = p.parse_args()
    root = args.dir.resolve()
    shutil.rmtree(root, ignore_errors=True)
    (root / "agents").mkdir(parents=True)
    pki = make_pki(root / "pki")
    init = root / "init.safetensors"
    save_file({"layer.lora_A.weight": torch.zeros(8, 64), "layer.lora_B.weight": torch.zeros(64, 8)}, init)
    port, health = _free_port(), _free_port()
    config = root / "aggregator.toml"
    config.write_text(
        f'listen = "127.0.0.1:{port}"\nhealth_listen = "127.0.0.1:{health}"\nstate_dir = "state"\n'
        f'trust_domain = "{DOMAIN}"\n\n[tls]\ncert = "pki/aggregator.pem"\nkey = "pki/aggregator-key.pem"\n'
        f'ca = "pki/ca.pem"\n\n[rounds]\nmin_agents = {len(AGENTS)}\nupload_deadline_s = 60\n'
    )
    print(f"cloudfed transport smoke run in {root}")
    print(f"  dev CA and certificates for {', '.join(f'{c}/{n}' for c, n, _ in AGENTS)} in {root / 'pki'}")
    log = open(root / "aggregator.log", "wb")  # noqa: SIM115 - the daemon's log
    agg = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "--config", str(config), "--init-from", str(init)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    print(f"  aggregator pid {agg.pid} on 127.0.0.1:{port} (log: {root / 'aggregator.log'})")
    try:
        wait_serving(f"127.0.0.1:{health}", timeout=60)
        start = time.monotonic()
        history = asyncio.run(federate(f"127.0.0.1:{port}", pki, args.rounds, root / "agents"))
        layout = ParamLayout.from_tensors(load_file(init))
        print(
            f"{args.rounds} rounds of {layout.numel} parameters in {time.monotonic() - start:.1f}s; "
            f"loss {history[0][1]:.4f} -> {history[-1][1]:.4f}"
        )
        ok = history[-1][1] < history[0][1]
    finally:
        agg.terminate()
        agg.wait(20)
    print("OK: the federation's loss went down" if ok else "FAILED: loss did not go down")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
