"""promtool for tests: required in CI (.ci/run installs Debian's prometheus), optional elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool; skip the test when it is missing outside CI, fail inside CI."""
    exe = shutil.which("promtool")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI: .ci/run must install Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return subprocess.run([exe, *args], input=stdin, capture_output=True, text=True, timeout=60)
