"""A local federation on loopback: the main job, end to end, in about a minute on 2 CPU cores.

    python -m agent.demo [--rounds 5] [--dir demo-run] [--no-secagg] [--dp aws] [--nf4 gcp]
                         [--codec eigen --codec-ratio 4] [--secagg-bits 8 --adaptive-clip 3]

Generates a dev CA and certificates, builds a tiny causal LM and tokenizer
locally (nothing is downloaded), gives three agents (aws, gcp, azure) different
local text (weather, cooking, football: non-IID), starts the real aggregator and
agent daemons, and prints each global version's evaluation loss on every
agent's held-out text as the rounds complete, then what each upload cost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from common.config import KNOWN_CODECS, AgentConfig, AggregatorConfig, load
from common.errors import ConfigError
from common.health import wait_serving
from common.identity import SpiffeId
from common.pki import PkiDir, issue_agent, issue_server
from common.tinylm import DOMAINS, build_tiny_lm, domain_corpus

TRUST_DOMAIN = "demo.cloudfed"
CLOUDS = ("aws", "gcp", "azure")
DOCUMENTS = {"aws": 150, "gcp": 300, "azure": 450}
"""Local documents per cloud: different sizes, so FedAvg weights differ."""


_HANDED_OUT: set[int] = set()
"""Ports free_port returned in this process: none is returned twice (the configs it fills are
written before any daemon binds, so the bind check alone let one port go to two daemons)."""


def free_port() -> int:
    """A port free on 127.0.0.1 a moment ago and not handed out before by this process, picked below
    the kernel's ephemeral range: a port from bind(0) can be handed to some outgoing connection
    before the daemon binds it; these cannot."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(min(20000, low // 2), low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            _HANDED_OUT.add(port)
            return port
    while True:  # no luck below the range: take what the kernel gives
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


DP_DEMO = """\
[privacy.dp]
enabled = true
max_epsilon = 8.0
delta = 1e-4
planned_rounds = {rounds}
"""
"""A demo cloud's DP-SGD: epsilon 8 over the demo's rounds (delta below 1 / its ~150 records)."""


def prepare(
    root: Path,
    rounds: int,
    secagg: bool = True,
    codec: str = "identity",
    codec_ratio: float = 16.0,
    secagg_bits: int = 24,
    adaptive_clip: float = 0.0,
    device: str = "cpu",
    dp_clouds: tuple[str, ...] = (),
    nf4_clouds: tuple[str, ...] = (),
) -> tuple[Path, list[Path], int]:
    """Write certificates, model, data and configs; return (aggregator config, agent configs, health port).
    With ``secagg`` the aggregator only ever sees the masked sum (``secagg_bits``-bit fixed point,
    clip 0.5, or bounds from the last aggregate with ``adaptive_clip``). The agents of
    ``dp_clouds`` train with record-level DP-SGD, a budget of epsilon 8 planned for ``rounds``;
    those of ``nf4_clouds`` over a 4-bit base (QLoRA)."""
    pki = PkiDir(root / "pki")
    ca = pki.init("cloudfed demo CA", force=True)
    pki.save("aggregator", issue_server(ca, ["localhost"], ["127.0.0.1"]))
    public = [doc for domain in DOMAINS for doc in domain_corpus(domain, 100, seed=99)]
    build_tiny_lm(root / "model", public)
    port, health = free_port(), free_port()
    (root / "aggregator.toml").write_text(f"""\
listen = "127.0.0.1:{port}"
health_listen = "127.0.0.1:{health}"
metrics_listen = "127.0.0.1:{free_port()}"
state_dir = "aggregator-state"
trust_domain = "{TRUST_DOMAIN}"
log_level = "WARNING"
[tls]
cert = "pki/aggregator.pem"
key = "pki/aggregator-key.pem"
ca = "pki/ca.pem"
crl = "pki/crl.pem"
[rounds]
min_agents = {len(CLOUDS)}
max_agents = 16
upload_deadline_s = 300
[secagg]
enabled = {"true" if secagg else "false"}
clip = {2.0 if codec in ("projection", "countsketch") else 0.5}
bits = {secagg_bits}
adaptive_clip = {adaptive_clip}
key_deadline_s = 30
[federation]
federation_id = "demo"
codec = "{codec}"
codec_ratio = {codec_ratio}
{'codec_state = "eigen-bases.safetensors"' if codec == "eigen" else ""}
{"autoencoder_warmup_rounds = 2" if codec == "autoencoder" else ""}
{'autoencoder_decoder = "' + ("linear" if secagg else "mlp") + '"' if codec == "autoencoder" else ""}
model_id = "{root / "model"}"
lora_rank = 8
lora_alpha = 16
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
local_steps = 25
learning_rate = 0.005
batch_size = 8
sequence_length = 64
""")
    if codec == "eigen":  # the operator's step: bases from public text, served to agents by digest
        from agent.eigen_bases import make_bases

        (root / "calibration.txt").write_text("\n\n".join(public))
        make_bases(
            load(AggregatorConfig, root / "aggregator.toml"),
            str(root / "model"),
            root / "calibration.txt",
            codec_ratio,
            64,
            root / "eigen-bases.safetensors",
        )
    agents = []
    for cloud, domain in zip(CLOUDS, DOMAINS, strict=True):
        name = f"{cloud}-agent-1"
        pki.save(name, issue_agent(ca, SpiffeId(TRUST_DOMAIN, cloud, "agent-1")))
        data = root / name / "data.jsonl"
        data.parent.mkdir(parents=True)
        docs = domain_corpus(domain, DOCUMENTS[cloud], seed=1)
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        config = root / name / "agent.toml"
        config.write_text(
            f"""\
aggregator = "127.0.0.1:{port}"
server_name = "localhost"
state_dir = "state"
data = "data.jsonl"
device = "{device}"
precision = "{"nf4" if cloud in nf4_clouds else "auto"}"
max_rounds = {rounds}
audit_dir = "audit"
metrics_listen = "127.0.0.1:{free_port()}"
log_level = "WARNING"
[tls]
cert = "../pki/{name}.pem"
key = "../pki/{name}-key.pem"
ca = "../pki/ca.pem"
crl = "../pki/crl.pem"
[privacy]
require_masking = {"true" if secagg else "false"}
"""
            + (DP_DEMO.format(rounds=rounds) if cloud in dp_clouds else "")
        )
        agents.append(config)
    return root / "aggregator.toml", agents, health


