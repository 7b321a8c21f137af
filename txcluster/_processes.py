# -*- test-case-name: tests.test_master -*-
"""
The master's table of worker processes: spawning one, hearing from it
through its channel, asking it to leave, killing it, and how it ended.

Each process is one L{WorkerProcess} record whose L{Phase} says where it
is; what the slots (L{txcluster._lifecycle.Slot}) need to hear of a process
(it is ready, it is lost, it ended) goes to a L{ProcessObserver}, the
supervisor.
"""

from __future__ import annotations

import json
import os
import signal as signalModule
from typing import Any, Callable, Optional, Protocol, Union

from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.logger import Logger
from twisted.python.failure import Failure

from txcluster import _commands, _events
from txcluster._channel import AnswerReader, MasterChannel
from txcluster._commands import CollectMetrics, Disconnect, ToWorker, WorkerCount, encodeMessage
from txcluster._lifecycle import (
    SERVING_PHASES,
    Phase,
    WorkerProcess,
    judge,
    seconds,
    spawnFailed,
)
from txcluster._handles import SHARED
from txcluster._listens import ListenBroker
from txcluster._loadboard import BoardSlots
from txcluster._policy import requestLimit
from txcluster._process import StacksUnavailable, WorkerOutput
from txcluster._scheduler import Allowance

_log = Logger(namespace="txcluster.master")

#: How long a worker whose channel broke may take to exit before it is killed.
CHANNEL_LOST_GRACE = 2.0
#: How long a hung worker has to write its stack before it is killed.
STACK_DUMP_GRACE = 1.0


class ProcessObserver(Protocol):
    """
    What the supervisor hears about worker processes.
    """

    def processReady(self, process: WorkerProcess) -> None:
        """
        C{process} said L{Ready}.
        """

    def processLost(self, process: WorkerProcess) -> None:
        """
        C{process} is leaving on its own: its slot lets it go.
        """

    def processEnded(self, process: WorkerProcess) -> None:
        """
        C{process} ended; C{process.ending} says how.
        """


class _Requests:
    """
    What one worker process may ask of the master (a
    L{txcluster._channel.WorkerRequests}).
    """

    def __init__(self, table: "ProcessTable", process: WorkerProcess) -> None:
        self._table = table
        self._process = process

    def describe(self) -> str:
        return self._process.describe()

    def online(self, pid: int) -> None:
        self._table.online(self._process)

    def queryServer(self, kind, address, port, index, backlog, mode) -> dict:
        return self._table.broker.queryServer(self._process, kind, address, port, index, backlog, mode)

    def listening(self, listenId: int) -> None:
        self._table.broker.listening(self._process, listenId)

    def close(self, listenId: int) -> None:
        self._table.broker.close(self._process, listenId)

    def ready(self) -> None:
        self._table.ready(self._process)

    def leaving(self, why: str) -> None:
        self._table.leaving(self._process, why)

    def reportLoad(self, connections: int) -> None:
        self._process.connections = connections
        self._table.broker.table.reportLoad(self._process, connections)

    def message(self, text: str) -> None:
        self._table.message(self._process, text)

    def finalMetrics(self, text: str) -> None:
        self._table.metricsReported(self._process, text)

    def askAgent(self, message: str) -> defer.Deferred:
        return self._table.agentRelay.ask(self._process.workerId, message)

    def agentBroadcast(self, message: str) -> None:
        if self._fromAgent("AgentBroadcast"):
            self._table.agentRelay.toWorkers(self._table.sorted(), None, message)

    def agentSend(self, workerId: int, message: str) -> defer.Deferred:
        if not self._fromAgent("AgentSend"):
            return defer.succeed(None)
        return self._table.agentRelay.toWorkers(self._table.sorted(), workerId, message)

    def _fromAgent(self, command: str) -> bool:
        # A worker that sends the agent's commands misbehaves.
        if self._process.workerId == _commands.AGENT_ID:
            return True
        self._table.misbehaved(self._process, f"sent {command}, which only the agent may send")
        return False

    def misbehaved(self, what: str) -> None:
        self._table.misbehaved(self._process, what)

    def channelLost(self, reason: Failure) -> None:
        self._table.channelLost(self._process, reason)


