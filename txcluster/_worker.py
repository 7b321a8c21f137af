# -*- test-case-name: tests.test_worker -*-
"""
The worker's side of the cluster: its AMP channel to the master, the ports
it gives the application in place of bound sockets, and L{Worker}, the
object the application can ask who it is.

A listen is a synchronous round trip: the worker writes L{QueryServer} and
reads the channel until the answer arrives (commands that arrive meanwhile
are held and run afterwards, in order), so C{listenTCP} keeps Twisted's
contract: it returns a port whose C{getHost()} is the real address, or
raises L{CannotListenError}.
"""

from __future__ import annotations

import json
import os
import select
import socket
import stat
import threading
import time
from collections import deque
from errno import ENOTCONN
from typing import Any, Callable, Optional

from twisted.internet import address, defer, error, tcp, unix
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.components import proxyForInterface
from zope.interface import implementer

from txcluster import _commands
from txcluster._deferreds import observe
from txcluster._commands import (
    closeUnclaimedDescriptors,
    BindFailed,
    Close,
    Disconnect,
    Listening,
    ListenRefused,
    LoadReport,
    NewConn,
    Online,
    Ping,
    QueryServer,
    Ready,
    ToMaster,
    ToWorker,
    WorkerCount,
)

_FDS = NewConn.arguments[1][1]

#: How long a listen waits for the master's answer before giving up.
QUERY_TIMEOUT = 30.0

#: How long a worker whose master died may take to stop before it exits hard.
ORPHAN_EXIT_SECONDS = 1.5

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


class MasterUnavailable(Exception):
    """
    The channel to the master is closed, or the master did not answer in time.
    """


class WorkerChannel(amp.AMP):
    """
    The worker's end of the AMP channel.

    Boxes are dispatched only after AMP's parser has returned, never from
    inside it, so that application code run by a command (a message
    observer, a protocol adopted by L{NewConn}) may make a synchronous
    listen, which reads the channel itself.  While such a call waits,
    commands are held and run afterwards in arrival order; answers go
    through at once.
    """

    def __init__(self, worker: "Worker") -> None:
        super().__init__()
        self._worker = worker
        self._parsing = False
        self._inbox: deque = deque()
        self._holdDepth = 0
        self._held: deque = deque()
        self._replayScheduled = False
        self._flushSoon = False

    # Synchronous calls (listen) ------------------------------------------

    def callSync(self, command, timeout: float = QUERY_TIMEOUT, **kw) -> Any:
        """
        Call C{command} and block until its answer arrives; commands from the
        master that arrive meanwhile are held and run afterwards in order.

        @raise MasterUnavailable: the channel closed or C{timeout} passed.
        @raise Exception: the error the master answered with.
        """
        transport = self.transport
        if transport is None:
            raise MasterUnavailable("the channel to the master is closed")
        results: list = []
        self.callRemote(command, **kw).addBoth(results.append)
        deadline = time.monotonic() + timeout
        fd = transport.fileno()
        self._holdDepth += 1
        try:
            while not results:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MasterUnavailable(
                        f"the master did not answer {command.__name__} within {timeout} s"
                    )
                wantWrite = _pendingBytes(transport) > 0
                readable, writable, _ = select.select(
                    [fd], [fd] if wantWrite else [], [], remaining
                )
                if writable and _isLost(transport.doWrite()):
                    raise MasterUnavailable("the channel to the master closed")
                if readable and _isLost(transport.doRead()):
                    raise MasterUnavailable("the channel to the master closed")
        finally:
            self._holdDepth -= 1
            self._scheduleReplay()
        result = results[0]
        if hasattr(result, "raiseException"):
            result.raiseException()
        return result

    def dataReceived(self, data: bytes) -> None:
        self._parsing = True
        try:
            super().dataReceived(data)
        finally:
            self._parsing = False
        self._dispatch()
        if self._flushSoon:
            self._flush()

    def ampBoxReceived(self, box) -> None:
        # Called by the parser: only queue.
        self._inbox.append(box)
        if not self._parsing:
            self._dispatch()

    def _dispatch(self) -> None:
        while self._inbox:
            box = self._inbox.popleft()
            if amp.COMMAND in box and (self._holdDepth or self._held):
                self._held.append(box)
                self._scheduleReplay()
            elif box.get(amp.COMMAND) == b"NewConn":
                self._newConnBox(box)
            else:
                amp.AMP.ampBoxReceived(self, box)

    def _newConnBox(self, box) -> None:
        # The hot path: NewConn's arguments parsed and its answer sent
        # directly, without the responder's Deferred and locator machinery.
        # Anything unexpected takes the general path, which answers errors.
        try:
            listenId = int(box[b"listenId"])
            fds = _FDS.fromStringProto(box[b"fds"], self)
        except Exception:
            amp.AMP.ampBoxReceived(self, box)
            return
        before = self._worker.openConnections
        accepted = self._worker._adopt(listenId, fds)
        self._flushSoon = True
        ask = box.get(amp.ASK)
        if ask is not None:
            self.sendBox(
                amp.AmpBox({amp.ANSWER: ask, b"accepted": b"%d" % accepted, b"connections": b"%d" % before})
            )

    def _scheduleReplay(self) -> None:
        if self._held and not self._holdDepth and not self._replayScheduled:
            self._replayScheduled = True
            self._worker.reactor.callLater(0, self._replay)

    def _replay(self) -> None:
        self._replayScheduled = False
        while self._held and not self._holdDepth:
            amp.AMP.ampBoxReceived(self, self._held.popleft())
        self._flush()
        self._scheduleReplay()

    def _flush(self) -> None:
        # A connection the worker adopted must not be read before the
        # master knows it was taken: if the worker died in between, the
        # master would give a half-read connection to another worker.
        self._flushSoon = False
        if self.transport is not None and _pendingBytes(self.transport):
            self.transport.doWrite()

    # Responders -----------------------------------------------------------

    @NewConn.responder
    def newConn(self, listenId: int, fds: list) -> dict:
        self._flushSoon = True
        before = self._worker.openConnections
        return {"accepted": self._worker._adopt(listenId, fds), "connections": before}

    @Disconnect.responder
    def disconnect(self, timeout: float) -> dict:
        self._worker.reactor.callLater(0, self._worker.disconnect, timeout)
        return {}

    @Ping.responder
    def ping(self) -> dict:
        return {}

    @ToWorker.responder
    def toWorker(self, message: str) -> dict:
        self._worker._deliver(json.loads(message))
        return {}

    @WorkerCount.responder
    def workerCount(self, count: int) -> dict:
        self._worker.count = count
        return {}

    def makeConnection(self, transport) -> None:
        # AMP logs every connection at info level; a channel is not news.
        self._transportPeer = transport.getPeer()
        self._transportHost = transport.getHost()
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason) -> None:
        closeUnclaimedDescriptors(self)
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None
        self._worker._masterGone(reason)


