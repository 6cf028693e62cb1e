"""Upload goodput: the real gRPC/mTLS path beside raw TLS sockets, same certificates, same run.

    python -m bench.transport [--mib 256] [--repeats 7] [--warmup 2]

The aggregator runs as its own process (the real daemon, ``server.cli``); the
client is the agent's AggregatorClient, so the measured call includes the
server's chunk validation, the spool write, sha256 and the receipt. Two raw
baselines use Python's ``ssl`` over TCP to another process with the same
certificates: ``discard`` (receive and drop: the wire's ceiling) and ``spool``
(receive, write to a file and sha256: the same essential work as the aggregator,
without gRPC). Runs are interleaved, each after the previous round completed;
ratios are of medians. The first ``--warmup`` gRPC uploads are timed but not
counted: a fresh daemon's first 256 MiB upload runs ~1.5x slower (allocator
and page-cache warm-up; its CPU time per upload falls from ~0.95 s to ~0.6 s),
which is not the steady state of a daemon serving round after round. The
receivers' CPU seconds per run are saved beside the wall times. Results go to
bench/results/transport.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import socket
import ssl
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from agent.client import AggregatorClient
from common.chunks import sha256_file
from common.codecs import identity
from common.identity import SpiffeId
from common.layout import ParamLayout
from common.pki import PkiDir, issue_agent, issue_server
from common.tls import TlsFiles
from protos.cloudfed.v1 import federation_pb2 as pb
from tests.daemons import free_port, start, stop, wait_serving

MiB = 1024 * 1024
RESULTS = Path(__file__).resolve().parent / "results"
DOMAIN = "bench.cloudfed"
RAW_MODES = ("discard", "spool")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_tls_server(port: int, pki: Path, mode: str, spool_dir: Path) -> None:
    """Serve forever: read an 8-byte length, then that many bytes; answer the count."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(pki / "aggregator.pem", pki / "aggregator-key.pem")
    ctx.load_verify_locations(pki / "ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    with socket.create_server(("127.0.0.1", port)) as srv:
        while True:
            conn, _ = srv.accept()
            with ctx.wrap_socket(conn, server_side=True) as tls, open(spool_dir / "raw.part", "wb") as out:
                want = int.from_bytes(_recv_exactly(tls, 8), "big")
                buf, got, digest = bytearray(MiB), 0, hashlib.sha256()
                view = memoryview(buf)
                while got < want and (n := tls.recv_into(buf, min(MiB, want - got))):
                    got += n
                    if mode == "spool":
                        out.write(view[:n])
                        digest.update(view[:n])
                tls.sendall(got.to_bytes(8, "big"))


def _recv_exactly(sock: ssl.SSLSocket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise ConnectionError("peer closed early")
        data += part
    return data


def raw_tls_upload(port: int, pki: Path, server_pid: int, payload: Path) -> tuple[float, float]:
    """Wall and server CPU seconds to send ``payload`` over a fresh mTLS socket and get the count back."""
    agent = "agent"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki / "ca.pem")
    ctx.load_cert_chain(pki / f"{agent}.pem", pki / f"{agent}-key.pem")
    size = payload.stat().st_size
    cpu0, t0 = cpu_seconds(server_pid), time.perf_counter()
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        open(payload, "rb") as f,
    ):
        tls.sendall(size.to_bytes(8, "big"))
        while block := f.read(MiB):
            tls.sendall(block)
        got = int.from_bytes(_recv_exactly(tls, 8), "big")
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds(server_pid) - cpu0
    if got != size:
        raise RuntimeError(f"raw server got {got} of {size} bytes")
    return elapsed, cpu


@dataclass
class Receiver:
    """One way to send the payload: returns wall seconds and the receiver's CPU seconds for it."""

    send: Callable[[], Awaitable[tuple[float, float]]]


