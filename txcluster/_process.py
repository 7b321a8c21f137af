# -*- test-case-name: tests.test_process -*-
"""
How a worker process is started and heard from, on the master's side.

L{spawnWorker} runs C{python -m txcluster._workermain} with
C{reactor.spawnProcess}: one end of a C{socketpair} becomes the worker's
fd 3 (the AMP channel), fd 4 is a pipe carrying its log events as JSON, and
fds 1 and 2 are pipes whose lines reach the master's log.  L{WorkerOutput}
is the C{ProcessProtocol} that turns all of that into master log events
tagged with the worker's id and pid, at a bounded rate.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import sys
import time
from typing import Any, Callable, Optional

from attrs import mutable
from twisted.internet import defer

from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel, eventFromJSON, formatEvent
from twisted.python.failure import Failure

import txcluster
from txcluster import _commands
from txcluster._policy import CommandBudget
from txcluster._twistedcompat import BatchingUNIXServer, adoptUNIXTransport, childReader

__all__ = [
    "BatchingUNIXServer",
    "LOG_BURST",
    "LOG_RATE",
    "StacksUnavailable",
    "WorkerOutput",
    "adoptChannel",
    "reactorModuleName",
    "spawnWorker",
    "workerEnvironment",
]

_log = Logger(namespace="txcluster.worker")
_masterLog = Logger(namespace="txcluster.master")

#: Lines (log events, stdout and stderr lines together) a worker may write
#: per second, sustained; the excess is dropped and counted.
LOG_RATE = 1_000.0

#: Lines a worker may write at once on top of L{LOG_RATE}.
LOG_BURST = 10_000

#: How long the master stops reading a worker's pipe once the worker has
#: written more than its budget: the pipe fills meanwhile and the worker's
#: writes wait, so that a worker writing as fast as it can costs the master
#: one read of a full pipe per pause instead of a wake-up per write.
LOG_PAUSE = 0.1

#: How long a stack dump may take to begin once asked for.
STACKS_TIMEOUT = 3.0

#: A stack dump is over once the worker wrote nothing more for this long.
STACKS_QUIET = 0.2


class StacksUnavailable(Exception):
    """
    The worker wrote no stacks when asked (it ended, or C{SIGUSR1} did
    not reach it).
    """


@mutable
class _StackCapture:
    chunks: list
    waiters: list
    timer: Any


#: The log event keys a relayed event keeps (the others are the worker's
#: own fields; these are what the logging system reads).
_EVENT_KEYS = frozenset({"log_format", "log_level", "log_time", "log_flattened"})


def adoptChannel(reactor, fd: int, protocol) -> BatchingUNIXServer:
    """
    Connect C{protocol} to the master's end of a worker's socketpair, with
    L{BatchingUNIXServer} as the transport.  C{fd} is C{dup()}ed; the
    caller closes its own copy.
    """
    return adoptUNIXTransport(reactor, fd, protocol, BatchingUNIXServer)


def workerEnvironment(
    base: dict, workerId: int, workerCount: int, reactorModule: str
) -> dict:
    """
    The environment of a worker: the master's, plus what tells the worker
    who it is, and a C{PYTHONPATH} under which C{txcluster} imports;
    without what systemd told the master (C{NOTIFY_SOCKET}, C{LISTEN_FDS},
    ...), which is the master's alone.
    """
    from txcluster._systemd import removeFromEnvironment

    env = removeFromEnvironment(dict(base))
    env[_commands.ENV_WORKER_ID] = str(workerId)
    env[_commands.ENV_WORKER_COUNT] = str(workerCount)
    env[_commands.ENV_CHANNEL_FD] = str(_commands.CHANNEL_FD)
    env[_commands.ENV_LOG_FD] = str(_commands.LOG_FD)
    env[_commands.ENV_STACKS_FD] = str(_commands.STACKS_FD)
    env[_commands.ENV_REACTOR] = reactorModule
    env[_commands.ENV_MASTER_PID] = str(os.getpid())
    env["PYTHONUNBUFFERED"] = "1"
    packageRoot = os.path.dirname(os.path.dirname(os.path.abspath(txcluster.__file__)))
    paths = [packageRoot] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def reactorModuleName(reactor) -> str:
    """
    The module whose C{install()} gives a worker the same kind of reactor.
    """
    return type(reactor).__module__


@contextlib.contextmanager
def interruptsBlocked():
    """
    Block C{SIGINT} in this thread meanwhile.  A process spawned meanwhile
    starts with it blocked (C{spawnProcess} resets ignored signals in the
    child, not the mask), so that a terminal's Ctrl-C, which reaches the
    whole process group, cannot kill a worker whose interpreter is still
    starting; the worker ignores it, then unblocks it.  A Ctrl-C that
    reaches the master meanwhile is delivered once this is over.
    """
    block = getattr(signal, "pthread_sigmask", None)
    if block is None:
        yield
        return
    previous = block(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        block(signal.SIG_SETMASK, previous)


def spawnWorker(
    reactor,
    processProtocol: "WorkerOutput",
    channel,
    workerId: int,
    workerCount: int,
    appPath: str,
    env: Optional[dict] = None,
    executable: str = sys.executable,
    uid: Optional[int] = None,
    gid: Optional[int] = None,
    board: Optional[int] = None,
):
    """
    Start one worker process.

    @param channel: the master-side AMP protocol for this worker; it is
        connected before this returns.
    @param uid: run the worker as this user (L{None}: the master's).
    @param gid: run the worker with this group (L{None}: the master's).
    @param board: the load board's descriptor, which the worker inherits as
        L{BOARD_FD<_commands.BOARD_FD>} (L{None}: none).
    @return: the C{IProcessTransport} of the new process.
    """
    masterEnd, workerEnd = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        environment = workerEnvironment(
            os.environ if env is None else env,
            workerId,
            workerCount,
            reactorModuleName(reactor),
        )
        args = [executable, "-m", "txcluster._workermain", str(workerId), appPath]
        childFDs = {
            0: "w",
            1: "r",
            2: "r",
            _commands.CHANNEL_FD: workerEnd.fileno(),
            _commands.LOG_FD: "r",
            _commands.STACKS_FD: "r",
        }
        if board is not None:
            childFDs[_commands.BOARD_FD] = board
        with interruptsBlocked():
            transport = reactor.spawnProcess(
                processProtocol,
                executable,
                args,
                env=environment,
                uid=uid,
                gid=gid,
                childFDs=childFDs,
            )
        masterEnd.setblocking(False)
        adoptChannel(reactor, masterEnd.fileno(), channel)
    finally:
        masterEnd.close()
        workerEnd.close()
    transport.closeStdin()
    return transport


class WorkerOutput(ProcessProtocol):
    """
    The master's C{ProcessProtocol} for one worker: re-emits the worker's
    log events (fd 4, JSON) and its stdout and stderr lines (fds 1 and 2)
    into the master's log, and reports the process's end to C{ended}.

    Every relayed event is the worker's, whatever it sent: its namespace is
    C{txcluster.worker} (the worker's own is kept as C{workerNamespace}),
    its system C{worker ID pid PID}, its C{workerId} and C{pid} fields the
    worker's.  At most L{LOG_BURST} lines at once and L{LOG_RATE} a second
    are relayed; the excess is dropped, and counted in a warning once a
    second while it lasts, and the pipe is not read for L{LOG_PAUSE}
    seconds (the worker's writes wait meanwhile).

    @ivar stderrTail: the last lines the worker wrote on stderr or logged at
        error level, kept for the give-up report.
    @ivar dropped: how many lines were dropped in all.
    """

    maxLine = 64 * 1024

    #: How often a note of dropped lines is logged, at most.
    noteInterval = 1.0

    def __init__(
        self,
        workerId: int,
        ended: Callable[[Failure], None],
        publisher: Callable[[dict], None],
        tailLines: int = 40,
        clock=None,
        rate: float = LOG_RATE,
        burst: int = LOG_BURST,
    ) -> None:
        """
        @param clock: an C{IReactorTime} for the rate limit and its notes
            (L{None}: the global reactor, once the process starts).
        """
        self.workerId = workerId
        self._ended = ended
        self._publisher = publisher
        self._buffers: dict[int, bytes] = {}
        self._skipping: set[int] = set()
        self._clock = clock
        self._rate = rate
        self._burst = burst
        self._budget: Optional[CommandBudget] = None
        self._unreported = 0
        self._noteCall = None
        self._paused: dict = {}
        self.dropped = 0
        self._stacks: Optional[_StackCapture] = None
        self.stderrTail: collections.deque = collections.deque(maxlen=tailLines)

    pid: Optional[int] = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def system(self) -> str:
        if self.workerId == _commands.AGENT_ID:
            return f"agent pid {self.pid}"
        return f"worker {self.workerId} pid {self.pid}"

    def _now(self) -> float:
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor
        return self._clock.seconds()

    def captureStacks(self, timeout: float = STACKS_TIMEOUT) -> defer.Deferred:
        """
        Take the next stack dump the worker writes (the caller sends it
        C{SIGUSR1}) instead of logging it.

        @return: a Deferred firing with the dump's text once the worker has
            written nothing more for L{STACKS_QUIET} seconds, or failing
            with L{StacksUnavailable} if nothing came within C{timeout}.
        """
        d = defer.Deferred()
        self._now()
        if self._stacks is None:
            timer = self._clock.callLater(timeout, self._stacksDone)
            self._stacks = _StackCapture([], [d], timer)
        else:
            self._stacks.waiters.append(d)
        return d

    def _stacksDone(self) -> None:
        capture, self._stacks = self._stacks, None
        if capture is None:
            return
        if capture.timer.active():
            capture.timer.cancel()
        text = b"".join(capture.chunks).decode("utf-8", "replace")
        for waiter in capture.waiters:
            if text:
                waiter.callback(text)
            else:
                waiter.errback(StacksUnavailable("the worker wrote no stacks"))

    def _stackData(self, data: bytes) -> None:
        capture = self._stacks
        if capture is None:
            # A dump nobody asked for (a hung worker's, before its kill): logged.
            self._relayLines(2, data)
            return
        capture.chunks.append(data)
        if sum(map(len, capture.chunks)) > self.maxLine * 16:
            self._stacksDone()
            return
        # faulthandler writes the whole dump at once: it is over once the
        # pipe is quiet.
        capture.timer.cancel()
        capture.timer = self._clock.callLater(STACKS_QUIET, self._stacksDone)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == _commands.STACKS_FD:
            self._now()
            self._stackData(data)
            return
        self._relayLines(childFD, data)

    def _relayLines(self, childFD: int, data: bytes) -> None:
        now = self._now()
        if self._budget is None:
            self._budget = CommandBudget(self._rate, self._burst, now)
        if childFD in self._skipping:
            # The rest of a line that was dropped.
            end = data.find(b"\n")
            if end < 0:
                return
            self._skipping.discard(childFD)
            data = data[end + 1 :]
        # JSON log records are "\x1e{json}\n"; JSON text has no raw newline.
        buffered = self._buffers.get(childFD, b"") + data
        *records, rest = buffered.split(b"\n")
        cut = len(rest) > self.maxLine
        if cut:
            records.append(rest)
            rest = b""
        self._buffers[childFD] = rest
        for index, record in enumerate(records):
            if not self._budget.spend(now):
                self._drop(childFD, len(records) - index + (1 if rest else 0))
                # A line cut at maxLine is unfinished too: skip its rest.
                if rest or cut:
                    self._buffers[childFD] = b""
                    self._skipping.add(childFD)
                return
            self._record(childFD, record)

    def _drop(self, childFD: int, lines: int) -> None:
        self.dropped += lines
        self._unreported += lines
        if self._noteCall is None:
            self._noteCall = self._clock.callLater(self.noteInterval, self._note)
        reader = childReader(self.transport, childFD)
        if reader is not None and childFD not in self._paused:
            reader.stopReading()
            self._paused[childFD] = self._clock.callLater(LOG_PAUSE, self._resume, childFD, reader)

    def _resume(self, childFD: int, reader) -> None:
        del self._paused[childFD]
        if childReader(self.transport, childFD) is reader:
            reader.startReading()

    def _note(self) -> None:
        self._noteCall = None
        if not self._unreported:
            return
        count, self._unreported = self._unreported, 0
        # The master's own line, about the worker.
        _masterLog.warn(
            "worker {workerId} (pid {pid}) wrote more than {rate:.0f} lines a second: "
            "{count} dropped",
            workerId=self.workerId,
            pid=self.pid,
            rate=self._rate,
            count=count,
        )

    def childConnectionLost(self, childFD: int) -> None:
        rest = self._buffers.pop(childFD, b"")
        self._skipping.discard(childFD)
        if rest:
            self._record(childFD, rest)

    def _record(self, childFD: int, record: bytes) -> None:
        if childFD == _commands.LOG_FD:
            record = record.strip(b"\x1e\r\n ")
            if record:
                self._relayEvent(record)
            return
        line = record.rstrip(b"\r\n").decode("utf-8", "replace")
        if not line:
            return
        if childFD == 2:
            self.stderrTail.append(line)
        _log.emit(
            LogLevel.warn if childFD == 2 else LogLevel.info,
            "{line}",
            line=line,
            stream="stderr" if childFD == 2 else "stdout",
            workerId=self.workerId,
            pid=self.pid,
            log_system=self.system(),
        )

    def _relayEvent(self, record: bytes) -> None:
        try:
            event = eventFromJSON(record.decode("utf-8", "replace"))
        except Exception:
            event = None
        if not isinstance(event, dict):
            _log.warn(
                "worker {workerId} (pid {pid}) wrote an unreadable log record: {record!r}",
                workerId=self.workerId,
                pid=self.pid,
                record=record[:200],
                log_system=self.system(),
            )
            return
        self._publisher(self._ownEvent(event))

    def _ownEvent(self, sent: dict) -> dict:
        """
        The event the worker C{sent}, as the worker's: only the logging
        system's keys it may set are kept, and those checked; who it is
        comes from the master.
        """
        event = {k: v for k, v in sent.items() if not k.startswith("log_") or k in _EVENT_KEYS}
        level = event.get("log_level")
        if not isinstance(level, type(LogLevel.info)):
            level = LogLevel.info
        event["log_level"] = level
        if not isinstance(event.get("log_format"), str):
            # None is an event without text (formatEvent gives ""), not "None".
            event["log_format"] = None if event.get("log_format") is None else str(event["log_format"])
        if not isinstance(event.get("log_time"), (int, float)) or isinstance(event.get("log_time"), bool):
            event["log_time"] = time.time()
        if not isinstance(event.get("log_flattened"), dict):
            event.pop("log_flattened", None)
        namespace = sent.get("log_namespace")
        if isinstance(namespace, str):
            event["workerNamespace"] = namespace
        original = sent.get("log_system")
        if isinstance(original, str) and original != "-":
            event["workerLogSystem"] = original
        event["log_namespace"] = "txcluster.worker"
        event["log_system"] = self.system()
        # What Twisted's legacy observers read for the system.
        event["system"] = self.system()
        event["workerId"] = self.workerId
        event["pid"] = self.pid
        traceback = event.get("workerTraceback")
        if isinstance(traceback, str) and traceback:
            event["log_format"] = (event.get("log_format") or "") + "\n{workerTraceback}"
            flattened = event.get("log_flattened")
            if isinstance(flattened, dict):
                flattened["workerTraceback!:"] = traceback
                flattened["workerTraceback!s:"] = traceback
        if level >= LogLevel.error:
            try:
                text = formatEvent(event)
            except Exception:
                text = repr(event.get("log_format"))
            self.stderrTail.extend(text.splitlines()[-self.stderrTail.maxlen :])
        return event

    def processEnded(self, reason: Failure) -> None:
        self._stacksDone()
        for childFD in list(self._buffers):
            self.childConnectionLost(childFD)
        if self._noteCall is not None and self._noteCall.active():
            self._noteCall.cancel()
        for call in self._paused.values():
            if call.active():
                call.cancel()
        self._paused.clear()
        self._note()
        self._ended(reason)
