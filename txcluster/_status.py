# -*- test-case-name: tests.test_control,tests.test_master -*-
"""
What the master tells about the cluster: the L{ClusterStatistics}
snapshot (C{txcluster status}, C{/metrics}), readiness, and the workers'
reports it collects for them (open connections, the applications'
metrics).
"""

from __future__ import annotations

import os
from typing import Optional

from attrs import frozen
from twisted.internet import defer
from twisted.logger import Logger

from txcluster._commands import Ping
from txcluster._lifecycle import Phase
from txcluster._metrics import BadMetrics
from txcluster._procstats import UsageSampler

_log = Logger(namespace="txcluster.master")


@frozen
class WorkerStatistics:
    """
    One worker process (or a worker id waiting to be respawned) as the
    master sees it.

    @ivar state: C{starting}, C{online}, C{ready}, C{draining} (asked to
        leave), C{leaving} (leaving on its own), C{failing} (being killed)
        or C{waiting} (backing off before a respawn).
    @ivar uptime: seconds since it was spawned.
    @ivar restarts: how many times this worker id was respawned.
    @ivar handed: connections it took.
    @ivar listens: the addresses it listens on.
    @ivar serial: the process's number in spawn order (0: none yet).
    @ivar connections: connections it has open, as it last said (L{None}:
        not known yet).
    @ivar rss: its resident memory in bytes (L{None}: not known).
    @ivar cpuSeconds: its user plus system CPU time.
    @ivar cpuPercent: its CPU use since the last snapshot (or its start),
        in percent of one CPU.
    @ivar lag: its last heartbeat's round trip in seconds: how long its
        reactor took to answer (L{None}: none answered yet).
    @ivar memory: its unique memory in bytes (USS, or what stands for it;
        see L{txcluster._procstats.readMemory}), as C{--max-memory} counts
        it (L{None}: not known).
    @ivar recycling: why it is being, or is about to be, recycled
        (C{memory}, C{lifetime}), if it is.
    """

    workerId: int
    pid: Optional[int]
    state: str
    uptime: float
    restarts: int
    handed: int
    listens: tuple
    serial: int = 0
    connections: Optional[int] = None
    rss: Optional[int] = None
    cpuSeconds: Optional[float] = None
    cpuPercent: Optional[float] = None
    lag: Optional[float] = None
    memory: Optional[int] = None
    recycling: Optional[str] = None


@frozen
class ClusterStatistics:
    """
    A snapshot of the cluster.

    @ivar pending: accepted connections waiting for a worker.
    @ivar dropped: accepted connections closed because no worker listened.
    @ivar failures: worker failures within the restart window.
    @ivar ready: worker ids whose current process is ready.
    @ivar minReady: how many must be for the cluster to be ready.
    @ivar stopping: whether a stop has begun.
    """

    workers: tuple
    listeners: tuple
    pending: int
    dropped: int
    failures: int
    pid: int = 0
    uptime: float = 0.0
    app: str = ""
    scheduling: str = ""
    workerCount: int = 0
    ready: int = 0
    minReady: int = 0
    stopping: bool = False