@dataclass
class Timings:
    """Wall and receiver-CPU seconds per run, by path; warm-up uploads kept apart."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    receiver_cpu: dict[str, list[float]] = field(default_factory=dict)
    warmup_wall: list[float] = field(default_factory=list)

    async def measure(self, name: str, receiver: Receiver, warmup: bool = False) -> None:
        wall, cpu = await receiver.send()
        if warmup:
            self.warmup_wall.append(wall)
            return
        self.wall.setdefault(name, []).append(wall)
        self.receiver_cpu.setdefault(name, []).append(cpu)


async def interleaved(
    target: str,
    files: TlsFiles,
    payload: Path,
    runs: tuple[int, int],
    server_pid: int,
    raws: dict[str, Receiver],
) -> Timings:
    """``warmup`` gRPC uploads, then ``repeats`` rounds of one gRPC upload and one run of every raw path."""
    warmup, repeats = runs
    timings = Timings()
    digest = sha256_file(payload).digest()  # the agent hashes its payload while writing it
    async with AggregatorClient(target, files, server_name="localhost") as client:
        join = await client.join(num_examples=1)
        events = client.watch_rounds()

        async def upload_once() -> tuple[float, float]:
            event = await anext(events)
            while event.phase != pb.ROUND_PHASE_UPLOAD:
                event = await anext(events)
            header = pb.UploadHeader(
                round_id=event.round_id,
                upload_id=uuid.uuid4().hex,
                codec=pb.CodecSpec(name=identity.NAME),
                layout_sha256=bytes.fromhex(join.settings.layout.digest),
                base_version=event.global_version,
                weight=1.0,
                sha256=digest,
            )
            cpu0, t0 = cpu_seconds(server_pid), time.perf_counter()
            receipt = await client.upload(payload, header)
            elapsed, cpu = time.perf_counter() - t0, cpu_seconds(server_pid) - cpu0
            assert receipt.digest_verified
            while event.phase != pb.ROUND_PHASE_COMPLETED:  # the server is idle again before raw runs
                event = await anext(events)
            return elapsed, cpu

        grpc_path = Receiver(upload_once)
        for _ in range(warmup):
            await timings.measure("grpc", grpc_path, warmup=True)
        for _ in range(repeats):
            await timings.measure("grpc", grpc_path)
            for name, raw in raws.items():
                await timings.measure(name, raw)
    return timings


def main() -> None:
    """Run the benchmark and save its figures."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mib", type=int, default=256, help="payload size in MiB (default 256)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved repeats (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="gRPC uploads before timing (default 2)")
    p.add_argument("--out", type=Path, default=RESULTS / "transport.json", help="where the JSON goes")
    p.add_argument("--raw-server", type=int, help=argparse.SUPPRESS)
    p.add_argument("--raw-mode", choices=RAW_MODES, help=argparse.SUPPRESS)
    p.add_argument("--pki", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.raw_server:
        raw_tls_server(args.raw_server, args.pki, args.raw_mode, args.pki.parent)
        return
    with tempfile.TemporaryDirectory(prefix="cloudfed-bench-") as tmp_name:
        tmp = Path(tmp_name)
        pki = PkiDir(tmp / "pki")
        ca = pki.init("bench CA")
        pki.save("aggregator", issue_server(ca, ["localhost"], ["127.0.0.1"]))
        pki.save("agent", issue_agent(ca, SpiffeId(DOMAIN, "bench", "agent")))
        adapter = {"bench.lora_A.weight": torch.zeros(args.mib * MiB // 4 - 1)}
        save_file(adapter, tmp / "init.safetensors")
        payload = tmp / "payload.bin"
        rng = np.random.default_rng(0)
        payload.write_bytes(
            identity.encode(rng.standard_normal(ParamLayout.from_tensors(adapter).numel, np.float32), 1.0)
        )
        port, health = free_port(), free_port()
        env = {
            "CLOUDFED_LISTEN": f"127.0.0.1:{port}",
            "CLOUDFED_HEALTH_LISTEN": f"127.0.0.1:{health}",
            "CLOUDFED_STATE_DIR": str(tmp / "state"),
            "CLOUDFED_TRUST_DOMAIN": DOMAIN,
            "CLOUDFED_TLS_CERT": str(pki.cert("aggregator")),
            "CLOUDFED_TLS_KEY": str(pki.key("aggregator")),
            "CLOUDFED_TLS_CA": str(pki.ca_cert),
            "CLOUDFED_ROUNDS_MIN_AGENTS": "1",
            "CLOUDFED_LIMITS_MAX_UPDATE_BYTES": str(payload.stat().st_size),
            "CLOUDFED_LOG_LEVEL": "WARNING",
        }
        procs = [
            start("server.cli", "--init-from", str(tmp / "init.safetensors"), log=tmp / "agg.log", env=env)
        ]
        raws: dict[str, Receiver] = {}
        for mode in RAW_MODES:
            raw_port = free_port()
            proc = start(
                "bench.transport",
                "--raw-server",
                str(raw_port),
                "--raw-mode",
                mode,
                "--pki",
                str(pki.root),
                log=tmp / f"raw-{mode}.log",
            )
            procs.append(proc)
            raws[f"raw_{mode}"] = Receiver(
                partial(asyncio.to_thread, raw_tls_upload, raw_port, pki.root, proc.pid, payload)
            )
        try:
            wait_serving(health)
            time.sleep(0.5)  # raw servers bind well within this
            files = TlsFiles(pki.cert("agent"), pki.key("agent"), pki.ca_cert)
            timings = asyncio.run(
                interleaved(
                    f"127.0.0.1:{port}", files, payload, (args.warmup, args.repeats), procs[0].pid, raws
                )
            )
        finally:
            for proc in procs:
                stop(proc)
    size = args.mib * MiB
    times = timings.wall
    mbs = {name: size / statistics.median(t) / 1e6 for name, t in times.items()}
    result = {
        "benchmark": "transport",
        "payload_bytes": size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seconds": times,
        "warmup_seconds": timings.warmup_wall,
        "receiver_cpu_seconds": timings.receiver_cpu,
        "mb_s": {k: round(v, 1) for k, v in mbs.items()},
        "ratio_vs_raw_spool": round(mbs["grpc"] / mbs["raw_spool"], 3),
        "ratio_vs_raw_discard": round(mbs["grpc"] / mbs["raw_discard"], 3),
        "target_ratio": 0.9,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "node": platform.node()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"payload {args.mib} MiB, {args.warmup} warm-up uploads "
        f"({[round(s, 2) for s in timings.warmup_wall]} s), {args.repeats} interleaved repeats, "
        "MB/s of the median run"
    )
    labels = {
        "grpc": "gRPC mTLS upload (real daemon)",
        "raw_spool": "raw TLS, write + sha256",
        "raw_discard": "raw TLS, discard",
    }
    for name, t in times.items():
        cpu = [round(s, 2) for s in timings.receiver_cpu[name]]
        print(
            f"  {labels[name]:<32} {mbs[name]:8.1f}   runs {[round(s, 2) for s in t]} s, receiver CPU {cpu} s"
        )
    print(f"ratio gRPC / raw spool:   {result['ratio_vs_raw_spool']:.3f} (target >= 0.9)")
    print(f"ratio gRPC / raw discard: {result['ratio_vs_raw_discard']:.3f}")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
