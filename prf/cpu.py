"""How many CPU cores this process may really use: its affinity mask, capped by a cgroup CPU quota.

Why the quota matters: in a container (Kubernetes ``resources.limits.cpu``, ``docker run --cpus``) the
affinity mask and ``os.cpu_count()`` show every core of the host, while the cgroup lets the container run
only ``quota / period`` cores' worth of time. Starting one scoring process per host core there would
oversubscribe the quota many times over and throttle every process.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def usable_cores(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """Cores this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``),
    capped by its cgroup's CPU quota rounded up (``cgroup_cpu_limit``); at least 1."""
    has_affinity = hasattr(os, "sched_getaffinity")  # Linux; not macOS or Windows
    cores = len(os.sched_getaffinity(0)) if has_affinity else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)


def cgroup_cpu_limit(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """CPUs' worth of time the process's cgroup allows (quota / period, e.g. 1.5), the smallest along its
    cgroup path up to the root; None when no limit is set or the files cannot be read (not Linux).

    cgroup v2: ``cpu.max`` holds "QUOTA PERIOD" or "max PERIOD". cgroup v1: ``cpu.cfs_quota_us`` (-1: no
    limit) and ``cpu.cfs_period_us`` in the ``cpu`` (or ``cpu,cpuacct``) hierarchy. Inside a container the
    process's own cgroup is usually mounted as the root, which is checked too.
    """
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2 unified hierarchy
            limits += [v for d in _dirs_up(cgroup_root, path) if (v := _v2_limit(d)) is not None]
        elif "cpu" in controllers.split(","):
            for mount in (cgroup_root / "cpu", cgroup_root / "cpu,cpuacct", cgroup_root / "cpuacct,cpu"):
                limits += [v for d in _dirs_up(mount, path) if (v := _v1_limit(d)) is not None]
    return min(limits) if limits else None


def _dirs_up(mount: Path, path: str) -> list[Path]:
    """``mount / path`` and each of its parents up to ``mount`` itself (those that exist)."""
    relative = Path(path.strip("/")) if path.strip("/") else Path()
    dirs = [mount / relative, *(mount / parent for parent in relative.parents)]
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def _v2_limit(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text(encoding="utf-8").split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return _ratio(quota, period)


def _v1_limit(directory: Path) -> float | None:
    try:
        quota = (directory / "cpu.cfs_quota_us").read_text(encoding="utf-8").strip()
        period = (directory / "cpu.cfs_period_us").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    """quota / period for positive integers, else None (-1 or garbage: no limit)."""
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None