def _pendingBytes(transport) -> int:
    # FileDescriptor keeps unsent bytes in dataBuffer (from offset) and
    # _tempDataBuffer; there is no public accessor.
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def _isLost(result) -> bool:
    return result is not None and result != 0


class _Tracker:
    """
    Counts a worker's open connections by wrapping each transport's (or
    protocol's) C{connectionLost}.
    """

    def __init__(self, changed: Callable[[int], None]) -> None:
        self.open = 0
        self._changed = changed

    def track(self, connection) -> None:
        self.open += 1
        original = connection.connectionLost

        def connectionLost(reason):
            try:
                return original(reason)
            finally:
                self.open -= 1
                self._changed(-1)

        connection.connectionLost = connectionLost
        self._changed(1)


class _TrackingFactory(proxyForInterface(IProtocolFactory, "_factory")):  # type: ignore[misc]
    """
    A factory that counts the connections an adopted listening port accepts.
    """

    def __init__(self, factory, tracker: _Tracker) -> None:
        self._factory = factory
        self._tracker = tracker

    def buildProtocol(self, addr):
        protocol = self._factory.buildProtocol(addr)
        if protocol is not None:
            self._tracker.track(protocol)
        return protocol


@implementer(IListeningPort)
class DispatchedPort:
    """
    What a listen returns in a worker for a round-robin (or least-busy)
    handle: the master accepts, this port adopts what it is sent.

    @ivar listenId: the master's id for the shared handle.
    """

    def __init__(self, worker: "Worker", listenId: int, family: int, factory, host) -> None:
        self._worker = worker
        self.listenId = listenId
        self._family = family
        self.factory = factory
        self._host = host
        self.listening = False
        self._closed: Optional[defer.Deferred] = None

    def startListening(self) -> None:
        if self.listening:
            return
        self.factory.doStart()
        self.listening = True

    def adopt(self, fds: list) -> int:
        taken = 0
        reactor = self._worker.reactor
        for fd in fds:
            if not self.listening:
                break
            taken += 1
            try:
                os.set_blocking(fd, False)
                transport = reactor.adoptStreamConnection(fd, self._family, self.factory)
            except OSError as e:
                if e.errno != ENOTCONN:
                    _log.failure("could not adopt a connection on {address}", address=self._host)
                continue
            except Exception:
                _log.failure("could not adopt a connection on {address}", address=self._host)
                continue
            finally:
                os.close(fd)
            if transport is not None:
                self._worker._tracker.track(transport)
        for fd in fds[taken:]:
            os.close(fd)
        return taken

    def stopListening(self) -> defer.Deferred:
        if self._closed is None:
            self.listening = False
            self._closed = self._worker._close(self)
            self._closed.addBoth(lambda _: self.factory.doStop())
        return observe(self._closed)

    loseConnection = stopListening

    def getHost(self):
        return self._host

    def __repr__(self) -> str:
        return f"<txcluster {type(self.factory).__name__} on {self._host} (listen {self.listenId})>"