def evals(agent_configs: list[Path]) -> dict[int, dict[str, float]]:
    """{version: {cloud: eval loss}} from the agents' local histories."""
    table: dict[int, dict[str, float]] = {}
    for config in agent_configs:
        history = config.parent / "state" / "evals.jsonl"
        if history.exists():
            for line in history.read_text().splitlines():
                record = json.loads(line)
                table.setdefault(record["version"], {})[config.parent.name.split("-")[0]] = record[
                    "eval_loss"
                ]
    return table


def released_evals(config: AgentConfig) -> str:
    """What a DP cloud's eval losses looked like to the aggregator, against its own."""
    history = [json.loads(line) for line in (config.state_dir / "evals.jsonl").read_text().splitlines()]
    shared = [r for r in history if "released_loss" in r]
    if not shared:
        kept = [r["kept"] for r in history if "kept" in r]
        return f"eval losses kept in the cloud: {kept[-1]}" if kept else "no eval loss released"
    pairs = ", ".join(
        f"v{r['version']} {r['eval_loss']:.2f} as {r['released_loss']:.2f} ± {r['released_stddev']:.2g}"
        for r in shared
    )
    return f"eval losses released with differential privacy (its own as the aggregator got them): {pairs}"


def uplink(root: Path) -> str:
    """What each agent uploaded a completed round on average, against the float32 update."""
    from common.layout import ParamLayout
    from server.checkpoints import CheckpointStore
    from server.state import StateDB

    config = load(AggregatorConfig, root / "aggregator.toml")
    db = StateDB(config.state_dir / "cloudfed.db")
    try:
        done = [r for r in db.rounds(limit=1000) if r.phase == "COMPLETED" and r.uploaded]
    finally:
        db.close()
    if not done:
        return "no completed round"
    each = sum(r.uploaded_bytes for r in done) / sum(r.uploaded for r in done)
    numel = ParamLayout.from_tensors(CheckpointStore(config.state_dir / "checkpoints").load(0)).numel
    return (
        f"each agent uploaded {each / 1e3:.1f} kB a round ({config.federation.codec},"
        f" {'masked' if config.secagg.enabled else 'in the clear'}); the float32 update is"
        f" {4 * numel / 1e3:.1f} kB: {4 * numel / each:.1f}x fewer bytes"
    )


