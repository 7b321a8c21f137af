# -*- test-case-name: tests.test_worker -*-
"""
L{Worker}: a worker process, as its application sees it — who it is, how
it talks to the master, and how it leaves the cluster.

Its listens go through the master (L{Worker.listen}); its channel is a
L{txcluster._workerchannel.WorkerChannel}; the ports it gives the
application are in L{txcluster._ports}.

Leaving: whatever makes a worker leave (the master's L{Disconnect}, a
C{SIGTERM}, the application's C{disconnect()} or C{reactor.stop()}), it
closes its listens at once and starts its application's own shutdown at
once — C{stopService} and the reactor's C{before shutdown} triggers run
while the worker waits for its open connections, so an application that
closes its long-lived connections itself is done as soon as it has.  The
worker's wait ends a little before the master's kill deadline (see
L{ownDeadline}): connections still open then are closed, and the process
exits 0 once the application's triggers are done.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import zlib
from typing import Any, Callable, Optional

from twisted.internet import address, defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.logger import Logger
from twisted.protocols import amp

from txcluster import _commands
from txcluster._commands import (
    AskAgent,
    BindFailed,
    Close,
    CompressedText,
    FinalMetrics,
    MetricsUnavailable,
    Leaving,
    Listening,
    ListenRefused,
    LoadReport,
    Online,
    QueryServer,
    Ready,
    ToMaster,
    WorkerLeaving,
    describeWorkerId,
    encodeMessage,
)
from txcluster._deferreds import observe
from txcluster._keepalive import IDLE_GRACE, endAllKeepAlive
from txcluster._ports import AdoptedPort, ConnectionTracker, DispatchedPort
from txcluster._twistedcompat import BatchingUNIXServer, adoptUNIXTransport
from txcluster._workerchannel import MasterUnavailable, WorkerChannel

__all__ = [
    "MasterUnavailable",
    "Worker",
    "currentWorker",
    "encodeMessage",
    "exitSoon",
    "ownDeadline",
    "setCurrentWorker",
]

#: How long a worker whose master died may take to stop before it exits hard.
ORPHAN_EXIT_SECONDS = 1.5

#: How long a leaving worker waits for the master to take its last metrics.
FINAL_METRICS_TIMEOUT = 1.0

_log = Logger(namespace="txcluster.worker")

_current: Optional["Worker"] = None


def currentWorker() -> Optional["Worker"]:
    """
    This process's L{Worker}, or L{None} outside a txcluster worker (in the
    master, or under plain C{twistd}).
    """
    return _current


def setCurrentWorker(worker: Optional["Worker"]) -> None:
    global _current
    _current = worker


def ownDeadline(timeout: float) -> float:
    """
    How long a worker given C{timeout} seconds to leave waits for its
    connections: long enough to use nearly all of it, short enough to end
    by itself before the master's kill: a tenth of it, at least half a
    second and at most a second, is left for the application's shutdown
    triggers and the exit (which can take a few tenths of a second with a
    large application loaded).
    """
    return max(0.0, timeout - min(1.0, max(0.5, timeout / 10.0)))


class Worker:
    """
    This process, as a txcluster worker.

    @ivar id: the worker id, 1..N, kept by a replacement.
    @ivar count: how many workers the master runs (updated when it scales).
    @ivar pid: this process's pid.
    @ivar gracefulTimeout: how long it has to leave when it leaves on its
        own (SIGTERM, C{disconnect()} without a timeout).
    @ivar leaveRequested: the master asked it to leave (its L{Disconnect}
        may not have run yet).
    @ivar disconnecting: it is leaving.
    """

    #: The channel's transport class (its writes go out in the call).
    channelTransport = BatchingUNIXServer

    def __init__(
        self,
        reactor,
        workerId: int,
        count: int,
        masterPid: Optional[int] = None,
        gracefulTimeout: float = 30.0,
    ) -> None:
        self.reactor = reactor
        self.id = workerId
        self.count = count
        self.pid = os.getpid()
        self.masterPid = masterPid
        self.gracefulTimeout = gracefulTimeout
        self.channel: Optional[WorkerChannel] = None
        self.tracker = ConnectionTracker(self._connectionsChanged)
        self.leaveRequested = False
        self.disconnecting = False
        self._ports: dict[int, Any] = {}
        self._indexes: dict[tuple, set] = {}
        self._portIndex: dict[int, tuple] = {}
        self._observers: list[Callable[[Any], None]] = []
        #: The L{txcluster._agentapi.Agent}, in the agent process.
        self.agent = None
        #: Under C{--proxy-protocol}: its L{txcluster._proxy.ProxySettings}.
        self.proxy = None
        self._reportLoad = False
        self._metricsTooLarge = False
        self._reportScheduled = False
        self._drained: Optional[defer.Deferred] = None
        self._stopping = False
        self.board = None  # a txcluster._loadboard.WorkerBoard, under shared scheduling

    def __repr__(self) -> str:
        return f"<txcluster worker {self.id} pid {self.pid}>"

    # Connecting -----------------------------------------------------------

    def connect(self, fd: int) -> WorkerChannel:
        """
        Run the channel over the inherited socket C{fd} (closed afterwards)
        and say L{Online}.
        """
        channel = WorkerChannel(self)
        adoptUNIXTransport(self.reactor, fd, channel, self.channelTransport)
        os.close(fd)
        self.channel = channel
        self._call(Online, pid=self.pid)
        # Now, not once the reactor runs: the application may take a while
        # to load, and the master should know the worker is up meanwhile.
        channel.flush()
        return channel

    @property
    def openConnections(self) -> int:
        """
        How many connections given to this worker are still open.
        """
        return self.tracker.open

    # The public API -------------------------------------------------------

    def sendToMaster(self, message: Any) -> defer.Deferred:
        """
        Send a JSON-serialisable C{message} to the master, where it fires a
        L{txcluster.WorkerMessage} event.
        """
        text = encodeMessage(message)
        if self.channel is None or self.channel.transport is None:
            return defer.fail(MasterUnavailable("the channel to the master is closed"))
        return self.channel.callRemote(ToMaster, message=text).addCallback(lambda _: None)

    def askAgent(self, message: Any) -> defer.Deferred:
        """
        Ask the agent (C{--agent}): its handler gets this worker's id and
        the JSON-serialisable C{message}; the Deferred fires with its
        answer, or fails with L{txcluster.AgentUnavailable} (no agent, or
        none within C{--agent-timeout}) or L{txcluster.AgentFailed}.
        """
        try:
            text = encodeMessage(message)
        except Exception:
            return defer.fail()
        if self.channel is None or self.channel.transport is None:
            return defer.fail(MasterUnavailable("the channel to the master is closed"))
        return self.channel.callRemote(AskAgent, message=text).addCallback(lambda answer: json.loads(answer["answer"]))

    def addMessageObserver(self, observer: Callable[[Any], None]) -> None:
        """
        Call C{observer(message)} for every message the master sends.
        """
        self._observers.append(observer)

    def removeMessageObserver(self, observer: Callable[[Any], None]) -> None:
        self._observers.remove(observer)

    def ready(self) -> defer.Deferred:
        """
        Tell the master the application has started.
        """
        return self._call(Ready)

    def disconnect(self, timeout: Optional[float] = None, why: Optional[str] = None) -> defer.Deferred:
        """
        Leave the cluster gracefully: stop listening, start the
        application's shutdown (the reactor stops, running C{stopService}
        and the C{before shutdown} triggers) and let the open connections
        finish meanwhile, for up to L{ownDeadline}C{(timeout)} seconds;
        those still open then are closed.  The process exits once the
        reactor has stopped.

        Called by the application (C{why} defaults to C{"disconnect()"}),
        the master tells the worker nothing: it replaces the worker and
        does not count its exit as a failure.

        @param timeout: seconds it has (default: C{gracefulTimeout}).
        @param why: why it leaves on its own, told to the master; L{None}
            when the master asked.
        @return: a Deferred that fires once the connections are gone.
        """
        if self._drained is not None:
            return observe(self._drained)
        if timeout is None:
            timeout = self.gracefulTimeout
        if why is None and not self.leaveRequested:
            why = "disconnect()"
        self.disconnecting = True
        if self.board is not None:
            self.board.leave()
        self._drained = defer.Deferred()
        if why is not None and self.channel is not None and self.channel.transport is not None:
            self.channel.callRemote(Leaving, why=why)
        wait = ownDeadline(timeout)
        _log.info(
            "{who} (pid {pid}) leaving ({why}): closing {ports} listeners, "
            "{open} connections open; its application stops now",
            who=describeWorkerId(self.id),
            workerId=self.id,
            pid=self.pid,
            why=why or "the master asked",
            ports=len(self._ports),
            open=self.openConnections,
        )
        timer = self.reactor.callLater(wait, self._drainTimedOut, wait)
        self._drained.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
        # HTTP keep-alive would hold the clients here: send them away.
        endAllKeepAlive(self.tracker.connections(), min(IDLE_GRACE, wait))
        closing = [defer.maybeDeferred(port.stopListening) for port in list(self._ports.values())]
        defer.DeferredList(closing, consumeErrors=True).addCallback(lambda _: self._checkDrained())
        if not self._stopping:
            self._stopReactor()
        return observe(self._drained)

    # Listening ------------------------------------------------------------

    def listen(self, kind: str, interface: str, port: int, backlog: int, mode: int, makePort):
        """
        Ask the master for C{(kind, interface, port)} and build the local
        port with C{makePort(answer)}.

        @raise error.CannotListenError: the master could not bind, refused,
            or is unreachable, or this worker is leaving.
        """
        if self.disconnecting:
            raise error.CannotListenError(
                interface, port, OSError("this txcluster worker is disconnecting")
            )
        if kind == "unix" and not interface.startswith("\0"):
            interface = os.path.abspath(interface)
        elif kind != "unix" and interface and not (isIPAddress(interface) or isIPv6Address(interface)):
            # The master binds numeric addresses only (resolving a name
            # would block it); resolve here, as bind() would have.
            family = socket.AF_INET6 if kind.endswith("6") else socket.AF_INET
            try:
                interface = socket.getaddrinfo(interface, port, family)[0][4][0]
            except OSError as e:
                raise error.CannotListenError(interface, port, e) from None
        base = (kind, interface, port)
        used = self._indexes.setdefault(base, set())
        index = 0
        while index in used:
            index += 1
        if self.channel is None:
            raise error.CannotListenError(interface, port, MasterUnavailable("not connected to a master"))
        try:
            answer = self.channel.callSync(
                QueryServer,
                kind=kind,
                address=interface,
                port=port,
                index=index,
                backlog=backlog,
                mode=mode,
            )
        except BindFailed as e:
            raise error.CannotListenError(interface, port, _osError(str(e))) from None
        except ListenRefused as e:
            raise error.CannotListenError(interface, port, PermissionError(str(e))) from None
        except WorkerLeaving as e:
            self.leaveRequested = True
            raise error.CannotListenError(interface, port, OSError(str(e))) from None
        except (MasterUnavailable, amp.RemoteAmpError, amp.UnknownRemoteError) as e:
            raise error.CannotListenError(interface, port, e) from None
        fd = answer.get("fd")
        try:
            listeningPort = makePort(answer)
        except BaseException:
            self._call(Close, listenId=answer["listenId"])
            raise
        finally:
            if fd is not None:
                os.close(fd)
        used.add(index)
        self._ports[answer["listenId"]] = listeningPort
        self._portIndex[answer["listenId"]] = (base, index)
        if answer["scheduling"] == "least-busy":
            self._reportLoad = True
        self._call(Listening, listenId=answer["listenId"])
        return listeningPort

    def listenStream(self, kind: str, interface: str, port: int, factory, backlog: int = 50, mode: int = 0o666):
        """
        A stream listen (TCP, TLS over TCP, UNIX) through the master.
        """
        families = {"tcp4": socket.AF_INET, "tcp6": socket.AF_INET6, "unix": socket.AF_UNIX}
        if self.proxy is not None:
            # Outermost (before TLS): the balancer's header comes first.
            factory = self.proxy.wrap(factory)

        def makePort(answer):
            # The socket's own kind: a dual-stack [::] socket may serve a
            # 0.0.0.0 listen.
            served = answer.get("kind") or kind
            family = families[served]
            if answer["scheduling"] == "shared":
                return AdoptedPort.stream(self, answer["listenId"], answer["fd"], family, factory)
            host = _address(served, answer["host"], answer["port"])
            p = DispatchedPort(self, answer["listenId"], family, factory, host)
            p.startListening()
            return p

        return self.listen(kind, interface, port, backlog, mode, makePort)

    def listenDatagram(self, kind: str, interface: str, port: int, protocol, maxPacketSize: int = 8192):
        """
        A UDP listen: the master binds, every worker reads the same socket.
        """
        family = socket.AF_INET6 if kind == "udp6" else socket.AF_INET

        def makePort(answer):
            realPort = self.reactor.adoptDatagramPort(answer["fd"], family, protocol, maxPacketSize)
            return AdoptedPort(self, answer["listenId"], realPort)

        return self.listen(kind, interface, port, 50, 0o666, makePort)

    # Internals ------------------------------------------------------------

    def _call(self, command, **arguments) -> Optional[defer.Deferred]:
        """
        Send C{command} to the master; a failure (the channel closed) is
        logged at debug level: the worker learns of a lost master from
        its channel.
        """
        if self.channel is None or self.channel.transport is None:
            return defer.succeed(None)
        d = self.channel.callRemote(command, **arguments)
        if d is not None:
            d.addErrback(
                lambda f: _log.debug("{command} got no answer: {why}", command=command.__name__, why=f.getErrorMessage())
            )
        return d

    def _adopt(self, listenId: int, fds: list) -> int:
        port = self._ports.get(listenId)
        if not isinstance(port, DispatchedPort) or self.disconnecting:
            for fd in fds:
                os.close(fd)
            return 0
        return port.adopt(fds)

    def _close(self, port) -> defer.Deferred:
        listenId = port.listenId
        if self._ports.pop(listenId, None) is None:
            return defer.succeed(None)
        base, index = self._portIndex.pop(listenId)
        self._indexes.get(base, set()).discard(index)
        if self.channel is None or self.channel.transport is None:
            return defer.succeed(None)
        return self.channel.callRemote(Close, listenId=listenId).addErrback(lambda f: None)

    def _connectionsChanged(self, delta: int) -> None:
        if self.board is not None:
            self.board.changed(delta)
        # Openings are reported by NewConn answers; a close is reported by
        # a LoadReport, at most every LOAD_REPORT_INTERVAL.
        if self._reportLoad and delta < 0 and not self._reportScheduled:
            self._reportScheduled = True
            self.reactor.callLater(_commands.LOAD_REPORT_INTERVAL, self._sendLoad)
        if delta < 0:
            self._checkDrained()

    def _sendLoad(self) -> None:
        self._reportScheduled = False
        if self.channel is not None and self.channel.transport is not None:
            self.channel.callRemote(LoadReport, connections=self.openConnections)

    def _checkDrained(self) -> None:
        if (
            self._drained is not None
            and not self._drained.called
            and not self._ports
            and self.openConnections == 0
            and (self.agent is None or self.agent.outstanding == 0)
        ):
            self._drained.callback(None)

    def _drainTimedOut(self, waited: float) -> None:
        if self._drained is not None and not self._drained.called:
            from txcluster._lifecycle import seconds

            _log.warn(
                "{who} (pid {pid}): {open} {connections} still open after {waited}; "
                "closing {them}",
                workerId=self.id,
                pid=self.pid,
                open=self.openConnections,
                connections="connection" if self.openConnections == 1 else "connections",
                them="it" if self.openConnections == 1 else "them",
                who=describeWorkerId(self.id),
                waited=seconds(waited),
            )
            self.tracker.abortAll()
            if not self._drained.called:
                self._drained.callback(None)

    def beforeShutdown(self) -> defer.Deferred:
        """
        The reactor is stopping: a C{before shutdown} trigger (beside the
        application's C{stopService}) that leaves the cluster if the worker
        was not leaving yet (the application stopped the reactor), waits
        for the connections, then sends the master its last metrics.
        """
        if self._drained is None:
            self._stopping = True
            why = None if self.leaveRequested else "the application stopped the reactor"
            self.disconnect(self.gracefulTimeout, why)
        return observe(self._drained).addCallback(lambda _: self._sendFinalMetrics())

    def metricsText(self) -> str:
        """
        The application's metrics (see L{applicationMetrics}).
        """
        return applicationMetrics(self)

    def _sendFinalMetrics(self) -> Optional[defer.Deferred]:
        if "prometheus_client" not in sys.modules or self.channel is None or self.channel.transport is None:
            return None
        try:
            text = self.metricsText()
        except MetricsUnavailable:
            return None
        sent = self.channel.callRemote(FinalMetrics, metrics=text)
        # The master answers at once; a master that does not cannot hold
        # up the exit.
        timer = self.reactor.callLater(FINAL_METRICS_TIMEOUT, sent.cancel)
        sent.addBoth(lambda _: timer.active() and timer.cancel())
        return sent

    def _deliver(self, message: Any) -> None:
        for observer in list(self._observers):
            try:
                observer(message)
            except Exception:
                _log.failure("a message observer failed")

    def _stopReactor(self) -> None:
        self._stopping = True
        if self.reactor.running:
            try:
                self.reactor.stop()
            except error.ReactorNotRunning:
                pass
        else:
            self.reactor.callWhenRunning(self._stopReactorNow)

    def _stopReactorNow(self) -> None:
        try:
            self.reactor.stop()
        except error.ReactorNotRunning:
            pass

    def _masterGone(self, reason) -> None:
        self.channel = None
        if self._stopping:
            return
        _log.warn(
            "worker {workerId} (pid {pid}): the channel to the master closed; exiting",
            workerId=self.id,
            pid=self.pid,
        )
        exitSoon(ORPHAN_EXIT_SECONDS)
        self.leaveRequested = True
        self.disconnect(ORPHAN_EXIT_SECONDS)



def applicationMetrics(worker: Worker) -> str:
    """
    The application's metrics: C{prometheus_client}'s default registry in
    the text format, or C{""} if the application does not use
    C{prometheus_client} (it is not imported here for it).

    @raise MetricsUnavailable: they could not be rendered, or are too
        large to send (the master keeps what it had).
    """
    proxy = "" if worker.proxy is None else worker.proxy.metricsText()
    if "prometheus_client" not in sys.modules:
        return proxy
    try:
        from prometheus_client import REGISTRY, generate_latest

        text = generate_latest(REGISTRY).decode("utf-8")
    except Exception:
        _log.failure("worker {workerId} (pid {pid}) could not render its metrics", workerId=worker.id, pid=worker.pid)
        raise MetricsUnavailable("the application's metrics could not be rendered")
    if len(zlib.compress(text.encode("utf-8"), 6)) > CompressedText.PIECE * CompressedText.PIECES:
        if not worker._metricsTooLarge:
            worker._metricsTooLarge = True
            _log.warn(
                "worker {workerId} (pid {pid}): the application's metrics are too large to report "
                "({size} bytes); the master gets none from this worker",
                workerId=worker.id,
                pid=worker.pid,
                size=len(text),
            )
        raise MetricsUnavailable(f"the application's metrics are too large ({len(text)} bytes)")
    return text + proxy


def exitSoon(seconds: float, code: int = 1) -> None:
    """
    Make sure this process is gone within C{seconds}, even if its reactor is
    blocked or a shutdown trigger never finishes.
    """
    timer = threading.Timer(seconds, os._exit, (code,))
    timer.daemon = True
    timer.start()


def _osError(description: str) -> OSError:
    number, _, message = description.partition(" ")
    try:
        return OSError(int(number), message)
    except ValueError:
        return OSError(description)


def _address(kind: str, host: str, port: int):
    if kind == "unix":
        return address.UNIXAddress(host)
    if kind == "tcp6":
        return address.IPv6Address("TCP", host, port)
    return address.IPv4Address("TCP", host, port)
