"""How many CPU threads torch runs: the CPUs this process may really use, shared by its ranks.

torch starts one intra-op thread per core it can be scheduled on, and a CPU *quota* does not
change what it sees: a pod with ``limits.cpu: 4`` on a 64-core node, or a systemd unit with
``CPUQuota=400%``, runs 64 threads that spend most of each CFS period throttled, and every
parallel region then waits for its slowest thread. So each daemon reads its CPU affinity and the
bandwidth quota of its cgroup and of every cgroup above it (v2 ``cpu.max``, v1
``cpu.cfs_quota_us``), takes the tightest, and shares the result among the torchrun ranks on
the host. joblib's ``cpu_count`` reads only the quota of the cgroup root (right inside a
container, blind to a systemd unit's), hence this reader.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs a process may use."""

    affinity: int
    """CPUs it may be scheduled on."""
    quota: float | None
    """The tightest cgroup CPU bandwidth quota, in CPUs (None: no quota)."""

    @property
    def usable(self) -> int:
        """Whole CPUs it can keep busy: a thread beyond a fractional quota only adds throttling."""
        if self.quota is None:
            return self.affinity
        return max(1, min(self.affinity, math.floor(self.quota)))

    def describe(self) -> str:
        """E.g. '4 CPUs (64 by affinity, cgroup quota 4.0)'."""
        quota = "no cgroup quota" if self.quota is None else f"cgroup quota {self.quota:g}"
        return f"{self.usable} CPU(s) ({self.affinity} by affinity, {quota})"


@dataclass(frozen=True)
class ThreadPlan:
    """torch's intra-op threads for one rank, and where the number came from."""

    threads: int
    source: str

    def describe(self) -> str:
        """E.g. '4 torch threads (the 4 CPU(s) ... shared by 1 rank)'."""
        return f"{self.threads} torch thread(s) ({self.source})"


def cgroup_quota(proc_cgroup: str, root: Path = CGROUP_ROOT) -> float | None:
    """The tightest CPU quota (in CPUs) on the cgroup paths in ``proc_cgroup`` (the text of
    /proc/self/cgroup) and their ancestors, as mounted under ``root``; None if there is none.

    A path that is not under the mount (a container's cgroup v1 without a cgroup namespace,
    whose own cgroup is mounted as the root) is looked for at its ancestors, ending at the
    mount itself, so the container's limit is still found."""
    quotas: list[float] = []
    for line in proc_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            mounts, read = [root], _read_v2
        elif "cpu" in controllers.split(","):
            mounts, read = [m for m in (root / "cpu", root / controllers) if m.is_dir()][:1], _read_v1
        else:
            continue
        for mount in mounts:
            quotas.extend(q for d in _lineage(mount, path) if (q := read(d)) is not None)
    return min(quotas) if quotas else None


def _lineage(mount: Path, path: str) -> list[Path]:
    """``mount/path`` and each directory above it up to ``mount``, those that exist."""
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    dirs = [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def _read_v2(directory: Path) -> float | None:
    """``cpu.max`` is 'QUOTA PERIOD' or 'max PERIOD'."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else _cpus(quota, period)


def _read_v1(directory: Path) -> float | None:
    """``cpu.cfs_quota_us`` is -1 without a quota."""
    try:
        quota = (directory / "cpu.cfs_quota_us").read_text().strip()
        period = (directory / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    return _cpus(quota, period)


def _cpus(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def cpu_budget(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> CpuBudget:
    """This process's CPUs: its affinity and its cgroups' quota (none where unreadable)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count() or 1
    try:
        text = proc_cgroup.read_text()
    except OSError:
        text = ""
    return CpuBudget(affinity, cgroup_quota(text, root))


def plan_threads(
    configured: int, budget: CpuBudget, ranks_on_host: int, env: Mapping[str, str]
) -> ThreadPlan:
    """The threads for one rank: ``configured`` if set, else ``OMP_NUM_THREADS`` if set (torchrun
    sets 1 when launching several ranks), else the usable CPUs divided among the host's ranks."""
    if configured > 0:
        return ThreadPlan(configured, "cpu_threads in the config")
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp:
        first = omp.split(",")[0].strip()
        if not first.isdigit() or int(first) < 1:
            raise ConfigError(f"OMP_NUM_THREADS must be a positive number of threads, got {omp!r}")
        return ThreadPlan(int(first), "OMP_NUM_THREADS")
    ranks = max(1, ranks_on_host)
    share = max(1, budget.usable // ranks)
    return ThreadPlan(share, f"{budget.describe()} shared by {ranks} rank(s) on this host")


def apply(plan: ThreadPlan) -> None:
    """Set torch's intra-op threads for this process."""
    import torch

    if torch.get_num_threads() != plan.threads:
        torch.set_num_threads(plan.threads)


def process_plan(configured: int) -> ThreadPlan:
    """This process's plan: its CPUs, its environment and torchrun's ranks on the host."""
    return plan_threads(configured, cpu_budget(), ranks_on_this_host(os.environ), os.environ)


def set_torch_threads(configured: int) -> ThreadPlan:
    """Plan this process's threads (``process_plan``) and set them."""
    plan = process_plan(configured)
    apply(plan)
    return plan


def ranks_on_this_host(env: Mapping[str, str]) -> int:
    """torchrun's ranks on this host (``LOCAL_WORLD_SIZE``), 1 without torchrun."""
    value = env.get("LOCAL_WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1