class ClusterStatus:
    """
    Builds snapshots of one master's cluster, and collects what the
    workers report for them.

    @param cluster: the L{txcluster.ClusterService}: its C{config},
        C{reactor}, C{recorder} and C{appMetrics}.
    """

    def __init__(self, cluster, supervisor, processes, table) -> None:
        self._cluster = cluster
        self._supervisor = supervisor
        self._processes = processes
        self._table = table
        self._clock = cluster.reactor
        self._usage = UsageSampler(self._clock.seconds)
        self._refused: set = set()
        processes.gone.append(self._processGone)
        processes.metricsReported = self._metricsReported

    def statistics(self) -> ClusterStatistics:
        cluster = self._cluster
        now = self._clock.seconds()
        supervisor = self._supervisor
        heartbeat = supervisor.heartbeat
        workers = []
        for process in self._processes.sorted():
            slot = supervisor.slotOf(process) or supervisor.slots.get(process.workerId)
            usage, cpuPercent = self._usage.sample(process, process.pid, process.forkedAt)
            # Read now: a sample of --max-memory may be old (and a draining
            # worker is not sampled).
            memory = None
            if process.pid is not None and process.phase is not Phase.DEAD:
                memory = supervisor.recycler.readMemory(process.pid)
            if usage is not None:
                cluster.recorder.cpu(process.workerId, process.serial, usage.cpuSeconds)
            workers.append(
                WorkerStatistics(
                    workerId=process.workerId,
                    pid=process.pid,
                    state=process.phase.value,
                    uptime=now - process.forkedAt,
                    restarts=0 if slot is None else slot.core.restarts,
                    handed=process.handed,
                    listens=self._processes.broker.listensOf(process),
                    serial=process.serial,
                    connections=process.connections,
                    rss=None if usage is None else usage.rss,
                    cpuSeconds=None if usage is None else usage.cpuSeconds,
                    cpuPercent=cpuPercent,
                    lag=heartbeat.lag(process, now),
                    memory=None if memory is None else memory.bytes,
                    recycling=supervisor.recycler.reasonFor(process),
                )
            )
        slots = list(supervisor.slots.values())
        if supervisor.agent.slot is not None:
            slots.insert(0, supervisor.agent.slot)
        for slot in slots:
            if slot.view().state == "respawning":
                workers.append(WorkerStatistics(slot.workerId, None, "waiting", 0.0, slot.core.restarts, 0, ()))
        listeners = self._table.statistics()
        startedAt = cluster.startedAt
        return ClusterStatistics(
            workers=tuple(sorted(workers, key=lambda w: w.workerId)),
            listeners=listeners,
            pending=sum(h.dispatch.pending for h in listeners if h.dispatch is not None),
            dropped=self._table.dropped,
            failures=supervisor.failures(),
            pid=os.getpid(),
            uptime=0.0 if startedAt is None else now - startedAt,
            app=cluster.config.app,
            scheduling=cluster.config.scheduling,
            workerCount=supervisor.workerCount(),
            ready=self.readyWorkers(),
            minReady=cluster.minReady(),
            stopping=cluster.stopping,
        )

    def readyWorkers(self) -> int:
        count = 0
        for slot in self._supervisor.slots.values():
            view = slot.view()
            if view.state in ("serving", "replacing") and view.current is not None and view.current.phase is Phase.READY:
                count += 1
        return count

    def refreshLoad(self, timeout: float) -> defer.Deferred:
        asked = []
        sentAt = self._clock.seconds()
        for process in self._processes.sorted():
            if process.phase is Phase.READY and process.channel.transport is not None:
                d = process.channel.callRemote(Ping)
                asked.append(d.addCallbacks(self._pinged, lambda f: None, (process, sentAt)))
        return _atMost(self._clock, timeout, asked)

    def _pinged(self, answer, process, sentAt: float) -> None:
        _noteLoad(answer, process)
        self._supervisor.heartbeat.noteRoundTrip(process, self._clock.seconds() - sentAt)

    def collectMetrics(self, timeout: float) -> defer.Deferred:
        asked = [
            self._processes.collectMetrics(p)
            for p in self._processes.sorted()
            if p.phase in (Phase.ONLINE, Phase.READY, Phase.DRAINING, Phase.LEAVING)
        ]
        return _atMost(self._clock, timeout, asked)

    def _metricsReported(self, process, text: str) -> None:
        if not self._cluster.servesMetrics:
            # Nothing serves them (no --metrics): not worth a parse.
            return
        try:
            self._cluster.appMetrics.report(process.workerId, process.serial, text, self._clock.seconds())
        except BadMetrics as e:
            if process not in self._refused:
                # Once a process: it would say the same at every scrape.
                self._refused.add(process)
                _log.warn(
                    "{worker} reported metrics the master cannot use ({why}); its last good report is served",
                    worker=process.describe(),
                    why=e.reason[:200],
                )

    def _processGone(self, process) -> None:
        self._usage.forget(process)
        self._refused.discard(process)
        self._cluster.recorder.gone(process.workerId, process.serial)
        self._cluster.appMetrics.gone(process.workerId, process.serial)
        if process.workerId not in self._supervisor.slots and not any(
            p.workerId == process.workerId for p in self._processes.processes
        ):
            # Scaled away: its series are no longer served (a later
            # scale-up of the id goes on from where they were).
            self._cluster.recorder.forget(process.workerId)
            self._cluster.appMetrics.forget(process.workerId)


def _atMost(clock, timeout: float, waits: list) -> defer.Deferred:
    """
    A Deferred that fires once every one of C{waits} has, or after
    C{timeout} seconds, whichever is first.
    """
    if not waits:
        return defer.succeed(None)
    done = defer.Deferred()
    timer = clock.callLater(timeout, lambda: done.called or done.callback(None))

    def over(_):
        if timer.active():
            timer.cancel()
        if not done.called:
            done.callback(None)

    defer.DeferredList(waits, consumeErrors=True).addCallback(over)
    return done


def _noteLoad(answer, process) -> None:
    connections = answer.get("connections") if isinstance(answer, dict) else None
    if isinstance(connections, int):
        process.connections = max(0, connections)
