# -*- test-case-name: tests.test_sockets -*-
"""
The master's listening sockets: what names one (L{ListenKey}), how it is
bound (L{bindSocket}), and the reader that accepts on it (L{AcceptReader}).

The master creates these sockets itself instead of using C{listenTCP}: a
Twisted port would shut down (C{shutdown(2)}) connections the master hands
away, and the master must only ever close its own copy of an fd.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Callable

from attrs import frozen
from twisted.internet.abstract import isIPv6Address
from twisted.logger import Logger
from zope.interface import implementer

from twisted.internet.interfaces import IReadDescriptor

STREAM_KINDS = ("tcp4", "tcp6", "unix")
DATAGRAM_KINDS = ("udp4", "udp6")
KINDS = STREAM_KINDS + DATAGRAM_KINDS

_log = Logger(namespace="txcluster.master")

_FAMILIES = {
    "tcp4": socket.AF_INET,
    "tcp6": socket.AF_INET6,
    "unix": socket.AF_UNIX,
    "udp4": socket.AF_INET,
    "udp6": socket.AF_INET6,
}


@frozen
class ListenKey:
    """
    What the master binds once and every worker shares (Node's handle key).

    @ivar kind: C{tcp4}, C{tcp6}, C{unix}, C{udp4} or C{udp6}.
    @ivar address: the interface (C{""} for all), or the UNIX socket path.
    @ivar port: the port asked for (0 for an ephemeral one; 0 for UNIX).
    @ivar index: the worker's n-th concurrent listen on the same
        C{(kind, address, port)}, so that every worker's n-th C{listen(0)}
        shares one ephemeral port.
    """

    kind: str
    address: str
    port: int
    index: int

    @property
    def family(self) -> int:
        return _FAMILIES[self.kind]

    @property
    def isStream(self) -> bool:
        return self.kind in STREAM_KINDS

    def describe(self) -> str:
        """
        The address as a person would write it.
        """
        if self.kind == "unix":
            return f"unix:{printablePath(self.address)}"
        host = self.address or ("::" if self.family == socket.AF_INET6 else "0.0.0.0")
        if ":" in host:
            host = f"[{host}]"
        return f"{self.kind[:3]}:{host}:{self.port}"


def printablePath(path: str) -> str:
    """
    A UNIX socket path fit for a log line: an abstract name (leading NUL)
    is written C{@name}, as C{ss} and C{netstat} do.
    """
    return "@" + path[1:] if path.startswith("\0") else path


def tcpKind(interface: str) -> str:
    """
    The stream kind Twisted's C{listenTCP} would use for C{interface}.
    """
    return "tcp6" if isIPv6Address(interface) else "tcp4"


def udpKind(interface: str) -> str:
    """
    The datagram kind Twisted's C{listenUDP} would use for C{interface}.
    """
    return "udp6" if isIPv6Address(interface) else "udp4"


def bindSocket(key: ListenKey, backlog: int = 50, mode: int = 0o666) -> socket.socket:
    """
    Create, bind and (for streams) listen on the socket for C{key}.  The
    socket is non-blocking and close-on-exec.

    A UNIX path left behind by a dead process (a socket nobody accepts on) is
    removed and bound again, which C{twistd} leaves to C{wantPID} lock files.

    @raise OSError: the operating system refused (C{EADDRINUSE},
        C{EACCES}, a bad path, ...).
    """
    sock = socket.socket(key.family, socket.SOCK_STREAM if key.isStream else socket.SOCK_DGRAM)
    try:
        if key.kind in ("tcp4", "tcp6"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if key.kind == "unix":
            _bindUNIX(sock, key.address)
            if not _isAbstract(key.address):
                os.chmod(key.address, mode)
        else:
            sock.bind(_sockaddr(key))
        if key.isStream:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _sockaddr(key: ListenKey) -> tuple:
    if key.family == socket.AF_INET6:
        return (key.address or "::", key.port, 0, 0)
    return (key.address, key.port)


def _isAbstract(path: str) -> bool:
    # Linux's abstract namespace: no file, so no mode and nothing left behind.
    return path.startswith("\0")


def _bindUNIX(sock: socket.socket, path: str) -> None:
    try:
        sock.bind(path)
    except OSError as e:
        if e.errno != errno.EADDRINUSE or _isAbstract(path) or not _isStaleUNIXSocket(path):
            raise
        os.unlink(path)
        sock.bind(path)


def _isStaleUNIXSocket(path: str) -> bool:
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # A live listener with a full backlog would block a blocking connect.
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


def boundAddress(sock: socket.socket, key: ListenKey) -> tuple[str, int]:
    """
    The C{(host, port)} the socket really has (the port is 0 for UNIX).
    """
    if key.kind == "unix":
        return (key.address, 0)
    name = sock.getsockname()
    return (name[0], name[1])


#: errno values that mean "out of a resource": stop accepting for a moment.
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


@implementer(IReadDescriptor)
class AcceptReader:
    """
    Accepts connections on a listening socket for the master's reactor and
    passes their raw file descriptors, a readiness event's worth at a time,
    to C{accepted}.

    @ivar acceptLimit: the most connections taken per readiness event.
    """

    acceptLimit = 256

    def __init__(
        self,
        sock: socket.socket,
        accepted: Callable[[list[int]], None],
        outOfResources: Callable[[OSError], None],
        description: str,
    ) -> None:
        self._sock = sock
        self._fileno = sock.fileno()
        self._accepted = accepted
        self._outOfResources = outOfResources
        self._description = description

    def fileno(self) -> int:
        return self._fileno

    def logPrefix(self) -> str:
        return f"txcluster listener {self._description}"

    def doRead(self) -> None:
        fds = self.acceptAll(self.acceptLimit)
        if fds:
            self._accepted(fds)

    def acceptAll(self, limit: int) -> list[int]:
        """
        Accept up to C{limit} waiting connections and return their fds.
        """
        fds = []
        accept = self._sock._accept  # the fd only: no socket object per connection
        while len(fds) < limit:
            try:
                fd, _ = accept()
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ECONNABORTED:
                    continue
                if e.errno in _RESOURCE_ERRORS:
                    self._outOfResources(e)
                    break
                _log.failure("accept() failed on {address}", address=self._description)
                break
            fds.append(fd)
        return fds

    def connectionLost(self, reason) -> None:
        pass
