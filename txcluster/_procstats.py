# -*- test-case-name: tests.test_procstats,tests.test_control -*-
"""
What the kernel says of a process: its resident memory and CPU time, from
C{/proc}.  Read on demand (a status request, a scrape), never on a timer.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from attrs import frozen

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@frozen
class ProcessUsage:
    """
    @ivar rss: resident memory, in bytes.
    @ivar cpuSeconds: user plus system CPU time, in seconds.
    """

    rss: int
    cpuSeconds: float


def readUsage(pid: int, proc: str = "/proc") -> Optional[ProcessUsage]:
    """
    C{pid}'s usage, or L{None} if it cannot be read (gone, or not Linux).
    """
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"{proc}/{pid}/statm", "rb") as f:
            statm = f.read()
        # The command name may hold spaces and parentheses: split after it.
        fields = stat.rsplit(b")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / _TICKS
        rss = int(statm.split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None
    return ProcessUsage(rss, cpu)


class UsageSampler:
    """
    Samples processes' usage, and each one's CPU share since it was last
    sampled (since it started, the first time).

    @param read: L{readUsage}, or a fake.
    @param now: the clock.
    """

    def __init__(self, now: Callable[[], float], read: Callable[[int], Optional[ProcessUsage]] = readUsage) -> None:
        self._now = now
        self._read = read
        self._last: dict[object, tuple[float, float]] = {}

    def sample(self, key: object, pid: Optional[int], startedAt: Optional[float]) -> tuple:
        """
        @param key: what stands for the process (its record).
        @return: C{(usage, cpuPercent)}; either may be L{None}.
        """
        usage = None if pid is None else self._read(pid)
        if usage is None:
            return None, None
        now = self._now()
        since, cpuBefore = self._last.get(key, (startedAt, 0.0))
        self._last[key] = (now, usage.cpuSeconds)
        if since is None or now - since <= 0:
            return usage, None
        return usage, round(100.0 * (usage.cpuSeconds - cpuBefore) / (now - since), 1)

    def forget(self, key: object) -> None:
        self._last.pop(key, None)


@frozen
class MemoryUsage:
    """
    @ivar bytes: the memory this process holds, in bytes.
    @ivar kind: how it was measured: C{"uss"}, the unique set size (pages
        no other process maps), or C{"rss-shared"}, the resident pages
        that are not file-backed or shared memory, where the kernel gives
        no USS (older kernels, another user's process); this one still
        counts the pages a forked worker shares copy-on-write with its
        master.
    """

    bytes: int
    kind: str


_PRIVATE = (b"Private_Clean:", b"Private_Dirty:", b"Private_Hugetlb:")


def readMemory(pid: int, proc: str = "/proc") -> Optional[MemoryUsage]:
    """
    C{pid}'s own memory, or L{None} if it cannot be read (gone, or not
    Linux).  Unlike L{ProcessUsage.rss}, it leaves out the libraries and
    files other processes map too.
    """
    uss = _uniqueSetSize(f"{proc}/{pid}/smaps_rollup")
    if uss is not None:
        return MemoryUsage(uss, "uss")
    try:
        with open(f"{proc}/{pid}/statm", "rb") as f:
            fields = f.read().split()
        resident, shared = int(fields[1]), int(fields[2])
    except (OSError, IndexError, ValueError):
        return None
    return MemoryUsage(max(0, resident - shared) * _PAGE, "rss-shared")


def _uniqueSetSize(smapsRollup: str) -> Optional[int]:
    """
    The sum of C{smapsRollup}'s C{Private_*} lines, in bytes, or L{None} if
    it cannot be read or lacks C{Private_Clean} or C{Private_Dirty}.
    """
    try:
        with open(smapsRollup, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = {}
    for line in lines:
        fields = line.split()
        if len(fields) == 3 and fields[0] in _PRIVATE and fields[2] == b"kB" and fields[1].isdigit():
            found[fields[0]] = int(fields[1])
    if not set(_PRIVATE[:2]) <= found.keys():
        return None
    return sum(found.values()) * 1024
