"""prf.cpu: the usable core count honours a container's cgroup CPU quota (v1 and v2 layouts, faked here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prf import cpu


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def test_v2_quota_of_the_process_cgroup(tmp_path: Path) -> None:
    write(tmp_path / "proc", "0::/kubepods/pod1\n")
    write(tmp_path / "cg" / "kubepods" / "pod1" / "cpu.max", "150000 100000\n")
    assert cpu.cgroup_cpu_limit(tmp_path / "cg", tmp_path / "proc") == pytest.approx(1.5)


def test_v2_smallest_limit_along_the_path_and_max_means_none(tmp_path: Path) -> None:
    write(tmp_path / "proc", "0::/a/b\n")
    write(tmp_path / "cg" / "a" / "b" / "cpu.max", "max 100000\n")
    write(tmp_path / "cg" / "a" / "cpu.max", "300000 100000\n")
    write(tmp_path / "cg" / "cpu.max", "800000 100000\n")
    assert cpu.cgroup_cpu_limit(tmp_path / "cg", tmp_path / "proc") == pytest.approx(3.0)
    write(tmp_path / "cg" / "a" / "cpu.max", "max 100000\n")
    write(tmp_path / "cg" / "cpu.max", "max 100000\n")
    assert cpu.cgroup_cpu_limit(tmp_path / "cg", tmp_path / "proc") is None


def test_container_root_mount_is_read(tmp_path: Path) -> None:
    """Inside a container /proc/self/cgroup often names a host path that is not mounted; the root is."""
    write(tmp_path / "proc", "0::/docker/abc123\n")
    write(tmp_path / "cg" / "cpu.max", "200000 100000\n")
    assert cpu.cgroup_cpu_limit(tmp_path / "cg", tmp_path / "proc") == pytest.approx(2.0)


def test_v1_cfs_quota(tmp_path: Path) -> None:
    write(tmp_path / "proc", "4:memory:/x\n2:cpu,cpuacct:/x\n")
    write(tmp_path / "cg" / "cpu,cpuacct" / "x" / "cpu.cfs_quota_us", "250000\n")
    write(tmp_path / "cg" / "cpu,cpuacct" / "x" / "cpu.cfs_period_us", "100000\n")
    assert cpu.cgroup_cpu_limit(tmp_path / "cg", tmp_path / "proc") == pytest.approx(2.5)
    write(tmp_path / "cg" / "cpu,cpuacct" / "x" / "cpu.cfs_quota_us", "-1\n")
    assert cpu.cgroup_cpu_limit(tmp_path / "cg", tmp_path / "proc") is None


@pytest.mark.parametrize("proc_text", [None, "", "garbage line\n", "0::/\n"])
def test_no_limit_when_nothing_can_be_read(tmp_path: Path, proc_text: str | None) -> None:
    if proc_text is not None:
        write(tmp_path / "proc", proc_text)
    write(tmp_path / "cg" / "cpu.max", "not numbers\n")
    assert cpu.cgroup_cpu_limit(tmp_path / "cg", tmp_path / "proc") is None


def test_usable_cores_rounds_the_quota_up_and_never_exceeds_the_affinity(tmp_path: Path) -> None:
    write(tmp_path / "proc", "0::/\n")
    write(tmp_path / "cg" / "cpu.max", "50000 100000\n")  # half a core: still one process
    assert cpu.usable_cores(tmp_path / "cg", tmp_path / "proc") == 1
    write(tmp_path / "cg" / "cpu.max", f"{(affinity() + 7) * 100000} 100000\n")  # more than the mask
    assert cpu.usable_cores(tmp_path / "cg", tmp_path / "proc") == affinity()
    (tmp_path / "cg" / "cpu.max").unlink()
    assert cpu.usable_cores(tmp_path / "cg", tmp_path / "proc") == affinity()
