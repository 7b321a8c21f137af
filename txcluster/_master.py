# -*- test-case-name: tests.test_master -*-
"""
L{ClusterService}: the master, as an L{IService}.

It is a façade over collaborators that each own one thing: the
L{Supervisor} (slots, spawning, restart policy, reload, scale, recycling),
the L{ProcessTable} (each worker process and its channel), the
L{ListenBroker} (what workers may listen on) and the L{HandleTable} (the
master's sockets and their dispatch).
"""

from __future__ import annotations

import os
import resource
from typing import Any, Callable, Optional

from attrs import field, frozen, validators
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure

from txcluster._agent import AGENT_TIMEOUT
from txcluster._proxy import DEFAULT_ALLOW, DEFAULT_HEADER_TIMEOUT, AllowList
from txcluster._access import ListenPolicy, parseDeclared, parsePattern, workerIdentity
from txcluster._commands import AGENT_ID
from txcluster._handles import SCHEDULING, SHARED, HandleStatistics, HandleTable
from txcluster._deferreds import observe
from txcluster._lifecycle import ClusterStopped, Phase, ReloadFailed, UnknownWorker, seconds
from txcluster._listens import ListenBroker, declareListens
from txcluster._metrics import ClusterRecorder, WorkerMetricsStore
from txcluster._policy import MAX_REQUESTS_DATAGRAMS, MAX_REQUESTS_SHARED, restartDelay
from txcluster._process import StacksUnavailable, spawnWorker
from txcluster._processes import CHANNEL_LOST_GRACE, STACK_DUMP_GRACE, ProcessTable
from txcluster._recycling import MEMORY_INTERVAL
from txcluster._scheduler import DEFAULT_WINDOW
from txcluster._sticky import ClientKeys
from txcluster._status import ClusterStatistics, ClusterStatus, WorkerStatistics
from txcluster._supervisor import Supervisor, _firstFailure

__all__ = [
    "CHANNEL_LOST_GRACE",
    "STACK_DUMP_GRACE",
    "ClusterConfig",
    "ClusterService",
    "ClusterStatistics",
    "ClusterStopped",
    "ReloadFailed",
    "WorkerStatistics",
]

_log = Logger(namespace="txcluster.master")

