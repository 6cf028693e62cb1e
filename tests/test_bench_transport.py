"""The transport benchmark runs end to end (small payload) and saves consistent figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.daemons import REPO


def test_transport_bench_runs_and_saves_figures(tmp_path: Path) -> None:
    out = tmp_path / "transport.json"
    cmd = [sys.executable, "-m", "bench.transport", "--mib", "8", "--repeats", "2", "--warmup", "1"]
    done = subprocess.run([*cmd, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["payload_bytes"] == 8 * 1024 * 1024
    assert len(result["warmup_seconds"]) == 1
    for path in ("grpc", "raw_spool", "raw_discard"):
        assert len(result["seconds"][path]) == 2
        assert all(s > 0 for s in result["seconds"][path])
        assert len(result["receiver_cpu_seconds"][path]) == 2
    ratio = result["mb_s"]["grpc"] / result["mb_s"]["raw_spool"]
    assert abs(result["ratio_vs_raw_spool"] - ratio) < 0.01
    assert "ratio gRPC / raw spool" in done.stdout
