# -*- test-case-name: tests.test_master -*-
"""
The heartbeat: the master pings each ready worker over its channel, and
the worker's reactor answers.  A worker whose reactor is blocked does not,
which a liveness check on a side thread would miss.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from txcluster._lifecycle import Phase, WorkerProcess

#: The shortest time between two rounds of pings.
MINIMUM_INTERVAL = 0.05


class Heartbeat:
    """
    Pings every ready worker each C{timeout}/3 seconds; one that has not
    answered for C{timeout} seconds is reported to C{hung} (once).

    @ivar roundTrips: each process's last ping round trip, in seconds (how
        long its reactor took to get to the ping).
    """

    def __init__(
        self,
        clock: IReactorTime,
        timeout: float,
        processes: Callable[[], Iterable[WorkerProcess]],
        ping: Callable[[WorkerProcess], Optional[defer.Deferred]],
        hung: Callable[[WorkerProcess, float], None],
        roundTrip: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        """
        @param timeout: seconds without an answer; 0 disables the heartbeat.
        @param processes: the worker processes there are now.
        @param ping: send a L{Ping}; the Deferred fires with the answer
            (L{None}: the channel is closed, nothing was sent).
        @param hung: called with a process that has not answered and how
            long it has been silent.
        @param roundTrip: called with each answered ping's round trip.
        """
        self._clock = clock
        self._timeout = timeout
        self._processes = processes
        self._ping = ping
        self._hung = hung
        self._roundTrip = roundTrip
        self._sentAt: dict[WorkerProcess, float] = {}
        self._call = None
        self.roundTrips: dict[WorkerProcess, float] = {}

    @property
    def interval(self) -> float:
        return max(MINIMUM_INTERVAL, self._timeout / 3.0)

    def start(self) -> None:
        """
        Start beating (if the timeout is not 0).
        """
        if self._timeout > 0 and self._call is None:
            self._call = self._clock.callLater(self.interval, self._again)

    def stop(self) -> None:
        """
        Stop beating; answers still on their way are ignored.
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._sentAt.clear()

    def forget(self, process: WorkerProcess) -> None:
        """
        C{process} is gone.
        """
        self._sentAt.pop(process, None)
        self.roundTrips.pop(process, None)

    def lag(self, process: WorkerProcess, now: float) -> Optional[float]:
        """
        How late C{process}'s reactor is: its last round trip, or how long
        the ping it has not answered yet has waited, if longer.
        """
        last = self.roundTrips.get(process)
        sentAt = self._sentAt.get(process)
        if sentAt is not None and sentAt != float("inf"):
            waiting = now - sentAt
            if last is None or waiting > last:
                return waiting
        return last

    def noteRoundTrip(self, process: WorkerProcess, seconds: float) -> None:
        """
        A ping sent by someone else (a status request) was answered after
        C{seconds}.
        """
        if process.phase is not Phase.DEAD:
            # Its lag, not a heartbeat: the heartbeat histogram is the
            # heartbeat's alone.
            self.roundTrips[process] = seconds

    def _again(self) -> None:
        self._call = None
        self.beat()
        self.start()

    def beat(self) -> None:
        """
        One round: ping the ready workers that have answered the last ping,
        and report those silent for too long.
        """
        now = self._clock.seconds()
        for process in list(self._processes()):
            if process.phase is not Phase.READY:
                self._sentAt.pop(process, None)
                continue
            sentAt = self._sentAt.get(process)
            if sentAt is not None:
                if now - sentAt >= self._timeout:
                    # Reported once: the master is killing it.
                    self._sentAt[process] = float("inf")
                    self._hung(process, now - sentAt)
                continue
            answer = self._ping(process)
            if answer is None:
                continue
            self._sentAt[process] = now
            answer.addCallbacks(self._answered, lambda f: None, callbackArgs=(process, now))

    def _answered(self, answer, process: WorkerProcess, sentAt: float) -> None:
        if isinstance(answer, dict) and isinstance(answer.get("connections"), int):
            process.connections = max(0, answer["connections"])
        if self._sentAt.get(process) == sentAt:
            del self._sentAt[process]
            roundTrip = self.roundTrips[process] = self._clock.seconds() - sentAt
            self._roundTrip(roundTrip)
