# -*- test-case-name: tests.test_recycling -*-
"""
Recycling: a worker's process replaced by a fresh one through the same
ready-gated path as a reload, when it was sent its C{--max-requests}
connections, when an operator asks (C{txcluster recycle}), when its memory
stays over C{--max-memory} or when it is older than C{--max-lifetime}.

Memory and age recyclings run one at a time across the pool, so that the
cluster is never more than one worker short of fresh capacity because of
them.
"""

from __future__ import annotations

import random
from typing import Callable, Optional, Protocol

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from txcluster._deferreds import observe
from txcluster._events import WorkerRecycling
from txcluster._lifecycle import ClusterStopped, Phase, Slot, UnknownWorker, WorkerProcess, seconds
from txcluster._procstats import MemoryUsage, readMemory

_log = Logger(namespace="txcluster.master")

#: Seconds between two samples of the workers' memory (C{--max-memory}).
MEMORY_INTERVAL = 5.0

#: Samples in a row over C{--max-memory} before a worker is recycled: a
#: short peak (a large request) is not a leak.
MEMORY_SAMPLES = 3

_MEMORY_KINDS = {
    "uss": "unique memory (USS)",
    "rss-shared": "resident memory less shared pages",
}


def mebibytes(count: int) -> str:
    return f"{count / (1024 * 1024):.1f} MiB"


class RecycleHost(Protocol):
    """
    What the L{Recycler} needs of the supervisor.
    """

    slots: dict

    def stopping(self) -> bool:
        """
        Whether the cluster is stopping.
        """

    def slotOf(self, process: WorkerProcess) -> Optional[Slot]:
        """
        The slot C{process} belongs to, while it does.
        """

    def replace(self, slot: Slot, reason: str, done: defer.Deferred) -> None:
        """
        Replace C{slot}'s ready process; C{done} says how it went.
        """

    def restartDelay(self, quickDeaths: int) -> float:
        """
        The backoff before the C{quickDeaths}-th try.
        """

    def emit(self, event) -> None:
        """
        Tell the cluster's observers.
        """