@implementer(IListeningPort)
class AdoptedPort:
    """
    What a listen returns in a worker for a shared handle: a real Twisted
    port over the master's listening socket, which also tells the master
    when it closes.
    """

    def __init__(self, worker: "Worker", listenId: int, port) -> None:
        self._worker = worker
        self.listenId = listenId
        self._port = port
        self._closed: Optional[defer.Deferred] = None

    @property
    def factory(self):
        return getattr(self._port, "factory", None)

    def startListening(self) -> None:
        pass

    def stopListening(self) -> defer.Deferred:
        if self._closed is None:
            local = defer.maybeDeferred(self._port.stopListening)
            self._closed = defer.gatherResults([local, self._worker._close(self)], consumeErrors=True)
            self._closed.addBoth(lambda _: None)
        return observe(self._closed)

    loseConnection = stopListening

    def getHost(self):
        return self._port.getHost()

    def __getattr__(self, name):
        return getattr(self._port, name)

    def __repr__(self) -> str:
        return f"<txcluster shared {self._port!r} (listen {self.listenId})>"


class SharedUNIXPort(unix.Port):
    """
    The UNIX port C{adoptStreamPort} would make, without what only the
    socket's owner may do: the master owns the path, so a worker neither
    resets its permissions when it starts listening nor removes the file
    when it stops, and does not C{shutdown()} the listening socket (Twisted
    spares adopted TCP ports that, not UNIX ones) — each would cut off the
    master and every other worker.
    """

    _shouldShutdown = False

    def startListening(self) -> None:
        try:
            self.mode = stat.S_IMODE(os.stat(self._bindPath).st_mode)
        except (OSError, TypeError, ValueError):
            pass
        super().startListening()

    def connectionLost(self, reason) -> None:
        tcp.Port.connectionLost(self, reason)


