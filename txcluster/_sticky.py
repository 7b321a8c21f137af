# -*- test-case-name: tests.test_sticky -*-
"""
Who a connection's client is, for C{--scheduling sticky}: the master keys
each accepted connection by its peer's address, or, under
C{--proxy-protocol}, by the client address in its PROXY header, read with
C{MSG_PEEK} so that the worker still finds the header there and checks it
as for any connection.
"""

from __future__ import annotations

import socket
from typing import Callable, Optional

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger

from txcluster._proxy import COMPLETE, INCOMPLETE, MAX_V2_SIZE, clientKey, parseHeader

_log = Logger(namespace="txcluster.master")

#: Seconds between two peeks at connections whose header is not whole yet
#: (a socket with unread bytes stays readable: polling it would spin).
PEEK_INTERVAL = 0.005

#: Connections the master waits for the header of at once; beyond, one is
#: keyed by its peer at once (the worker still judges its header).
MAX_WAITING = 256


def peerAddress(fd: int) -> Optional[IAddress]:
    """
    The address of connection C{fd}'s peer, or L{None} if it is gone.
    """
    sock = socket.socket(fileno=fd)
    try:
        family = sock.family
        name = sock.getpeername()
    except OSError:
        return None
    finally:
        sock.detach()
    if family == socket.AF_INET:
        return IPv4Address("TCP", name[0], name[1])
    if family == socket.AF_INET6:
        return IPv6Address("TCP", name[0], name[1])
    return UNIXAddress(name or None)


def peerKey(fd: int) -> bytes:
    """
    The client key of connection C{fd}'s peer (C{b""} if it is gone, or
    not an IP peer).
    """
    return clientKey(peerAddress(fd))


def _peek(fd: int) -> Optional[bytes]:
    # The bytes waiting (b"" at the end of the stream), or None for none yet.
    sock = socket.socket(fileno=fd)
    try:
        return sock.recv(MAX_V2_SIZE, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return b""
    finally:
        sock.detach()


class ClientKeys:
    """
    The client keys of one master's accepted connections, for the sticky
    dispatchers.

    @param proxyProtocol: whether connections start with a PROXY header.
    @param timeout: how long the master waits for a header before it keys
        the connection by its peer (the worker judges the header).
    @param allow: the L{txcluster._proxy.AllowList} of peers that may send
        a header: the master waits for no one else's.
    """

    def __init__(self, clock, proxyProtocol: bool = False, timeout: float = 5.0, allow=None) -> None:
        self._clock = clock
        self._proxy = proxyProtocol
        self._timeout = timeout
        self._allow = allow
        self._stopped = False
        self._keys: dict[int, bytes] = {}
        self._waiting: dict[int, tuple[float, Callable[[list], None]]] = {}
        self._call = None

    @classmethod
    def forConfig(cls, clock, config) -> "ClientKeys":
        """
        The keys a master of C{config} (a L{txcluster.ClusterConfig}) uses.
        """
        from txcluster._proxy import AllowList

        return cls(clock, config.proxyProtocol, config.proxyTimeout, AllowList.fromStrings(config.proxyAllowFrom))

    @property
    def waiting(self) -> int:
        """
        Connections whose header the master still waits for.
        """
        return len(self._waiting)

    def keyOf(self, fd: int) -> bytes:
        """
        The client key of connection C{fd} (see L{admit}).
        """
        key = self._keys.get(fd)
        return peerKey(fd) if key is None else key

    def admit(self, fds: list, then: Callable[[list], None]) -> None:
        """
        Call C{then} with C{fds} once their client is known: at once, or,
        under C{--proxy-protocol}, once their header (or its absence) is.
        """
        if not self._proxy:
            then(fds)
            return
        deadline = self._clock.seconds() + self._timeout
        known = []
        for fd in fds:
            final = self._stopped or len(self._waiting) >= MAX_WAITING or not self._trusted(fd)
            if self._known(fd, final=final):
                known.append(fd)
            else:
                self._waiting[fd] = (deadline, then)
        if known:
            then(known)
        self._schedule()

    def _trusted(self, fd: int) -> bool:
        if self._allow is None:
            return True
        address = peerAddress(fd)
        return address is not None and self._allow.allows(address)

    def _known(self, fd: int, final: bool) -> bool:
        data = _peek(fd)
        header = parseHeader(data) if data else None
        if header is not None and header.state == COMPLETE and header.source is not None:
            self._keys[fd] = clientKey(header.source)
            return True
        waiting = data is None or (header is not None and header.state == INCOMPLETE and data)
        if waiting and not final:
            return False
        # No header, a bad one, LOCAL/UNKNOWN, the end of the stream, or
        # too slow: the peer's address (the worker judges the header).
        self._keys[fd] = peerKey(fd)
        return True

    def _schedule(self) -> None:
        if self._waiting and (self._call is None or not self._call.active()):
            self._call = self._clock.callLater(PEEK_INTERVAL, self._again)

    def _again(self) -> None:
        now = self._clock.seconds()
        known = []
        for fd, (deadline, then) in list(self._waiting.items()):
            if self._known(fd, final=now >= deadline):
                del self._waiting[fd]
                known.append((fd, then))
        _handOn(known)
        self._schedule()

    def stop(self) -> None:
        """
        The master stops: what still waits is keyed by its peer now, and
        so is what it accepts from now on.
        """
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        waiting, self._waiting = self._waiting, {}
        for fd in waiting:
            self._keys[fd] = peerKey(fd)
        _handOn([(fd, then) for fd, (_, then) in waiting.items()])


def _handOn(known: list) -> None:
    # Each caller of admit() gets its connections in one call.
    byCaller: dict = {}
    for fd, then in known:
        byCaller.setdefault(then, []).append(fd)
    for then, fds in byCaller.items():
        then(fds)
