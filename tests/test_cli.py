"""The command-line tools and the aggregator daemon as real processes."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import tomllib
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import save_file

from agent.client import AggregatorClient
from common.tls import TlsFiles
from tests.daemons import free_port, run_cli, start, stop, wait_serving

DOMAIN = "cli.test"


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    assert run_cli("common.pki_cli", "--dir", str(d), "init", "--trust-domain", DOMAIN).returncode == 0
    r = run_cli("common.pki_cli", "--dir", str(d), "server", "--dns", "localhost", "--ip", "127.0.0.1")
    assert r.returncode == 0, r.stderr
    r = run_cli("common.pki_cli", "--dir", str(d), "agent", "--cloud", "gcp", "--name", "a1")
    assert r.returncode == 0, r.stderr
    return d


def test_pki_cli_issues_and_lists(pki_dir: Path) -> None:
    listing = run_cli("common.pki_cli", "--dir", str(pki_dir), "list")
    assert listing.returncode == 0
    lines = listing.stdout.splitlines()
    assert lines[1].startswith("ca ")
    assert any(f"spiffe://{DOMAIN}/cloud/gcp/agent/a1" in line and "valid" in line for line in lines)
    assert any("DNS" not in line and "localhost,127.0.0.1" in line for line in lines)
    assert (pki_dir / "gcp-a1-key.pem").stat().st_mode & 0o777 == 0o600
    again = run_cli("common.pki_cli", "--dir", str(pki_dir), "init", "--trust-domain", DOMAIN)
    assert again.returncode == 2
    assert "exists" in again.stderr
    bad = run_cli("common.pki_cli", "--dir", str(pki_dir), "agent", "--cloud", "a/b", "--name", "x")
    assert bad.returncode == 2


def write_config(tmp: Path, pki_dir: Path, **extra: str) -> Path:
    port, health = free_port(), free_port()
    body = {
        "listen": f'"127.0.0.1:{port}"',
        "health_listen": f'"127.0.0.1:{health}"',
        "state_dir": f'"{tmp / "state"}"',
        "trust_domain": f'"{DOMAIN}"',
        **extra,
    }
    text = "\n".join(f"{k} = {v}" for k, v in body.items())
    text += f'\n[tls]\ncert = "{pki_dir}/aggregator.pem"\nkey = "{pki_dir}/aggregator-key.pem"\n'
    text += f'ca = "{pki_dir}/ca.pem"\n'
    text += "[rounds]\nmin_agents = 1\n"
    path = tmp / "aggregator.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.replace("aggregator.pem", "missing.pem"), "tls.cert: file not found"),
        (lambda t: t + '[federation]\ncodec = "zip"\n', "federation.codec: unknown codec 'zip'"),
        (
            lambda t: t.replace("min_agents = 1", "min_agents = 3").replace(
                f'trust_domain = "{DOMAIN}"',
                f'trust_domain = "{DOMAIN}"\nallowed_agents = ["spiffe://{DOMAIN}/cloud/gcp/agent/a1"]',
            ),
            "rounds.min_agents (3) exceeds the 1 allowed agents",
        ),
        (lambda t: t.replace("min_agents = 1", "min_agents = 'two'"), "rounds.min_agents: expected int"),
        (lambda t: t + "bogus = 1\n", "rounds.bogus: unknown setting"),
        (lambda t: t + "[[[", "invalid TOML"),
    ],
)
def test_config_errors_exit_nonzero_with_one_clear_line(
    tmp_path: Path, pki_dir: Path, mutate, message
) -> None:
    path = write_config(tmp_path, pki_dir)
    path.write_text(mutate(path.read_text()))
    r = run_cli("server.cli", "--config", str(path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert message in lines[0]


def test_env_var_overrides_the_file(tmp_path: Path, pki_dir: Path) -> None:
    path = write_config(tmp_path, pki_dir)
    r = run_cli("server.cli", "--config", str(path), env={"CLOUDFED_FEDERATION_CODEC": "nope"})
    assert r.returncode == 2
    assert "unknown codec 'nope'" in r.stderr


def ports_of(config: Path) -> tuple[int, int]:
    """(federation port, health port) of a config written by write_config."""
    data = tomllib.loads(config.read_text())
    return int(data["listen"].rsplit(":", 1)[1]), int(data["health_listen"].rsplit(":", 1)[1])


def start_aggregator_process(tmp: Path, config: Path, **env: str) -> subprocess.Popen[bytes]:
    """The real aggregator daemon seeded from a small adapter, logging to tmp/agg.log."""
    init = adapter_file(tmp)
    return start(
        "server.cli", "--config", str(config), "--init-from", str(init), log=tmp / "agg.log", env=env
    )


def adapter_file(tmp: Path) -> Path:
    path = tmp / "init.safetensors"
    save_file({"w.lora_A": torch.zeros(4, 8), "w.lora_B": torch.zeros(8, 4)}, path)
    return path


async def _join(port: int, files: TlsFiles) -> grpc.StatusCode:
    async with AggregatorClient(f"127.0.0.1:{port}", files, server_name="localhost", attempts=1) as c:
        try:
            await c.join(num_examples=1)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_daemon_serves_reloads_rotated_certificates_and_stops_on_sigterm(
    tmp_path: Path, pki_dir: Path
) -> None:
    config = write_config(tmp_path, pki_dir)
    port, health = ports_of(config)
    missing = run_cli("server.cli", "--config", str(config))
    assert missing.returncode == 2
    assert "--init-from" in missing.stderr
    proc = start_aggregator_process(tmp_path, config)
    try:
        wait_serving(health)
        old_agent = TlsFiles(pki_dir / "gcp-a1.pem", pki_dir / "gcp-a1-key.pem", pki_dir / "ca.pem")
        assert asyncio.run(_join(port, old_agent)) == grpc.StatusCode.OK
        # Rotate to a brand-new CA in place (as a Secret update would), then SIGHUP.
        new = tmp_path / "pki2"
        assert run_cli("common.pki_cli", "--dir", str(new), "init", "--trust-domain", DOMAIN).returncode == 0
        assert run_cli("common.pki_cli", "--dir", str(new), "server", "--dns", "localhost").returncode == 0
        assert (
            run_cli("common.pki_cli", "--dir", str(new), "agent", "--cloud", "gcp", "--name", "a1").returncode
            == 0
        )
        for name in ("aggregator.pem", "aggregator-key.pem", "ca.pem"):
            (pki_dir / name).write_bytes((new / name).read_bytes())
        proc.send_signal(signal.SIGHUP)
        new_agent = TlsFiles(new / "gcp-a1.pem", new / "gcp-a1-key.pem", new / "ca.pem")
        assert asyncio.run(_join(port, new_agent)) == grpc.StatusCode.OK
        # The old agent's certificate is from the retired CA: refused at the handshake now.
        assert asyncio.run(_join(port, old_agent)) == grpc.StatusCode.UNAVAILABLE
        assert proc.poll() is None
    finally:
        code = stop(proc)
    assert code == 0, (tmp_path / "agg.log").read_text()
    assert "shutting down" in (tmp_path / "agg.log").read_text()


def test_the_daemon_logs_json_objects_when_asked(tmp_path: Path, pki_dir: Path) -> None:
    """log_format = "json": every line the real aggregator writes, from start to shutdown, is one
    JSON object with time (UTC), level, logger, message and component."""
    config = write_config(tmp_path, pki_dir, log_format='"json"')
    _, health = ports_of(config)
    proc = start_aggregator_process(tmp_path, config)
    try:
        wait_serving(health)
    finally:
        code = stop(proc)
    assert code == 0
    lines = (tmp_path / "agg.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # a line that is not JSON fails here
    assert len(records) >= 3
    for record in records:
        assert {"time", "level", "logger", "message", "component"} <= record.keys(), record
        assert record["component"] == "aggregator" and record["time"].endswith("+00:00")
    assert any(r["message"] == "shutting down" and r["level"] == "INFO" for r in records)
    assert any(r["message"].endswith(" torch thread(s) (OMP_NUM_THREADS)") for r in records)  # daemons' 1


def test_agent_check_joins_and_verifies_the_latest_version(tmp_path: Path, pki_dir: Path) -> None:
    config = write_config(tmp_path, pki_dir)
    port, health = ports_of(config)
    proc = start_aggregator_process(tmp_path, config)
    agent_toml = tmp_path / "agent.toml"
    agent_toml.write_text(
        f'aggregator = "127.0.0.1:{port}"\nserver_name = "localhost"\nstate_dir = "agent-state"\n'
        f'[tls]\ncert = "{pki_dir}/gcp-a1.pem"\nkey = "{pki_dir}/gcp-a1-key.pem"\nca = "{pki_dir}/ca.pem"\n'
    )
    (tmp_path / "data.txt").write_text("\n\n".join(f"document {i} of this cloud" for i in range(40)))
    trusting = {"CLOUDFED_AGENT_PRIVACY_REQUIRE_MASKING": "false"}
    try:
        wait_serving(health)
        # this aggregator runs without secure aggregation: refused by the default policy
        refused = run_cli("agent.cli", "--config", str(agent_toml), "check")
        daemon = run_cli(
            "agent.cli",
            "--config",
            str(agent_toml),
            "run",
            env={"CLOUDFED_AGENT_DATA": "data.txt", "CLOUDFED_AGENT_CPU_THREADS": "1"},
        )
        trusting["CLOUDFED_AGENT_DATA"] = "data.txt"
        ok = run_cli(
            "agent.cli", "--config", str(agent_toml), "check", env={**trusting, "OMP_NUM_THREADS": "2"}
        )
        private = {
            "CLOUDFED_AGENT_PRIVACY_DP_ENABLED": "true",
            "CLOUDFED_AGENT_PRIVACY_DP_NOISE_MULTIPLIER": "1",
            "CLOUDFED_AGENT_CPU_THREADS": "3",
        }
        dp = run_cli("agent.cli", "--config", str(agent_toml), "check", env={**trusting, **private})
        other = tmp_path / "other"
        assert (
            run_cli("common.pki_cli", "--dir", str(other), "init", "--trust-domain", DOMAIN).returncode == 0
        )
        assert (
            run_cli(
                "common.pki_cli", "--dir", str(other), "agent", "--cloud", "gcp", "--name", "a1"
            ).returncode
            == 0
        )
        bad = run_cli(
            "agent.cli",
            "--config",
            str(agent_toml),
            "check",
            env={
                "CLOUDFED_AGENT_TLS_CERT": str(other / "gcp-a1.pem"),
                "CLOUDFED_AGENT_TLS_KEY": str(other / "gcp-a1-key.pem"),
                **trusting,
            },
        )
    finally:
        stop(proc)
    for r in (refused, daemon):  # the aggregator checks the policy the agent announces at Join
        assert r.returncode == 2, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("cloudfed-agent: the aggregator refused to let us join: federation 'cloudfed'")
        assert "runs without secure aggregation" in last and "privacy.require_masking" in last
    assert "1 torch thread(s) (cpu_threads in the config)" in daemon.stderr  # set before joining
    assert "privacy         aggregator learns each agent's update (no secure aggregation)" in ok.stdout
    assert re.search(r"certificate     valid until \d{4}-\d\d-\d\d \d\d:\d\d UTC \((89|90) days\)", ok.stdout)
    assert "allowed by this agent's policy" in ok.stdout
    assert "dp              off: updates are not differentially private" in ok.stdout
    assert "model           none named: set `model`, or the federation's model_id" in ok.stdout
    assert "revocations     none: rosters are not checked against a CRL" in ok.stdout  # no tls.crl here
    counted = re.search(
        r"data            (\d+) training and (\d+) evaluation records from \S*/data.txt; not tok", ok.stdout
    )
    assert counted and int(counted[1]) + int(counted[2]) == 40 and int(counted[2]) > 0
    assert "dp              DP-SGD: epsilon 0.000 of 8 spent over 0 rounds (delta 1e-06, rdp" in dp.stdout
    assert "cpu             2 torch thread(s) (OMP_NUM_THREADS)" in ok.stdout
    assert "cpu             3 torch thread(s) (cpu_threads in the config)" in dp.stdout
    assert not (tmp_path / "agent-state" / "uploads").exists() or not any(
        (tmp_path / "agent-state" / "uploads").iterdir()
    )
    assert ok.returncode == 0, ok.stderr
    assert f"spiffe://{DOMAIN}/cloud/gcp/agent/a1" in ok.stdout
    assert "global version  0" in ok.stdout
    assert "sha256 verified" in ok.stdout
    assert (tmp_path / "agent-state" / "models" / "v00000000.safetensors").exists()
    assert bad.returncode == 1
    assert "UNAVAILABLE" in bad.stderr


def test_agent_config_errors_exit_with_one_clear_line(tmp_path: Path, pki_dir: Path) -> None:
    agent_toml = tmp_path / "agent.toml"
    agent_toml.write_text(
        f'aggregator = "127.0.0.1:1"\ndata = "nowhere"\n[tls]\ncert = "{pki_dir}/missing.pem"\n'
        f'key = "{pki_dir}/gcp-a1-key.pem"\nca = "{pki_dir}/ca.pem"\n'
    )
    r = run_cli("agent.cli", "--config", str(agent_toml), "run")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"cloudfed-agent: tls.cert: file not found: {pki_dir}/missing.pem"
    ]
    agent_toml.write_text(agent_toml.read_text().replace("missing.pem", "gcp-a1.pem"))
    r = run_cli("agent.cli", "--config", str(agent_toml), "run")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("cloudfed-agent: data: no .txt or .jsonl files")


def test_free_port_never_hands_out_one_port_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo fills every config with ports before any daemon binds one, so a port drawn twice
    went to two daemons (seen once: aws's and gcp's agents got one metrics port). With the random
    draw stuck on one port, the second call must still give another."""
    import random

    from agent import demo

    stuck = demo.free_port()
    monkeypatch.setattr(random.SystemRandom, "randrange", lambda self, a, b: stuck)
    ports = [demo.free_port() for _ in range(3)]
    assert len({stuck, *ports}) == 4