class Worker:
    """
    This process, as a txcluster worker.

    @ivar id: the worker id, 1..N, kept by a replacement.
    @ivar count: how many workers the master runs (updated when it scales).
    @ivar pid: this process's pid.
    """

    def __init__(self, reactor, workerId: int, count: int, masterPid: Optional[int] = None) -> None:
        self.reactor = reactor
        self.id = workerId
        self.count = count
        self.pid = os.getpid()
        self.masterPid = masterPid
        self.channel: Optional[WorkerChannel] = None
        self._ports: dict[int, Any] = {}
        self._indexes: dict[tuple, set] = {}
        self._portIndex: dict[int, tuple] = {}
        self._observers: list[Callable[[Any], None]] = []
        self._tracker = _Tracker(self._connectionsChanged)
        self._reportLoad = False
        self._reportScheduled = False
        self._drained: Optional[defer.Deferred] = None
        self.disconnecting = False
        self._exiting = False

    # Connecting -----------------------------------------------------------

    def connect(self, fd: int) -> WorkerChannel:
        """
        Run the channel over the inherited socket C{fd} (closed afterwards).
        """
        from twisted.internet.protocol import Factory

        channel = WorkerChannel(self)
        self.reactor.adoptStreamConnection(fd, socket.AF_UNIX, Factory.forProtocol(lambda: channel))
        os.close(fd)
        self.channel = channel
        channel.callRemote(Online, pid=self.pid)
        return channel

    @property
    def openConnections(self) -> int:
        """
        How many connections given to this worker are still open.
        """
        return self._tracker.open

    # The public API -------------------------------------------------------

    def sendToMaster(self, message: Any) -> defer.Deferred:
        """
        Send a JSON-serialisable C{message} to the master, where it fires a
        L{txcluster.WorkerMessage} event.
        """
        text = _encodeMessage(message)
        if self.channel is None or self.channel.transport is None:
            return defer.fail(MasterUnavailable("the channel to the master is closed"))
        return self.channel.callRemote(ToMaster, message=text).addCallback(lambda _: None)

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
        return self.channel.callRemote(Ready)

    def disconnect(self, timeout: Optional[float] = None) -> defer.Deferred:
        """
        Leave the cluster gracefully: stop listening, let the open
        connections finish (for up to C{timeout} seconds), then stop the
        reactor, which stops the application.

        @return: a Deferred that fires once the connections are drained.
        """
        if self._drained is not None:
            return observe(self._drained)
        self.disconnecting = True
        self._drained = defer.Deferred()
        _log.info(
            "worker {workerId} (pid {pid}) disconnecting: closing {ports} listeners, "
            "{open} connections open",
            workerId=self.id,
            pid=self.pid,
            ports=len(self._ports),
            open=self.openConnections,
        )
        closing = [defer.maybeDeferred(port.stopListening) for port in list(self._ports.values())]
        timer = None
        if timeout is not None:
            timer = self.reactor.callLater(max(0.0, timeout), self._drainTimedOut)

        def closed(_):
            self._checkDrained()

        defer.DeferredList(closing, consumeErrors=True).addCallback(closed)

        def done(result):
            if timer is not None and timer.active():
                timer.cancel()
            self._exit()
            return result

        self._drained.addCallback(done)
        return observe(self._drained)

    # Listening ------------------------------------------------------------

    def listen(self, kind: str, interface: str, port: int, backlog: int, mode: int, makePort):
        """
        Ask the master for C{(kind, interface, port)} and build the local
        port with C{makePort(answer, family)}.

        @raise error.CannotListenError: the master could not bind, refused,
            or is unreachable.
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
        except (MasterUnavailable, amp.RemoteAmpError, amp.UnknownRemoteError) as e:
            raise error.CannotListenError(interface, port, e) from None
        fd = answer.get("fd")
        try:
            listeningPort = makePort(answer)
        except BaseException:
            self.channel.callRemote(Close, listenId=answer["listenId"]).addErrback(lambda f: None)
            raise
        finally:
            if fd is not None:
                os.close(fd)
        used.add(index)
        self._ports[answer["listenId"]] = listeningPort
        self._portIndex[answer["listenId"]] = (base, index)
        if answer["scheduling"] == "least-busy":
            self._reportLoad = True
        self.channel.callRemote(Listening, listenId=answer["listenId"]).addErrback(
            lambda f: _log.failure("the master did not take listen {listenId}", f, listenId=answer["listenId"])
        )
        return listeningPort

    def listenStream(self, kind: str, interface: str, port: int, factory, backlog: int = 50, mode: int = 0o666):
        """
        A stream listen (TCP, TLS over TCP, UNIX) through the master.
        """
        family = {"tcp4": socket.AF_INET, "tcp6": socket.AF_INET6, "unix": socket.AF_UNIX}[kind]

        def makePort(answer):
            if answer["scheduling"] == "shared":
                tracked = _TrackingFactory(factory, self._tracker)
                if family == socket.AF_UNIX:
                    realPort = SharedUNIXPort._fromListeningDescriptor(self.reactor, answer["fd"], tracked)
                    realPort.startListening()
                else:
                    realPort = self.reactor.adoptStreamPort(answer["fd"], family, tracked)
                return AdoptedPort(self, answer["listenId"], realPort)
            host = _address(kind, answer["host"], answer["port"])
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
        ):
            self._drained.callback(None)

    def _drainTimedOut(self) -> None:
        if self._drained is not None and not self._drained.called:
            _log.warn(
                "worker {workerId} (pid {pid}): {open} connections still open after the "
                "graceful timeout; stopping anyway",
                workerId=self.id,
                pid=self.pid,
                open=self.openConnections,
            )
            self._drained.callback(None)

    def _deliver(self, message: Any) -> None:
        for observer in list(self._observers):
            try:
                observer(message)
            except Exception:
                _log.failure("a message observer failed")

    def _exit(self) -> None:
        if self._exiting:
            return
        self._exiting = True
        if self.reactor.running:
            self.reactor.stop()

    def _masterGone(self, reason) -> None:
        self.channel = None
        if self._exiting:
            return
        _log.warn(
            "worker {workerId} (pid {pid}): the channel to the master closed; exiting",
            workerId=self.id,
            pid=self.pid,
        )
        exitSoon(ORPHAN_EXIT_SECONDS)
        self._exit()


def exitSoon(seconds: float, code: int = 1) -> None:
    """
    Make sure this process is gone within C{seconds}, even if its reactor is
    blocked or a shutdown trigger never finishes.
    """
    timer = threading.Timer(seconds, os._exit, (code,))
    timer.daemon = True
    timer.start()


def _encodeMessage(message: Any) -> str:
    text = json.dumps(message)
    if len(text.encode("utf-8")) > 0xFFFF:
        raise _commands.MessageTooLarge(
            f"a message is at most 65535 bytes of JSON; this one is {len(text.encode('utf-8'))}"
        )
    return text


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
