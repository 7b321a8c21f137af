# -*- test-case-name: tests.test_master -*-
"""
L{ClusterService}: the master.  It spawns the workers, answers their
channel, shares its listening sockets with them, and supervises them:
respawn with backoff and a give-up rule, start timeout, heartbeat, rolling
reload gated on readiness, scaling and recycling.

Each worker id (1..N) is a slot whose state carries its own data; each
process is one L{_Process} record.
"""

from __future__ import annotations

import json
import os
import resource
import signal as signalModule
from typing import Any, Callable, Optional, Union

from attrs import field, frozen, mutable, validators
from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure

from txcluster import _commands, _events
from txcluster._commands import (
    BindFailed,
    Disconnect,
    ListenRefused,
    Ping,
    ToWorker,
    UnknownListen,
    WorkerCount,
)
from txcluster._channel import MasterChannel
from txcluster._handles import SCHEDULING, HandleTable, HandleStatistics
from txcluster._scheduler import DEFAULT_WINDOW
from txcluster._policy import FailureWindow, requestLimit, restartDelay
from txcluster._process import WorkerOutput, spawnWorker
from txcluster._deferreds import observe
from txcluster._access import ListenPolicy, normalizeAddress, parseDeclared, parsePattern, workerIdentity
from txcluster._sockets import KINDS, ListenKey

_log = Logger(namespace="txcluster.master")

#: How long a worker whose channel broke may take to exit before it is killed.
CHANNEL_LOST_GRACE = 2.0
#: How long a hung worker has to write its stack before it is killed.
STACK_DUMP_GRACE = 1.0


class ReloadFailed(Exception):
    """
    A replacement worker did not become ready; the reload stopped there and
    the old worker keeps serving.
    """


class ClusterStopped(Exception):
    """
    The cluster stopped (or gave up) before the operation finished.
    """


def _each(parse):
    def validate(instance, attribute, values):
        for value in values:
            parse(value)

    return validate


def _positive(instance, attribute, value):
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative, not {value!r}")


@frozen
class ClusterConfig:
    """
    Everything a L{ClusterService} is told; see C{docs/operations.md}.

    @ivar app: the C{.tac} or C{.py} file defining C{application}.
    @ivar workers: how many workers to run.
    @ivar scheduling: C{rr}, C{shared} or C{least-busy}.
    @ivar gracefulTimeout: how long a leaving worker may take to finish
        its connections before it is killed.
    @ivar startTimeout: how long a new worker may take to become ready.
    @ivar maxRestarts: more failures than this within C{restartWindow}
        seconds and the master gives up.
    @ivar workerTimeout: heartbeat timeout; 0 disables the heartbeat.
    @ivar reloadConcurrency: how many workers a reload replaces at once.
    @ivar maxRequests: connections a worker serves before it is recycled
        (0: never), plus up to C{maxRequestsJitter}.
    @ivar minRestartDelay: the first backoff delay after a quick death.
    @ivar maxRestartDelay: the longest backoff delay.
    @ivar stableAfter: a worker up this long no longer counts as dying
        quickly: its next death respawns at once.
    @ivar env: the workers' environment (default: the master's).
    @ivar listens: endpoint descriptions (C{tcp:80}, C{unix:/run/app.sock})
        the master binds at start-up, before twistd drops its privileges.
    @ivar allowListen: C{--allow-listen} rules: what workers may have the
        master bind (see L{txcluster._access.parsePattern}).
    @ivar user: the user the workers run as (a name or a uid); L{None}:
        the master's.
    @ivar group: the workers' group (a name or a gid); L{None}: the user's
        primary group (or the master's).
    """

    app: str
    workers: int = field(default=1, validator=validators.ge(1))
    scheduling: str = field(default="rr", validator=validators.in_(SCHEDULING))
    gracefulTimeout: float = field(default=30.0, converter=float, validator=_positive)
    startTimeout: float = field(default=30.0, converter=float, validator=_positive)
    maxRestarts: int = field(default=5, validator=_positive)
    restartWindow: float = field(default=60.0, converter=float, validator=_positive)
    workerTimeout: float = field(default=30.0, converter=float, validator=_positive)
    reloadConcurrency: int = field(default=1, validator=validators.ge(1))
    maxRequests: int = field(default=0, validator=_positive)
    maxRequestsJitter: int = field(default=0, validator=_positive)
    minRestartDelay: float = field(default=0.5, converter=float, validator=_positive)
    maxRestartDelay: float = field(default=30.0, converter=float, validator=_positive)
    stableAfter: float = field(default=10.0, converter=float, validator=_positive)
    env: Optional[dict] = None
    listens: tuple = field(default=(), converter=tuple, validator=_each(parseDeclared))
    allowListen: tuple = field(default=(), converter=tuple, validator=_each(parsePattern))
    user: Optional[str] = None
    group: Optional[str] = None


# One record per worker process.


@mutable(eq=False)
class _Process:
    workerId: int
    serial: int
    output: WorkerOutput
    channel: "MasterChannel"
    forkedAt: float
    transport: Any = None
    state: str = "starting"
    readyAt: Optional[float] = None
    handed: int = 0
    requestLimit: int = 0
    expectedExit: bool = False
    stopReason: Optional[str] = None
    failedHow: Optional[str] = None
    killTimer: Any = None
    pingSentAt: Optional[float] = None
    exited: defer.Deferred = field(factory=defer.Deferred)
    listens: dict = field(factory=dict)
    #: The listens it reported up with Listening (each is logged once).
    listening: set = field(factory=set)
    paused: bool = False
    pid: Optional[int] = None

    def __repr__(self) -> str:
        return f"<worker {self.workerId} pid {self.pid}>"