class Recycler:
    """
    Watches the serving workers' memory and age and replaces, one at a
    time, those over a limit.

    @param maxMemory: bytes of unique memory a worker may keep using
        (0: no limit).
    @param memoryInterval: seconds between samples.
    @param maxLifetime: seconds a worker process serves before it is
        replaced (0: no limit), plus up to C{lifetimeJitter}.
    @param minDelay: the shortest wait before a failed recycling is tried
        again.
    @param readMemory: reads a pid's memory (default:
        L{txcluster._procstats.readMemory}).
    @param uniform: L{random.uniform}, or a fake.
    """

    def __init__(
        self,
        host: RecycleHost,
        clock,
        maxMemory: int = 0,
        memoryInterval: float = MEMORY_INTERVAL,
        maxLifetime: float = 0.0,
        lifetimeJitter: float = 0.0,
        minDelay: float = 0.5,
        readMemory: Optional[Callable[[int], Optional[MemoryUsage]]] = None,
        uniform: Optional[Callable[[float, float], float]] = None,
    ) -> None:
        self._host = host
        self._clock = clock
        self._maxMemory = maxMemory
        self._memoryInterval = memoryInterval
        self._maxLifetime = maxLifetime
        self._jitter = lifetimeJitter
        self._read = readMemory
        self._uniform = uniform or random.uniform
        self._loop: Optional[task.LoopingCall] = None
        self._deadlines: dict[WorkerProcess, object] = {}
        self._over: dict[WorkerProcess, int] = {}
        self._queue: list[tuple[WorkerProcess, str]] = []
        self._current: Optional[tuple[WorkerProcess, str]] = None
        self._tries: dict[WorkerProcess, int] = {}
        self._retries: dict[WorkerProcess, object] = {}
        self._minDelay = minDelay

    # What the supervisor tells it ----------------------------------------------

    def start(self) -> None:
        if self._maxMemory and self._loop is None:
            self._loop = task.LoopingCall(self.sample)
            self._loop.clock = self._clock
            self._loop.start(self._memoryInterval, now=False).addErrback(
                lambda f: _log.failure("sampling the workers' memory failed", f)
            )

    def serving(self, process: WorkerProcess) -> None:
        """
        C{process} is ready and takes connections: its lifetime starts.
        """
        if self._maxLifetime and process not in self._deadlines:
            lifetime = self._maxLifetime + (self._uniform(0.0, self._jitter) if self._jitter else 0.0)
            self._deadlines[process] = self._clock.callLater(lifetime, self._expired, process, lifetime)

    def forget(self, process: WorkerProcess) -> None:
        """
        C{process} ended.
        """
        for calls in (self._deadlines, self._retries):
            call = calls.pop(process, None)
            if call is not None and call.active():
                call.cancel()
        self._over.pop(process, None)
        self._tries.pop(process, None)
        self._queue = [(p, r) for p, r in self._queue if p is not process]

    def stop(self) -> None:
        """
        The cluster stops: no more recycling.
        """
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for calls in (self._deadlines, self._retries):
            for call in calls.values():
                if call.active():
                    call.cancel()
            calls.clear()
        self._queue = []

    # What it tells ---------------------------------------------------------------

    def reasonFor(self, process: WorkerProcess) -> Optional[str]:
        """
        Why C{process} is being or about to be recycled, if it is.
        """
        if self._current is not None and self._current[0] is process:
            return self._current[1]
        for queued, reason in self._queue:
            if queued is process:
                return reason
        return None

    def readMemory(self, pid: int) -> Optional[MemoryUsage]:
        """
        C{pid}'s memory now, as C{--max-memory} counts it.
        """
        return (self._read or readMemory)(pid)

    # Requests and operators ------------------------------------------------------

    def limitReached(self, process: WorkerProcess) -> None:
        """
        C{process} has been sent all the connections it may take
        (C{--max-requests}): replace it now, gated on its replacement's
        readiness (not queued: meanwhile it takes connections only when no
        other worker can, as the dispatchers see its allowance).
        """
        slot = self._host.slotOf(process)
        if slot is None or self._host.stopping():
            return
        view = slot.view()
        if view.state != "serving" or view.current is not process:
            return
        _log.info(
            "{worker} was sent its {limit} connections (--max-requests): recycling it",
            worker=process.describe(),
            limit=process.allowance.limit,
            workerId=process.workerId,
            pid=process.pid,
        )
        self._host.emit(WorkerRecycling(process.workerId, process.pid, "max-requests"))
        done = defer.Deferred()
        done.addCallbacks(lambda _: self._tries.pop(process, None), self._limitFailed, errbackArgs=(process,))
        self._host.replace(slot, "recycle", done)

    def _limitFailed(self, failure: Failure, process: WorkerProcess) -> None:
        # The worker serves on, over its limit: try again on a timer,
        # backing off like a respawn (each failed boot counts towards
        # --max-restarts anyway).
        if failure.check(ClusterStopped):
            return
        tries = self._tries[process] = self._tries.get(process, 0) + 1
        delay = max(self._minDelay, self._host.restartDelay(tries))
        _log.error(
            "recycling worker {workerId} failed: {why}; trying again in {delay}",
            workerId=process.workerId,
            why=failure.getErrorMessage(),
            delay=seconds(delay),
        )
        self._retries[process] = self._clock.callLater(delay, self._retryLimit, process)

    def _retryLimit(self, process: WorkerProcess) -> None:
        self._retries.pop(process, None)
        if process.phase is not Phase.DEAD:
            self.limitReached(process)

    def recycle(self, workerId: int) -> defer.Deferred:
        """
        Replace worker C{workerId}'s process now (an operator's
        C{txcluster recycle}).

        @return: a Deferred firing with C{(old, new)} processes once the
            old one has exited, or failing with L{KeyError} (no such
            worker), L{ReloadFailed} (the replacement failed; the old one
            serves on) or L{ClusterStopped}.
        """
        slot = self._host.slots.get(workerId)
        view = None if slot is None else slot.view()
        if view is None or view.current is None or view.current.phase is Phase.DEAD:
            return defer.fail(UnknownWorker(f"no running worker {workerId}"))
        if self._host.stopping():
            return defer.fail(ClusterStopped("the cluster is stopping"))
        old = view.current
        self._host.emit(WorkerRecycling(old.workerId, old.pid, "control"))
        done = defer.Deferred()
        self._host.replace(slot, "recycle", done)

        def replaced(_):
            new = slot.view().current
            return observe(old.exited).addCallback(lambda _: (old, new))

        return done.addCallback(replaced)

    # Memory and age ----------------------------------------------------------------

    def _expired(self, process: WorkerProcess, lifetime: float) -> None:
        self._deadlines.pop(process, None)
        _log.info(
            "{worker} has served for {lifetime} (--max-lifetime): recycling it",
            worker=process.describe(),
            lifetime=seconds(lifetime),
            workerId=process.workerId,
            pid=process.pid,
        )
        self.request(process, "lifetime")

    def sample(self) -> None:
        """
        Read every serving worker's memory; one over the limit for
        L{MEMORY_SAMPLES} samples in a row is recycled.
        """
        for process in self._serving():
            usage = None if process.pid is None else self.readMemory(process.pid)
            if usage is None:
                continue
            if usage.bytes <= self._maxMemory:
                self._over.pop(process, None)
                continue
            over = self._over[process] = self._over.get(process, 0) + 1
            if over >= MEMORY_SAMPLES and self.reasonFor(process) is None and process not in self._retries:
                _log.warn(
                    "{worker} uses {used} of {kind}, over --max-memory {limit} for {count} samples "
                    "in a row: recycling it",
                    worker=process.describe(),
                    used=mebibytes(usage.bytes),
                    kind=_MEMORY_KINDS.get(usage.kind, usage.kind),
                    limit=mebibytes(self._maxMemory),
                    count=over,
                    workerId=process.workerId,
                    pid=process.pid,
                )
                self.request(process, "memory")

    def _serving(self) -> list:
        serving = []
        for workerId in sorted(self._host.slots):
            view = self._host.slots[workerId].view()
            if view.state == "serving" and view.current.phase is Phase.READY:
                serving.append(view.current)
        return serving

    # One at a time -----------------------------------------------------------------

    def request(self, process: WorkerProcess, reason: str) -> None:
        """
        Replace C{process} for C{reason} once no other recycling runs.
        """
        if self.reasonFor(process) is not None or self._host.stopping():
            return
        self._queue.append((process, reason))
        self._next()

    def _next(self) -> None:
        while self._current is None and self._queue and not self._host.stopping():
            process, reason = self._queue.pop(0)
            slot = self._host.slotOf(process)
            view = None if slot is None else slot.view()
            if view is None or view.current is not process or process.phase is not Phase.READY:
                continue
            if view.state != "serving":
                # A reload or another recycling replaces it already: if that
                # fails, it serves on, and is asked for again.
                if process not in self._retries:
                    self._retries[process] = self._clock.callLater(
                        max(self._minDelay, 1.0), self._retry, process, reason
                    )
                continue
            self._current = (process, reason)
            self._host.emit(WorkerRecycling(process.workerId, process.pid, reason))
            done = defer.Deferred()
            done.addBoth(self._finished, process, reason)
            self._host.replace(slot, reason, done)

    def _finished(self, result, process: WorkerProcess, reason: str) -> None:
        self._current = None
        self._over.pop(process, None)
        if isinstance(result, Failure) and not result.check(ClusterStopped):
            tries = self._tries[process] = self._tries.get(process, 0) + 1
            delay = max(self._minDelay, self._host.restartDelay(tries))
            _log.error(
                "recycling {worker} ({reason}) failed: {why}; it serves on, and is tried again in {delay}",
                worker=process.describe(),
                reason=reason,
                why=result.getErrorMessage(),
                delay=seconds(delay),
                workerId=process.workerId,
                pid=process.pid,
            )
            self._retries[process] = self._clock.callLater(delay, self._retry, process, reason)
        self._clock.callLater(0, self._next)

    def _retry(self, process: WorkerProcess, reason: str) -> None:
        self._retries.pop(process, None)
        if process.phase is Phase.READY:
            self.request(process, reason)