class ProcessTable:
    """
    Every worker process of one master.

    @ivar processes: the processes that have not ended.
    """

    def __init__(
        self,
        reactor,
        config,
        spawner: Callable,
        publisher: Callable[[dict], None],
        broker: ListenBroker,
        emit: Callable[[Any], None],
        observer: ProcessObserver,
        uid: Optional[int] = None,
        gid: Optional[int] = None,
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._spawner = spawner
        self._publisher = publisher
        self.broker = broker
        self._emit = emit
        self._observer = observer
        self._uid = uid
        self._gid = gid
        self._serial = 0
        self._killTimers: dict[WorkerProcess, Any] = {}
        self.processes: set[WorkerProcess] = set()
        #: Whether the master is stopping: then nothing waits for a respawn.
        self.stopping = False
        #: Called with each process once it has ended.
        self.gone: list[Callable[[WorkerProcess], None]] = []
        #: Called with a process and the metrics text it reported.
        self.metricsReported: Callable[[WorkerProcess, str], None] = lambda process, text: None
        #: The messenger between the workers and the agent.
        self.agentRelay = None
        #: Reads the workers' answers to NewConn.
        self.answers = AnswerReader(reactor)
        #: The slots on the load board (fair accept, under shared scheduling).
        self.board = BoardSlots(enabled=config.scheduling == SHARED and config.fairAccept)

    @property
    def lastSerial(self) -> int:
        """
        The serial of the last process made: any process made from now on
        has a higher one.
        """
        return self._serial

    def sorted(self) -> list[WorkerProcess]:
        return sorted(self.processes, key=lambda p: (p.workerId, p.serial))

    # Spawning ------------------------------------------------------------------

    def new(self, workerId: int) -> WorkerProcess:
        """
        The record of a process to spawn for C{workerId} (nothing starts).
        """
        self._serial += 1
        limit = requestLimit(self._config.maxRequests, self._config.maxRequestsJitter)
        return WorkerProcess(workerId, self._serial, Allowance(limit or None))

    def spawn(self, process: WorkerProcess, workerCount: int) -> bool:
        """
        Start C{process}.

        @return: L{False} if the spawner raised (logged; C{process.ending}
            says so and the process is L{Phase.DEAD}).
        """
        channel = MasterChannel(_Requests(self, process), self._reactor.seconds, self.answers)
        process.channel = channel
        process.output = WorkerOutput(
            process.workerId, lambda reason: self.ended(process, reason), self._publisher, clock=self._reactor
        )
        process.forkedAt = self._reactor.seconds()
        env = dict(os.environ if self._config.env is None else self._config.env)
        env[_commands.ENV_GRACEFUL_TIMEOUT] = repr(self._config.gracefulTimeout)
        app = self._config.app
        env.pop(_commands.ENV_PROXY, None)
        if self._config.proxyProtocol:
            env[_commands.ENV_PROXY] = json.dumps(
                {"allow": list(self._config.proxyAllowFrom), "timeout": self._config.proxyTimeout}
            )
        if process.workerId == _commands.AGENT_ID:
            env[_commands.ENV_ROLE] = "agent"
            app = self._config.agent
        else:
            env.pop(_commands.ENV_ROLE, None)
        env.pop(_commands.ENV_LOAD_SLOT, None)
        # (The agent's listens are its own.)
        board = self.board.assign(process, env) if process.workerId != _commands.AGENT_ID else {}
        try:
            process.transport = self._spawner(
                self._reactor,
                process.output,
                channel,
                process.workerId,
                workerCount,
                app,
                env=env,
                uid=self._uid,
                gid=self._gid,
                **board,
            )
        except Exception as e:
            _log.failure("could not spawn worker {workerId}", workerId=process.workerId)
            process.phase = Phase.DEAD
            process.ending = spawnFailed(str(e))
            self.board.free(process)
            return False
        process.pid = process.transport.pid
        self.processes.add(process)
        _log.info("{worker} forked", worker=process.describe(), workerId=process.workerId, pid=process.pid)
        self._emit(_events.WorkerForked(process.workerId, process.pid))
        return True

    # What a worker tells the master --------------------------------------------

    def online(self, process: WorkerProcess) -> None:
        if process.phase is Phase.STARTING:
            process.advance(Phase.ONLINE)
        _log.info("{worker} online", worker=process.describe(), workerId=process.workerId, pid=process.pid)
        self._emit(_events.WorkerOnline(process.workerId, process.pid))

    def ready(self, process: WorkerProcess) -> None:
        if process.phase not in (Phase.STARTING, Phase.ONLINE):
            # Told to leave before it was ready, or said so twice.
            return
        process.advance(Phase.READY)
        process.readyAt = self._reactor.seconds()
        _log.info(
            "{worker} ready in {seconds:.2f} s, listening on {listens}",
            worker=process.describe(),
            seconds=process.readyAt - process.forkedAt,
            listens=", ".join(self.broker.listensOf(process)) or "nothing",
            workerId=process.workerId,
            pid=process.pid,
        )
        self._observer.processReady(process)

    def leaving(self, process: WorkerProcess, why: str) -> None:
        why = _shorten(why, 80) or "no reason given"
        if process.phase not in SERVING_PHASES:
            return
        process.advance(Phase.LEAVING, why)
        self.broker.table.leaveAll(process)
        _log.info(
            "{worker} is leaving on its own ({why}): replacing it",
            worker=process.describe(),
            why=why,
            workerId=process.workerId,
            pid=process.pid,
        )
        self._emit(_events.WorkerDisconnected(process.workerId, process.pid, why))
        self.killAfter(process, self._config.gracefulTimeout, self._killLate(self._config.gracefulTimeout))
        self._observer.processLost(process)

    def message(self, process: WorkerProcess, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            self.misbehaved(process, "sent a message that is not JSON")
            return
        self._emit(_events.WorkerMessage(process.workerId, process.pid, message))

    def misbehaved(self, process: WorkerProcess, what: str) -> None:
        _log.error(
            "{worker} misbehaved: it {what}; replacing it",
            worker=process.describe(),
            what=what,
            workerId=process.workerId,
            pid=process.pid,
        )
        self.fail(process, f"misbehaved: it {what}")
        self.kill(process)
        # Whatever else it sends is not taken, but for the answers to the
        # handoffs it was sent: the connections in them may have been read.
        process.channel.drop("the worker misbehaved", answers=True)

    def channelLost(self, process: WorkerProcess, reason: Failure) -> None:
        self.broker.table.lose(process, keepOrphans=not self.stopping)
        if process.phase is Phase.DEAD:
            return
        if not process.leaving:
            _log.warn(
                "{worker}: channel closed ({why})",
                worker=process.describe(),
                why=reason.getErrorMessage(),
                workerId=process.workerId,
                pid=process.pid,
            )
        self.killAfter(process, CHANNEL_LOST_GRACE, self.kill)

    def ended(self, process: WorkerProcess, reason: Failure) -> None:
        """
        The process is gone (its L{WorkerOutput} saw it end).
        """
        exitCode = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        ending = judge(process, exitCode, signal)
        phase = process.phase
        process.ending = ending
        process.phase = Phase.DEAD
        timer = self._killTimers.pop(process, None)
        if timer is not None and timer.active():
            timer.cancel()
        self.processes.discard(process)
        self.board.free(process)
        self.broker.table.lose(process, keepOrphans=not self.stopping)
        self.broker.forget(process)
        if process.channel.dropped is not None and process.channel.transport is not None:
            # Whatever still holds its end (a child it forked) is not heard.
            process.channel.transport.loseConnection()
        fields = dict(worker=process.describe(), how=ending.description, workerId=process.workerId, pid=process.pid)
        if ending.failure is not None:
            _log.error("{worker} died ({how})", exitCode=exitCode, signal=signal, **fields)
        elif phase is Phase.DRAINING:
            _log.info("{worker} exited ({how})", **fields)
        elif phase is Phase.LEAVING:
            _log.info(
                "{worker} exited ({how}) after leaving on its own ({why}); not counted as a failure",
                why=ending.why,
                **fields,
            )
        elif ending.why is not None:
            _log.info("{worker} exited ({how}): it was sent {why}; not counted as a failure", why=ending.why, **fields)
        else:
            _log.info("{worker} exited ({how}) on its own; not counted as a failure", **fields)
        self._emit(
            _events.WorkerExited(process.workerId, process.pid, exitCode, signal, ending.failure is None)
        )
        # The supervisor first: whoever waits on 'exited' may carry on at
        # once (the end of a stop forgets every slot).
        self._observer.processEnded(process)
        for gone in list(self.gone):
            try:
                gone(process)
            except Exception:
                _log.failure("bug: a process-end hook failed on {worker}", worker=process.describe())
        process.exited.callback(ending)

    # What the master does to a worker ------------------------------------------

    def drain(self, process: WorkerProcess, reason: str, timeout: Optional[float] = None) -> None:
        """
        Ask C{process} to leave gracefully; kill it after C{timeout} (the
        graceful timeout by default).  A process already asked, or gone, is
        left as it is; one leaving on its own is not asked again, but is
        killed after C{timeout} if that comes sooner than its own deadline
        (a stop's one deadline holds for it too).
        """
        if timeout is None:
            timeout = self._config.gracefulTimeout
        if process.phase is Phase.LEAVING:
            self.killAfter(process, timeout, self._killLate(timeout))
            return
        if process.phase not in SERVING_PHASES:
            return
        process.advance(Phase.DRAINING, reason)
        self.broker.table.leaveAll(process)
        _log.info(
            "{worker} disconnecting ({reason}): it has {timeout} to finish",
            worker=process.describe(),
            reason=reason,
            timeout=seconds(timeout),
            workerId=process.workerId,
            pid=process.pid,
        )
        self._emit(_events.WorkerDisconnected(process.workerId, process.pid, reason))
        if process.channel.transport is not None:
            process.channel.callRemote(Disconnect, timeout=timeout).addErrback(lambda f: None)
        self.killAfter(process, timeout, self._killLate(timeout))

    def fail(self, process: WorkerProcess, how: str) -> None:
        """
        C{process} failed (C{how}, worded to follow "which"): it goes out of
        rotation and its end counts as a failure, unless it was leaving
        anyway.
        """
        if process.phase in SERVING_PHASES:
            process.advance(Phase.FAILING, how)
        self.broker.table.leaveAll(process)

    def condemn(self, process: WorkerProcess, how: str) -> None:
        """
        C{process} failed: log it, and kill it.
        """
        _log.error(
            "{worker} {how}: killing it",
            worker=process.describe(),
            how=how,
            workerId=process.workerId,
            pid=process.pid,
        )
        self.fail(process, how)
        self.kill(process)

    def hung(self, process: WorkerProcess, silent: float) -> None:
        """
        C{process} has not answered a heartbeat for C{silent} seconds: dump
        its stack, then kill it.
        """
        _log.error(
            "{worker} has not answered a heartbeat for {seconds}: its reactor is blocked. "
            "Dumping its stack, then killing it",
            worker=process.describe(),
            seconds=seconds(silent),
            workerId=process.workerId,
            pid=process.pid,
        )
        self.fail(process, f"stopped answering heartbeats (blocked for {seconds(silent)})")
        # A number: Twisted's signalProcess only knows HUP, STOP, INT, KILL
        # and TERM by name and hands anything else to os.kill as it is.
        self.kill(process, signalModule.SIGUSR1)
        self.killAfter(process, STACK_DUMP_GRACE, self.kill)

    def kill(self, process: WorkerProcess, signal: Union[str, int] = "KILL") -> None:
        try:
            process.transport.signalProcess(signal)
        except (ProcessExitedAlready, OSError, AttributeError):
            pass

    def killAfter(self, process: WorkerProcess, delay: float, kill: Callable[[WorkerProcess], None]) -> None:
        """
        Call C{kill(process)} after C{delay} seconds, unless a kill is due
        sooner.  A process has one kill timer, so that the one its end
        cancels is the only one there is.
        """
        current = self._killTimers.get(process)
        if current is not None and current.active():
            if current.getTime() <= self._reactor.seconds() + delay:
                return
            current.cancel()
        self._killTimers[process] = self._reactor.callLater(delay, kill, process)

    def _killLate(self, timeout: float) -> Callable[[WorkerProcess], None]:
        """
        What kills a leaving process that is still running C{timeout}
        seconds after it began to leave.
        """

        def kill(process: WorkerProcess) -> None:
            if process.phase is not Phase.DEAD:
                _log.warn(
                    "{worker} still running {timeout} after it {began}: killing it",
                    worker=process.describe(),
                    timeout=seconds(timeout),
                    began="began to leave on its own" if process.phase is Phase.LEAVING else "was asked to stop",
                    workerId=process.workerId,
                    pid=process.pid,
                )
                self.kill(process)

        return kill

    def stacks(self, process: WorkerProcess) -> defer.Deferred:
        """
        The current Python stacks of C{process}'s threads: it is sent
        C{SIGUSR1}, on which C{faulthandler} writes them to the master
        (from a signal handler, so a blocked reactor does not keep it from
        answering).

        @return: a Deferred firing with the text, or failing with
            L{StacksUnavailable}.
        """
        if process.phase is Phase.DEAD or process.pid is None:
            return defer.fail(StacksUnavailable(f"{process.describe()} has exited"))
        d = process.output.captureStacks()
        self.kill(process, signalModule.SIGUSR1)
        return d

    def collectMetrics(self, process: WorkerProcess) -> defer.Deferred:
        """
        Ask C{process} for its application's metrics; they go to
        C{metricsReported}.  The Deferred fires (with nothing) once it
        answered or could not.
        """
        if process.channel.transport is None or process.channel.dropped is not None:
            return defer.succeed(None)

        def answered(answer):
            self.metricsReported(process, answer["metrics"])

        def failed(failure):
            _log.debug("{worker} gave no metrics: {why}", worker=process.describe(), why=failure.getErrorMessage())

        return process.channel.callRemote(CollectMetrics).addCallbacks(answered, failed)

    # Messages ----------------------------------------------------------------

    def send(self, process: WorkerProcess, message: Any) -> defer.Deferred:
        """
        Send C{message} (JSON-serialisable) to C{process} with L{ToWorker}.
        """
        try:
            text = encodeMessage(message)
        except Exception:
            return defer.fail()
        return process.channel.callRemote(ToWorker, message=text).addCallback(lambda _: None)

    def tellCount(self, count: int) -> None:
        """
        Tell every worker that is not leaving how many workers there are.
        """
        for process in self.processes:
            if process.channel.transport is not None and process.phase in SERVING_PHASES:
                process.channel.callRemote(WorkerCount, count=count)


def _shorten(text: str, limit: int) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