# Slot states: each carries what it needs.


@frozen(eq=False)
class _Starting:
    process: _Process
    deadline: Any


@frozen(eq=False)
class _Running:
    process: _Process


@frozen(eq=False)
class _Waiting:
    call: Any


@frozen(eq=False)
class _Replacing:
    old: _Process
    new: _Process
    deadline: Any
    done: defer.Deferred


@frozen(eq=False)
class _Retiring:
    process: Optional[_Process]


_SlotState = Union[_Starting, _Running, _Waiting, _Replacing, _Retiring]


@mutable(eq=False)
class _Slot:
    workerId: int
    state: Any = None
    quickDeaths: int = 0
    restarts: int = 0
    readyWaiters: list = field(factory=list)


@frozen
class WorkerStatistics:
    """
    One worker process (or a worker id waiting to be respawned) as the
    master sees it.

    @ivar state: C{starting}, C{online}, C{ready}, C{draining} or
        C{waiting} (backing off before a respawn).
    @ivar uptime: seconds since it was spawned.
    @ivar restarts: how many times this worker id was respawned.
    @ivar handed: connections it took.
    @ivar listens: the addresses it listens on.
    """

    workerId: int
    pid: Optional[int]
    state: str
    uptime: float
    restarts: int
    handed: int
    listens: tuple


@frozen
class ClusterStatistics:
    """
    A snapshot of the cluster.
    """

    workers: tuple
    listeners: tuple
    pending: int
    dropped: int
    failures: int


def raiseFileLimit() -> None:
    """
    Raise this process's soft limit on open files to the hard limit: the
    master holds every accepted connection until a worker takes it.
    """
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard))
    except (ValueError, OSError):
        pass