#: The most workers a master runs (C{--workers}, C{scale()}): each costs
#: the master a few descriptors and a process; a count above this is a
#: typo, not a plan.
MAX_WORKERS = 1024


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
    @ivar maxRequests: connections a worker takes before it is recycled
        (0: never), plus up to C{maxRequestsJitter}.  Only with C{rr} and
        C{least-busy} scheduling, where the master hands out every
        connection; UDP listens are then refused.
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
    @ivar drainDelay: seconds between the start of a stop (readiness turns
        false) and the workers' drain; the master accepts and dispatches
        meanwhile, so that a load balancer takes it out of rotation first.
    @ivar minReady: how many ready workers make the cluster ready
        (L{None}: all of C{workers}).
    @ivar maxMemory: MiB of unique memory a worker may keep using before it
        is recycled (0: no limit); sampled every C{memoryInterval} seconds.
    @ivar maxLifetime: seconds a worker process serves before it is
        recycled (0: no limit), plus a random 0..C{maxLifetimeJitter}.
    @ivar agent: the C{.tac} or C{.py} file of the agent, one process
        started before the workers and stopped after them (L{None}: none).
    @ivar agentTimeout: how long a worker's C{askAgent} waits for the
        agent to answer (or to come back from a restart).
    @ivar proxyProtocol: every stream listen expects a PROXY protocol
        header (v1 or v2) from a balancer in C{proxyAllowFrom} (addresses
        and networks), within C{proxyTimeout} seconds; the application sees
        the client's address as its peer.
    @ivar fairAccept: under C{shared} scheduling, each worker accepts no
        more than its share (L{txcluster._loadboard}).
    """

    app: str
    workers: int = field(default=1, validator=[validators.ge(1), validators.le(MAX_WORKERS)])
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
    drainDelay: float = field(default=0.0, converter=float, validator=_positive)
    minReady: Optional[int] = field(default=None, validator=validators.optional(validators.ge(1)))
    maxMemory: float = field(default=0.0, converter=float, validator=_positive)
    memoryInterval: float = field(default=MEMORY_INTERVAL, converter=float, validator=validators.gt(0))
    maxLifetime: float = field(default=0.0, converter=float, validator=_positive)
    maxLifetimeJitter: float = field(default=0.0, converter=float, validator=_positive)
    agent: Optional[str] = None
    proxyProtocol: bool = False
    fairAccept: bool = True
    proxyAllowFrom: tuple = field(default=DEFAULT_ALLOW, converter=tuple, validator=lambda i, a, v: AllowList.fromStrings(v))
    proxyTimeout: float = field(default=DEFAULT_HEADER_TIMEOUT, converter=float, validator=validators.gt(0))
    agentTimeout: float = field(default=AGENT_TIMEOUT, converter=float, validator=validators.gt(0))

    def __attrs_post_init__(self) -> None:
        if self.minReady is not None and self.minReady > self.workers:
            raise ValueError(f"minReady {self.minReady} is more than workers {self.workers}: the cluster could never be ready")
        if self.maxRequests and self.scheduling == SHARED:
            raise ValueError(MAX_REQUESTS_SHARED)
        if self.maxRequests:
            for description in self.listens:
                if not parseDeclared(description).isStream:
                    raise ValueError(f"--listen {description}: {MAX_REQUESTS_DATAGRAMS}")


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
    @param restartPolicy: the delay before a respawn, given how many times
        in a row the worker id died soon after it started.
    @param handoffWindow: handoffs a worker may have unanswered.

    @ivar exitCode: 0, or 1 once the master gave up.
    """

    name = "txcluster"

    def __init__(
        self,
        config: ClusterConfig,
        reactor=None,
        spawner: Callable = spawnWorker,
        onGiveUp: Optional[Callable[[int], None]] = None,
        logPublisher: Callable[[dict], None] = globalLogPublisher,
        restartPolicy: Optional[Callable[[int], float]] = None,
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
        self._supervisor: Optional[Supervisor] = None
        self._table: Optional[HandleTable] = None
        self._processes: Optional[ProcessTable] = None
        self._uid: Optional[int] = None
        self._gid: Optional[int] = None
        #: When it started (the reactor's time), once it has.
        self.startedAt: Optional[float] = None
        self._stopped: Optional[defer.Deferred] = None
        self._drainCall = None
        self._stopWaiters: list[defer.Deferred] = []
        self._status: Optional[ClusterStatus] = None
        self.exitCode = 0
        #: txcluster's own metrics, counted as things happen.
        self.recorder = ClusterRecorder()
        #: The applications' metrics, as the workers last reported them.
        self.appMetrics = WorkerMetricsStore()
        #: Whether a L{MetricsServer} serves them (only then are reports parsed).
        self.servesMetrics = False

    @property
    def reactor(self):
        if self._reactorArg is None:
            from twisted.internet import reactor

            self._reactorArg = reactor
        return self._reactorArg

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
        if self._supervisor is not None:
            return
        raiseFileLimit()
        uid, gid = workerIdentity(self.config.user, self.config.group)
        supervisor = Supervisor(self.config, self.reactor, self._restartPolicy, self._emit, self._giveUp)
        table = HandleTable(
            self.reactor,
            self.config.scheduling,
            self._sendConnections,
            window=self._handoffWindow,
            badAnswer=lambda process, why: self._processes.misbehaved(process, why),
            adopted=self.recorder.handoffLatency,
            keys=ClientKeys.forConfig(self.reactor, self.config),
        )
        supervisor.restarted = self.recorder.restarted
        supervisor.roundTrip = self.recorder.heartbeat
        supervisor.reloaded = self.recorder.reloadFinished
        declared = declareListens(table, [parseDeclared(d) for d in self.config.listens], self.reactor, os.environ)
        policy = ListenPolicy(
            [parsePattern(p) for p in self.config.allowListen],
            declared,
            declaredOnly=os.geteuid() == 0 and uid not in (None, 0),
        )
        broker = ListenBroker(
            table,
            policy,
            listening=self._listening,
            datagramsRefused=MAX_REQUESTS_DATAGRAMS if self.config.maxRequests else None,
        )
        self._processes = ProcessTable(
            self.reactor,
            self.config,
            self._spawner,
            self._publisher,
            broker,
            self._emit,
            supervisor,
            uid,
            gid,
        )
        self._processes.agentRelay = supervisor.agent.relay
        table.beforeDispatch = self._processes.answers.readAnswers
        supervisor.attach(self._processes, table)
        self._status = ClusterStatus(self, supervisor, self._processes, table)
        self._table = table
        self._supervisor = supervisor
        self._uid, self._gid = uid, gid

    def startService(self) -> None:
        self._prepare()
        super().startService()
        self.startedAt = self.reactor.seconds()
        if self._uid is not None or self._gid is not None:
            _log.info("workers run as uid {uid}, gid {gid}", uid=self._uid, gid=self._gid)
        _log.info(
            "master (pid {pid}) starting {workers} workers of {app} ({scheduling} scheduling)",
            pid=os.getpid(),
            workers=self.config.workers,
            app=self.config.app,
            scheduling=self.config.scheduling,
        )
        self._supervisor.start()

    def stopService(self) -> defer.Deferred:
        """
        Stop gracefully: stop accepting, hand out what was accepted, ask
        every worker to finish its connections and exit, kill those still
        running after the graceful timeout (one timeout for all of it).

        @return: a Deferred that fires once every worker process is gone.
        """
        super().stopService()
        if self._stopped is not None:
            return observe(self._stopped)
        from txcluster._events import ClusterStopping

        if self._supervisor is None:
            self._stopped = defer.succeed(None)
        else:
            delay = self.config.drainDelay
            self._emit(ClusterStopping(delay))
            if delay > 0:
                _log.info(
                    "stopping: not ready any more; taking connections for {delay} more (--drain-delay) "
                    "before the workers drain", delay=seconds(delay))
                waited = defer.Deferred()
                self._drainCall = self.reactor.callLater(delay, waited.callback, None)
                self._stopped = waited.addCallback(lambda _: self._supervisor.stop())
            else:
                self._stopped = self._supervisor.stop()
        waiters, self._stopWaiters = self._stopWaiters, []
        for waiter in waiters:
            observe(self._stopped).addBoth(lambda _, waiter=waiter: waiter.callback(None))
        return observe(self._stopped)

    def stopNow(self) -> None:
        """
        Cut a stop's C{drainDelay} short: the workers drain now.
        """
        if self._drainCall is not None and self._drainCall.active():
            _log.info("draining the workers now, before the end of --drain-delay")
            self._drainCall.reset(0)

    @property
    def stopping(self) -> bool:
        """
        Whether a stop has begun (from then on the cluster is not ready).
        """
        return self._stopped is not None

    def whenStopped(self) -> defer.Deferred:
        """
        A Deferred that fires once the cluster has stopped: every worker is
        gone.  It waits for a stop that has not begun yet, too.
        """
        d = defer.Deferred()
        if self._stopped is not None:
            observe(self._stopped).addBoth(lambda _: d.callback(None))
        else:
            self._stopWaiters.append(d)
        return d

    def _giveUp(self, code: int) -> None:
        self.exitCode = code

        def stopped(_):
            if self._onGiveUp is not None:
                self._onGiveUp(self.exitCode)
            else:
                _exitProcessAfterReactor(self.reactor, self.exitCode)

        if self.running:
            self.stopService().addBoth(stopped)
        else:
            self._supervisor.stop().addBoth(stopped)

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

    def _listening(self, process, handle) -> None:
        from txcluster._events import WorkerListening

        self._emit(WorkerListening(process.workerId, process.pid, handle.describe(), handle.host, handle.port))

    # Handoffs --------------------------------------------------------------

    def _sendConnections(self, process, listenId: int, fds: list) -> defer.Deferred:
        d = process.channel.sendConnections(listenId, fds)
        if process.allowance.limit is not None and process.allowance.exhausted:
            self._supervisor.recycler.limitReached(process)
        return d.addCallback(self._taken, process, len(fds))

    def _taken(self, accepted: int, process, sent: int) -> int:
        if not 0 <= accepted <= sent:
            self._processes.misbehaved(process, f"said it took {accepted} of {sent} connections")
            accepted = sent
        process.handed += accepted
        if accepted:
            self.recorder.handed(process.workerId, accepted)
        return accepted

    # The public API ----------------------------------------------------------

    def statistics(self) -> ClusterStatistics:
        """
        A snapshot: every worker, every listener, the queue and counters.
        """
        if self._status is None:
            return ClusterStatistics((), (), 0, 0, 0)
        return self._status.statistics()

    def refreshLoad(self, timeout: float) -> defer.Deferred:
        """
        Ask every ready worker how many connections it has open; the
        Deferred fires once all have answered or after C{timeout} seconds.
        """
        return defer.succeed(None) if self._status is None else self._status.refreshLoad(timeout)

    def collectMetrics(self, timeout: float) -> defer.Deferred:
        """
        Ask every worker process for its application's metrics (into
        C{appMetrics}); the Deferred fires once all have answered or after
        C{timeout} seconds (a busy worker's last report is served).
        """
        return defer.succeed(None) if self._status is None else self._status.collectMetrics(timeout)

    def readyWorkers(self) -> int:
        """
        How many worker ids have a ready process taking connections.
        """
        return 0 if self._status is None else self._status.readyWorkers()

    def minReady(self) -> int:
        """
        How many ready workers make the cluster ready: C{config.minReady},
        or every worker it runs.
        """
        if self.config.minReady is not None:
            # Scaled below it, every worker there is makes it ready.
            return min(self.config.minReady, self.workerCount())
        return self.workerCount()

    def isReady(self) -> bool:
        """
        Whether the cluster is ready: running, not stopping, with at least
        L{minReady} ready workers.
        """
        return self.running and not self.stopping and self.readyWorkers() >= self.minReady()

    def workerCount(self) -> int:
        """
        How many worker ids the master keeps running.
        """
        return self.config.workers if self._supervisor is None else self._supervisor.workerCount()

    def recycle(self, workerId: int) -> defer.Deferred:
        """
        Replace worker C{workerId} with a fresh process, gated on the new
        one's readiness, as a reload does for one worker.

        @return: a Deferred firing with C{(oldPid, newPid)} once the old
            process has exited, or failing with L{KeyError} (no running
            worker C{workerId}), L{ReloadFailed} or L{ClusterStopped}.
        """
        if self._supervisor is None or not self.running:
            return defer.fail(ClusterStopped(self._notRunning()))
        return self._supervisor.recycler.recycle(workerId).addCallback(lambda pair: (pair[0].pid, pair[1].pid))

    def stacks(self, workerId: int) -> defer.Deferred:
        """
        The Python stacks of every thread of worker C{workerId}'s current
        process, without stopping it (a worker whose reactor is blocked
        answers too).

        @return: a Deferred firing with C{(pid, text)}, or failing with
            L{KeyError} (no running worker C{workerId}) or
            L{txcluster._process.StacksUnavailable}.
        """
        slot = None if self._supervisor is None else self._supervisor.slots.get(workerId)
        if workerId == AGENT_ID and self._supervisor is not None:
            slot = self._supervisor.agent.slot
        view = None if slot is None else slot.view()
        process = None if view is None else view.current
        if process is None or process.phase is Phase.DEAD:
            return defer.fail(UnknownWorker(f"no running worker {workerId}"))
        if process.phase is Phase.STARTING:
            # Its faulthandler is not set up yet: SIGUSR1 would kill it.
            return defer.fail(StacksUnavailable(f"{process.describe()} is still starting"))
        _log.info("writing the stacks of {worker} for a control client", worker=process.describe())
        return self._processes.stacks(process).addCallback(lambda text: (process.pid, text))

    def sendMessage(self, workerId: int, message: Any) -> defer.Deferred:
        """
        Send a JSON-serialisable C{message} to worker C{workerId}.
        """
        slot = None if self._supervisor is None else self._supervisor.slots.get(workerId)
        view = None if slot is None else slot.view()
        if view is None or view.current is None or view.current.phase is Phase.DEAD:
            return defer.fail(UnknownWorker(f"no running worker {workerId}"))
        return self._processes.send(view.current, message)

    def broadcast(self, message: Any) -> defer.Deferred:
        """
        Send C{message} to every worker that is not leaving.
        """
        targets = [] if self._processes is None else [
            p for p in self._processes.sorted()
            if p.phase in (Phase.STARTING, Phase.ONLINE, Phase.READY) and p.workerId != AGENT_ID
        ]
        return defer.gatherResults(
            [self._processes.send(p, message) for p in targets], consumeErrors=True
        ).addCallbacks(lambda _: None, _firstFailure)

    def reload(self, agent: bool = False) -> defer.Deferred:
        """
        Replace every worker with a fresh process that re-reads the app, a
        few at a time (C{reloadConcurrency}): each replacement must be ready
        before the worker it replaces stops taking connections and drains.
        A worker still starting, or being replaced already, is replaced once
        it is ready; a reload asked for while one runs replaces whatever was
        started before it too.

        @return: a Deferred that fires when every worker runs a process
            started after C{reload()} was called and the old ones are gone,
            or fails with L{ReloadFailed} (the reload stopped; the old
            workers keep serving) or L{ClusterStopped}.

        @param agent: restart the agent (C{config.agent}) first: its old
            process leaves, then a new one starts (never two at once);
            the workers' requests to it wait meanwhile.
        """
        if self._supervisor is None or not self.running:
            return defer.fail(ClusterStopped(self._notRunning()))
        return self._supervisor.reload(agent)

    def reloadProgress(self) -> Optional[tuple[int, int]]:
        """
        C{(done, total)} of the rolling reload under way (worker ids that
        serve with a fresh process, out of all), or L{None} if none is.
        """
        if self._supervisor is None or not self._supervisor.reloading:
            return None
        return self._supervisor.reloadProgress()

    def scale(self, count: int) -> defer.Deferred:
        """
        Run C{count} workers: start new ones (the Deferred waits until they
        are ready) or drain the highest-numbered ones (it waits until they
        have exited).
        """
        if count > MAX_WORKERS:
            return defer.fail(ValueError(f"a master runs at most {MAX_WORKERS} workers, not {count}"))
        if self._supervisor is None or not self.running:
            if count < 1:
                return defer.fail(ValueError(f"a cluster needs at least 1 worker, not {count}"))
            return defer.fail(ClusterStopped(self._notRunning()))
        return self._supervisor.scale(count)

    def _notRunning(self) -> str:
        return "the cluster is stopping" if self.stopping else "the cluster is not running"


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
        from twisted.internet.error import ReactorNotRunning

        try:
            reactor.stop()
        except ReactorNotRunning:
            # A stop signal stopped it first.
            pass

