# -*- test-case-name: tests.test_process -*-
"""
How a worker process is started and heard from, on the master's side.

L{spawnWorker} runs C{python -m txcluster._workermain} with
C{reactor.spawnProcess}: one end of a C{socketpair} becomes the worker's
fd 3 (the AMP channel), fd 4 is a pipe carrying its log events as JSON, and
fds 1 and 2 are pipes whose lines reach the master's log.  L{WorkerOutput}
is the C{ProcessProtocol} that turns all of that into master log events
tagged with the worker's id and pid.
"""

from __future__ import annotations

import collections
import os
import socket
import struct
import sys
from errno import EWOULDBLOCK, ENOBUFS
from typing import Callable, Optional

from twisted.internet import error, main
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.unix import Server as UNIXServer
from twisted.logger import Logger, LogLevel, eventFromJSON, formatEvent
from twisted.python.failure import Failure

import txcluster
from txcluster import _commands

_log = Logger(namespace="txcluster.worker")

class BatchingUNIXServer(UNIXServer):
    """
    A UNIX stream transport that sends every queued file descriptor with the
    pending bytes in one C{sendmsg} (up to 253 per call), where Twisted's
    sends one descriptor per call with one byte each.  The receiver is an
    ordinary Twisted UNIX transport: it gets the descriptors before the
    bytes of the box that names them, in order.
    """

    def writeSomeData(self, data):
        queue = self._sendmsgQueue
        if not queue:
            return UNIXServer._writeSomeDataBase.writeSomeData(self, data)
        if len(queue) > len(data):
            return error.FileDescriptorOverrun()
        sent = 0
        while queue:
            batch = queue[: _commands.MAX_FDS_PER_MESSAGE]
            # Every batch needs a byte to travel with; the last takes the rest.
            last = len(batch) == len(queue)
            chunk = data[sent:] if last else data[sent : sent + 1]
            try:
                sent += self.socket.sendmsg(
                    [chunk], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _packFds(batch))]
                )
            except OSError as e:
                if e.errno in (EWOULDBLOCK, ENOBUFS):
                    return sent
                return main.CONNECTION_LOST
            del queue[: len(batch)]
        return sent


def _packFds(fds: list) -> bytes:
    return struct.pack(f"{len(fds)}i", *fds)


class _OneProtocolFactory(Factory):
    def __init__(self, protocol):
        self._protocol = protocol

    def buildProtocol(self, addr):
        return self._protocol


def adoptChannel(reactor, fd: int, protocol) -> BatchingUNIXServer:
    """
    Connect C{protocol} to the master's end of a worker's socketpair.

    This is what C{reactor.adoptStreamConnection(fd, AF_UNIX, factory)}
    does, with L{BatchingUNIXServer} as the transport class.  C{fd} is
    C{dup()}ed; the caller closes its own copy.
    """
    return BatchingUNIXServer._fromConnectedSocket(fd, _OneProtocolFactory(protocol), reactor)


def workerEnvironment(
    base: dict, workerId: int, workerCount: int, reactorModule: str
) -> dict:
    """
    The environment of a worker: the master's, plus what tells the worker
    who it is, and a C{PYTHONPATH} under which C{txcluster} imports.
    """
    env = dict(base)
    env[_commands.ENV_WORKER_ID] = str(workerId)
    env[_commands.ENV_WORKER_COUNT] = str(workerCount)
    env[_commands.ENV_CHANNEL_FD] = str(_commands.CHANNEL_FD)
    env[_commands.ENV_LOG_FD] = str(_commands.LOG_FD)
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
):
    """
    Start one worker process.

    @param channel: the master-side AMP protocol for this worker; it is
        connected before this returns.
    @param uid: run the worker as this user (L{None}: the master's).
    @param gid: run the worker with this group (L{None}: the master's).
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
        transport = reactor.spawnProcess(
            processProtocol,
            executable,
            args,
            env=environment,
            uid=uid,
            gid=gid,
            childFDs={
                0: "w",
                1: "r",
                2: "r",
                _commands.CHANNEL_FD: workerEnd.fileno(),
                _commands.LOG_FD: "r",
            },
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
    into the master's log, tagged with the worker's id and pid, and reports
    the process's end to C{ended}.

    @ivar stderrTail: the last lines the worker wrote on stderr or logged at
        error level, kept for the give-up report.
    """

    maxLine = 64 * 1024

    def __init__(
        self,
        workerId: int,
        ended: Callable[[Failure], None],
        publisher: Callable[[dict], None],
        tailLines: int = 40,
    ) -> None:
        self.workerId = workerId
        self._ended = ended
        self._publisher = publisher
        self._buffers: dict[int, bytes] = {}
        self.stderrTail: collections.deque = collections.deque(maxlen=tailLines)

    pid: Optional[int] = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def system(self) -> str:
        return f"worker {self.workerId} pid {self.pid}"

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        # JSON log records are "\x1e{json}\n"; JSON text has no raw newline.
        buffered = self._buffers.get(childFD, b"") + data
        *records, rest = buffered.split(b"\n")
        if len(rest) > self.maxLine:
            records.append(rest)
            rest = b""
        self._buffers[childFD] = rest
        for record in records:
            self._record(childFD, record)

    def childConnectionLost(self, childFD: int) -> None:
        rest = self._buffers.pop(childFD, b"")
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
        except ValueError:
            _log.warn(
                "worker {workerId} (pid {pid}) wrote an unreadable log record: {record!r}",
                workerId=self.workerId,
                pid=self.pid,
                record=record[:200],
                log_system=self.system(),
            )
            return
        if not isinstance(event, dict):
            return
        original = event.get("log_system")
        event["log_system"] = self.system()
        if original not in (None, "-"):
            event["workerLogSystem"] = original
        event["workerId"] = self.workerId
        event["pid"] = self.pid
        traceback = event.get("workerTraceback")
        if traceback:
            event["log_format"] = (event.get("log_format") or "") + "\n{workerTraceback}"
            flattened = event.get("log_flattened")
            if isinstance(flattened, dict):
                flattened["workerTraceback!:"] = traceback
                flattened["workerTraceback!s:"] = traceback
        level = event.get("log_level")
        if level is not None and level >= LogLevel.error:
            text = formatEvent(event)
            self.stderrTail.extend(text.splitlines()[-self.stderrTail.maxlen :])
        self._publisher(event)

    def processEnded(self, reason: Failure) -> None:
        for childFD in list(self._buffers):
            self.childConnectionLost(childFD)
        self._ended(reason)
