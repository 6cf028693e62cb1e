"""testssl.sh for tests: required in CI (.ci/run installs Debian's testssl.sh), optional elsewhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

PROBLEMS = {"LOW", "MEDIUM", "HIGH", "CRITICAL"}
"""testssl.sh severities that are findings (OK, INFO and WARN, a check it could not run, are not)."""


def run_testssl(target: str, out: Path) -> list[dict[str, Any]]:
    """Scan ``target`` (host:port) for protocols, cipher categories, forward secrecy and known
    vulnerabilities; return testssl.sh's findings. Skips outside CI where it is not installed."""
    exe = shutil.which("testssl") or shutil.which("testssl.sh")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("testssl.sh is missing in CI: .ci/run must install Debian's testssl.sh package")
        pytest.skip("testssl.sh not installed (apt-get install testssl.sh)")
    out.unlink(missing_ok=True)
    checks = ("--jsonfile", str(out), "-p", "-s", "-f", "-U")
    done = subprocess.run(
        [*(exe, "--quiet", "--color", "0", "--warnings", "off", "--openssl-timeout", "10"), *checks, target],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    findings: list[dict[str, Any]] = json.loads(out.read_text())
    return findings
