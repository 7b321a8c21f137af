# -*- test-case-name: tests.test_control -*-
"""
The master's control socket: a UNIX socket (mode 0600) on which the
C{txcluster} command, or any AMP client, asks for the status, a reload,
scaling, a recycle, a stop, a worker's stacks, or the lifecycle events
(see L{txcluster._controlcommands}).

Only a peer running as root or as the master's user is served
(C{SO_PEERCRED}).  A client that sends what is not AMP, floods, sends
descriptors or does not read its events is logged and cut off; it costs
the master one socket meanwhile, and at most L{MAX_CLIENTS} are served at
once.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
import time
from types import MethodType
from typing import Any, Callable, Optional

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from txcluster import _events
from txcluster._commands import AGENT_ID
from txcluster._deferreds import observe
from txcluster._controlcommands import (
    CLIENT_COMMANDS,
    SOCKET_NAME,
    BadRequest,
    Event,
    NoSuchWorker,
    NotRunning,
    OperationFailed,
    Recycle,
    Reload,
    Scale,
    Stacks,
    Status,
    Stop,
    Watch,
)
from txcluster._lifecycle import ClusterStopped, ReloadFailed, UnknownWorker
from txcluster._policy import CommandBudget
from txcluster._process import StacksUnavailable
from txcluster._twistedcompat import connectionLostQuietly, makeConnectionQuietly, readingValue, responderFor

_log = Logger(namespace="txcluster.control")

#: Commands a second a control client may send, sustained, and at once.
COMMAND_RATE = 100.0
COMMAND_BURST = 500

#: The largest box a control client may send (its commands are tiny).
MAX_BOX_SIZE = 16 * 1024

#: Control clients served at once; more are refused.
MAX_CLIENTS = 64

#: Events kept for a watcher that does not read them; one more and it is
#: cut off.
WATCH_BACKLOG = 10_000

#: Bytes of events kept for a watcher that does not read them (an event
#: carries a worker's message of up to 64 KiB); more and it is cut off.
WATCH_BACKLOG_BYTES = 4 * 1024 * 1024

#: How long a stopping master waits for its control clients' answers to
#: be written.
FLUSH_TIMEOUT = 2.0

_EVENT_NAMES = {
    _events.WorkerForked: "fork",
    _events.WorkerOnline: "online",
    _events.WorkerListening: "listening",
    _events.WorkerReady: "ready",
    _events.WorkerDisconnected: "disconnect",
    _events.WorkerExited: "exit",
    _events.WorkerMessage: "message",
    _events.WorkerRecycling: "recycle",
    _events.ReloadStarted: "reload-start",
    _events.ReloadFinished: "reload-end",
    _events.ClusterStopping: "stopping",
}


def defaultControlPath(environ=None, cwd: Optional[str] = None) -> str:
    """
    Where the control socket is when C{--control} is not given:
    C{$RUNTIME_DIRECTORY/txcluster.sock} under systemd (the first of its
    directories), C{txcluster.sock} in the working directory otherwise.
    """
    environ = os.environ if environ is None else environ
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    directory = runtime or (os.getcwd() if cwd is None else cwd)
    return os.path.join(directory, SOCKET_NAME)


def eventAsJSON(event, now: Optional[float] = None) -> dict:
    """
    A lifecycle event as the JSON object L{Event} carries.
    """
    record = {"event": _EVENT_NAMES.get(type(event), type(event).__name__), "time": time.time() if now is None else now}
    for name in getattr(type(event), "__attrs_attrs__", ()):
        value = getattr(event, name.name)
        record[name.name] = value
    return record


def statusAsJSON(statistics) -> dict:
    """
    A L{ClusterStatistics} as the object L{Status} answers.
    """
    return {
        "pid": statistics.pid,
        "uptime": round(statistics.uptime, 3),
        "app": statistics.app,
        "scheduling": statistics.scheduling,
        "workerCount": statistics.workerCount,
        "ready": statistics.ready,
        "minReady": statistics.minReady,
        "stopping": statistics.stopping,
        "queue": statistics.pending,
        "dropped": statistics.dropped,
        "failures": statistics.failures,
        "listeners": [
            {"address": h.address, "scheduling": h.scheduling, "workers": h.workers, "accepted": h.accepted}
            for h in statistics.listeners
        ],
        "workers": [
            {
                "id": w.workerId,
                "role": "agent" if w.workerId == AGENT_ID else "worker",
                "pid": w.pid,
                "state": w.state,
                "uptime": round(w.uptime, 3),
                "restarts": w.restarts,
                "handed": w.handed,
                "connections": w.connections,
                "rss": w.rss,
                "cpuPercent": w.cpuPercent,
                "cpuSeconds": w.cpuSeconds,
                "lag": None if w.lag is None else round(w.lag, 6),
                "memory": w.memory,
                "recycling": w.recycling,
                "listens": list(w.listens),
            }
            for w in statistics.workers
        ],
    }


def peerCredentials(transport) -> Optional[tuple]:
    """
    C{(pid, uid, gid)} of the process at the other end of a UNIX socket.
    """
    try:
        handle = transport.getHandle()
        data = handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    return struct.unpack("3i", data)


def _count(n: int, one: str, many: Optional[str] = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _who(workerId: int) -> str:
    return "agent" if workerId == AGENT_ID else f"worker {workerId}"


def _pids(statistics) -> dict:
    return {w.workerId: w.pid for w in statistics.workers if w.state == "ready"}


@implementer(IPushProducer)
class ControlProtocol(amp.AMP):
    """
    One control client: answers its commands from the L{ControlServer}'s
    cluster.
    """

    def __init__(self, server: "ControlServer") -> None:
        super().__init__()
        self._server = server
        self._budget: Optional[CommandBudget] = None
        self._boxSize = 0
        self._cut: Optional[str] = None
        self._watching = False
        self._paused = False
        self._backlog: list[str] = []
        self._backlogBytes = 0
        self.peer: Optional[tuple] = None
        #: Fires once the connection is closed.
        self.gone = defer.Deferred()

    # Who it is ---------------------------------------------------------------

    def describe(self) -> str:
        if self.peer is None:
            return "a control client"
        pid, uid, _ = self.peer
        return f"control client pid {pid} (uid {uid})"

    def makeConnection(self, transport) -> None:
        makeConnectionQuietly(self, transport)

    def connectionMade(self) -> None:
        super().connectionMade()
        self.peer = peerCredentials(self.transport)
        allowed = self._server.allowedUIDs()
        if self.peer is not None and self.peer[1] not in allowed:
            _log.warn(
                "refused {client}: only root and uid {uid} may use the control socket",
                client=self.describe(),
                uid=os.getuid(),
            )
            self._cut = "refused"
            self.transport.abortConnection()
            return
        if len(self._server.clients) >= MAX_CLIENTS:
            _log.warn("refused {client}: {count} control clients already", client=self.describe(), count=MAX_CLIENTS)
            self._cut = "refused"
            self.transport.abortConnection()
            return
        self._server.clients.add(self)

    def connectionLost(self, reason) -> None:
        self._server.clients.discard(self)
        if self._watching:
            self._watching = False
            self._server.cluster.removeObserver(self._event)
        connectionLostQuietly(self, reason)
        self.gone.callback(None)

    def cutOff(self, why: str) -> None:
        """
        The client misbehaved: log it and close its connection.
        """
        if self._cut is not None:
            return
        self._cut = why
        _log.warn("{client} {why}; cutting it off", client=self.describe(), why=why)
        if self.transport is not None:
            self.transport.abortConnection()

    # Framing -----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._cut is not None:
            return
        try:
            super().dataReceived(data)
        except Exception as e:
            self.cutOff(f"sent what is not AMP ({type(e).__name__})")

    def stringReceived(self, string: bytes) -> None:
        if self._cut is not None:
            return
        self._boxSize += 2 + len(string)
        if self._boxSize > MAX_BOX_SIZE:
            self.cutOff(f"sent a box larger than {MAX_BOX_SIZE} bytes")
            return
        if not string and not readingValue(self):
            self._boxSize = 0
        super().stringReceived(string)

    def lengthLimitExceeded(self, length: int) -> None:
        self.cutOff(f"sent a key of {length} bytes")

    def fileDescriptorReceived(self, descriptor: int) -> None:
        os.close(descriptor)
        self.cutOff("sent a file descriptor")

    def ampBoxReceived(self, box) -> None:
        if self._cut is not None:
            return
        if amp.COMMAND not in box:
            # The master asks nothing of a client that needs an answer.
            self.cutOff("sent a box that is not a command")
            return
        now = self._server.reactor.seconds()
        if self._budget is None:
            self._budget = CommandBudget(COMMAND_RATE, COMMAND_BURST, now)
        if not self._budget.spend(now):
            self.cutOff(f"sent commands faster than {COMMAND_RATE:.0f} a second")
            return
        super().ampBoxReceived(box)

    def locateResponder(self, name: bytes):
        found = responderFor(self, name) if name in _COMMAND_NAMES else None
        if found is None:
            # AMP answers an unknown command with an UNHANDLED error.
            return None
        command, responder = found
        return lambda box: self._respond(command, MethodType(responder, self), box)

    def _respond(self, command, responder, box) -> defer.Deferred:
        try:
            arguments = command.parseArguments(box, self)
        except Exception as e:
            self.cutOff(f"sent a malformed {command.__name__} ({type(e).__name__})")
            return defer.Deferred()
        d = defer.maybeDeferred(responder, **arguments)
        return d.addCallbacks(command.makeResponse, self._failed, callbackArgs=(self,), errbackArgs=(command,))

    def _failed(self, failure: Failure, command) -> Failure:
        known = failure.check(*command.allErrors)
        if known is not None:
            return Failure(amp.RemoteAmpError(command.allErrors[known], failure.getErrorMessage(), local=failure))
        _log.failure("the master failed to answer {command} from {client}", failure, command=command.__name__, client=self.describe())
        return Failure(amp.RemoteAmpError(amp.UNKNOWN_ERROR_CODE, "the master failed; see its log", local=failure))

    # Commands ----------------------------------------------------------------

    @Status.responder
    def status(self) -> defer.Deferred:
        d = self._server.cluster.refreshLoad(self._server.statusWait)
        return d.addCallback(lambda _: {"status": json.dumps(statusAsJSON(self._server.cluster.statistics()))})

    @Reload.responder
    def reload(self, agent: bool = False) -> defer.Deferred:
        cluster = self._server.cluster
        started = cluster.reactor.seconds()
        before = _pids(cluster.statistics())
        _log.info(
            "{client} asked for a reload{agent}", client=self.describe(), agent=" (the agent too)" if agent else ""
        )

        def done(_):
            after = _pids(cluster.statistics())
            lines = [
                f"  {_who(i)}: pid {before[i]} -> pid {after[i]}" if i in before else f"  {_who(i)}: pid {after[i]} (new)"
                for i in sorted(after)
                if i != AGENT_ID or agent
            ]
            took = cluster.reactor.seconds() - started
            workers = len([i for i in after if i != AGENT_ID])
            head = f"reloaded {_count(workers, 'worker')}{' and the agent' if agent else ''} in {took:.1f} s"
            return {"summary": "\n".join([head] + lines)}

        return cluster.reload(agent=bool(agent)).addCallbacks(done, _refusal)

    @Scale.responder
    def scale(self, count: int) -> defer.Deferred:
        cluster = self._server.cluster
        if count < 1:
            return defer.fail(BadRequest(f"a cluster needs at least 1 worker, not {count}"))
        started = cluster.reactor.seconds()
        before = cluster.workerCount()
        _log.info("{client} asked to scale to {workers}", client=self.describe(), workers=_count(count, "worker"))

        def done(_):
            pids = _pids(cluster.statistics())
            took = cluster.reactor.seconds() - started
            running = ", ".join(f"worker {i} (pid {pid})" for i, pid in sorted(pids.items()))
            return {"summary": f"scaled from {before} to {_count(cluster.workerCount(), 'worker')} in {took:.1f} s: {running}"}

        return cluster.scale(count).addCallbacks(done, _refusal)

    @Recycle.responder
    def recycle(self, workerId: int) -> defer.Deferred:
        cluster = self._server.cluster
        started = cluster.reactor.seconds()
        _log.info("{client} asked to recycle worker {workerId}", client=self.describe(), workerId=workerId)

        def done(pids):
            took = cluster.reactor.seconds() - started
            return {"summary": f"recycled worker {workerId} in {took:.1f} s: pid {pids[0]} -> pid {pids[1]}"}

        return cluster.recycle(workerId).addCallbacks(done, _refusal)

    @Stop.responder
    def stop(self) -> defer.Deferred:
        cluster = self._server.cluster
        started = cluster.reactor.seconds()
        running = [w for w in cluster.statistics().workers if w.pid is not None]
        count = len([w for w in running if w.workerId != AGENT_ID])
        agent = " and the agent" if len(running) > count else ""
        stopped = cluster.whenStopped()
        if cluster.stopping:
            _log.info("{client} asked the master to stop: it is stopping already; draining now", client=self.describe())
            cluster.stopNow()
        else:
            _log.info("{client} asked the master to stop", client=self.describe())
            self._server.stopMaster()

        def done(_):
            took = cluster.reactor.seconds() - started
            gone = _count(count, "worker process", "worker processes")
            return {"summary": f"stopped: {gone}{agent} gone in {took:.1f} s"}

        return stopped.addCallback(done)

    @Stacks.responder
    def stacks(self, workerId: int) -> defer.Deferred:
        cluster = self._server.cluster
        return cluster.stacks(workerId).addCallbacks(lambda answer: {"pid": answer[0], "stacks": answer[1]}, _refusal)

    @Watch.responder
    def watch(self) -> dict:
        if not self._watching:
            self._watching = True
            self.transport.registerProducer(self, True)
            self._server.cluster.addObserver(self._event)
        return {}

    # Events ------------------------------------------------------------------

    def _event(self, event) -> None:
        if self._cut is not None or self.transport is None:
            return
        try:
            text = json.dumps(eventAsJSON(event), default=repr)
        except Exception:
            return
        if len(text.encode("utf-8")) > 0xFFFF:
            text = json.dumps({"event": "truncated", "time": time.time(), "type": type(event).__name__})
        if self._paused:
            self._backlog.append(text)
            self._backlogBytes += len(text)
            if len(self._backlog) > WATCH_BACKLOG:
                self.cutOff(f"did not read {WATCH_BACKLOG} events")
            elif self._backlogBytes > WATCH_BACKLOG_BYTES:
                self.cutOff(f"did not read {WATCH_BACKLOG_BYTES // (1024 * 1024)} MiB of events")
            return
        self.callRemote(Event, event=text)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        backlog, self._backlog = self._backlog, []
        self._backlogBytes = 0
        for text in backlog:
            if self._paused:
                self._backlog.append(text)
            else:
                self.callRemote(Event, event=text)

    def stopProducing(self) -> None:
        self._paused = True
        self._backlog = []
        self._backlogBytes = 0


_COMMAND_NAMES = frozenset(c.commandName for c in CLIENT_COMMANDS)


def _refusal(failure: Failure) -> Failure:
    """
    The cluster's refusal as the command's declared error.
    """
    if failure.check(ClusterStopped):
        return Failure(NotRunning(failure.getErrorMessage()))
    if failure.check(UnknownWorker):
        return Failure(NoSuchWorker(str(failure.value)))
    if failure.check(ValueError):
        return Failure(BadRequest(failure.getErrorMessage()))
    if failure.check(ReloadFailed, StacksUnavailable):
        return Failure(OperationFailed(failure.getErrorMessage()))
    _log.failure("a control operation failed", failure)
    return Failure(OperationFailed(f"the master failed: {failure.getErrorMessage()}"))


class ControlServer(service.Service):
    """
    Serves the control socket at C{path} for C{cluster} while the cluster
    runs, and until its stop is over (so that C{txcluster status} and
    C{stop} work while it drains).

    @param cluster: the L{txcluster.ClusterService}.
    @param stopMaster: what a L{Stop} does: by default stop the reactor,
        as C{SIGTERM} does under C{twistd}.
    @param statusWait: how long a L{Status} waits for the workers to say
        how many connections they have open.
    @param reactor: the cluster's by default.
    """

    name = "txcluster-control"

    def __init__(
        self,
        cluster,
        path: str,
        reactor=None,
        stopMaster: Optional[Callable[[], Any]] = None,
        statusWait: float = 0.25,
    ) -> None:
        self.cluster = cluster
        self.path = os.path.abspath(path)
        self._reactor = reactor
        self._stopMaster = stopMaster
        self.statusWait = statusWait
        self.clients: set[ControlProtocol] = set()
        self._port = None

    @property
    def reactor(self):
        # The cluster's, unless one was given.
        return self._reactor if self._reactor is not None else self.cluster.reactor

    def allowedUIDs(self) -> frozenset:
        """
        Who may use the socket: root and the master's user, as it is now
        (after twistd's C{--uid}, the user it runs as).
        """
        return frozenset({0, os.getuid(), os.geteuid()})

    def stopMaster(self) -> None:
        if self._stopMaster is not None:
            self._stopMaster()
        elif self.cluster.stopping:
            self.cluster.stopNow()
        elif self.reactor.running:
            try:
                self.reactor.stop()
            except ReactorNotRunning:
                pass

    def startService(self) -> None:
        """
        @raise CannotListenError: the path is in use by a live master, or
            cannot be bound; the error names the path.
        """
        removeStaleSocket(self.path)
        factory = Factory.forProtocol(lambda: ControlProtocol(self))
        factory.noisy = False
        previous = os.umask(0o177)
        try:
            self._port = self.reactor.listenUNIX(self.path, factory, mode=0o600)
        except CannotListenError as e:
            hint = ""
            if getattr(e.socketError, "errno", None) == errno.EACCES:
                hint = (
                    f" (the master runs as uid {os.getuid()}: give --control a path in a directory it may "
                    "write, such as systemd's RuntimeDirectory=, or --no-control)"
                )
            raise CannotListenError(None, self.path, f"cannot serve the control socket: {e.socketError}{hint}") from None
        finally:
            os.umask(previous)
        super().startService()
        _log.info("control socket: {path}", path=self.path)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        await self.cluster.whenStopped()
        if self._port is not None:
            port, self._port = self._port, None
            await defer.maybeDeferred(port.stopListening)
        # The answers to Stop (and the last events) go out first.
        clients = [c for c in self.clients if c.transport is not None]
        if not clients:
            return
        for client in clients:
            client.transport.loseConnection()
        timeout = self.reactor.callLater(FLUSH_TIMEOUT, self._abortAll)
        await defer.DeferredList([observe(c.gone) for c in clients])
        if timeout.active():
            timeout.cancel()

    def _abortAll(self) -> None:
        for client in list(self.clients):
            if client.transport is not None:
                client.transport.abortConnection()


def _probe(path: str) -> Optional[OSError]:
    """
    Connect to the UNIX socket at C{path} and hang up: L{None} if some
    process listens there, otherwise why not.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as e:
        return e
    finally:
        probe.close()
    return None


def liveMasterOn(path: str) -> bool:
    """
    Whether a process listens on the UNIX socket at C{path} (nothing is
    removed).
    """
    return _probe(path) is None


def removeStaleSocket(path: str) -> None:
    """
    Make way for a control socket at C{path}: a socket file no process
    listens on (a master that died) is removed.

    @raise CannotListenError: a master already listens there, or the path
        is something other than a socket.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise CannotListenError(None, path, f"cannot use the control socket path: {e}") from None
    if not stat.S_ISSOCK(mode):
        raise CannotListenError(None, path, "the control socket path exists and is not a socket")
    refused = _probe(path)
    if refused is None:
        raise CannotListenError(None, path, "a master is already running with this control socket")
    if refused.errno not in (errno.ECONNREFUSED, errno.ENOENT):
        raise CannotListenError(None, path, f"cannot probe the control socket: {refused}")
    _log.info("removing the stale control socket {path} (no master listens on it)", path=path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
