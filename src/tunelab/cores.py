"""The cores this process may use: its CPU affinity, capped by a container's CPU quota.

Kept apart from `tunelab.device` (which needs torch) so that the data check, which runs no
model, can size its worker processes by the same rule without importing torch."""

from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cores() -> int:
    """The cores this process may run on: its affinity (not the host's count, which is wrong in
    containers and under `taskset`), and no more than a container's CPU quota allows (`docker
    run --cpus 2` leaves every host core in the affinity but lets only two cores' worth run:
    more threads than that are stalled in turn by the quota, as by a competing program)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


CGROUP_FILES = (Path("/sys/fs/cgroup/cpu.max"), Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"))
"""Where Linux says a container's CPU quota: cgroup v2, then v1 (whose period is in the next file)."""


def cpu_quota(files: tuple[Path, Path] = CGROUP_FILES) -> float | None:
    """The cores' worth of CPU time this process's cgroup may use, or None when there is no
    quota (or no cgroup files: not Linux, or not readable)."""
    v2, v1 = files
    try:
        if v2.exists():
            quota, _, period = v2.read_text().strip().partition(" ")
            return None if quota == "max" else int(quota) / int(period or 100000)
        if v1.exists():
            quota_us = int(v1.read_text())
            return None if quota_us <= 0 else quota_us / int((v1.parent / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, ZeroDivisionError):
        return None
    return None