def run_federation(
    root: Path,
    rounds: int,
    show: bool = True,
    timeout_s: float = 600,
    secagg: bool = True,
    codec: str = "identity",
    codec_ratio: float = 16.0,
    secagg_bits: int = 24,
    adaptive_clip: float = 0.0,
    device: str = "cpu",
    dp_clouds: tuple[str, ...] = (),
    nf4_clouds: tuple[str, ...] = (),
) -> dict[int, dict[str, float]]:
    """Start the aggregator and agents, wait for ``rounds`` new versions, stop them; return the eval table."""
    agg_config, agent_configs, health = prepare(
        root, rounds, secagg, codec, codec_ratio, secagg_bits, adaptive_clip, device, dp_clouds, nf4_clouds
    )
    # what the aggregator would refuse at start is said here (ConfigError), not only in its log
    load(AggregatorConfig, agg_config).validate()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # The agents share this machine's cores: each gets its share of torch's threads (unless the
    # caller says otherwise). Left at torch's default of every core each, OpenMP's busy-waiting
    # threads of several agents starve one another: rounds took up to 80x longer on 2 cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(agent_configs))))
    logs = [open(root / "aggregator.log", "wb")]  # noqa: SIM115 - closed below
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "server.cli", "--config", str(agg_config)],
            stdout=logs[0],
            stderr=subprocess.STDOUT,
            env=env,
        )
    ]
    try:
        wait_serving(f"127.0.0.1:{health}", timeout=120)
        for config in agent_configs:
            logs.append(open(config.parent / "agent.log", "wb"))  # noqa: SIM115 - closed below
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "agent.cli", "--config", str(config), "run"],
                    stdout=logs[-1],
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
        if show:
            print(f"aggregator and {len(agent_configs)} agents up; logs in {root}")
            print(
                f"{'version':>7}  "
                + "  ".join(f"{c:>8}" for c in CLOUDS)
                + "      mean   (eval loss on each cloud's held-out text)"
            )
        shown: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(shown) < rounds + 1 and time.monotonic() < deadline:
            for version, losses in sorted(evals(agent_configs).items()):
                if version not in shown and len(losses) == len(CLOUDS):
                    shown.add(version)
                    if show:
                        mean = sum(losses.values()) / len(losses)
                        print(
                            f"{version:>7}  "
                            + "  ".join(f"{losses[c]:>8.4f}" for c in CLOUDS)
                            + f"  {mean:>8.4f}",
                            flush=True,
                        )
            if any(proc.poll() not in (None, 0) for proc in procs):
                break
            time.sleep(0.5)
        return evals(agent_configs)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        for log in logs:
            log.close()


def main() -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dir", type=Path, default=Path("demo-run"))
    p.add_argument("--no-secagg", action="store_true", help="send plain updates (no secure aggregation)")
    p.add_argument(
        "--dp",
        action="append",
        default=[],
        choices=CLOUDS,
        help="this cloud trains with DP-SGD (epsilon 8 over the rounds); repeat for more",
    )
    p.add_argument(
        "--nf4",
        action="append",
        default=[],
        choices=CLOUDS,
        help="this cloud trains over a 4-bit base (QLoRA, needs bitsandbytes); repeat for more",
    )
    p.add_argument("--codec", default="identity", choices=KNOWN_CODECS, help="how agents encode updates")
    p.add_argument("--codec-ratio", type=float, default=16.0, help="the codec's compression (default: 16)")
    p.add_argument(
        "--secagg-bits", type=int, default=24, help="fixed-point bits of masked values (default: 24)"
    )
    p.add_argument(
        "--adaptive-clip",
        type=float,
        default=0.0,
        help="clip masked values at this multiple of their RMS in the last aggregate (default: off)",
    )
    args = p.parse_args()
    root = args.dir.resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    began = time.monotonic()
    masking = "plain updates" if args.no_secagg else f"secure aggregation on ({args.secagg_bits}-bit values)"
    if args.codec != "identity":
        masking += f", codec {args.codec} (ratio {args.codec_ratio:g})"
    private = f", DP-SGD in {', '.join(args.dp)}" if args.dp else ""
    quantized = f", QLoRA (a 4-bit base) in {', '.join(args.nf4)}" if args.nf4 else ""
    print(
        f"cloudfed demo in {root}: dev CA, tiny LM, {len(CLOUDS)} clouds with their own text,"
        f" {masking}{private}{quantized}"
    )
    try:
        table = run_federation(
            root,
            args.rounds,
            secagg=not args.no_secagg,
            codec=args.codec,
            codec_ratio=args.codec_ratio,
            secagg_bits=args.secagg_bits,
            adaptive_clip=args.adaptive_clip,
            dp_clouds=tuple(args.dp),
            nf4_clouds=tuple(args.nf4),
        )
    except ConfigError as exc:
        print(f"error: {exc}")
        return 2
    complete = sorted(v for v, losses in table.items() if len(losses) == len(CLOUDS))
    if len(complete) < 2:
        print(f"FAILED: only {len(complete)} versions evaluated; see the logs in {root}")
        return 1
    first, last = (sum(table[v].values()) / len(CLOUDS) for v in (complete[0], complete[-1]))
    ok = last < first
    seconds = time.monotonic() - began
    print(
        f"{len(complete) - 1} rounds in {seconds:.0f}s: mean eval loss {first:.4f} -> {last:.4f} "
        f"({'down' if ok else 'NOT down'}). What each agent sent is in {root}/*/audit."
    )
    print(uplink(root))
    from agent.dp_budget import describe as describe_dp

    for cloud in args.dp:
        config = load(AgentConfig, root / f"{cloud}-agent-1" / "agent.toml")
        print(f"{cloud}: {describe_dp(config.privacy.dp, config.state_dir)}")
        print(f"{cloud}: {released_evals(config)}")
    export = ["export", "--out", str(root / "export"), "--merge", "--force"]
    exported = subprocess.run(
        [sys.executable, "-m", "server.cli", "--config", str(root / "aggregator.toml"), *export],
        capture_output=True,
        text=True,
    )
    print(exported.stdout.strip() or f"FAILED to export: {exported.stderr.strip()}")
    return 0 if ok and exported.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
