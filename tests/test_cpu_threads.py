"""torch's CPU threads follow the CPUs a process may use: affinity, and the CPU quota of its
cgroup and of the cgroups above it (v1 and v2), shared among the torchrun ranks on the host."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cpu_threads import child_cgroup, run_in
from common.config import AgentConfig, AggregatorConfig
from common.cpu_threads import CpuBudget, cgroup_quota, cpu_budget, plan_threads, ranks_on_this_host
from common.errors import ConfigError
from tests.daemons import REPO


def _write(path: Path, text: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for line in text.splitlines():
        name, value = line.split("=", 1)
        (path / name).write_text(value + "\n")


def test_v2_takes_the_tightest_quota_on_the_way_to_the_root(tmp_path: Path) -> None:
    """A systemd unit's CPUQuota (its own cgroup) and a slice's (above it) both bind."""
    _write(tmp_path / "system.slice", "cpu.max=max 100000")
    _write(tmp_path / "system.slice" / "cloudfed-agent.service", "cpu.max=150000 100000")
    line = "0::/system.slice/cloudfed-agent.service\n"
    assert cgroup_quota(line, tmp_path) == 1.5
    _write(tmp_path / "system.slice", "cpu.max=100000 100000")
    assert cgroup_quota(line, tmp_path) == 1.0
    _write(tmp_path / "system.slice", "cpu.max=max 100000")
    _write(tmp_path / "system.slice" / "cloudfed-agent.service", "cpu.max=max 100000")
    assert cgroup_quota(line, tmp_path) is None


def test_v2_in_a_container_reads_the_namespace_root(tmp_path: Path) -> None:
    """With a cgroup namespace (Kubernetes on cgroup v2) the pod's cgroup is the mount's root."""
    (tmp_path / "cpu.max").write_text("400000 100000\n")
    assert cgroup_quota("0::/\n", tmp_path) == 4.0


def test_v1_finds_the_cpu_controller_and_its_quota(tmp_path: Path) -> None:
    _write(tmp_path / "cpu,cpuacct", "cpu.cfs_quota_us=-1\ncpu.cfs_period_us=100000")
    _write(
        tmp_path / "cpu,cpuacct" / "kubepods" / "pod1", "cpu.cfs_quota_us=250000\ncpu.cfs_period_us=100000"
    )
    lines = "12:memory:/kubepods/pod1\n4:cpu,cpuacct:/kubepods/pod1\n1:name=systemd:/kubepods/pod1\n"
    assert cgroup_quota(lines, tmp_path) == 2.5
    # the usual symlink name is found first
    _write(tmp_path / "cpu" / "kubepods" / "pod1", "cpu.cfs_quota_us=50000\ncpu.cfs_period_us=100000")
    assert cgroup_quota(lines, tmp_path) == 0.5


def test_v1_without_a_cgroup_namespace_falls_back_to_the_mounted_root(tmp_path: Path) -> None:
    """Docker on cgroup v1 shows the host's path in /proc/self/cgroup but mounts the container's
    own cgroup as the root: its quota is the root's."""
    _write(tmp_path / "cpu", "cpu.cfs_quota_us=300000\ncpu.cfs_period_us=100000")
    assert cgroup_quota("3:cpu:/docker/0123abcd\n", tmp_path) == 3.0


def test_a_hybrid_host_reads_v1_cpu_and_ignores_a_v2_tree_without_cpu_max(tmp_path: Path) -> None:
    _write(tmp_path / "cpu" / "user.slice", "cpu.cfs_quota_us=200000\ncpu.cfs_period_us=100000")
    (tmp_path / "user.slice").mkdir()
    assert cgroup_quota("3:cpu:/user.slice\n0::/user.slice\n", tmp_path) == 2.0


@pytest.mark.parametrize(
    "text",
    ["", "garbage\n", "0::/\n", "3:memory:/x\n"],
)
def test_no_quota_when_none_is_set_or_readable(tmp_path: Path, text: str) -> None:
    (tmp_path / "cpu.max").write_text("not numbers\n")
    assert cgroup_quota(text, tmp_path) is None


def test_usable_cpus_round_a_quota_down_and_never_exceed_the_affinity() -> None:
    assert CpuBudget(64, 4.0).usable == 4
    assert CpuBudget(64, 2.5).usable == 2
    assert CpuBudget(64, 0.5).usable == 1
    assert CpuBudget(2, 8.0).usable == 2
    assert CpuBudget(16, None).usable == 16
    assert "4 CPU(s) (64 by affinity, cgroup quota 4)" in CpuBudget(64, 4.0).describe()


def test_the_plan_prefers_the_config_then_omp_then_the_share_of_the_cpus() -> None:
    budget = CpuBudget(64, 8.0)
    assert plan_threads(3, budget, 2, {"OMP_NUM_THREADS": "7"}).threads == 3
    omp = plan_threads(0, budget, 1, {"OMP_NUM_THREADS": "7"})
    assert (omp.threads, omp.source) == (7, "OMP_NUM_THREADS")
    assert plan_threads(0, budget, 1, {"OMP_NUM_THREADS": "6,2"}).threads == 6  # nested: the outer level
    shared = plan_threads(0, budget, 2, {})
    assert shared.threads == 4
    assert shared.describe() == (
        "4 torch thread(s) (8 CPU(s) (64 by affinity, cgroup quota 8) shared by 2 rank(s) on this host)"
    )
    assert plan_threads(0, CpuBudget(2, None), 8, {}).threads == 1
    for bad in ("0", "many", "-2"):
        with pytest.raises(ConfigError, match="OMP_NUM_THREADS must be a positive number"):
            plan_threads(0, budget, 1, {"OMP_NUM_THREADS": bad})


def test_ranks_on_this_host_come_from_torchrun() -> None:
    assert ranks_on_this_host({}) == 1
    assert ranks_on_this_host({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert ranks_on_this_host({"LOCAL_WORLD_SIZE": "x"}) == 1


def test_this_process_budget_is_its_affinity_when_no_quota_binds() -> None:
    budget = cpu_budget()
    assert budget.affinity == len(os.sched_getaffinity(0))
    assert budget.usable >= 1


def test_configs_refuse_negative_threads() -> None:
    with pytest.raises(ConfigError, match="cpu_threads must be >= 0"):
        AggregatorConfig(cpu_threads=-1).validate()
    with pytest.raises(ConfigError, match="cpu_threads must be >= 0"):
        AgentConfig(cpu_threads=-1).validate()


_PRINT_THREADS = (
    "from common.cpu_threads import set_torch_threads; import torch; "
    "plan = set_torch_threads(0); print(plan.threads, torch.get_num_threads())"
)


def test_a_real_cgroup_quota_sets_the_threads_of_a_process_in_it() -> None:
    """A child cgroup with a quota of one CPU: a process started in it runs one torch thread,
    while the same command outside runs one a CPU this test may use."""
    if os.geteuid() != 0 or cpu_budget().usable < 2:
        pytest.skip("needs root and at least 2 usable CPUs")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    argv = [sys.executable, "-c", _PRINT_THREADS]
    try:
        with child_cgroup(1.0) as group:
            inside = run_in(group, argv, env, timeout=120)
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup with a CPU quota here: {exc}")
    outside = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.split() == ["1", "1"]
    cpus = str(cpu_budget().usable)
    assert outside.stdout.split() == [cpus, cpus]
