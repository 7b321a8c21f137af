# -*- test-case-name: tests.test_worker -*-
"""
What a listen returns in a worker, in place of a bound socket: a
L{DispatchedPort} (the master accepts and sends connections) or an
L{AdoptedPort} (a real Twisted port over the master's shared listening
socket), and the count of the connections they give the application.
"""

from __future__ import annotations

import os
import socket
from errno import ENOTCONN
from typing import Callable, Optional, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.python.components import proxyForInterface
from zope.interface import implementer

from txcluster._deferreds import observe
from txcluster._twistedcompat import SharedUNIXPort

_log = Logger(namespace="txcluster.worker")


class PortOwner(Protocol):
    """
    What a port needs of the worker it belongs to (a L{txcluster.Worker}).
    """

    reactor: object
    tracker: "ConnectionTracker"
    #: Its L{txcluster._loadboard.WorkerBoard} (shared scheduling), or L{None}.
    board: object

    def _close(self, port) -> defer.Deferred:
        """
        C{port} stopped listening: tell the master.
        """


class ConnectionTracker:
    """
    Counts a worker's open connections by wrapping each transport's (or
    protocol's) C{connectionLost}, and can close those still open.

    @ivar open: how many are open.
    """

    def __init__(self, changed: Callable[[int], None]) -> None:
        self._changed = changed
        self._open: dict[int, object] = {}

    @property
    def open(self) -> int:
        return len(self._open)

    def track(self, connection) -> None:
        """
        Count C{connection} (a transport, or a protocol) until its
        C{connectionLost}.
        """
        key = id(connection)
        self._open[key] = connection
        original = connection.connectionLost

        def connectionLost(reason):
            try:
                return original(reason)
            finally:
                if self._open.pop(key, None) is not None:
                    self._changed(-1)

        connection.connectionLost = connectionLost
        self._changed(1)

    def connections(self) -> list:
        """
        The connections still open (transports or protocols).
        """
        return list(self._open.values())

    def abortAll(self) -> int:
        """
        Close every connection still open, at once.

        @return: how many there were.
        """
        connections = list(self._open.values())
        for connection in connections:
            transport = connection if hasattr(connection, "abortConnection") else connection.transport
            try:
                transport.abortConnection()
            except Exception:
                _log.failure("could not close a connection")
        return len(connections)


class _TrackingFactory(proxyForInterface(IProtocolFactory, "_factory")):  # type: ignore[misc]
    """
    A factory that counts the connections an adopted listening port accepts.
    """

    def __init__(self, factory, tracker: ConnectionTracker) -> None:
        self._factory = factory
        self._tracker = tracker

    def buildProtocol(self, addr):
        protocol = self._factory.buildProtocol(addr)
        if protocol is not None:
            self._tracker.track(protocol)
        return protocol


def trackingFactory(factory, tracker: ConnectionTracker):
    """
    C{factory}, wrapped so that C{tracker} counts what it builds.
    """
    return _TrackingFactory(factory, tracker)


@implementer(IListeningPort)
class DispatchedPort:
    """
    What a listen returns in a worker for a round-robin (or least-busy)
    handle: the master accepts, this port adopts what it is sent.

    @ivar listenId: the master's id for the shared handle.
    """

    def __init__(self, worker: PortOwner, listenId: int, family: int, factory, host) -> None:
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
        """
        Adopt the connections C{fds}, in order, while listening.

        @return: how many were taken (each is closed here: the transport
            has its own duplicate); the rest are closed and refused.
        """
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
                self._worker.tracker.track(transport)
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

    def __init__(self, worker: PortOwner, listenId: int, port, gate=None) -> None:
        """
        @param gate: the port's L{txcluster._loadboard.AcceptGate}, if it
            has one (stopped with the port).
        """
        self._worker = worker
        self.listenId = listenId
        self._port = port
        self._gate = gate
        self._closed: Optional[defer.Deferred] = None

    @classmethod
    def stream(cls, worker: PortOwner, listenId: int, fd: int, family: int, factory) -> "AdoptedPort":
        """
        A port over the shared listening stream socket C{fd} (C{dup()}ed),
        whose connections the worker's tracker counts, behind the worker's
        accept gate if it has a load board.
        """
        tracked = trackingFactory(factory, worker.tracker)
        if family == socket.AF_UNIX:
            port = SharedUNIXPort.adopt(worker.reactor, fd, tracked)
        else:
            port = worker.reactor.adoptStreamPort(fd, family, tracked)
        gate = worker.board.gate(port, worker.reactor) if worker.board is not None else None
        return cls(worker, listenId, port, gate)

    @property
    def factory(self):
        return getattr(self._port, "factory", None)

    def startListening(self) -> None:
        pass

    def stopListening(self) -> defer.Deferred:
        if self._closed is None:
            if self._gate is not None:
                self._gate.stop()
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