class ClusterService(service.Service):
    """
    The txcluster master as an L{IService}: runs C{config.workers} workers of
    C{config.app} and serves every port they listen on from one socket.

    @param reactor: provides C{IReactorProcess}, C{IReactorSocket},
        C{IReactorFDSet} and C{IReactorTime}; the global reactor by default.
    @param spawner: starts a worker process; see L{spawnWorker}.
    @param onGiveUp: called with the exit code once the master has given
        up and stopped its workers.  The default stops the reactor and makes
        the process exit with that code.
    """

    name = "txcluster"

    def __init__(
        self,
        config: ClusterConfig,
        reactor=None,
        spawner: Callable = spawnWorker,
        onGiveUp: Optional[Callable[[int], None]] = None,
        logPublisher: Callable[[dict], None] = globalLogPublisher,
        restartPolicy: Callable[[int], float] = None,
        handoffWindow: int = DEFAULT_WINDOW,
    ) -> None:
        self.config = config
        self._reactorArg = reactor
        self._spawner = spawner
        self._onGiveUp = onGiveUp
        self._publisher = logPublisher
        if restartPolicy is None:
            restartPolicy = lambda quickDeaths: restartDelay(
                quickDeaths, config.minRestartDelay, config.maxRestartDelay
            )
        self._restartPolicy = restartPolicy
        self._handoffWindow = handoffWindow
        self._observers: list[Callable[[Any], None]] = []
        self._slots: dict[int, _Slot] = {}
        self._processes: set[_Process] = set()
        self._serial = 0
        self._stopping: Optional[defer.Deferred] = None
        self._gaveUp = False
        self._failures = FailureWindow(config.maxRestarts, config.restartWindow)
        self._heartbeat = None
        self._reloading: Optional[defer.Deferred] = None
        self._table: Optional[HandleTable] = None
        self._target = config.workers
        self._uid: Optional[int] = None
        self._gid: Optional[int] = None
        self._policy = ListenPolicy()
        self.exitCode = 0

    # Reactor ---------------------------------------------------------------

    @property
    def reactor(self):
        if self._reactorArg is None:
            from twisted.internet import reactor

            self._reactorArg = reactor
        return self._reactorArg

    def _now(self) -> float:
        return self.reactor.seconds()

    # IService --------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """
        Bind the declared listens (C{--listen}) while the process may still
        be privileged: twistd drops privileges (C{--uid}/C{--gid}) after
        this and before L{startService}.

        @raise CannotListenError: a declared listen could not be bound.
        """
        super().privilegedStartService()
        self._prepare()

    def _prepare(self) -> None:
        if self._table is not None:
            return
        raiseFileLimit()
        self._uid, self._gid = workerIdentity(self.config.user, self.config.group)
        declared = [parseDeclared(d) for d in self.config.listens]
        self._policy = ListenPolicy(
            [parsePattern(p) for p in self.config.allowListen],
            [d.key for d in declared],
            declaredOnly=os.geteuid() == 0 and self._uid not in (None, 0),
        )
        self._table = HandleTable(
            self.reactor,
            self.config.scheduling,
            self._sendConnections,
            window=self._handoffWindow,
            badAnswer=lambda process, why: self._misbehaved(process, why),
        )
        for d in declared:
            try:
                handle = self._table.declare(d.key, d.backlog, d.mode)
            except OSError as e:
                from twisted.internet.error import CannotListenError

                self._table.closeAll()
                self._table = None
                raise CannotListenError(d.key.address, d.key.port, e) from None
            _log.info("declared {address} (--listen {description})", address=handle.describe(), description=d.description)

    def startService(self) -> None:
        self._prepare()
        super().startService()
        if self._uid is not None or self._gid is not None:
            _log.info("workers run as uid {uid}, gid {gid}", uid=self._uid, gid=self._gid)
        _log.info(
            "master (pid {pid}) starting {workers} workers of {app} ({scheduling} scheduling)",
            pid=os.getpid(),
            workers=self.config.workers,
            app=self.config.app,
            scheduling=self.config.scheduling,
        )
        for workerId in range(1, self.config.workers + 1):
            self._startSlot(workerId)
        self._scheduleBeat()

    def stopService(self) -> defer.Deferred:
        """
        Stop gracefully: stop accepting, hand out what was accepted, ask
        every worker to finish its connections and exit, kill those still
        running after the graceful timeout.

        @return: a Deferred that fires once every worker process is gone.
        """
        super().stopService()
        if self._stopping is None:
            self._stopping = defer.ensureDeferred(self._stop())
        return observe(self._stopping)

    async def _stop(self) -> None:
        _log.info(
            "master stopping: {count} workers, graceful timeout {timeout} s",
            count=len(self._processes),
            timeout=self.config.gracefulTimeout,
        )
        _cancel(self._heartbeat)
        self._heartbeat = None
        for slot in list(self._slots.values()):
            if isinstance(slot.state, _Waiting) and slot.state.call.active():
                slot.state.call.cancel()
            for d in slot.readyWaiters:
                d.errback(ClusterStopped("the cluster stopped"))
            slot.readyWaiters = []
        deadline = self._now() + self.config.gracefulTimeout
        if self._table is not None:
            self._table.stopAccepting()
            idle = self._table.whenIdle()
            timeout = self.reactor.callLater(self.config.gracefulTimeout, idle.cancel)
            try:
                await idle
            except defer.CancelledError:
                _log.warn("connections still waiting for a worker after the graceful timeout")
            else:
                if timeout.active():
                    timeout.cancel()
        # Handing out the last accepted connections is part of the graceful
        # period, not added to it.
        remaining = max(0.0, deadline - self._now())
        processes = list(self._processes)
        for process in processes:
            self._drain(process, "stop", remaining)
        await defer.DeferredList([observe(p.exited) for p in processes])
        if self._table is not None:
            self._table.closeAll()
        self._slots.clear()
        _log.info("master stopped: all workers are gone")

    # Observers -------------------------------------------------------------

    def addObserver(self, observer: Callable[[Any], None]) -> None:
        """
        Call C{observer(event)} for every lifecycle event (see
        L{txcluster._events}).
        """
        self._observers.append(observer)

    def removeObserver(self, observer: Callable[[Any], None]) -> None:
        self._observers.remove(observer)

    def _emit(self, event) -> None:
        for observer in list(self._observers):
            try:
                observer(event)
            except Exception:
                _log.failure("a cluster event observer failed on {event!r}", event=event)

    # The public API ----------------------------------------------------------

    def statistics(self) -> ClusterStatistics:
        """
        A snapshot: every worker, every listener, the queue and counters.
        """
        now = self._now()
        workers = []
        for process in sorted(self._processes, key=lambda p: (p.workerId, p.serial)):
            slot = self._slots.get(process.workerId)
            workers.append(
                WorkerStatistics(
                    workerId=process.workerId,
                    pid=process.pid,
                    state=process.state,
                    uptime=now - process.forkedAt,
                    restarts=0 if slot is None else slot.restarts,
                    handed=process.handed,
                    listens=tuple(sorted(process.listens.values())),
                )
            )
        for slot in self._slots.values():
            if isinstance(slot.state, _Waiting):
                workers.append(WorkerStatistics(slot.workerId, None, "waiting", 0.0, slot.restarts, 0, ()))
        listeners: tuple[HandleStatistics, ...] = () if self._table is None else self._table.statistics()
        return ClusterStatistics(
            workers=tuple(sorted(workers, key=lambda w: w.workerId)),
            listeners=listeners,
            pending=sum(h.dispatch.pending for h in listeners if h.dispatch is not None),
            dropped=0 if self._table is None else self._table.dropped,
            failures=self._failures.count(now),
        )

    def workerCount(self) -> int:
        """
        How many worker ids the master keeps running.
        """
        return len([s for s in self._slots.values() if not isinstance(s.state, _Retiring)])

    def sendMessage(self, workerId: int, message: Any) -> defer.Deferred:
        """
        Send a JSON-serialisable C{message} to worker C{workerId}.
        """
        process = self._current(workerId)
        if process is None:
            return defer.fail(KeyError(f"no running worker {workerId}"))
        return self._send(process, message)

    def broadcast(self, message: Any) -> defer.Deferred:
        """
        Send C{message} to every worker that is not leaving.
        """
        targets = [p for p in self._processes if not p.expectedExit]
        return defer.gatherResults([self._send(p, message) for p in targets], consumeErrors=True).addCallbacks(
            lambda _: None, _firstFailure
        )

    def reload(self) -> defer.Deferred:
        """
        Replace every worker with a fresh process that re-reads the app, a
        few at a time: each replacement must be ready before the worker it
        replaces stops taking connections and drains.

        @return: a Deferred that fires when every worker was replaced and
            the old ones are gone, or fails with L{ReloadFailed} (the
            reload stopped; the old workers keep serving).
        """
        if self._stopping is not None:
            return defer.fail(ClusterStopped("the cluster is stopping"))
        if self._reloading is not None:
            _log.info("reload requested while one is running: it continues")
            return observe(self._reloading)
        # _reload() may finish at once (nothing to replace, a spawn that
        # fails), and then finished() has cleared self._reloading already.
        reloading = self._reloading = defer.ensureDeferred(self._reload())

        def finished(result):
            self._reloading = None
            return result

        reloading.addBoth(finished)
        return observe(reloading)

    async def _reload(self) -> None:
        slots = sorted(self._slots)
        _log.info(
            "reload: replacing {count} workers, {concurrency} at a time",
            count=len(slots),
            concurrency=self.config.reloadConcurrency,
        )
        semaphore = defer.DeferredSemaphore(self.config.reloadConcurrency)
        failures: list = []
        olds: list = []

        async def step(workerId: int) -> None:
            if failures or self._stopping is not None:
                return
            slot = self._slots.get(workerId)
            if slot is None or not isinstance(slot.state, _Running):
                _log.info("reload: worker {workerId} is not running; it starts fresh anyway", workerId=workerId)
                return
            old = slot.state.process
            olds.append(old)
            try:
                await self._replace(slot, "reload")
            except Exception as e:
                failures.append(e)

        await defer.DeferredList(
            [semaphore.run(lambda w=w: defer.ensureDeferred(step(w))) for w in slots]
        )
        if failures:
            _log.error("reload aborted: {why}; the remaining old workers keep serving", why=failures[0])
            raise ReloadFailed(str(failures[0]))
        await defer.DeferredList([observe(p.exited) for p in olds])
        _log.info("reload complete: {count} workers replaced", count=len(olds))

    def scale(self, count: int) -> defer.Deferred:
        """
        Run C{count} workers: start new ones (the Deferred waits until they
        are ready) or drain the highest-numbered ones (it waits until they
        have exited).
        """
        if count < 1:
            return defer.fail(ValueError(f"a cluster needs at least 1 worker, not {count}"))
        if self._stopping is not None:
            return defer.fail(ClusterStopped("the cluster is stopping"))
        active = sorted(w for w, s in self._slots.items() if not isinstance(s.state, _Retiring))
        waits: list = []
        self._target = count
        if count > len(active):
            newIds = []
            candidate = 1
            while len(active) + len(newIds) < count:
                # An id still draining after a scale-down is free again:
                # worker ids stay 1..N.
                if candidate not in active:
                    newIds.append(candidate)
                candidate += 1
            _log.info(
                "scaling up from {old} to {new} workers: starting {ids}",
                old=len(active),
                new=count,
                ids=newIds,
            )
            for workerId in newIds:
                slot = self._startSlot(workerId)
                waits.append(self._whenReady(slot))
        elif count < len(active):
            retiring = active[count:]
            _log.info(
                "scaling down from {old} to {new} workers: draining {ids}",
                old=len(active),
                new=count,
                ids=retiring,
            )
            for workerId in retiring:
                waits.append(self._retire(self._slots[workerId]))
        self._broadcastCount()
        return defer.gatherResults(waits, consumeErrors=True).addCallbacks(
            lambda _: None, _firstFailure
        )

    # Slots -------------------------------------------------------------------

    def _startSlot(self, workerId: int) -> _Slot:
        slot = self._slots.get(workerId)
        if slot is None:
            slot = self._slots[workerId] = _Slot(workerId)
        # A spawn that fails is retried later, as a respawn's is.
        self._startSlotProcess(slot)
        return slot

    def _bootDeadline(self, process: _Process):
        if self.config.startTimeout <= 0:
            return None
        return self.reactor.callLater(self.config.startTimeout, self._bootTimedOut, process)

    def _current(self, workerId: int) -> Optional[_Process]:
        slot = self._slots.get(workerId)
        state = None if slot is None else slot.state
        if isinstance(state, (_Running, _Starting)):
            return state.process
        if isinstance(state, _Replacing):
            return state.old
        return None

    def _whenReady(self, slot: _Slot) -> defer.Deferred:
        d = defer.Deferred()
        if isinstance(slot.state, _Running):
            d.callback(None)
        else:
            slot.readyWaiters.append(d)
        return d

    def _replace(self, slot: _Slot, reason: str) -> defer.Deferred:
        old = slot.state.process
        new = self._spawn(slot.workerId)
        done = defer.Deferred()
        slot.state = _Replacing(old, new, self._bootDeadline(new), done)
        _log.info(
            "{reason}: worker {workerId} (pid {oldPid}) is replaced by pid {newPid}; "
            "it serves until the replacement is ready",
            reason=reason,
            workerId=slot.workerId,
            oldPid=old.pid,
            newPid=new.pid,
        )
        return done

    def _retire(self, slot: _Slot) -> defer.Deferred:
        state = slot.state
        if isinstance(state, _Waiting):
            if state.call.active():
                state.call.cancel()
            del self._slots[slot.workerId]
            return defer.succeed(None)
        if isinstance(state, _Replacing):
            _cancel(state.deadline)
            self._drain(state.new, "scale")
            process = state.old
        else:
            if isinstance(state, _Starting):
                _cancel(state.deadline)
            process = state.process
        slot.state = _Retiring(process)
        for d in slot.readyWaiters:
            d.errback(ClusterStopped(f"worker {slot.workerId} was scaled away"))
        slot.readyWaiters = []
        self._drain(process, "scale")
        if isinstance(state, _Replacing):
            # Nothing is left to replace: the reload or recycle waiting
            # for this slot is done with it.
            state.done.callback(None)
        return observe(process.exited)

    def _broadcastCount(self) -> None:
        count = self._target
        for process in self._processes:
            if process.channel.transport is not None and not process.expectedExit:
                process.channel.callRemote(WorkerCount, count=count)

    # Processes ---------------------------------------------------------------

    def _spawn(self, workerId: int) -> _Process:
        self._serial += 1
        channel = MasterChannel(self)
        process = _Process(
            workerId=workerId,
            serial=self._serial,
            output=None,
            channel=channel,
            forkedAt=self._now(),
            requestLimit=requestLimit(self.config.maxRequests, self.config.maxRequestsJitter),
        )
        process.output = WorkerOutput(workerId, lambda reason: self._ended(process, reason), self._publisher)
        channel.process = process
        self._processes.add(process)
        env = dict(os.environ if self.config.env is None else self.config.env)
        env[_commands.ENV_GRACEFUL_TIMEOUT] = repr(self.config.gracefulTimeout)
        try:
            process.transport = self._spawner(
                self.reactor,
                process.output,
                channel,
                workerId,
                self._target,
                self.config.app,
                env=env,
                uid=self._uid,
                gid=self._gid,
            )
            process.pid = process.transport.pid
        except Exception:
            _log.failure("could not spawn worker {workerId}", workerId=workerId)
            self._processes.discard(process)
            raise
        _log.info("worker {workerId} (pid {pid}) forked", workerId=workerId, pid=process.pid)
        self._emit(_events.WorkerForked(workerId, process.pid))
        return process

    def _online(self, process: _Process, pid: int) -> None:
        if process.state == "starting":
            process.state = "online"
        _log.info("worker {workerId} (pid {pid}) online", workerId=process.workerId, pid=process.pid)
        self._emit(_events.WorkerOnline(process.workerId, process.pid))

    def _ready(self, process: _Process) -> None:
        if process.expectedExit or process.state == "ready":
            return
        process.state = "ready"
        process.readyAt = self._now()
        slot = self._slots.get(process.workerId)
        _log.info(
            "worker {workerId} (pid {pid}) ready in {seconds:.2f} s, listening on {listens}",
            workerId=process.workerId,
            pid=process.pid,
            seconds=process.readyAt - process.forkedAt,
            listens=", ".join(sorted(process.listens.values())) or "nothing",
        )
        state = None if slot is None else slot.state
        if isinstance(state, _Starting) and state.process is process:
            replaced = None
        elif isinstance(state, _Replacing) and state.new is process:
            replaced = state
        else:
            self._emit(_events.WorkerReady(process.workerId, process.pid))
            return
        _cancel(state.deadline)
        slot.state = _Running(process)
        # Observers hear of it once the slot says so (one may reload or
        # scale from there), and before the old worker is told to leave.
        self._emit(_events.WorkerReady(process.workerId, process.pid))
        if replaced is not None:
            self._drain(replaced.old, "replaced")
            replaced.done.callback(None)
        if self._table is not None and all(
            isinstance(s.state, (_Running, _Retiring)) for s in self._slots.values()
        ):
            # Every worker is ready and has made its listens: a socket kept
            # open for the replacement of a dead worker that nobody took
            # up again would accept connections no one will serve.
            self._table.closeOrphans()
        waiters, slot.readyWaiters = slot.readyWaiters, []
        for d in waiters:
            d.callback(None)

    def _drain(self, process: _Process, reason: str, timeout: Optional[float] = None) -> None:
        """
        Ask C{process} to leave gracefully; kill it after C{timeout} (the
        graceful timeout by default).
        """
        if process.state == "dead":
            return
        if process.expectedExit:
            return
        process.expectedExit = True
        process.stopReason = reason
        process.state = "draining"
        if self._table is not None:
            self._table.leaveAll(process)
        if timeout is None:
            timeout = self.config.gracefulTimeout
        _log.info(
            "worker {workerId} (pid {pid}) disconnecting ({reason}): it has {timeout} s to finish",
            workerId=process.workerId,
            pid=process.pid,
            reason=reason,
            timeout=timeout,
        )
        self._emit(_events.WorkerDisconnected(process.workerId, process.pid, reason))
        if process.channel.transport is not None:
            process.channel.callRemote(Disconnect, timeout=timeout).addErrback(lambda f: None)
        self._killAfter(process, timeout, self._killLate)

    def _killAfter(self, process: _Process, delay: float, kill: Callable[[_Process], None]) -> None:
        """
        Call C{kill(process)} after C{delay} seconds, unless a kill is due
        sooner.  A process has one kill timer, so that the one its exit
        cancels is the only one there is.
        """
        current = process.killTimer
        if current is not None and current.active():
            if current.getTime() <= self._now() + delay:
                return
            current.cancel()
        process.killTimer = self.reactor.callLater(delay, kill, process)

    def _killLate(self, process: _Process) -> None:
        if process.state != "dead":
            _log.warn(
                "worker {workerId} (pid {pid}) still running {timeout} s after it was asked "
                "to stop: killing it",
                workerId=process.workerId,
                pid=process.pid,
                timeout=self.config.gracefulTimeout,
            )
            self._kill(process)

    def _kill(self, process: _Process, signal: Union[str, int] = "KILL") -> None:
        try:
            process.transport.signalProcess(signal)
        except (ProcessExitedAlready, OSError, AttributeError):
            pass

    def _bootTimedOut(self, process: _Process) -> None:
        if process.state == "dead" or process.expectedExit:
            # Asked to leave before it was ready: the graceful timeout rules.
            return
        _log.error(
            "worker {workerId} (pid {pid}) was not ready within {timeout} s: killing it",
            workerId=process.workerId,
            pid=process.pid,
            timeout=self.config.startTimeout,
        )
        process.failedHow = f"was not ready within {self.config.startTimeout} s"
        self._kill(process)

    def _channelLost(self, process: _Process, reason: Failure) -> None:
        if self._table is not None:
            self._table.lose(process, keepOrphans=self._keepOrphans())
        if process.state != "dead" and not process.expectedExit:
            _log.warn(
                "worker {workerId} (pid {pid}): channel closed ({why})",
                workerId=process.workerId,
                pid=process.pid,
                why=reason.getErrorMessage(),
            )
        if process.state != "dead":
            self._killAfter(process, CHANNEL_LOST_GRACE, self._kill)

    def _misbehaved(self, process: Optional[_Process], what: str) -> None:
        if process is None:
            return
        _log.error(
            "worker {workerId} (pid {pid}) misbehaved: it {what}; replacing it",
            workerId=process.workerId,
            pid=process.pid,
            what=what,
        )
        process.failedHow = f"misbehaved: it {what}"
        self._kill(process)
        # Whatever else it sends is not read.
        process.channel.drop("the worker misbehaved")

    def _keepOrphans(self) -> bool:
        return self._stopping is None and not self._gaveUp

    def _ended(self, process: _Process, reason: Failure) -> None:
        exitCode = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        process.state = "dead"
        _cancel(process.killTimer)
        self._processes.discard(process)
        if self._table is not None:
            self._table.lose(process, keepOrphans=self._keepOrphans())
        how = _describeExit(exitCode, signal)
        if process.expectedExit:
            _log.info(
                "worker {workerId} (pid {pid}) exited ({how})",
                workerId=process.workerId,
                pid=process.pid,
                how=how,
            )
        else:
            _log.error(
                "worker {workerId} (pid {pid}) died ({how})",
                workerId=process.workerId,
                pid=process.pid,
                how=how,
                exitCode=exitCode,
                signal=signal,
            )
        self._emit(_events.WorkerExited(process.workerId, process.pid, exitCode, signal, process.expectedExit))
        # The slot first: whoever waits on 'exited' may carry on at once
        # (the end of stopService clears every slot).
        self._slotProcessEnded(process, process.failedHow or _failedHow(exitCode, signal), exitCode, signal)
        process.exited.callback((exitCode, signal))

    def _slotProcessEnded(self, process: _Process, how: str, exitCode, signal) -> None:
        slot = self._slots.get(process.workerId)
        if slot is None:
            return
        state = slot.state
        if isinstance(state, _Retiring) and state.process is process:
            del self._slots[slot.workerId]
            _log.info("worker {workerId} retired", workerId=slot.workerId)
            return
        if isinstance(state, _Replacing):
            if state.new is process:
                _cancel(state.deadline)
                slot.state = _Running(state.old)
                self._resume(state.old)
                self._failed(slot, process, how)
                state.done.errback(
                    ReloadFailed(f"replacement worker {slot.workerId} (pid {process.pid}) {how}")
                )
                return
            if state.old is process and not process.expectedExit:
                # The old one died during the reload; the replacement carries on.
                slot.state = _Starting(state.new, state.deadline)
                state.done.callback(None)
                self._failed(slot, process, how)
            return
        if isinstance(state, (_Starting, _Running)) and state.process is process:
            if isinstance(state, _Starting):
                _cancel(state.deadline)
            if process.expectedExit:
                # Recycled or stopped through the slot: start the next one.
                if self._stopping is None and not self._gaveUp:
                    self._respawn(slot, 0.0)
                return
            quick = (
                process.readyAt is None
                or self._now() - process.forkedAt < self.config.stableAfter
            )
            slot.quickDeaths = slot.quickDeaths + 1 if quick else 0
            self._failed(slot, process, how)
            if self._stopping is None and not self._gaveUp:
                self._respawn(slot, self._restartPolicy(slot.quickDeaths))

    def _resume(self, process: _Process) -> None:
        """
        Put a worker that was taken out of rotation (while being recycled)
        back, because its replacement failed.
        """
        if not process.paused or process.expectedExit or self._table is None:
            return
        process.paused = False
        for listenId in list(process.listens):
            self._table.listening(process, listenId)

    def _failed(self, slot: _Slot, process: _Process, how: str) -> None:
        if self._stopping is not None or self._gaveUp:
            return
        if self._failures.record(self._now()):
            self._giveUp(slot, process, how)

    def _respawn(self, slot: _Slot, delay: float) -> None:
        slot.restarts += 1
        if delay <= 0:
            _log.info("respawning worker {workerId}", workerId=slot.workerId)
            self._startSlotProcess(slot)
            return
        _log.warn(
            "worker {workerId} died {count} times in a row soon after starting: "
            "backing off for {delay:.1f} s",
            workerId=slot.workerId,
            count=slot.quickDeaths,
            delay=delay,
        )
        slot.state = _Waiting(self.reactor.callLater(delay, self._startSlotProcess, slot))

    def _startSlotProcess(self, slot: _Slot) -> None:
        if self._slots.get(slot.workerId) is not slot or self._stopping is not None:
            return
        try:
            process = self._spawn(slot.workerId)
        except Exception:
            slot.state = _Waiting(
                self.reactor.callLater(self.config.maxRestartDelay, self._startSlotProcess, slot)
            )
            return
        slot.state = _Starting(process, self._bootDeadline(process))

    def _giveUp(self, slot: _Slot, process: _Process, how: str) -> None:
        self._gaveUp = True
        self.exitCode = 1
        tail = "\n".join(process.output.stderrTail) or "(the worker wrote nothing on stderr)"
        _log.critical(
            "giving up: more than {maxRestarts} worker failures within {window} s; "
            "the last was worker {workerId} (pid {pid}), which {how}. Its last error output:\n{tail}",
            maxRestarts=self.config.maxRestarts,
            window=self.config.restartWindow,
            workerId=slot.workerId,
            pid=process.pid,
            how=how,
            tail=tail,
        )
        for s in self._slots.values():
            for d in s.readyWaiters:
                d.errback(ClusterStopped("the cluster gave up"))
            s.readyWaiters = []

        def stopped(_):
            if self._onGiveUp is not None:
                self._onGiveUp(self.exitCode)
            else:
                _exitProcessAfterReactor(self.reactor, self.exitCode)

        if self.running:
            self.stopService().addBoth(stopped)
        else:
            stopped(None)

    # Heartbeat ---------------------------------------------------------------

    def _scheduleBeat(self) -> None:
        if self.config.workerTimeout > 0 and self._stopping is None:
            interval = max(0.05, self.config.workerTimeout / 3.0)
            self._heartbeat = self.reactor.callLater(interval, self._beatAgain)

    def _beatAgain(self) -> None:
        self._heartbeat = None
        self._beat()
        self._scheduleBeat()

    def _beat(self) -> None:
        now = self._now()
        timeout = self.config.workerTimeout
        for process in list(self._processes):
            if process.state != "ready" or process.expectedExit or process.failedHow:
                continue
            if process.pingSentAt is not None:
                if now - process.pingSentAt >= timeout:
                    self._hung(process, now - process.pingSentAt)
                continue
            if process.channel.transport is None:
                continue
            process.pingSentAt = now
            process.channel.callRemote(Ping).addCallbacks(
                lambda _, p=process: setattr(p, "pingSentAt", None), lambda f: None
            )

    def _hung(self, process: _Process, silent: float) -> None:
        _log.error(
            "worker {workerId} (pid {pid}) has not answered a heartbeat for {seconds:.1f} s: "
            "its reactor is blocked. Dumping its stack, then killing it",
            workerId=process.workerId,
            pid=process.pid,
            seconds=silent,
        )
        process.failedHow = f"stopped answering heartbeats (blocked for {silent:.1f} s)"
        if self._table is not None:
            self._table.leaveAll(process)
        # A number: Twisted's signalProcess only knows HUP, STOP, INT, KILL
        # and TERM by name and hands anything else to os.kill as it is.
        self._kill(process, signalModule.SIGUSR1)
        self._killAfter(process, STACK_DUMP_GRACE, self._kill)

    # Worker requests ---------------------------------------------------------

    def _queryServer(self, process, kind, address, port, index, backlog, mode) -> dict:
        problem = _checkQuery(kind, address, port, index, backlog, mode)
        if problem is not None:
            _log.warn(
                "worker {workerId} (pid {pid}) asked for an invalid listen: {problem}",
                workerId=process.workerId,
                pid=process.pid,
                problem=problem,
            )
            raise ListenRefused(problem)
        if process.expectedExit:
            raise ListenRefused("this worker is leaving the cluster")
        key = ListenKey(kind, normalizeAddress(kind, address), port, index)
        if not self._policy.permits(key):
            why = f"{key.describe()}: {self._policy.explain()}"
            _log.warn(
                "worker {workerId} (pid {pid}) may not listen on {why}",
                workerId=process.workerId,
                pid=process.pid,
                why=why,
            )
            raise ListenRefused(why)
        try:
            handle = self._table.query(process, key, backlog, mode)
        except OSError as e:
            _log.warn(
                "worker {workerId} (pid {pid}) cannot listen on {address}: {error}",
                workerId=process.workerId,
                pid=process.pid,
                address=key.describe(),
                error=e.strerror or str(e),
            )
            raise BindFailed(f"{e.errno or 0} {e.strerror or e}")
        if handle.sock is None:
            raise ListenRefused("the master is stopping")
        process.listens[handle.listenId] = handle.describe()
        return {
            "listenId": handle.listenId,
            "scheduling": handle.scheduling,
            "host": handle.host,
            "port": handle.port,
            "fd": handle.sock.fileno() if handle.dispatcher is None else None,
        }

    def _listening(self, process: _Process, listenId: int) -> None:
        handle = self._table.get(listenId)
        if handle is None or process not in handle.members:
            raise UnknownListen(f"listen {listenId} is not one of this worker's")
        if listenId in process.listening:
            return
        process.listening.add(listenId)
        if not process.expectedExit and process.failedHow is None:
            # A worker that was told to leave (or is about to be killed)
            # may still report a listen that crossed the Disconnect: it
            # stays out of rotation.
            self._table.listening(process, listenId)
        _log.info(
            "worker {workerId} (pid {pid}) listening on {address}",
            workerId=process.workerId,
            pid=process.pid,
            address=handle.describe(),
        )
        self._emit(
            _events.WorkerListening(process.workerId, process.pid, handle.describe(), handle.host, handle.port)
        )

    def _close(self, process: _Process, listenId: int) -> None:
        process.listening.discard(listenId)
        address = process.listens.pop(listenId, None)
        if address is None:
            raise UnknownListen(f"listen {listenId} is not one of this worker's")
        _log.info(
            "worker {workerId} (pid {pid}) stopped listening on {address}",
            workerId=process.workerId,
            pid=process.pid,
            address=address,
        )
        self._table.close(process, listenId)

    def _message(self, process: _Process, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            self._misbehaved(process, "sent a message that is not JSON")
            return
        self._emit(_events.WorkerMessage(process.workerId, process.pid, message))

    def _send(self, process: _Process, message: Any) -> defer.Deferred:
        from txcluster._worker import _encodeMessage

        try:
            text = _encodeMessage(message)
        except Exception:
            return defer.fail()
        return process.channel.callRemote(ToWorker, message=text).addCallback(lambda _: None)

    def _sendConnections(self, process: _Process, listenId: int, fds: list) -> defer.Deferred:
        d = process.channel.sendConnections(listenId, fds)
        return d.addCallback(self._taken, process, len(fds))

    def _taken(self, accepted: int, process: _Process, sent: int) -> int:
        if not 0 <= accepted <= sent:
            self._misbehaved(process, f"said it took {accepted} of {sent} connections")
            accepted = sent
        process.handed += accepted
        if process.requestLimit and process.handed >= process.requestLimit and not process.expectedExit:
            self._recycle(process)
        return accepted

    def _recycle(self, process: _Process) -> None:
        slot = self._slots.get(process.workerId)
        if slot is None or not isinstance(slot.state, _Running) or slot.state.process is not process:
            return
        if self._stopping is not None:
            return
        _log.info(
            "worker {workerId} (pid {pid}) took {handed} connections (limit {limit}): recycling it",
            workerId=process.workerId,
            pid=process.pid,
            handed=process.handed,
            limit=process.requestLimit,
        )
        # maybeDeferred: a spawn that raises must not fail the handoff
        # whose answer got us here (the connections were taken).
        replaced = defer.maybeDeferred(self._replace, slot, "recycle")
        replaced.addErrback(
            lambda f: _log.error("recycling worker {workerId} failed: {why}", workerId=slot.workerId, why=f.getErrorMessage())
        )
        # The limit is what the worker may take: while its replacement
        # starts, the other ready workers take its share (if there are none,
        # it keeps serving rather than leave the port unserved).
        if not replaced.called and self._table is not None and any(
            p.state == "ready" and not p.expectedExit and not p.paused and p is not process
            for p in self._processes
        ):
            process.paused = True
            self._table.leaveAll(process)


def _checkQuery(kind, address, port, index, backlog, mode) -> Optional[str]:
    # Every value is the worker's: quote text shortened, for the log.
    if kind not in KINDS:
        return f"unknown kind {_quote(kind)}"
    if not 0 <= port <= 65535:
        return f"port {port} is out of range"
    if not 0 <= index <= 1024:
        return f"index {index} is out of range"
    if not 0 <= backlog <= 65535:
        return f"backlog {backlog} is out of range"
    if not 0 <= mode <= 0o7777:
        return f"mode {mode:o} is out of range"
    if len(address) > 1024:
        return f"address is too long ({len(address)} characters)"
    if kind == "unix":
        # The worker makes a relative path absolute; a NUL may only start
        # an abstract name.
        if not address.startswith(("/", "\0")) or "\0" in address[1:] or len(address.encode()) > 107:
            return f"bad UNIX socket path {_quote(address)}"
    elif not (address.isascii() and address.isprintable()):
        # bind() raises TypeError, not OSError, for these.
        return f"bad interface address {_quote(address)}"
    elif address and not _isNumericAddress(address):
        # A name would make the master resolve it (blocking its reactor);
        # workers resolve names before they ask.
        return f"interface {_quote(address)} is not a numeric address"
    return None


def _isNumericAddress(address: str) -> bool:
    from twisted.internet.abstract import isIPAddress, isIPv6Address

    return isIPAddress(address) or isIPv6Address(address)


def _quote(text: str, limit: int = 80) -> str:
    quoted = repr(text)
    return quoted if len(quoted) <= limit else f"{quoted[:limit]}... ({len(text)} characters)"


def _describeExit(exitCode, signal) -> str:
    if signal is not None:
        try:
            name = signalModule.Signals(signal).name
        except ValueError:
            name = str(signal)
        return f"killed by {name}"
    return f"exit code {exitCode}"


def _failedHow(exitCode, signal) -> str:
    """
    How a process ended, worded to follow "which" or a worker's name as
    the other failure descriptions are ("was not ready within 5.0 s"),
    keeping the "exit code N" operators search for.
    """
    if signal is not None:
        return f"was {_describeExit(exitCode, signal)}"
    return f"died with exit code {exitCode}"


def _firstFailure(failure: Failure) -> Failure:
    """
    The failure inside a L{defer.FirstError}, so that callers see the
    documented exception (L{ClusterStopped}) rather than the wrapper.
    """
    if failure.check(defer.FirstError):
        return failure.value.subFailure
    return failure


def _cancel(call) -> None:
    if call is not None and call.active():
        call.cancel()


def _exitProcessAfterReactor(reactor, code: int) -> None:
    """
    Stop the reactor and make the process exit with C{code} once whatever
    runs it (C{twistd}) has finished cleaning up.
    """
    import atexit
    import sys

    def exit():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    atexit.register(exit)
    if reactor.running:
        reactor.stop()
