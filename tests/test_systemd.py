"""The shipped systemd units: verify clean, exposure <= 2.0; both daemons speak the notify protocol."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemons import free_port, start, stop, wait_serving
from tests.test_cli import pki_dir, start_aggregator_process, write_config  # noqa: F401 - pki_dir is a fixture

UNITS = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
UNIT = UNITS / "cloudfed-aggregator.service"
AGENT_UNIT = UNITS / "cloudfed-agent.service"
BACKUP_UNIT = UNITS / "cloudfed-aggregator-backup.service"
BACKUP_TIMER = UNITS / "cloudfed-aggregator-backup.timer"


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing in CI")
        pytest.skip("systemd-analyze not installed")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(params=[UNIT, AGENT_UNIT, BACKUP_UNIT], ids=lambda p: p.stem)
def installed_unit(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A shipped unit with its install prefix pointed at this checkout's console scripts."""
    unit: Path = request.param
    path = tmp_path / unit.name
    path.write_text(unit.read_text().replace("/opt/cloudfed/bin/", f"{Path(sys.executable).parent}/"))
    return path


def test_unit_verifies_without_any_warning(installed_unit: Path) -> None:
    result = systemd_analyze("verify", str(installed_unit))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
    assert result.stderr.strip() == ""


def test_unit_exposure_is_at_most_2(installed_unit: Path) -> None:
    result = systemd_analyze("security", "--offline=true", "--threshold=20", str(installed_unit))
    assert result.returncode == 0, result.stdout[-2000:]
    level = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)[1])  # type: ignore[index]
    assert level <= 2.0


def test_backup_timer_verifies_with_its_service(tmp_path: Path) -> None:
    """The timer starts the backup unit daily; both verify together. The backup runs as the
    aggregator's dynamic user (same name: same UID while both run) on its state directory."""
    service = tmp_path / BACKUP_UNIT.name
    service.write_text(
        BACKUP_UNIT.read_text().replace("/opt/cloudfed/bin/", f"{Path(sys.executable).parent}/")
    )
    timer = tmp_path / BACKUP_TIMER.name
    timer.write_text(BACKUP_TIMER.read_text())
    result = systemd_analyze("verify", str(service), str(timer))
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    text = BACKUP_UNIT.read_text()
    for line in (
        "User=cloudfed-aggregator\n",
        "DynamicUser=yes",
        "StateDirectory=cloudfed cloudfed-backups",
        "Environment=CLOUDFED_STATE_DIR=%S/cloudfed",
        "backup --into %S/cloudfed-backups --keep 7",
    ):
        assert line in text, line
    assert "OnCalendar=daily" in BACKUP_TIMER.read_text()
    assert "DynamicUser=yes" in UNIT.read_text() and "\nUser=" not in UNIT.read_text()  # named after its unit


def terminate_and_expect_stopping(proc: subprocess.Popen[bytes], listener: socket.socket) -> None:
    """SIGTERM, then STOPPING=1 within the next messages (watchdog pings may still arrive first)."""
    proc.send_signal(signal.SIGTERM)
    for _ in range(20):
        if listener.recv(4096).decode() == "STOPPING=1":
            return
    pytest.fail("no STOPPING=1 after SIGTERM")


def test_unit_uses_notify_credentials_state_dir_and_reload() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "LoadCredential=tls-key:",
        "Environment=CLOUDFED_TLS_KEY=%d/tls-key",
        "StateDirectory=cloudfed",
        "DynamicUser=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "CapabilityBoundingSet=\n",
        "UMask=0077",
        "SystemCallFilter=@system-service",
    ):
        assert line in text, line


def test_daemon_reports_ready_watchdog_reload_and_stopping(tmp_path: Path, pki_dir: Path) -> None:  # noqa: F811
    sock_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(60)
    config = write_config(tmp_path, pki_dir)
    proc = start_aggregator_process(tmp_path, config, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="400000")

    def next_message() -> str:
        return listener.recv(4096).decode()

    try:
        ready = next_message()
        assert ready.splitlines()[0] == "READY=1"
        assert "STATUS=serving on" in ready
        assert next_message() == "WATCHDOG=1"
        assert next_message() == "WATCHDOG=1"  # repeated at half of WATCHDOG_USEC
        proc.send_signal(signal.SIGHUP)
        messages = [next_message() for _ in range(4)]
        reloading = next(m for m in messages if m.startswith("RELOADING=1"))
        assert "MONOTONIC_USEC=" in reloading
        assert "READY=1" in messages[messages.index(reloading) + 1 :]
        terminate_and_expect_stopping(proc, listener)
    finally:
        code = stop(proc)
        listener.close()
    assert code == 0, (tmp_path / "agg.log").read_text()[-2000:]


def test_agent_unit_runs_as_its_own_user_with_credentials_and_only_gpu_devices() -> None:
    text = AGENT_UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "User=cloudfed-agent",
        "LoadCredential=tls-key:",
        "Environment=CLOUDFED_AGENT_TLS_KEY=%d/tls-key",
        "StateDirectory=cloudfed-agent",
        "DevicePolicy=closed",
        "DeviceAllow=char-nvidia-uvm rw",
        "CapabilityBoundingSet=\n",
        "UMask=0077",
    ):
        assert line in text, line
    sysusers = (UNITS / "cloudfed-agent.sysusers.conf").read_text()
    assert re.search(r"^u cloudfed-agent ", sysusers, re.M)


def test_agent_reports_ready_watchdog_health_and_stopping(tmp_path: Path, pki_dir: Path) -> None:  # noqa: F811
    """The agent daemon is up (pinging, health SERVING) while it retries an aggregator not there yet."""
    sock_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(60)
    health = free_port()
    (tmp_path / "data.txt").write_text("a local document\n\nanother one\n")
    agent_toml = tmp_path / "agent.toml"
    agent_toml.write_text(
        f'data = "data.txt"\naggregator = "127.0.0.1:{free_port()}"\nserver_name = "localhost"\n'
        f'state_dir = "state"\nmetrics_listen = ""\nhealth_listen = "127.0.0.1:{health}"\n'
        f'[tls]\ncert = "{pki_dir}/gcp-a1.pem"\nkey = "{pki_dir}/gcp-a1-key.pem"\nca = "{pki_dir}/ca.pem"\n'
    )
    proc = start(
        "agent.cli",
        "--config",
        str(agent_toml),
        "run",
        log=tmp_path / "agent.log",
        env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"},
    )
    try:
        ready = listener.recv(4096).decode()
        assert ready.splitlines()[0] == "READY=1"
        assert listener.recv(4096).decode() == "WATCHDOG=1"
        assert listener.recv(4096).decode() == "WATCHDOG=1"
        wait_serving(health)  # the probe port answers SERVING
        terminate_and_expect_stopping(proc, listener)
    finally:
        code = stop(proc)
        listener.close()
    assert code == 0, (tmp_path / "agent.log").read_text()[-2000:]
