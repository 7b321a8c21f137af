# -*- test-case-name: tests.test_master -*-
"""
The supervisor: keeps one L{Slot} per worker id and carries out what the
slots decide — spawning, respawning with backoff, giving up, rolling
reloads, scaling, recycling (C{--max-requests}) and the graceful stop.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from txcluster import _events
from txcluster._agent import AgentKeeper, AgentRelay
from txcluster._commands import AGENT_ID, Ping
from txcluster._deferreds import observe
from txcluster._handles import HandleTable
from txcluster._heartbeat import Heartbeat
from txcluster._lifecycle import (
    ClusterStopped,
    Drain,
    Effects,
    Fire,
    Kill,
    Phase,
    Serve,
    Slot,
    Spawn,
    WorkerProcess,
    seconds,
)
from txcluster._policy import FailureWindow
from txcluster._processes import ProcessTable
from txcluster._recycling import Recycler
from txcluster._reload import RollingReload

_log = Logger(namespace="txcluster.master")


class Supervisor:
    """
    Runs C{config.workers} worker slots over a L{ProcessTable}.

    It is each slot's L{txcluster._lifecycle.SlotHost} and the table's
    L{txcluster._processes.ProcessObserver}.

    @param restartPolicy: the delay before a respawn, given how many times
        in a row the worker id was lost soon after it started.
    @param giveUp: called with the exit code once too many workers failed.
    """

    def __init__(
        self,
        config,
        clock,
        restartPolicy: Callable[[int], float],
        emit: Callable[[Any], None],
        giveUp: Callable[[int], None],
    ) -> None:
        self.config = config
        self._clock = clock
        self._restartPolicy = restartPolicy
        self._emit = emit
        self._giveUp = giveUp
        self._failures = FailureWindow(config.maxRestarts, config.restartWindow)
        self.slots: dict[int, Slot] = {}
        self.target = config.workers
        self.processes: Optional[ProcessTable] = None
        self.handles: Optional[HandleTable] = None
        self.heartbeat: Optional[Heartbeat] = None
        self._watchers: dict[Slot, list] = {}
        self._reload = RollingReload(self)
        self.recycler = Recycler(
            self,
            clock,
            maxMemory=int(config.maxMemory * 1024 * 1024),
            memoryInterval=config.memoryInterval,
            maxLifetime=config.maxLifetime,
            lifetimeJitter=config.maxLifetimeJitter,
            minDelay=config.minRestartDelay,
        )
        self.agent = AgentKeeper(
            self,
            AgentRelay(clock, configured=config.agent is not None, timeout=config.agentTimeout),
            config.maxRestarts,
            config.restartWindow,
        )
        self._stopping: Optional[defer.Deferred] = None
        self.gaveUp = False
        self._checkedListens = False
        #: Called with a worker id and why, each time one gets a new process.
        self.restarted: Callable[[int, str], None] = lambda workerId, reason: None
        #: Called with how each reload request ended (C{succeeded}, ...).
        self.reloaded: Callable[[str], None] = lambda outcome: None
        #: Called with each heartbeat's round trip.
        self.roundTrip: Callable[[float], None] = lambda seconds: None

    def attach(self, processes: ProcessTable, handles: HandleTable) -> None:
        """
        Work with C{processes}, whose connections C{handles} dispatch.
        """
        self.processes = processes
        self.handles = handles
        self.heartbeat = Heartbeat(
            self._clock,
            self.config.workerTimeout,
            lambda: self.processes.processes,
            lambda p: p.channel.callRemote(Ping) if p.channel.transport is not None else None,
            processes.hung,
            lambda seconds: self.roundTrip(seconds),
        )

    # SlotHost ------------------------------------------------------------------

    @property
    def startTimeout(self) -> float:
        return self.config.startTimeout

    @property
    def stableAfter(self) -> float:
        return self.config.stableAfter

    @property
    def maxRestartDelay(self) -> float:
        return self.config.maxRestartDelay

    def seconds(self) -> float:
        return self._clock.seconds()

    def callLater(self, delay: float, f: Callable, *args):
        return self._clock.callLater(delay, f, *args)

    def restartDelay(self, quickDeaths: int) -> float:
        return self._restartPolicy(quickDeaths)

    def emit(self, event) -> None:
        self._emit(event)

    def timerFired(self, slot: Slot, event: Callable[[Slot], Effects]) -> None:
        self.run(slot, event(slot))

    # Effects -------------------------------------------------------------------

    def run(self, slot: Slot, effects: Effects) -> None:
        """
        Carry out what C{slot} decided, in order.
        """
        for effect in effects:
            if isinstance(effect, Spawn):
                if not self.processes.spawn(effect.process, self.target):
                    self.run(slot, slot.processLost(effect.process))
            elif isinstance(effect, Serve):
                self._serve(effect.process)
            elif isinstance(effect, Drain):
                self.processes.drain(effect.process, effect.reason, effect.timeout)
            elif isinstance(effect, Kill):
                self.processes.condemn(effect.process, effect.how)
            elif isinstance(effect, Fire):
                _fire(effect.waiters, effect.result)
        watchers = self._watchers.pop(slot, ())
        _fire(watchers, None)

    def _serve(self, process: WorkerProcess) -> None:
        # Observers hear of it once the slot says so (one may reload or
        # scale from there), and before the old worker is told to leave.
        self._emit(_events.WorkerReady(process.workerId, process.pid))
        if process.workerId == AGENT_ID:
            self.agent.served(process)
            return
        self.agent.relay.workersChanged(self.readyIds())
        if all(s.view().state == "serving" for s in self.slots.values()):
            # Every worker is ready and has made its listens: a socket kept
            # open for the replacement of a dead worker that nobody took
            # up again would accept connections no one will serve.
            self.handles.closeOrphans()
            if not self._checkedListens:
                self._checkedListens = True
                for handle in self.handles.unused():
                    _log.warn(
                        "every worker is ready and none listens on {address} ({how}): its "
                        "connections wait for a worker that does",
                        address=handle.describe(),
                        how="passed by systemd" if handle.inherited else "--listen",
                    )
        self.recycler.serving(process)
        if process.allowance.exhausted:
            self.recycler.limitReached(process)

    # Starting ------------------------------------------------------------------

    def start(self) -> None:
        if self.config.agent is not None:
            self.agent.start(self._startWorkers)
        else:
            self._startWorkers()
        self.heartbeat.start()
        self.recycler.start()

    def _startWorkers(self) -> None:
        if self._stopping is None:
            for workerId in range(1, self.target + 1):
                # (A scale while the agent booted may have started some.)
                if workerId not in self.slots:
                    self._startSlot(workerId)

    def readyIds(self) -> tuple:
        """
        The worker ids whose current process is ready.
        """
        return tuple(
            w for w, slot in sorted(self.slots.items())
            if slot.view().current is not None and slot.view().current.phase is Phase.READY
        )

    def _startSlot(self, workerId: int) -> Slot:
        slot = self.slots[workerId] = Slot(workerId, self, self.processes.new)
        self.run(slot, slot.start())
        return slot

    def slotOf(self, process: WorkerProcess) -> Optional[Slot]:
        if process.workerId == AGENT_ID:
            return self.agent.slotOf(process)
        slot = self.slots.get(process.workerId)
        if slot is not None and process in slot.view().processes:
            return slot
        return None

    # ProcessObserver -----------------------------------------------------------

    def processReady(self, process: WorkerProcess) -> None:
        slot = self.slotOf(process)
        if slot is not None:
            self.run(slot, slot.processReady(process))

    def processLost(self, process: WorkerProcess) -> None:
        if process.workerId == AGENT_ID:
            self.agent.relay.agentLost(process)
            if process.phase is not Phase.DEAD:
                # Never two agents: the next starts once this one is gone
                # (processEnded says so again).
                return
        slot = self.slotOf(process)
        if slot is not None:
            restarts = slot.core.restarts
            self.run(slot, slot.processLost(process))
            if slot.core.restarts > restarts:
                self.restarted(process.workerId, _restartReason(process))

    def processEnded(self, process: WorkerProcess) -> None:
        self.heartbeat.forget(process)
        self.recycler.forget(process)
        ending = process.ending
        if process.workerId == AGENT_ID:
            failed = ending.failure is not None and self._stopping is None and not self.gaveUp
            if self.agent.ended(process, failed, self._clock.seconds()):
                self._gaveUpOn(process, "agent failures")
        elif ending.failure is not None and self._stopping is None and not self.gaveUp:
            slot = self.slotOf(process)
            view = None if slot is None else slot.view()
            if view is not None and view.state == "replacing" and view.successor is process:
                # A replacement (a reload's, a recycling's) that failed
                # while the process it was to replace serves on: the
                # cluster lost nothing, so this does not count towards
                # giving up (which would stop the healthy workers).
                _log.warn(
                    "{worker}, a replacement, {how}; {current} serves on (not counted towards --max-restarts)",
                    worker=process.describe(),
                    how=ending.failure,
                    current=view.current.describe(),
                    workerId=process.workerId,
                    pid=process.pid,
                )
            elif self._failures.record(self._clock.seconds()):
                self._gaveUpOn(process)
        self.processLost(process)
        if process.workerId != AGENT_ID:
            self.agent.relay.workersChanged(self.readyIds())

    def failures(self) -> int:
        return self._failures.count(self._clock.seconds())

    def _gaveUpOn(self, process: WorkerProcess, what: str = "worker failures") -> None:
        self.gaveUp = True
        tail = "\n".join(process.output.stderrTail) or f"({process.describe()} wrote nothing on stderr)"
        _log.critical(
            "giving up: more than {maxRestarts} {what} within {window}; "
            "the last was {worker}, which {how}. Its last error output:\n{tail}",
            maxRestarts=self.config.maxRestarts,
            what=what,
            window=seconds(self.config.restartWindow),
            worker=process.describe(),
            how=process.ending.failure,
            tail=tail,
            workerId=process.workerId,
            pid=process.pid,
        )
        self._giveUp(1)

    # Reloading -----------------------------------------------------------------

    def reload(self, agent: bool = False) -> defer.Deferred:
        """
        See L{txcluster.ClusterService.reload}.
        """
        return self._reload.reload(agent)

    @property
    def reloading(self) -> bool:
        return self._reload.running

    def reloadProgress(self) -> tuple[int, int]:
        return self._reload.progress()

    def stopping(self) -> bool:
        return self._stopping is not None

    def changed(self, slot: Slot) -> defer.Deferred:
        """
        A Deferred firing after C{slot}'s next input.
        """
        d = defer.Deferred()
        self._watchers.setdefault(slot, []).append(d)
        return d

    def replace(self, slot: Slot, reason: str, done: defer.Deferred) -> None:
        """
        Replace C{slot}'s ready process, gated on its replacement's
        readiness; C{done} says how it went (see L{Slot.replace}).
        """
        joined = slot.view().successor is not None
        self.run(slot, slot.replace(reason, done))
        view = slot.view()
        if view.state == "replacing" and not joined:
            self.restarted(slot.workerId, reason)
        if view.state == "replacing" and view.successor.pid is not None:
            _log.info(
                "{reason}: {worker} is replaced by pid {newPid}; it serves until the replacement is ready",
                reason=reason,
                worker=view.current.describe(),
                newPid=view.successor.pid,
                workerId=slot.workerId,
                pid=view.current.pid,
            )

    # Scaling -------------------------------------------------------------------

    def workerCount(self) -> int:
        return len(self.slots)

    def scale(self, count: int) -> defer.Deferred:
        """
        See L{txcluster.ClusterService.scale}.
        """
        if count < 1:
            return defer.fail(ValueError(f"a cluster needs at least 1 worker, not {count}"))
        if self._stopping is not None:
            return defer.fail(ClusterStopped("the cluster is stopping"))
        active = sorted(self.slots)
        waits: list = []
        self.target = count
        if count > len(active):
            # An id still draining after a scale-down is free again: worker
            # ids stay 1..N.
            newIds = [w for w in range(1, count + 1) if w not in self.slots][: count - len(active)]
            _log.info(
                "scaling up from {old} to {new} workers: starting {ids}",
                old=len(active),
                new=count,
                ids=newIds,
            )
            for workerId in newIds:
                waits.append(self._startSlot(workerId).whenReady())
        elif count < len(active):
            retiring = active[count:]
            _log.info(
                "scaling down from {old} to {new} workers: draining {ids}",
                old=len(active),
                new=count,
                ids=retiring,
            )
            for workerId in retiring:
                waits.append(self._retire(self.slots.pop(workerId)))
        self.processes.tellCount(count)
        return defer.gatherResults(waits, consumeErrors=True).addCallbacks(lambda _: None, _firstFailure)

    def _retire(self, slot: Slot) -> defer.Deferred:
        held = slot.view().processes
        self.run(slot, slot.retire())
        gone = defer.DeferredList([observe(p.exited) for p in held])

        def retired(_):
            _log.info("worker {workerId} retired", workerId=slot.workerId)

        return gone.addCallback(retired)

    # Stopping ------------------------------------------------------------------

    def stop(self) -> defer.Deferred:
        """
        See L{txcluster.ClusterService.stopService}.
        """
        if self._stopping is None:
            self._stopping = defer.ensureDeferred(self._stop())
        return observe(self._stopping)

    async def _stop(self) -> None:
        _log.info(
            "master stopping: {count} worker processes{agent}, graceful timeout {timeout}",
            count=len([p for p in self.processes.processes if p.workerId != AGENT_ID]),
            agent=" and the agent" if any(p.workerId == AGENT_ID for p in self.processes.processes) else "",
            timeout=seconds(self.config.gracefulTimeout),
        )
        self.processes.stopping = True
        self.heartbeat.stop()
        self.recycler.stop()
        self.agent.halt()
        deadline = self._clock.seconds() + self.config.gracefulTimeout
        # Every slot stops now (nothing respawns, nobody waits for a ready
        # worker any more); its processes are asked to leave once the
        # connections already accepted have gone to them.
        drains: list = []
        for slot in list(self.slots.values()):
            effects = slot.stop()
            drains.extend(e for e in effects if isinstance(e, Drain))
            self.run(slot, [e for e in effects if not isinstance(e, Drain)])
        self.handles.stopAccepting()
        idle = self.handles.whenIdle()
        timeout = self._clock.callLater(self.config.gracefulTimeout, idle.cancel)
        try:
            await idle
        except defer.CancelledError:
            _log.warn("connections still waiting for a worker after the graceful timeout")
        else:
            if timeout.active():
                timeout.cancel()
        # Handing out the last accepted connections is part of the graceful
        # period, not added to it.
        remaining = max(0.0, deadline - self._clock.seconds())
        for drain in drains:
            self.processes.drain(drain.process, drain.reason, remaining)
        # And those no slot holds any more: leaving on their own, or
        # draining after a reload or a scale-down (whose own deadline, if
        # sooner, stands).
        workers = [p for p in self.processes.sorted() if p.workerId != AGENT_ID]
        for process in workers:
            self.processes.drain(process, "stop", remaining)
        await defer.DeferredList([observe(p.exited) for p in workers])
        # The agent goes last: the workers may ask it for things until
        # they are gone.
        if self.config.agent is not None:
            _log.info("the workers are gone: stopping the agent")
            await self.agent.stop(max(0.0, deadline - self._clock.seconds()))
        await defer.DeferredList([observe(p.exited) for p in list(self.processes.processes)])
        self.handles.closeAll()
        self.slots.clear()
        _log.info("master stopped: all workers are gone")


def _restartReason(process: WorkerProcess) -> str:
    """
    Why C{process}'s worker id is getting a new process, for the metrics:
    C{hung}, C{failure} or C{left} (it ended, or left, on its own).
    """
    ending = process.ending
    failed = ending.failure is not None if ending is not None else process.phase is Phase.FAILING
    if failed:
        return "hung" if "heartbeat" in (process.why or "") else "failure"
    return "left"


def _fire(waiters, result) -> None:
    for d in waiters:
        if d.called:
            continue
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)


def _firstFailure(failure: Failure) -> Failure:
    """
    The failure inside a L{defer.FirstError}, so that callers see the
    documented exception (L{ClusterStopped}) rather than the wrapper.
    """
    if failure.check(defer.FirstError):
        return failure.value.subFailure
    return failure

