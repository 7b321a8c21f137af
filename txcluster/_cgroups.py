# -*- test-case-name: tests.test_cgroups -*-
"""
How much of the machine this process may use: the CPUs of its scheduler
affinity and of its cgroup CPU quota (the default C{--workers} in a
container), and its cgroup memory limit (for a start-up log line).

Read once, at start-up.  A file that is missing, unreadable or malformed
sets no limit; nothing here raises.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from typing import Callable, Optional

from attrs import frozen


@frozen
class CPUBudget:
    """
    @ivar count: how many CPUs this process may use, at least 1.
    @ivar source: where C{count} comes from, a phrase for a log line.
    """

    count: int
    source: str


@frozen
class _Quota:
    """
    @ivar cpus: the quota over its period.
    @ivar source: e.g. C{"cgroup v2 CPU quota 150000/100000 in PATH"}.
    """

    cpus: Fraction
    source: str


def cpuBudget(
    affinity: Callable[[], int] | None = None,
    procSelfCgroup: str = "/proc/self/cgroup",
    cgroupRoot: str = "/sys/fs/cgroup",
) -> CPUBudget:
    """
    The CPUs this process may use: those of its scheduler affinity, or
    fewer if a cgroup CPU quota (the tightest of its cgroup and every
    ancestor's, v2 or v1) is tighter, rounded up.

    @param affinity: how many CPUs the scheduler lets this process run on;
        by default C{os.sched_getaffinity(0)}, or C{os.cpu_count()} where
        there is no affinity.
    """
    if affinity is None:
        cpus, where = _schedulerCPUs()
    else:
        cpus, where = affinity(), "in the scheduler affinity"
    cpus = max(1, cpus)
    tightest = min(_cpuQuotas(procSelfCgroup, cgroupRoot), key=lambda q: q.cpus, default=None)
    if tightest is None or tightest.cpus >= cpus:
        return CPUBudget(cpus, f"{_cpus(cpus)} {where}")
    count = max(1, math.ceil(tightest.cpus))
    rounded = "" if count == tightest.cpus else f", rounded up to {count}"
    return CPUBudget(count, f"{tightest.source} ({_cpus(tightest.cpus)}{rounded})")


def memoryLimit(
    procSelfCgroup: str = "/proc/self/cgroup",
    cgroupRoot: str = "/sys/fs/cgroup",
) -> Optional[int]:
    """
    The tightest cgroup memory limit on this process, in bytes: C{memory.max}
    (v2) or C{memory.limit_in_bytes} (v1) of its cgroup and every ancestor;
    L{None} if there is none.
    """
    limits = []
    for version, directory in _directories(procSelfCgroup, cgroupRoot, "memory"):
        name = "memory.max" if version == 2 else "memory.limit_in_bytes"
        limit = _readInt(os.path.join(directory, name))
        # v2 says "max" (no integer) for no limit; v1 a huge page-aligned number.
        if limit is not None and 0 < limit < 2**60:
            limits.append(limit)
    return min(limits, default=None)


def _schedulerCPUs() -> tuple[int, str]:
    try:
        return len(os.sched_getaffinity(0)), "in the scheduler affinity"
    except (AttributeError, OSError):
        return os.cpu_count() or 1, "on the machine (os.cpu_count)"


def _cpus(n: int | Fraction) -> str:
    return f"{float(n):g} CPU{'' if n == 1 else 's'}"


def _cpuQuotas(procSelfCgroup: str, cgroupRoot: str) -> list[_Quota]:
    quotas = []
    for version, directory in _directories(procSelfCgroup, cgroupRoot, "cpu"):
        if version == 2:
            path = os.path.join(directory, "cpu.max")
            fields = (_read(path) or "").split()
            # "max 100000" is no limit: "max" is no integer to _quota.
            quota = _quota(2, fields[0], fields[1], path) if len(fields) == 2 else None
        else:
            path = os.path.join(directory, "cpu.cfs_quota_us")
            quota = _quota(1, _read(path), _read(os.path.join(directory, "cpu.cfs_period_us")), path)
        if quota is not None:
            quotas.append(quota)
    return quotas


def _quota(version: int, quota: Optional[str], period: Optional[str], path: str) -> Optional[_Quota]:
    try:
        q, p = int(quota), int(period)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    # v1 says -1 for no limit.
    if q <= 0 or p <= 0:
        return None
    return _Quota(Fraction(q, p), f"cgroup v{version} CPU quota {q}/{p} in {path}")


def _directories(procSelfCgroup: str, cgroupRoot: str, controller: str) -> list[tuple[int, str]]:
    """
    Where C{controller}'s files for this process may be, as C{(version,
    directory)}: its cgroup's directory and every ancestor's up to the
    mount, in the unified (v2) hierarchy and in C{controller}'s v1 one.
    They may not exist: a missing file sets no limit.
    """
    found = []
    for line in (_read(procSelfCgroup) or "").splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        if hierarchy == "0" and controllers == "":
            mounts = [(2, cgroupRoot)]
            # A hybrid host mounts the unified hierarchy beside the v1 ones.
            if not os.path.exists(os.path.join(cgroupRoot, "cgroup.controllers")):
                mounts.append((2, os.path.join(cgroupRoot, "unified")))
        elif controller in controllers.split(","):
            # Mounted as "cpu,cpuacct", often with a "cpu" link to it.
            names = dict.fromkeys([controllers, controller])
            mounts = [(1, os.path.join(cgroupRoot, name)) for name in names]
        else:
            continue
        for version, mount in mounts:
            found.extend((version, directory) for directory in _ancestry(mount, path))
    return list(dict.fromkeys(found))


def _ancestry(mount: str, path: str) -> list[str]:
    """
    The directory of cgroup C{path} under C{mount} and each of its
    ancestors up to C{mount}, deepest first.  Without a cgroup namespace a
    container sees the host's path, and its own cgroup at C{mount}; with
    one, its path is C{/}, or climbs out of it with C{..}: then only
    C{mount}.
    """
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        parts = []
    return [os.path.join(mount, *parts[:n]) for n in range(len(parts), -1, -1)]


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def _readInt(path: str) -> Optional[int]:
    try:
        return int(_read(path))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
