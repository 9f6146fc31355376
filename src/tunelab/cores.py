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


CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMBERSHIP = Path("/proc/self/cgroup")


def cpu_quota(root: Path = CGROUP_ROOT, membership: Path = MEMBERSHIP) -> float | None:
    """The cores' worth of CPU time this process's cgroup may use, or None when there is no
    quota (or no cgroup files: not Linux, or not readable). The quota is the smallest set on
    the process's own cgroup (`/proc/self/cgroup`; "/" inside a container's cgroup namespace)
    or any cgroup above it (`systemd-run -p CPUQuota=`, a pod without a cgroup namespace):
    cgroup v2's `cpu.max`, else v1's `cpu.cfs_quota_us` over `cpu.cfs_period_us`."""
    v2, v1 = cgroup_folders("cpu", root, membership)
    quotas = [q for folder in v2 if (q := _v2_quota(folder)) is not None]
    if not quotas:
        quotas = [q for folder in v1 if (q := _v1_quota(folder)) is not None]
    return min(quotas, default=None)


def cgroup_folders(controller: str, root: Path = CGROUP_ROOT,
                   membership: Path = MEMBERSHIP) -> tuple[list[Path], list[Path]]:
    """The folders of this process's cgroup and of each cgroup above it, where a limit set on
    any of them applies: cgroup v2's (under `root`), and v1's for `controller` (under
    `root/controller`). Either list holds at least `root`'s own folder."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    v2 = [path for line in lines if (path := line.partition("::")[2]) and line.startswith("0::")]
    v1 = [line.split(":", 2)[2] for line in lines
          if line.count(":") >= 2 and controller in line.split(":", 2)[1].split(",")]
    return _and_above(root, v2[0] if v2 else "/"), _and_above(root / controller, v1[0] if v1 else "/")


def _and_above(root: Path, path: str) -> list[Path]:
    """The cgroup folder of `path` under `root`, and each folder above it up to `root`."""
    parts = [part for part in path.strip().split("/") if part and part not in (".", "..")]
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, _, period = (folder / "cpu.max").read_text().strip().partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100000)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota_us = int((folder / "cpu.cfs_quota_us").read_text())
        return None if quota_us <= 0 else quota_us / int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, ZeroDivisionError):
        return None
