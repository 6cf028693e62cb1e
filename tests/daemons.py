"""Start the real daemons as processes for tests; every wait is bounded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from agent.demo import free_port
from common import health

__all__ = ["free_port", "run_cli", "start", "stop", "torchrun", "wait_serving"]

REPO = Path(__file__).resolve().parent.parent


def run_cli(
    module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m module args`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def torchrun(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node=2 args`` (2 CPU ranks, gloo) to completion."""
    return run_cli(
        "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args, env=env, timeout=timeout
    )


def start(module: str, *args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``python -m module args`` in the background, output to ``log``. Daemons started
    together share the cores: each gets one torch thread unless the caller says otherwise (as the
    demo does; several processes with a thread a core each starve one another)."""
    out = open(log, "ab")  # noqa: SIM115 - owned by the child
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads, **(env or {})},
    )


def wait_serving(port: int, timeout: float = 60) -> None:
    """Block until the health service on 127.0.0.1:``port`` says SERVING."""
    health.wait_serving(f"127.0.0.1:{port}", timeout)


def stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time; return the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout)
