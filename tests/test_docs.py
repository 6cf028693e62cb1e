"""docs/deployment.md: every ```bash block runs, in order, as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs" / "deployment.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
TOOLS = ("kubectl", "promtool", "systemd-analyze")


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(GUIDE.read_text()) if lang == language]


def test_every_code_block_says_whether_it_is_run() -> None:
    languages = {lang for lang, _ in FENCE.findall(GUIDE.read_text())}
    assert languages <= {"bash", "shell"}, languages
    assert len(blocks("bash")) >= 6


def test_bash_blocks_run_in_order(tmp_path: Path) -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"missing in CI: {missing}")
        pytest.skip(f"not installed: {missing}")
    (tmp_path / "deploy").symlink_to(REPO / "deploy")
    script = "set -euo pipefail\n" + "\n".join(blocks("bash"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for cloud in ("aws", "gcp", "azure"):
        assert f"spiffe://fed.example.org/cloud/{cloud}/agent/agent-0" in out
        assert (tmp_path / f"agent-tls-{cloud}.yaml").is_file()
    assert "Overall exposure level for cloudfed-aggregator.service: 1.1" in out
    assert "built-in resources valid for Kubernetes 1.37" in out
    assert "hadolint: clean" in out
    assert "SUCCESS" in out  # promtool
