"""
Tests for L{txcluster._sockets}: listen keys, binding the master's sockets
and accepting on them.  Real sockets on loopback, each closed by the test.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile

from attrs.exceptions import FrozenInstanceError
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface.verify import verifyObject

from txcluster._sockets import (
    DATAGRAM_KINDS,
    KINDS,
    STREAM_KINDS,
    AcceptReader,
    ListenKey,
    bindSocket,
    boundAddress,
    tcpKind,
    udpKind,
)


def _hasIPv6() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


_noIPv6 = None if _hasIPv6() else "IPv6 loopback is not available"
_notLinux = None if sys.platform.startswith("linux") else "abstract UNIX sockets are Linux only"


class _SocketTestMixin:
    """
    Helpers that close whatever a test opens.
    """

    def bind(self, key: ListenKey, **kwargs) -> socket.socket:
        sock = bindSocket(key, **kwargs)
        self.addCleanup(sock.close)
        return sock

    def socket(self, *args, **kwargs) -> socket.socket:
        sock = socket.socket(*args, **kwargs)
        self.addCleanup(sock.close)
        return sock

    def connect(self, family: int, address) -> socket.socket:
        client = self.socket(family, socket.SOCK_STREAM)
        client.connect(address)
        return client

    def closeFDs(self, fds: list) -> list:
        for fd in fds:
            self.addCleanup(os.close, fd)
        return fds

    def directory(self) -> str:
        # Short, absolute: UNIX socket paths are limited to about 100 bytes.
        path = tempfile.mkdtemp(prefix="txcluster-")
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        return path

    def openFDs(self) -> int:
        if not os.path.isdir("/proc/self/fd"):
            raise SkipTest("needs /proc/self/fd to count open descriptors")
        return len(os.listdir("/proc/self/fd"))

    def watchdog(self, seconds: int = 10) -> None:
        """
        Turn a call that would block forever into a failure.
        """

        def expired(signum, frame):
            raise self.failureException(f"blocked for {seconds} seconds")

        previous = signal.signal(signal.SIGALRM, expired)
        signal.alarm(seconds)
        self.addCleanup(signal.signal, signal.SIGALRM, previous)
        self.addCleanup(signal.alarm, 0)


class ListenKeyTests(SynchronousTestCase):
    """
    L{ListenKey}: what names a shared listening socket.
    """

    def test_kinds(self):
        """
        Every kind is either a stream or a datagram kind.
        """
        self.assertEqual(set(KINDS), set(STREAM_KINDS) | set(DATAGRAM_KINDS))
        self.assertFalse(set(STREAM_KINDS) & set(DATAGRAM_KINDS))

    def test_family(self):
        """
        Each kind has its address family.
        """
        families = {kind: ListenKey(kind, "", 0, 0).family for kind in KINDS}
        self.assertEqual(
            families,
            {
                "tcp4": socket.AF_INET,
                "tcp6": socket.AF_INET6,
                "unix": socket.AF_UNIX,
                "udp4": socket.AF_INET,
                "udp6": socket.AF_INET6,
            },
        )

    def test_isStream(self):
        """
        TCP and UNIX keys are streams, UDP keys are not.
        """
        self.assertEqual(
            [kind for kind in KINDS if ListenKey(kind, "", 0, 0).isStream],
            ["tcp4", "tcp6", "unix"],
        )

    def test_valueSemantics(self):
        """
        Keys with the same fields are equal and hash alike, so that they can
        name a socket in a dict; the index tells concurrent listens apart.
        """
        key = ListenKey("tcp4", "127.0.0.1", 8080, 0)
        self.assertEqual(key, ListenKey("tcp4", "127.0.0.1", 8080, 0))
        self.assertEqual({key: 1}[ListenKey("tcp4", "127.0.0.1", 8080, 0)], 1)
        self.assertNotEqual(key, ListenKey("tcp4", "127.0.0.1", 8080, 1))
        self.assertNotEqual(key, ListenKey("udp4", "127.0.0.1", 8080, 0))

    def test_frozen(self):
        """
        A key cannot be changed.
        """
        key = ListenKey("tcp4", "", 80, 0)
        self.assertRaises(FrozenInstanceError, setattr, key, "port", 81)
        self.assertEqual(key.port, 80)

    def test_describeTCP(self):
        """
        TCP keys read C{tcp:host:port}, with the wildcard spelled out and
        IPv6 hosts in brackets.
        """
        self.assertEqual(ListenKey("tcp4", "", 80, 0).describe(), "tcp:0.0.0.0:80")
        self.assertEqual(ListenKey("tcp4", "127.0.0.1", 8080, 2).describe(), "tcp:127.0.0.1:8080")
        self.assertEqual(ListenKey("tcp6", "", 80, 0).describe(), "tcp:[::]:80")
        self.assertEqual(ListenKey("tcp6", "::1", 443, 0).describe(), "tcp:[::1]:443")

    def test_describeUDP(self):
        """
        UDP keys read C{udp:host:port}.
        """
        self.assertEqual(ListenKey("udp4", "", 53, 0).describe(), "udp:0.0.0.0:53")
        self.assertEqual(ListenKey("udp6", "::1", 53, 0).describe(), "udp:[::1]:53")

    def test_describeUNIX(self):
        """
        UNIX keys read C{unix:path}.
        """
        self.assertEqual(ListenKey("unix", "/run/app.sock", 0, 0).describe(), "unix:/run/app.sock")


class KindTests(SynchronousTestCase):
    """
    L{tcpKind} and L{udpKind} choose the family as Twisted's C{listenTCP}
    and C{listenUDP} would.
    """

    def test_tcpKind(self):
        """
        IPv6 literals listen on C{tcp6}; the empty interface, IPv4 literals
        and host names on C{tcp4}.
        """
        self.assertEqual(
            [tcpKind(i) for i in ("", "0.0.0.0", "127.0.0.1", "localhost")], ["tcp4"] * 4
        )
        self.assertEqual([tcpKind(i) for i in ("::", "::1", "fe80::1%lo")], ["tcp6"] * 3)

    def test_udpKind(self):
        """
        IPv6 literals listen on C{udp6}, everything else on C{udp4}.
        """
        self.assertEqual([udpKind(i) for i in ("", "127.0.0.1")], ["udp4", "udp4"])
        self.assertEqual([udpKind(i) for i in ("::", "::1")], ["udp6", "udp6"])


class BindTCPTests(_SocketTestMixin, SynchronousTestCase):
    """
    L{bindSocket} and L{boundAddress} for TCP.
    """

    def test_portZeroGetsARealPort(self):
        """
        Port 0 binds an ephemeral port, which L{boundAddress} reports, and
        the socket accepts connections on it.
        """
        key = ListenKey("tcp4", "127.0.0.1", 0, 0)
        sock = self.bind(key)
        host, port = boundAddress(sock, key)
        self.assertEqual(host, "127.0.0.1")
        self.assertNotEqual(port, 0)
        self.assertEqual(sock.getsockname(), (host, port))
        self.connect(socket.AF_INET, (host, port))

    def test_streamSocketOptions(self):
        """
        A TCP socket is a non-blocking, non-inheritable stream socket with
        C{SO_REUSEADDR}.
        """
        sock = self.bind(ListenKey("tcp4", "127.0.0.1", 0, 0))
        self.assertEqual((sock.family, sock.type), (socket.AF_INET, socket.SOCK_STREAM))
        self.assertFalse(sock.getblocking())
        self.assertFalse(sock.get_inheritable())
        self.assertTrue(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR))
        self.assertTrue(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))

    def test_allInterfaces(self):
        """
        The empty address binds every IPv4 interface.
        """
        key = ListenKey("tcp4", "", 0, 0)
        host, port = boundAddress(self.bind(key), key)
        self.assertEqual(host, "0.0.0.0")
        self.connect(socket.AF_INET, ("127.0.0.1", port))

    def test_explicitPort(self):
        """
        A port that was just free is bound as asked.
        """
        first = ListenKey("tcp4", "127.0.0.1", 0, 0)
        sock = bindSocket(first)
        port = sock.getsockname()[1]
        sock.close()
        key = ListenKey("tcp4", "127.0.0.1", port, 0)
        self.assertEqual(boundAddress(self.bind(key), key), ("127.0.0.1", port))

    def test_addressInUse(self):
        """
        Binding a port another socket listens on raises L{OSError} with
        C{EADDRINUSE}, and leaves no socket open behind it.
        """
        key = ListenKey("tcp4", "127.0.0.1", 0, 0)
        port = self.bind(key).getsockname()[1]
        before = self.openFDs()
        error = self.assertRaises(OSError, bindSocket, ListenKey("tcp4", "127.0.0.1", port, 0))
        self.assertEqual(error.errno, errno.EADDRINUSE)
        self.assertEqual(self.openFDs(), before)

    def test_badAddress(self):
        """
        An address that is not the machine's raises L{OSError}.
        """
        error = self.assertRaises(OSError, bindSocket, ListenKey("tcp4", "192.0.2.1", 0, 0))
        self.assertEqual(error.errno, errno.EADDRNOTAVAIL)

    def test_tcp6(self):
        """
        A C{tcp6} key binds an IPv6 stream socket.
        """
        key = ListenKey("tcp6", "::1", 0, 0)
        sock = self.bind(key)
        host, port = boundAddress(sock, key)
        self.assertEqual(sock.family, socket.AF_INET6)
        self.assertEqual(host, "::1")
        self.assertNotEqual(port, 0)
        self.connect(socket.AF_INET6, ("::1", port))

    test_tcp6.skip = _noIPv6

    def test_tcp6AddressInUse(self):
        """
        C{EADDRINUSE} on IPv6 is an L{OSError} too.
        """
        port = self.bind(ListenKey("tcp6", "::1", 0, 0)).getsockname()[1]
        error = self.assertRaises(OSError, bindSocket, ListenKey("tcp6", "::1", port, 0))
        self.assertEqual(error.errno, errno.EADDRINUSE)

    test_tcp6AddressInUse.skip = _noIPv6


class BindUDPTests(_SocketTestMixin, SynchronousTestCase):
    """
    L{bindSocket} for UDP.
    """

    def test_udp4(self):
        """
        A C{udp4} key binds a non-blocking datagram socket that receives
        datagrams on the port L{boundAddress} reports.
        """
        key = ListenKey("udp4", "127.0.0.1", 0, 0)
        sock = self.bind(key)
        self.assertEqual((sock.family, sock.type), (socket.AF_INET, socket.SOCK_DGRAM))
        self.assertFalse(sock.getblocking())
        address = boundAddress(sock, key)
        self.assertNotEqual(address[1], 0)
        sender = self.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.sendto(b"ping", address)
        sock.setblocking(True)
        self.assertEqual(sock.recv(16), b"ping")

    def test_udp6(self):
        """
        A C{udp6} key binds an IPv6 datagram socket.
        """
        key = ListenKey("udp6", "::1", 0, 0)
        sock = self.bind(key)
        self.assertEqual((sock.family, sock.type), (socket.AF_INET6, socket.SOCK_DGRAM))
        host, port = boundAddress(sock, key)
        self.assertEqual(host, "::1")
        self.assertNotEqual(port, 0)

    test_udp6.skip = _noIPv6

    def test_addressInUse(self):
        """
        Binding a UDP port that is taken raises L{OSError} with
        C{EADDRINUSE}.
        """
        port = self.bind(ListenKey("udp4", "127.0.0.1", 0, 0)).getsockname()[1]
        error = self.assertRaises(OSError, bindSocket, ListenKey("udp4", "127.0.0.1", port, 0))
        self.assertEqual(error.errno, errno.EADDRINUSE)


class BindUNIXTests(_SocketTestMixin, SynchronousTestCase):
    """
    L{bindSocket} for UNIX sockets, and what it does with a path that is
    already there.
    """

    def test_bind(self):
        """
        A C{unix} key binds a listening stream socket at the path, which
        L{boundAddress} reports with port 0.
        """
        path = os.path.join(self.directory(), "s")
        key = ListenKey("unix", path, 0, 0)
        sock = self.bind(key)
        self.assertEqual((sock.family, sock.type), (socket.AF_UNIX, socket.SOCK_STREAM))
        self.assertFalse(sock.getblocking())
        self.assertTrue(stat.S_ISSOCK(os.stat(path).st_mode))
        self.assertEqual(boundAddress(sock, key), (path, 0))
        self.connect(socket.AF_UNIX, path)

    def test_defaultMode(self):
        """
        The socket file is world read-writable by default, whatever the
        umask.
        """
        path = os.path.join(self.directory(), "s")
        previous = os.umask(0o077)
        try:
            self.bind(ListenKey("unix", path, 0, 0))
        finally:
            os.umask(previous)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o666)

    def test_mode(self):
        """
        The mode asked for is applied to the socket file.
        """
        path = os.path.join(self.directory(), "s")
        self.bind(ListenKey("unix", path, 0, 0), mode=0o600)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_staleSocketReplaced(self):
        """
        A socket file left behind by a socket that was closed without
        unlinking is removed and bound again.
        """
        path = os.path.join(self.directory(), "s")
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(path)
        dead.listen(1)
        dead.close()
        self.assertTrue(os.path.exists(path))
        self.bind(ListenKey("unix", path, 0, 0))
        self.connect(socket.AF_UNIX, path)

    def test_liveSocketKept(self):
        """
        A path another socket listens on is not taken over: binding raises
        C{EADDRINUSE} and the other socket still accepts.
        """
        path = os.path.join(self.directory(), "s")
        live = self.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        live.bind(path)
        live.listen(1)
        error = self.assertRaises(OSError, bindSocket, ListenKey("unix", path, 0, 0))
        self.assertEqual(error.errno, errno.EADDRINUSE)
        self.connect(socket.AF_UNIX, path)
        live.accept()[0].close()

    def test_liveSocketWithFullBacklog(self):
        """
        A path whose listener has a full backlog is alive too: binding
        raises C{EADDRINUSE} at once instead of waiting for room.
        """
        self.watchdog()
        path = os.path.join(self.directory(), "s")
        live = self.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        live.bind(path)
        live.listen(0)
        for _ in range(64):
            client = self.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            try:
                client.connect(path)
            except BlockingIOError:
                break
        else:
            self.fail("the backlog never filled")
        error = self.assertRaises(OSError, bindSocket, ListenKey("unix", path, 0, 0))
        self.assertEqual(error.errno, errno.EADDRINUSE)

    def test_liveDatagramSocketKept(self):
        """
        A path a datagram socket is bound to is not taken over either.
        """
        path = os.path.join(self.directory(), "s")
        self.socket(socket.AF_UNIX, socket.SOCK_DGRAM).bind(path)
        error = self.assertRaises(OSError, bindSocket, ListenKey("unix", path, 0, 0))
        self.assertEqual(error.errno, errno.EADDRINUSE)
        self.assertTrue(stat.S_ISSOCK(os.stat(path).st_mode))

    def test_regularFileKept(self):
        """
        A file that is not a socket is never removed: binding raises
        C{EADDRINUSE} and the file is untouched.
        """
        path = os.path.join(self.directory(), "s")
        with open(path, "w") as f:
            f.write("precious")
        before = self.openFDs()
        error = self.assertRaises(OSError, bindSocket, ListenKey("unix", path, 0, 0))
        self.assertEqual(error.errno, errno.EADDRINUSE)
        with open(path) as f:
            self.assertEqual(f.read(), "precious")
        self.assertEqual(self.openFDs(), before)

    def test_missingDirectory(self):
        """
        A path in a directory that does not exist raises L{OSError}.
        """
        path = os.path.join(self.directory(), "missing", "s")
        error = self.assertRaises(OSError, bindSocket, ListenKey("unix", path, 0, 0))
        self.assertEqual(error.errno, errno.ENOENT)

    def test_abstractNamespace(self):
        """
        A path starting with a NUL byte binds in Linux's abstract namespace
        (no file, so no mode to set), and a second bind of the same name is
        C{EADDRINUSE}.
        """
        name = f"\0txcluster-test-{os.getpid()}-{id(self)}"
        key = ListenKey("unix", name, 0, 0)
        sock = self.bind(key)
        self.assertEqual(sock.getsockname(), name.encode())
        self.assertEqual(boundAddress(sock, key), (name, 0))
        self.connect(socket.AF_UNIX, name)
        error = self.assertRaises(OSError, bindSocket, key)
        self.assertEqual(error.errno, errno.EADDRINUSE)

    test_abstractNamespace.skip = _notLinux


class _FakeListeningSocket:
    """
    Stands in for a listening socket whose C{_accept} gives the results
    queued in C{results}: an C{(fd, address)} pair or an exception to raise.
    """

    def __init__(self, results: list, fileno: int = 42) -> None:
        self.results = list(results)
        self._fd = fileno
        self.calls = 0

    def fileno(self) -> int:
        return self._fd

    def _accept(self):
        self.calls += 1
        if not self.results:
            raise BlockingIOError(errno.EAGAIN, "nothing waiting")
        result = self.results.pop(0)
        if isinstance(result, BaseException):
            raise result
        return result


class AcceptReaderTests(_SocketTestMixin, SynchronousTestCase):
    """
    L{AcceptReader} accepts on a real listening socket.
    """

    def setUp(self):
        self.key = ListenKey("tcp4", "127.0.0.1", 0, 0)
        self.sock = self.bind(self.key)
        self.address = boundAddress(self.sock, self.key)
        self.batches: list = []
        self.outOfResources: list = []
        self.reader = AcceptReader(
            self.sock, self.batches.append, self.outOfResources.append, self.key.describe()
        )

    def clients(self, count: int) -> list:
        return [self.connect(socket.AF_INET, self.address) for _ in range(count)]

    def test_interface(self):
        """
        The reader is an L{IReadDescriptor} on the listening socket's fd,
        named after its address.
        """
        self.assertTrue(verifyObject(IReadDescriptor, self.reader))
        self.assertEqual(self.reader.fileno(), self.sock.fileno())
        self.assertEqual(self.reader.logPrefix(), "txcluster listener tcp:127.0.0.1:0")
        self.assertIsNone(self.reader.connectionLost(None))

    def test_acceptAllReturnsRawFDs(self):
        """
        C{acceptAll} accepts every waiting connection and returns their
        file descriptors, each the server end of one client's connection.
        """
        clients = self.clients(3)
        fds = self.closeFDs(self.reader.acceptAll(10))
        self.assertEqual(len(fds), 3)
        self.assertTrue(all(isinstance(fd, int) for fd in fds))
        peers = set()
        for fd in fds:
            with socket.socket(fileno=os.dup(fd)) as accepted:
                peers.add(accepted.getpeername())
        self.assertEqual(peers, {c.getsockname() for c in clients})

    def test_acceptAllWithNothingWaiting(self):
        """
        With no connection waiting C{acceptAll} returns nothing at once.
        """
        self.assertEqual(self.reader.acceptAll(10), [])
        self.assertEqual(self.outOfResources, [])

    def test_acceptAllStopsAtTheLimit(self):
        """
        C{acceptAll} takes at most C{limit} connections; the rest wait for
        the next call.
        """
        self.clients(5)
        first = self.closeFDs(self.reader.acceptAll(2))
        rest = self.closeFDs(self.reader.acceptAll(10))
        self.assertEqual((len(first), len(rest)), (2, 3))
        self.assertFalse(set(first) & set(rest))

    def test_doReadPassesABatch(self):
        """
        C{doRead} passes every waiting connection to the callback in one
        list.
        """
        self.clients(3)
        self.reader.doRead()
        self.assertEqual([len(batch) for batch in self.batches], [3])
        self.closeFDs(self.batches[0])

    def test_doReadWithNothingWaiting(self):
        """
        C{doRead} with no connection waiting does not call the callback.
        """
        self.reader.doRead()
        self.assertEqual(self.batches, [])

    def test_doReadHonoursAcceptLimit(self):
        """
        C{doRead} takes at most C{acceptLimit} connections per readiness
        event.
        """
        self.reader.acceptLimit = 2
        self.clients(3)
        self.reader.doRead()
        self.reader.doRead()
        self.assertEqual([len(batch) for batch in self.batches], [2, 1])
        for batch in self.batches:
            self.closeFDs(batch)


class AcceptReaderErrorTests(SynchronousTestCase):
    """
    L{AcceptReader} with C{accept()} failures, on a fake socket.
    """

    def reader(self, results: list):
        sock = _FakeListeningSocket(results)
        batches: list = []
        errors: list = []
        reader = AcceptReader(sock, batches.append, errors.append, "tcp:127.0.0.1:1")
        return reader, sock, batches, errors

    def test_outOfResources(self):
        """
        Running out of file descriptors, buffers or memory stops accepting
        for this readiness event and reports the error; what was accepted
        before is returned.
        """
        for code in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            failure = OSError(code, os.strerror(code))
            reader, sock, _, errors = self.reader([(5, None), failure, (6, None)])
            self.assertEqual(reader.acceptAll(10), [5])
            self.assertEqual(errors, [failure])
            self.assertEqual(sock.results, [(6, None)])

    def test_doReadOutOfResourcesFirst(self):
        """
        When the first C{accept()} runs out of resources, C{doRead} reports
        it and passes no empty batch on.
        """
        failure = OSError(errno.EMFILE, "too many open files")
        reader, _, batches, errors = self.reader([failure])
        reader.doRead()
        self.assertEqual((batches, errors), ([], [failure]))

    def test_connectionAbortedSkipped(self):
        """
        A connection reset before it was accepted is skipped and accepting
        goes on.
        """
        reader, _, batches, errors = self.reader(
            [(5, None), OSError(errno.ECONNABORTED, "aborted"), (6, None)]
        )
        reader.doRead()
        self.assertEqual((batches, errors), ([[5, 6]], []))

    def test_interruptedRetried(self):
        """
        An C{accept()} interrupted by a signal is tried again.
        """
        reader, _, _, _ = self.reader([InterruptedError(), (5, None)])
        self.assertEqual(reader.acceptAll(10), [5])

    def test_otherErrorLoggedAndStops(self):
        """
        Any other error is logged with the address and stops accepting for
        this readiness event, without claiming resources ran out.
        """
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        reader, sock, _, errors = self.reader(
            [(5, None), OSError(errno.EINVAL, "invalid"), (6, None)]
        )
        self.assertEqual(reader.acceptAll(10), [5])
        self.assertEqual(errors, [])
        self.assertEqual(sock.results, [(6, None)])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        [event] = [e for e in events if "log_failure" in e]
        self.assertEqual(event["address"], "tcp:127.0.0.1:1")

    def test_limitStopsBeforeAccepting(self):
        """
        At the limit C{acceptAll} does not call C{accept()} again, so no
        connection is accepted and dropped.
        """
        reader, sock, _, _ = self.reader([(5, None), (6, None), (7, None)])
        self.assertEqual(reader.acceptAll(2), [5, 6])
        self.assertEqual(sock.calls, 2)
        self.assertEqual(reader.acceptAll(0), [])
        self.assertEqual(sock.calls, 2)
