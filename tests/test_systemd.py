"""The shipped systemd unit: verify clean, exposure <= 2.0; the daemon speaks the notify protocol."""

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

from tests.daemons import stop
from tests.test_cli import pki_dir, start_aggregator_process, write_config  # noqa: F401 - pki_dir is a fixture

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "systemd" / "cloudfed-aggregator.service"


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing in CI")
        pytest.skip("systemd-analyze not installed")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def installed_unit(tmp_path: Path) -> Path:
    """The shipped unit with its install prefix pointed at this checkout's console scripts."""
    path = tmp_path / UNIT.name
    path.write_text(UNIT.read_text().replace("/opt/cloudfed/bin/", f"{Path(sys.executable).parent}/"))
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
        proc.send_signal(signal.SIGTERM)
        for _ in range(20):  # watchdog pings may still arrive first
            if next_message() == "STOPPING=1":
                break
        else:
            pytest.fail("no STOPPING=1 after SIGTERM")
    finally:
        code = stop(proc)
        listener.close()
    assert code == 0, (tmp_path / "agg.log").read_text()[-2000:]
