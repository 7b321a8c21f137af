# -*- test-case-name: tests.test_control -*-
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
