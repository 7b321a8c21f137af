# -*- test-case-name: tests.test_policy -*-
"""
Pure supervision rules: how long to wait before a respawn, when to give up,
when a worker has served enough connections, and how fast a worker may
send commands or log lines.  No clock, no reactor:
callers pass the time in.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Callable

#: Why C{--max-requests} and C{--scheduling shared} do not go together.
MAX_REQUESTS_SHARED = (
    "--max-requests needs --scheduling rr or least-busy: under shared scheduling "
    "the workers accept connections themselves, so the master cannot count them"
)

#: Why a UDP listen is refused under C{--max-requests}.
MAX_REQUESTS_DATAGRAMS = (
    "--max-requests counts connections the master hands out, and a UDP socket is shared "
    "(each worker reads its datagrams itself), so the limit could not hold; "
    "run UDP without --max-requests"
)


def restartDelay(
    quickDeaths: int,
    minimum: float = 0.5,
    maximum: float = 30.0,
    jitter: Callable[[], float] = lambda: random.uniform(0.0, 0.1),
) -> float:
    """
    The delay before respawning a worker.

    @param quickDeaths: how many times in a row this worker died soon after
        it started (0 for a worker that had stayed up: respawn at once).
    @return: 0 for the first death of a worker that had stayed up, then
        C{minimum}, doubling per quick death up to C{maximum}, each
        stretched by C{jitter()} of itself (up to 10 % by default, also at
        the maximum) so that workers failing together do not come back in
        lockstep.
    """
    if quickDeaths <= 0:
        return 0.0
    # 2.0 ** 1024 overflows a float; long before that the doubling is capped.
    base = min(maximum, minimum * 2.0 ** min(quickDeaths - 1, 1000))
    return base * (1.0 + jitter())


class FailureWindow:
    """
    Counts worker failures in a sliding window of time: more than
    C{maxFailures} within C{window} seconds means the cluster gives up.
    """

    def __init__(self, maxFailures: int, window: float) -> None:
        self.maxFailures = maxFailures
        self.window = window
        self._times: deque = deque()

    def record(self, now: float) -> bool:
        """
        A worker failed at C{now}.

        @return: C{True} when that makes too many failures: give up.
        """
        self._times.append(now)
        while self._times and self._times[0] <= now - self.window:
            self._times.popleft()
        return len(self._times) > self.maxFailures

    def count(self, now: float) -> int:
        """
        How many failures lie within the window ending at C{now}.
        """
        return sum(1 for t in self._times if t > now - self.window)


def requestLimit(
    maxRequests: int, jitter: int, randint: Callable[[int, int], int] = random.randint
) -> int:
    """
    How many connections one worker process serves before it is recycled:
    C{maxRequests} plus a random 0..C{jitter}, so that workers started
    together are not recycled together.  0 means never.
    """
    if maxRequests <= 0:
        return 0
    return maxRequests + (randint(0, jitter) if jitter > 0 else 0)


class CommandBudget:
    """
    A token bucket: C{burst} commands at once, then C{rate} per second.

    Pure: the caller passes the time in.
    """

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = now

    def spend(self, now: float) -> bool:
        """
        One command arrived at C{now}.

        @return: L{False} when it exceeds the budget.
        """
        elapsed = max(0.0, now - self._last)
        self._last = max(now, self._last)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        # Rounding must not refuse a worker sending exactly at the rate.
        if self._tokens < 1.0 - 1e-6:
            return False
        self._tokens -= 1.0
        return True
