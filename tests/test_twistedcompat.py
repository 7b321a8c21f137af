"""
Pin tests for L{txcluster._twistedcompat}: every Twisted (and AMP) private
txcluster uses still exists and behaves as txcluster relies on.

Each test exercises the real Twisted object (real sockets, real transports,
a real AMP) and fails with a message that names what changed in Twisted
and what in txcluster must follow, so that a Twisted upgrade that breaks
one of them is found here.
"""

import errno
import ipaddress
import os
import shutil
import socket
import tempfile
import time
from types import MethodType

from twisted.internet import error, reactor, tcp, unix
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IFileDescriptorReceiver
from twisted.internet.protocol import Factory, Protocol

try:
    from twisted.internet.interfaces import _Binding
    from twisted.internet.tcp import makeBinding
except ImportError:  # Twisted before 26.10
    _Binding = makeBinding = None
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from txcluster._twistedcompat import (
    MAX_KEY_LENGTH,
    PROXY_V1_PREFIX,
    PROXY_V2_SIGNATURE,
    BatchingUNIXServer,
    InvalidProxyHeader,
    SharedUNIXPort,
    adoptUNIXTransport,
    bindingOf,
    childReader,
    connectionLostQuietly,
    makeConnectionQuietly,
    markTLS,
    outstandingRequests,
    parseProxyV1,
    parseProxyV2,
    pendingBytes,
    readingValue,
    responderFor,
    unclaimedDescriptors,
)

from tests._transports import OneProtocol, pipeDescriptors


def followChange(change: str, follower: str) -> str:
    """
    The message of a failed pin: C{"Twisted CHANGE: txcluster._twistedcompat.
    FOLLOWER must follow the change"}.
    """
    return f"Twisted {change}: txcluster._twistedcompat.{follower} must follow the change"


# Fixtures ---------------------------------------------------------------------


def shortSocketPath(testCase, name: str = "s.sock") -> str:
    """
    A UNIX socket path in a fresh directory under the system's temporary
    directory, removed after the test (trial's own temporary directory can
    exceed the 107 bytes a socket path may have).
    """
    directory = tempfile.mkdtemp(prefix="txc-")
    testCase.addCleanup(shutil.rmtree, directory, True)
    return os.path.join(directory, name)


def socketPair(testCase) -> tuple:
    """
    A connected non-blocking UNIX stream socketpair, closed after the test.
    """
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):
        s.setblocking(False)
        testCase.addCleanup(s.close)
    return a, b


def tcpPair(testCase) -> tuple:
    """
    A connected non-blocking TCP socket pair over the loopback interface,
    closed after the test.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    testCase.addCleanup(listener.close)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    testCase.addCleanup(client.close)
    server, _ = listener.accept()
    testCase.addCleanup(server.close)
    for s in (client, server):
        s.setblocking(False)
    return client, server





def adoptedUNIX(testCase, clock, sock, protocol, transportClass=unix.Server):
    """
    C{protocol} connected over C{sock} (C{dup()}ed) by C{transportClass}'s
    C{_fromConnectedSocket}, in C{clock} (a memory reactor: the test drives
    C{doRead} and C{doWrite} itself).  The transport's socket is closed
    after the test.
    """
    transport = transportClass._fromConnectedSocket(sock.fileno(), OneProtocol(protocol), clock)
    testCase.addCleanup(transport.socket.close)
    return transport


def drain(sock) -> bytes:
    """
    Everything C{sock} can read now.
    """
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)











def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def closeLater(testCase, fds) -> None:
    """
    Close the (received) descriptors C{fds} after the test.
    """
    for fd in fds:
        testCase.addCleanup(_closeQuietly, fd)


def _closeQuietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def capturedLogs(testCase) -> list:
    """
    Every event logged (through the global publisher) while the test runs.
    """
    events: list = []
    globalLogPublisher.addObserver(events.append)
    testCase.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


@implementer(IFileDescriptorReceiver)
class Recorder(Protocol):
    """
    Records what its transport delivers, in order: C{("fd", descriptor)}
    and C{("data", bytes)}.
    """

    def __init__(self) -> None:
        self.events: list = []
        self.made = 0

    def connectionMade(self) -> None:
        self.made += 1

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self.events.append(("fd", descriptor))

    def dataReceived(self, data: bytes) -> None:
        self.events.append(("data", data))

    def descriptors(self) -> list:
        return [value for kind, value in self.events if kind == "fd"]

    def data(self) -> bytes:
        return b"".join(value for kind, value in self.events if kind == "data")


# FileDescriptor: pendingBytes ----------------------------------------------------


class PendingBytesTests(unittest.SynchronousTestCase):
    """
    L{pendingBytes} reads C{FileDescriptor.dataBuffer}, C{offset} and
    C{_tempDataLen}.
    """

    def unixTransport(self):
        clock = MemoryReactorClock()
        mine, peer = socketPair(self)
        return clock, adoptedUNIX(self, clock, mine, Protocol()), peer

    def tcpTransport(self):
        clock = MemoryReactorClock()
        mine, peer = tcpPair(self)
        transport = tcp.Server._fromConnectedSocket(mine.fileno(), socket.AF_INET, OneProtocol(Protocol()), clock)
        self.addCleanup(transport.socket.close)
        return clock, transport, peer

    def test_buffersExist(self) -> None:
        """
        A real transport has the three attributes L{pendingBytes} reads, of
        the types it does arithmetic with, and nothing pending at first.
        """
        for make in (self.unixTransport, self.tcpTransport):
            _, transport, _ = make()
            for name, kind in (("dataBuffer", bytes), ("offset", int), ("_tempDataLen", int)):
                self.assertTrue(
                    hasattr(transport, name),
                    followChange(f"no longer keeps FileDescriptor.{name}", "pendingBytes"),
                )
                self.assertIsInstance(
                    getattr(transport, name),
                    kind,
                    followChange(f"changed the type of FileDescriptor.{name}", "pendingBytes"),
                )
            self.assertEqual(pendingBytes(transport), 0, followChange("starts a transport with bytes pending", "pendingBytes"))

    def assertCountsWhatIsUnsent(self, clock, transport, peer) -> None:
        # Writes not yet attempted sit in _tempDataBuffer.
        transport.write(b"abc")
        transport.writeSequence([b"de", b"f"])
        self.assertEqual(
            pendingBytes(transport),
            6,
            followChange("no longer counts writes not yet moved to dataBuffer in FileDescriptor._tempDataLen", "pendingBytes"),
        )
        self.assertEqual(drain(peer), b"", "write() sent at once: the test cannot see pending bytes")
        # More than the socket takes: doWrite leaves the rest in dataBuffer
        # from offset, while the socket is not writable.
        big = os.urandom(8 << 20)
        transport.write(big)
        total = 6 + len(big)
        transport.doWrite()
        received = drain(peer)
        self.assertTrue(0 < len(received) < total, "the socket took all 8 MB (or nothing): the test cannot see a partial write")
        self.assertEqual(
            pendingBytes(transport),
            total - len(received),
            followChange("no longer keeps a partly written buffer in FileDescriptor.dataBuffer from offset", "pendingBytes"),
        )
        # A write meanwhile adds to _tempDataBuffer on top of that.
        transport.write(b"tail")
        total += 4
        self.assertEqual(
            pendingBytes(transport),
            total - len(received),
            followChange("no longer adds writes to a partly written buffer in FileDescriptor._tempDataLen", "pendingBytes"),
        )
        while transport in clock.getWriters():
            self.assertIsNone(transport.doWrite(), followChange("made doWrite() fail on a healthy socket", "pendingBytes"))
            received += drain(peer)
        received += drain(peer)
        self.assertEqual(received, b"abcdef" + big + b"tail", "the transport lost or reordered bytes")
        self.assertEqual(
            pendingBytes(transport),
            0,
            followChange("no longer empties dataBuffer, offset and _tempDataLen once all is written", "pendingBytes"),
        )

    def test_unixTransport(self) -> None:
        """
        On a UNIX stream transport L{pendingBytes} counts the bytes written
        and not yet sent: waiting writes, the unsent part of a partly
        written buffer, and both together; 0 once all is sent.
        """
        self.assertCountsWhatIsUnsent(*self.unixTransport())

    def test_tcpTransport(self) -> None:
        """
        The same holds on a TCP transport.
        """
        self.assertCountsWhatIsUnsent(*self.tcpTransport())


# UNIX transports ------------------------------------------------------------------


class BatchingUNIXServerPinTests(unittest.SynchronousTestCase):
    """
    L{BatchingUNIXServer} overrides C{unix.Server.writeSomeData} using
    C{_sendmsgQueue} and C{_writeSomeDataBase}; its receiver is Twisted's
    own transport.
    """

    def test_sendFileDescriptorQueues(self) -> None:
        """
        Twisted's C{sendFileDescriptor} appends the descriptor to the
        transport's C{_sendmsgQueue} list, in order, asks the producer to
        pause if need be (C{_maybePauseProducer}, which
        L{BatchingUNIXServer}'s calls too) and asks to write.
        """
        clock = MemoryReactorClock()
        mine, _ = socketPair(self)
        transport = adoptedUNIX(self, clock, mine, Protocol())
        self.assertTrue(
            callable(getattr(transport, "_maybePauseProducer", None)),
            followChange("no longer has FileDescriptor._maybePauseProducer", "BatchingUNIXServer"),
        )
        self.assertIsInstance(
            getattr(transport, "_sendmsgQueue", None),
            list,
            followChange("no longer keeps unix.Server._sendmsgQueue as a list", "BatchingUNIXServer"),
        )
        first, second = pipeDescriptors(self, 2)
        transport.sendFileDescriptor(first)
        transport.sendFileDescriptor(second)
        self.assertEqual(
            transport._sendmsgQueue,
            [first, second],
            followChange("no longer queues sendFileDescriptor()'s descriptors in _sendmsgQueue", "BatchingUNIXServer"),
        )
        self.assertIn(transport, clock.getWriters(), followChange("no longer writes after sendFileDescriptor()", "BatchingUNIXServer"))

    def test_writeSomeDataBase(self) -> None:
        """
        C{unix.Server._writeSomeDataBase.writeSomeData} sends plain bytes,
        without the queued descriptors, and returns how many it sent.
        """
        clock = MemoryReactorClock()
        mine, peer = socketPair(self)
        transport = adoptedUNIX(self, clock, mine, Protocol())
        base = getattr(unix.Server, "_writeSomeDataBase", None)
        self.assertIsNotNone(base, followChange("no longer has unix.Server._writeSomeDataBase", "BatchingUNIXServer"))
        (queued,) = pipeDescriptors(self, 1)
        transport._sendmsgQueue.append(queued)
        sent = base.writeSomeData(transport, b"hello")
        self.assertEqual(sent, 5, followChange("changed what _writeSomeDataBase.writeSomeData returns", "BatchingUNIXServer"))
        data, ancillary, _, _ = peer.recvmsg(100, socket.CMSG_SPACE(4))
        closeLater(self, [fd for _, _, packed in ancillary for fd in _unpack(packed)])
        self.assertEqual((data, ancillary), (b"hello", []), followChange("made _writeSomeDataBase send descriptors", "BatchingUNIXServer"))

    def test_doWriteKeepsWhatWasNotSent(self) -> None:
        """
        C{doWrite} hands C{writeSomeData} the pending bytes, advances by the
        count it returns, and returns an exception it returns (so that the
        reactor drops the connection), which L{BatchingUNIXServer} relies on
        for partial sends and for C{FileDescriptorOverrun}.
        """
        clock = MemoryReactorClock()
        mine, peer = socketPair(self)
        seen = []

        class Recording(unix.Server):
            answers = [2, error.FileDescriptorOverrun()]

            def writeSomeData(self, data):
                seen.append(bytes(data))
                return self.answers.pop(0)

        transport = adoptedUNIX(self, clock, mine, Protocol(), Recording)
        transport.write(b"abcdef")
        self.assertIsNone(transport.doWrite(), followChange("made doWrite() fail on a partial write", "BatchingUNIXServer"))
        self.assertEqual(pendingBytes(transport), 4, followChange("changed how doWrite() counts writeSomeData()'s result", "BatchingUNIXServer"))
        result = transport.doWrite()
        self.assertEqual(seen, [b"abcdef", b"cdef"], followChange("changed what doWrite() passes to writeSomeData()", "BatchingUNIXServer"))
        self.assertIsInstance(
            result,
            error.FileDescriptorOverrun,
            followChange("no longer returns writeSomeData()'s exception from doWrite()", "BatchingUNIXServer"),
        )

    def test_receiverTakesSeveralDescriptorsPerMessage(self) -> None:
        """
        Twisted's UNIX transport delivers every descriptor of one
        C{sendmsg}, in order, before the bytes that came with them.
        """
        clock = MemoryReactorClock()
        mine, peer = socketPair(self)
        receiver = Recorder()
        transport = adoptedUNIX(self, clock, mine, receiver)
        sent = pipeDescriptors(self, 3)
        peer.sendmsg([b"xyz"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _pack(sent))])
        transport.doRead()
        closeLater(self, receiver.descriptors())
        kinds = [kind for kind, _ in receiver.events]
        self.assertEqual(
            kinds,
            ["fd", "fd", "fd", "data"],
            followChange("no longer delivers the descriptors of one message before its bytes", "BatchingUNIXServer"),
        )
        self.assertEqual(
            [inode(fd) for fd in receiver.descriptors()],
            [inode(fd) for fd in sent],
            followChange("no longer delivers several descriptors of one message in order", "BatchingUNIXServer"),
        )
        self.assertEqual(receiver.data(), b"xyz", followChange("no longer delivers the bytes sent with descriptors", "BatchingUNIXServer"))


def _pack(fds) -> bytes:
    import struct

    return struct.pack(f"{len(fds)}i", *fds)


def _unpack(packed: bytes) -> list:
    import struct

    return list(struct.unpack(f"{len(packed) // 4}i", packed[: len(packed) // 4 * 4]))


class AdoptUNIXTransportTests(unittest.SynchronousTestCase):
    """
    L{adoptUNIXTransport} uses C{unix.Server._fromConnectedSocket}.
    """

    def test_adoptsWithTheGivenClass(self) -> None:
        """
        The transport is of the class given (L{BatchingUNIXServer} by
        default), connected to the protocol, over a C{dup()} of the
        descriptor: the caller may close its own copy.
        """
        for transportClass in (BatchingUNIXServer, unix.Server):
            clock = MemoryReactorClock()
            mine, peer = socketPair(self)
            protocol = Recorder()
            if transportClass is BatchingUNIXServer:
                transport = adoptUNIXTransport(clock, mine.fileno(), protocol)
            else:
                transport = adoptUNIXTransport(clock, mine.fileno(), protocol, transportClass)
            self.addCleanup(transport.socket.close)
            self.assertIs(
                type(transport),
                transportClass,
                followChange("no longer builds cls in unix.Server._fromConnectedSocket", "adoptUNIXTransport"),
            )
            self.assertIs(protocol.transport, transport, followChange("no longer connects the protocol in _fromConnectedSocket", "adoptUNIXTransport"))
            self.assertEqual(protocol.made, 1, followChange("no longer calls makeConnection in _fromConnectedSocket", "adoptUNIXTransport"))
            self.assertNotEqual(transport.fileno(), mine.fileno(), followChange("no longer dup()s the descriptor in _fromConnectedSocket", "adoptUNIXTransport"))
            self.assertIsInstance(transport.getHost(), UNIXAddress, followChange("no longer gives UNIX transports a UNIXAddress host", "adoptUNIXTransport"))
            self.assertIsInstance(transport.getPeer(), UNIXAddress, followChange("no longer gives UNIX transports a UNIXAddress peer", "adoptUNIXTransport"))
            self.assertIn(transport, clock.getReaders(), followChange("no longer starts reading in _fromConnectedSocket", "adoptUNIXTransport"))
            mine.close()
            transport.write(b"ping")
            self.assertIsNone(transport.doWrite(), followChange("made the adopted transport's doWrite() fail", "adoptUNIXTransport"))
            self.assertEqual(drain(peer), b"ping", followChange("gives _fromConnectedSocket's transport the caller's descriptor", "adoptUNIXTransport"))
            peer.send(b"pong")
            transport.doRead()
            self.assertEqual(protocol.data(), b"pong", followChange("no longer reads into the protocol in _fromConnectedSocket's transport", "adoptUNIXTransport"))


# SharedUNIXPort ------------------------------------------------------------------------


def listeningUNIX(testCase, path: str, backlog: int = 5, mode: int = 0o600) -> socket.socket:
    """
    The master's socket: bound at C{path} with C{mode}, listening,
    non-blocking; closed after the test.
    """
    master = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    testCase.addCleanup(master.close)
    master.bind(path)
    os.chmod(path, mode)
    master.listen(backlog)
    master.setblocking(False)
    return master


def queueCapacity(testCase, master: socket.socket, path: str) -> int:
    """
    How many connections C{path}'s accept queue takes before a
    non-blocking C{connect} fails (Linux: the backlog plus one), leaving
    the queue empty again.
    """
    clients = []
    try:
        while len(clients) < 5000:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            try:
                client.connect(path)
            except OSError as e:
                client.close()
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise
                break
            clients.append(client)
    finally:
        for client in clients:
            client.close()
        while True:
            try:
                accepted, _ = master.accept()
            except BlockingIOError:
                break
            accepted.close()
    return len(clients)


def adoptWith(testCase, portClass, clock, master, factory):
    """
    C{portClass} (L{SharedUNIXPort} or C{unix.Port}) over a copy of
    C{master}, listening in C{clock}; the socket is closed after the test.
    """
    fd = os.dup(master.fileno())
    try:
        port = portClass._fromListeningDescriptor(clock, fd, factory)
    finally:
        os.close(fd)
    port.startListening()
    testCase.addCleanup(lambda: getattr(port, "socket", None) and port.socket.close())
    return port


def stop(clock, port) -> None:
    """
    Stop C{port} (listening in the memory reactor C{clock}) completely.
    """
    d = port.stopListening()
    clock.advance(0)
    result = []
    d.addBoth(result.append)
    if result != [None]:
        raise AssertionError(f"stopListening() gave {result!r}")


def connects(path: str) -> bool:
    """
    Whether a client can connect to C{path} (the connection is closed).
    """
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
    except OSError:
        return False
    finally:
        client.close()
    return True


class SharedUNIXPortPinTests(unittest.SynchronousTestCase):
    """
    L{SharedUNIXPort} is a C{unix.Port} made with
    C{_fromListeningDescriptor}, whose C{startListening} is Twisted's
    without chmod and listen, and whose C{connectionLost} skips
    C{unix.Port}'s (which unlinks) and does not shut the socket down
    (C{_shouldShutdown}).
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.path = shortSocketPath(self)
        self.master = listeningUNIX(self, self.path)

    def test_fromListeningDescriptor(self) -> None:
        """
        C{_fromListeningDescriptor} makes an instance of the class it is
        called on, not listening, holding a C{dup()} of the socket as
        C{_preexistingSocket}, with the socket's path as C{_bindPath} (as
        C{port} before Twisted 26.10).
        """
        fd = os.dup(self.master.fileno())
        try:
            port = SharedUNIXPort._fromListeningDescriptor(self.clock, fd, Factory())
        finally:
            os.close(fd)
        skt = getattr(port, "_preexistingSocket", None)
        self.assertIsInstance(skt, socket.socket, followChange("no longer keeps the adopted socket as unix.Port._preexistingSocket", "SharedUNIXPort"))
        self.addCleanup(skt.close)
        self.assertIs(type(port), SharedUNIXPort, followChange("no longer builds cls in unix.Port._fromListeningDescriptor", "SharedUNIXPort"))
        self.assertEqual(skt.getsockname(), self.path, followChange("no longer keeps the adopted socket itself in _preexistingSocket", "SharedUNIXPort"))
        self.assertEqual(
            os.fsencode(port.path or b""),
            os.fsencode(self.path),
            followChange("keeps the socket's path neither as unix.Port._bindPath (26.10) nor as port", "SharedUNIXPort.path"),
        )
        self.assertFalse(getattr(port, "connected", False), followChange("starts listening in _fromListeningDescriptor", "SharedUNIXPort.adopt"))

    def test_startListeningLikeUNIXPort(self) -> None:
        """
        L{SharedUNIXPort.startListening} leaves the port as Twisted's own
        C{unix.Port.startListening} leaves an adopted one: the same
        attributes, connected, reading, the factory started; and it logs
        the same line.
        """
        logs = capturedLogs(self)
        otherPath = shortSocketPath(self)
        other = listeningUNIX(self, otherPath)
        twisted = adoptWith(self, unix.Port, self.clock, other, Factory())
        twistedLine = [e for e in logs if "starting on" in str(e.get("log_text", e.get("message", "")))]
        del logs[:]
        factory = Factory()
        shared = adoptWith(self, SharedUNIXPort, self.clock, self.master, factory)
        sharedLine = [e for e in logs if "starting on" in str(e.get("log_text", e.get("message", "")))]
        missing = set(vars(twisted)) - set(vars(shared))
        self.assertEqual(
            missing,
            set(),
            followChange(f"made unix.Port.startListening set {sorted(missing)}", "SharedUNIXPort.startListening"),
        )
        self.assertTrue(shared.connected, followChange("changed what marks a port listening (connected)", "SharedUNIXPort.startListening"))
        self.assertIn(shared, self.clock.getReaders(), followChange("changed how a port starts reading", "SharedUNIXPort.startListening"))
        self.assertEqual(factory.numPorts, 1, followChange("changed how a port starts its factory", "SharedUNIXPort.startListening"))
        self.assertEqual(
            shared.getHost(),
            UNIXAddress(os.fsencode(self.path)),
            followChange("changed where a UNIX port's getHost() looks", "SharedUNIXPort.startListening"),
        )
        self.assertEqual(
            (len(twistedLine), len(sharedLine)),
            (1, 1),
            "unix.Port.startListening and SharedUNIXPort.startListening should both log one 'starting on' line",
        )
        self.assertEqual(
            twistedLine[0]["log_text"].replace(repr(otherPath), "PATH"),
            sharedLine[0]["log_text"].replace(repr(self.path), "PATH"),
            followChange("changed unix.Port's 'starting on' line", "SharedUNIXPort.startListening"),
        )
        self.assertTrue(hasattr(tcp, "_reservedFD"), followChange("no longer has tcp._reservedFD", "SharedUNIXPort.startListening"))

    def test_acceptsOnTheMastersSocket(self) -> None:
        """
        The adopted port accepts connections made to the master's path.
        """
        accepted = []

        class Accepted(Protocol):
            def connectionMade(self) -> None:
                accepted.append(self)
                self.transport.socket.close()

        port = adoptWith(self, SharedUNIXPort, self.clock, self.master, Factory.forProtocol(Accepted))
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.connect(self.path)
        port.doRead()
        self.assertEqual(len(accepted), 1, followChange("no longer accepts in tcp.Port.doRead over an adopted UNIX socket", "SharedUNIXPort"))

    def test_keepsTheModeAndTheFile(self) -> None:
        """
        Adopting does not touch the socket file (its mode stays, and so its
        change time: no C{chmod}, which a worker running as another user
        than the master may not do); stopping leaves it in place.
        """
        before = os.stat(self.path)
        # A chmod, even to the same mode, would set a later change time.
        time.sleep(0.05)
        port = adoptWith(self, SharedUNIXPort, self.clock, self.master, Factory())
        after = os.stat(self.path)
        self.assertEqual(after.st_mode & 0o777, 0o600, "SharedUNIXPort changed the mode of the master's socket file")
        self.assertEqual(after.st_ctime_ns, before.st_ctime_ns, "SharedUNIXPort.startListening changed the master's socket file (chmod)")
        stop(self.clock, port)
        self.assertTrue(os.path.exists(self.path), "SharedUNIXPort removed the master's socket file")
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600, "stopping a SharedUNIXPort changed the socket file's mode")

    def test_twistedWouldChmodAndUnlink(self) -> None:
        """
        Twisted's own C{unix.Port} over an adopted socket still resets the
        file's mode and removes the file when it stops: what
        L{SharedUNIXPort} must not do.
        """
        port = adoptWith(self, unix.Port, self.clock, self.master, Factory())
        self.assertEqual(
            os.stat(self.path).st_mode & 0o777,
            0o666,
            "Twisted's unix.Port.startListening no longer chmods an adopted socket: "
            "txcluster._twistedcompat.SharedUNIXPort.startListening may use it again",
        )
        stop(self.clock, port)
        self.assertFalse(
            os.path.exists(self.path),
            "Twisted's unix.Port.connectionLost no longer unlinks the path: "
            "txcluster._twistedcompat.SharedUNIXPort.connectionLost may call it again",
        )

    def test_keepsTheBacklog(self) -> None:
        """
        Adopting does not C{listen()} again: the master's backlog stays
        (Twisted's C{unix.Port} sets its own, 50).
        """
        path = shortSocketPath(self)
        master = listeningUNIX(self, path, backlog=20)
        before = queueCapacity(self, master, path)
        adoptWith(self, SharedUNIXPort, self.clock, master, Factory())
        self.assertEqual(queueCapacity(self, master, path), before, "SharedUNIXPort changed the master's backlog")
        adoptWith(self, unix.Port, self.clock, master, Factory())
        self.assertNotEqual(
            queueCapacity(self, master, path),
            before,
            "Twisted's unix.Port.startListening no longer listen()s an adopted socket again: "
            "txcluster._twistedcompat.SharedUNIXPort.startListening may use it again",
        )

    def test_shouldShutdownIsTheSwitch(self) -> None:
        """
        C{_shouldShutdown} is what Twisted reads before it C{shutdown()}s a
        port's socket: with it set, the master's socket stops accepting;
        L{SharedUNIXPort} leaves it working.
        """
        self.assertTrue(tcp._SocketCloser._shouldShutdown, followChange("no longer shuts sockets down by default (_SocketCloser._shouldShutdown)", "SharedUNIXPort"))

        class Shutting(SharedUNIXPort):
            _shouldShutdown = True

        stop(self.clock, adoptWith(self, SharedUNIXPort, self.clock, self.master, Factory()))
        self.assertTrue(connects(self.path), "stopping a SharedUNIXPort shut the master's socket down")
        otherPath = shortSocketPath(self)
        other = listeningUNIX(self, otherPath)
        stop(self.clock, adoptWith(self, Shutting, self.clock, other, Factory()))
        self.assertTrue(os.path.exists(otherPath), "SharedUNIXPort.connectionLost removed the socket file")
        self.assertFalse(
            connects(otherPath),
            followChange("no longer reads _shouldShutdown before shutting a port's socket down", "SharedUNIXPort"),
        )

    def test_stopLikeUNIXPort(self) -> None:
        """
        Stopping a L{SharedUNIXPort} leaves it as Twisted's own
        C{unix.Port.connectionLost} leaves a port (not connected, no
        socket, the factory stopped), only without unlinking: nothing
        Twisted's C{connectionLost} does is skipped but that.
        """
        otherPath = shortSocketPath(self)
        other = listeningUNIX(self, otherPath)
        twisted = adoptWith(self, unix.Port, self.clock, other, Factory())
        stop(self.clock, twisted)
        factory = Factory()
        shared = adoptWith(self, SharedUNIXPort, self.clock, self.master, factory)
        stop(self.clock, shared)
        self.assertEqual(
            set(vars(shared)) ^ set(vars(twisted)),
            set(),
            followChange("changed what unix.Port.connectionLost leaves on a port", "SharedUNIXPort.connectionLost"),
        )
        self.assertEqual(
            (shared.connected, shared.disconnecting),
            (False, False),
            followChange("changed the flags tcp.Port.connectionLost resets", "SharedUNIXPort.connectionLost"),
        )
        self.assertEqual(factory.numPorts, 0, followChange("no longer stops the factory in tcp.Port.connectionLost", "SharedUNIXPort.connectionLost"))
        self.assertNotIn(shared, self.clock.getReaders(), followChange("no longer stops reading a stopped port", "SharedUNIXPort.connectionLost"))
        self.assertTrue(connects(self.path), "stopping a SharedUNIXPort cut off the master's socket")
        accepted, _ = self.master.accept()
        accepted.close()


class SharedUNIXPortEndToEndTests(unittest.TestCase):
    """
    L{SharedUNIXPort} with the real reactor over a real bound UNIX socket.
    """

    async def test_adoptAndStopLeaveTheMastersSocketAlone(self):
        """
        A port adopted from the master's socket accepts a client; after it
        is stopped the socket file is still there with its mode (0o600),
        and the master's listening socket still takes connections.
        """
        path = shortSocketPath(self)
        master = listeningUNIX(self, path, mode=0o600)
        connected, lost = Deferred(), Deferred()

        class Accepted(Protocol):
            def connectionMade(self) -> None:
                connected.callback(self)

            def connectionLost(self, reason) -> None:
                lost.callback(None)

        fd = os.dup(master.fileno())
        try:
            port = SharedUNIXPort.adopt(reactor, fd, Factory.forProtocol(Accepted))
        finally:
            os.close(fd)
        self.addCleanup(lambda: port.stopListening() if port.connected else None)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600, "adopting the shared port changed the socket file's mode")

        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.connect(path)
        await connected
        client.close()
        await lost

        await port.stopListening()
        self.assertTrue(os.path.exists(path), "stopping the shared port removed the master's socket file")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600, "stopping the shared port changed the socket file's mode")
        again = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(again.close)
        again.connect(path)
        accepted, _ = master.accept()
        accepted.close()


# AMP -------------------------------------------------------------------------------


class Take(amp.Command):
    arguments = [(b"fd", amp.Descriptor())]
    response: list = []


class Echo(amp.Command):
    arguments = [(b"value", amp.Integer())]
    response = [(b"value", amp.Integer())]


class Renamed(amp.Command):
    commandName = b"other-name"


class Taker(amp.AMP):
    def __init__(self) -> None:
        super().__init__()
        self.taken: list = []

    @Take.responder
    def take(self, fd):
        self.taken.append(fd)
        return {}


class Base(amp.AMP):
    @Echo.responder
    def echo(self, value):
        return {"value": value}


class Derived(Base):
    @Renamed.responder
    def renamed(self):
        return {}


class UnclaimedDescriptorsTests(unittest.SynchronousTestCase):
    """
    L{unclaimedDescriptors} is AMP's C{_descriptors}.
    """

    def test_receivedDescriptorsByOrdinal(self) -> None:
        """
        A real AMP over a real socketpair keeps each descriptor it receives
        in C{_descriptors}, keyed by its ordinal (0, 1, ...), until a box
        claims it by that ordinal; clearing the dict (as
        C{closeUnclaimedDescriptors} does) keeps it the one AMP fills.
        """
        clock = MemoryReactorClock()
        mine, peer = socketPair(self)
        proto = Taker()
        transport = adoptedUNIX(self, clock, mine, proto)
        store = unclaimedDescriptors(proto)
        self.assertIsInstance(store, dict, followChange("no longer keeps received descriptors in AMP._descriptors", "unclaimedDescriptors"))
        first, second, third = pipeDescriptors(self, 3)
        box = amp.AmpBox({b"_command": b"Take", b"_ask": b"1", b"fd": b"1"}).serialize()
        # The descriptors come with the first byte of a box that names the
        # second one.
        peer.sendmsg([box[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _pack([first, second]))])
        transport.doRead()
        closeLater(self, list(store.values()))
        self.assertEqual(
            sorted(store),
            [0, 1],
            followChange("no longer keys AMP._descriptors by the ordinal of arrival", "unclaimedDescriptors"),
        )
        self.assertEqual(
            [inode(store[0]), inode(store[1])],
            [inode(first), inode(second)],
            followChange("no longer numbers received descriptors in the order they arrive", "unclaimedDescriptors"),
        )
        peer.send(box[1:])
        transport.doRead()
        self.assertEqual([inode(fd) for fd in proto.taken], [inode(second)], "AMP's Descriptor argument no longer claims by ordinal")
        self.assertEqual(sorted(store), [0], followChange("no longer removes a claimed descriptor from AMP._descriptors", "unclaimedDescriptors"))
        store.clear()
        peer.sendmsg([b"\x00"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _pack([third]))])
        transport.doRead()
        closeLater(self, list(unclaimedDescriptors(proto).values()))
        self.assertIs(unclaimedDescriptors(proto), store, followChange("replaces AMP._descriptors", "unclaimedDescriptors"))
        self.assertEqual(sorted(store), [2], followChange("restarts the descriptor ordinals", "unclaimedDescriptors"))
        self.assertEqual(inode(store[2]), inode(third), followChange("stores another descriptor under the next ordinal", "unclaimedDescriptors"))


class OutstandingRequestsTests(unittest.SynchronousTestCase):
    """
    L{outstandingRequests} is AMP's C{_outstandingRequests}.
    """

    def connected(self):
        clock = MemoryReactorClock()
        mine, peer = socketPair(self)
        proto = amp.AMP()
        adoptedUNIX(self, clock, mine, proto)
        return clock, proto, peer

    def sentBox(self, proto, peer):
        proto.transport.doWrite()
        boxes = amp.parseString(drain(peer))
        self.assertEqual(len(boxes), 1, "AMP's callRemote no longer sends one box")
        return boxes[0]

    def test_unansweredRequests(self) -> None:
        """
        An unanswered C{callRemote} is in C{_outstandingRequests} under the
        tag sent as C{_ask}, as a Deferred not yet fired; the answer removes
        it and fires the call's Deferred.
        """
        clock, proto, peer = self.connected()
        self.assertEqual(outstandingRequests(proto), {}, followChange("no longer starts AMP._outstandingRequests as a dict", "outstandingRequests"))
        called = proto.callRemote(Echo, value=5)
        tag = self.sentBox(proto, peer)[b"_ask"]
        outstanding = outstandingRequests(proto)
        self.assertEqual(list(outstanding), [tag], followChange("no longer keys AMP._outstandingRequests by the _ask tag", "outstandingRequests"))
        self.assertIsInstance(outstanding[tag], Deferred, followChange("no longer keeps Deferreds in AMP._outstandingRequests", "outstandingRequests"))
        self.assertFalse(outstanding[tag].called, followChange("fires an unanswered request's Deferred", "outstandingRequests"))
        peer.send(amp.AmpBox({b"_answer": tag, b"value": b"5"}).serialize())
        proto.transport.doRead()
        self.assertEqual(outstandingRequests(proto), {}, followChange("no longer removes answered requests from AMP._outstandingRequests", "outstandingRequests"))
        self.assertEqual(self.successResultOf(called), {"value": 5}, "AMP no longer answers callRemote from the _answer box")

    def test_noneOnceLost(self) -> None:
        """
        Once the connection is lost (through AMP's own C{connectionLost},
        as the transport calls it, or L{connectionLostQuietly}),
        C{_outstandingRequests} is L{None} and the unanswered calls fail.
        """
        for lose in (
            lambda proto, reason: proto.transport.connectionLost(reason),
            connectionLostQuietly,
        ):
            clock, proto, peer = self.connected()
            called = proto.callRemote(Echo, value=1)
            lose(proto, Failure(error.ConnectionDone()))
            self.assertIsNone(outstandingRequests(proto), followChange("no longer sets AMP._outstandingRequests to None when the connection is lost", "outstandingRequests"))
            self.failureResultOf(called, error.ConnectionDone)


class ResponderForTests(unittest.SynchronousTestCase):
    """
    L{responderFor} looks a command up in AMP's C{_commandDispatch}.
    """

    def test_lookup(self) -> None:
        """
        The table maps a command's name (its C{commandName}) to the command
        class and the plain responder function, inherited ones included,
        and has nothing for other names.
        """
        proto = Derived()
        self.assertTrue(hasattr(Derived, "_commandDispatch"), followChange("no longer has CommandLocator._commandDispatch", "responderFor"))
        found = responderFor(proto, b"Echo")
        self.assertIsNotNone(found, followChange("no longer puts inherited responders in _commandDispatch", "responderFor"))
        command, responder = found
        self.assertIs(command, Echo, followChange("no longer keeps the command class in _commandDispatch", "responderFor"))
        self.assertEqual(
            MethodType(responder, proto)(value=3),
            {"value": 3},
            followChange("no longer keeps the plain responder function in _commandDispatch", "responderFor"),
        )
        self.assertEqual(responderFor(proto, b"other-name"), (Renamed, Derived.renamed), followChange("no longer keys _commandDispatch by commandName", "responderFor"))
        self.assertIsNone(responderFor(proto, b"Renamed"), followChange("keys _commandDispatch by class name, not commandName", "responderFor"))
        self.assertIsNone(responderFor(proto, b"Unknown"), followChange("has entries in _commandDispatch for undeclared commands", "responderFor"))


class BoxRecorder:
    """
    An C{IBoxReceiver} that records boxes.
    """

    def __init__(self) -> None:
        self.boxes: list = []

    def startReceivingBoxes(self, sender) -> None:
        pass

    def ampBoxReceived(self, box) -> None:
        self.boxes.append(box)

    def stopReceivingBoxes(self, reason) -> None:
        pass


def framed(string: bytes) -> bytes:
    return len(string).to_bytes(2, "big") + string


class ParserTests(unittest.SynchronousTestCase):
    """
    L{readingValue} (the parser's C{state}) and L{MAX_KEY_LENGTH}.
    """

    def parser(self):
        receiver = BoxRecorder()

        class Limited(amp.BinaryBoxProtocol):
            exceeded: list = []

            def lengthLimitExceeded(self, length):
                self.exceeded.append(length)

        proto = Limited(receiver)
        proto.exceeded = []
        proto.makeConnection(StringTransport())
        return proto, receiver

    def test_readingValueFlips(self) -> None:
        """
        L{readingValue} is false before a key and true after it; an empty
        string read as a value is an empty value, not the end of the box,
        which an empty key is.
        """
        proto, receiver = self.parser()
        self.assertTrue(hasattr(proto, "state"), followChange("no longer keeps the parser state in StatefulStringProtocol.state", "readingValue"))
        states = [readingValue(proto)]
        for string in (b"a", b"", b"b", b"2", b""):
            proto.dataReceived(framed(string))
            states.append(readingValue(proto))
        self.assertEqual(
            states,
            [False, True, False, True, False, False],
            followChange("no longer calls the state after a key 'value'", "readingValue"),
        )
        self.assertEqual(receiver.boxes, [{b"a": b"", b"b": b"2"}], "AMP took an empty value for the end of a box")

    def test_maxKeyLength(self) -> None:
        """
        L{MAX_KEY_LENGTH} is AMP's limit on a key: a key that long is read,
        a longer one is refused with C{lengthLimitExceeded}; values may be
        longer.
        """
        self.assertEqual(
            MAX_KEY_LENGTH,
            getattr(amp.BinaryBoxProtocol, "_MAX_KEY_LENGTH", None),
            followChange("no longer has BinaryBoxProtocol._MAX_KEY_LENGTH", "MAX_KEY_LENGTH"),
        )
        proto, receiver = self.parser()
        proto.dataReceived(framed(b"k" * MAX_KEY_LENGTH) + framed(b"v" * 1000) + framed(b""))
        self.assertEqual(proto.exceeded, [], followChange("refuses a value longer than a key may be", "MAX_KEY_LENGTH"))
        self.assertEqual(receiver.boxes, [{b"k" * MAX_KEY_LENGTH: b"v" * 1000}], followChange("refuses a key of _MAX_KEY_LENGTH bytes", "MAX_KEY_LENGTH"))
        proto.dataReceived(framed(b"k" * (MAX_KEY_LENGTH + 1)))
        self.assertEqual(
            proto.exceeded,
            [MAX_KEY_LENGTH + 1],
            followChange("no longer refuses a key longer than _MAX_KEY_LENGTH with lengthLimitExceeded", "MAX_KEY_LENGTH"),
        )


class QuietConnectionTests(unittest.SynchronousTestCase):
    """
    L{makeConnectionQuietly} and L{connectionLostQuietly}: AMP's
    C{makeConnection} and C{connectionLost} without the info-level line.
    """

    def ampLines(self, logs) -> list:
        return [e for e in logs if e.get("log_namespace") == amp.__name__ and "connection" in (e.get("log_format") or "")]

    def test_makeConnectionQuietly(self) -> None:
        """
        L{makeConnectionQuietly} connects an AMP as C{AMP.makeConnection}
        does (the same attributes, C{_transportPeer} and C{_transportHost}
        included) without the line AMP logs; AMP's own C{connectionLost}
        then still works.
        """
        logs = capturedLogs(self)
        loud, quiet = amp.AMP(), amp.AMP()
        loud.makeConnection(StringTransport())
        self.assertEqual(len(self.ampLines(logs)), 1, "Twisted's AMP.makeConnection no longer logs: makeConnectionQuietly may call it again")
        del logs[:]
        transport = StringTransport()
        makeConnectionQuietly(quiet, transport)
        self.assertEqual(self.ampLines(logs), [], "makeConnectionQuietly logged AMP's connection line")
        self.assertEqual(
            set(vars(loud)) ^ set(vars(quiet)),
            set(),
            followChange("changed what AMP.makeConnection sets", "makeConnectionQuietly"),
        )
        self.assertIs(quiet.transport, transport, followChange("no longer sets the transport in BinaryBoxProtocol.makeConnection", "makeConnectionQuietly"))
        self.assertIs(quiet.boxSender, quiet, followChange("no longer starts receiving boxes in BinaryBoxProtocol.makeConnection", "makeConnectionQuietly"))
        self.assertEqual(
            (quiet._transportPeer, quiet._transportHost),
            (transport.getPeer(), transport.getHost()),
            followChange("changed what AMP keeps in _transportPeer and _transportHost", "makeConnectionQuietly"),
        )
        amp.AMP.connectionLost(quiet, Failure(error.ConnectionDone()))
        self.assertIsNone(quiet.transport, followChange("no longer drops the transport in AMP.connectionLost", "makeConnectionQuietly"))

    def test_connectionLostQuietly(self) -> None:
        """
        L{connectionLostQuietly} ends an AMP connection as
        C{AMP.connectionLost} does (the same attributes; the transport
        gone; the unanswered calls failed) without the line AMP logs.
        """
        logs = capturedLogs(self)
        loud, quiet = amp.AMP(), amp.AMP()
        makeConnectionQuietly(loud, StringTransport())
        makeConnectionQuietly(quiet, StringTransport())
        loudCall, quietCall = loud.callRemote(Echo, value=1), quiet.callRemote(Echo, value=1)
        loud.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(len(self.ampLines(logs)), 1, "Twisted's AMP.connectionLost no longer logs: connectionLostQuietly may call it again")
        del logs[:]
        connectionLostQuietly(quiet, Failure(error.ConnectionDone()))
        self.assertEqual(self.ampLines(logs), [], "connectionLostQuietly logged AMP's connection line")
        self.assertIsNone(loud.transport, "Twisted's AMP.connectionLost no longer drops the transport: txcluster._twistedcompat.connectionLostQuietly may keep it")
        self.assertEqual(
            set(vars(loud)) ^ set(vars(quiet)),
            set(),
            followChange("changed what AMP.connectionLost sets", "connectionLostQuietly"),
        )
        self.assertIsNone(quiet.transport, "connectionLostQuietly kept the transport")
        self.failureResultOf(loudCall, error.ConnectionDone)
        self.failureResultOf(quietCall, error.ConnectionDone)


# The reactor ---------------------------------------------------------------------


class BindingOfTests(unittest.SynchronousTestCase):
    """
    L{bindingOf} reads C{interfaces._Binding}'s C{_address}, C{_port} and
    C{_reusePort}.
    """

    if makeBinding is None:
        skip = "this Twisted has no makeBinding (26.10 added it): listenTCP takes port numbers only"

    def test_makeBinding(self) -> None:
        """
        What C{makeBinding} returns is an C{_Binding} whose fields
        L{bindingOf} reads; a plain port number is not a binding.
        """
        binding = makeBinding("127.0.0.1", 8080, reusePort=True)
        self.assertIsInstance(binding, _Binding, followChange("no longer makes interfaces._Binding in makeBinding", "bindingOf"))
        self.assertEqual(bindingOf(binding), ("127.0.0.1", 8080, True), followChange("changed the fields of interfaces._Binding", "bindingOf"))
        self.assertEqual(bindingOf(makeBinding()), ("", 0, False), followChange("changed makeBinding()'s defaults", "bindingOf"))
        self.assertIsNone(bindingOf(8080), "bindingOf took a port number for a binding")
        self.assertIsNone(bindingOf(0), "bindingOf took a port number for a binding")

    def test_portReadsTheSameFields(self) -> None:
        """
        A C{tcp.Port} given a binding listens where L{bindingOf} says:
        Twisted reads the same fields.
        """
        for binding in (makeBinding("127.0.0.1", 8080, reusePort=True), makeBinding("::1", 0)):
            port = tcp.Port(binding, Factory())
            self.assertEqual(
                (port.interface, port.port, port._reusePort),
                bindingOf(binding),
                followChange("changed how tcp.Port reads a makeBinding() binding", "bindingOf"),
            )


class MarkTLSTests(unittest.SynchronousTestCase):
    """
    L{markTLS} sets a port's C{_type}.
    """

    def test_portSaysTLS(self) -> None:
        """
        A TCP port marked by L{markTLS} says "TLS" where Twisted logs its
        C{_type} (when it closes).
        """
        self.assertEqual(getattr(tcp.Port, "_type", None), "TCP", followChange("no longer has tcp.Port._type", "markTLS"))
        logs = capturedLogs(self)
        clock = MemoryReactorClock()
        port = tcp.Port(0, Factory(), interface="127.0.0.1", reactor=clock)
        port.startListening()
        self.addCleanup(lambda: getattr(port, "socket", None) and port.socket.close())
        number = port.getHost().port
        markTLS(port)
        stop(clock, port)
        lines = [str(e.get("log_text", "")) for e in logs]
        self.assertIn(f"(TLS Port {number} Closed)", lines, followChange("no longer logs tcp.Port._type when a port closes", "markTLS"))


class MarkTLSReactorTests(unittest.TestCase):
    """
    Twisted's own TLS ports carry the C{_type} L{markTLS} sets.
    """

    def test_listenSSL(self):
        """
        The reactor's C{listenSSL} returns a port whose C{_type} is "TLS".
        """
        try:
            from twisted.internet import ssl
        except ImportError:
            raise unittest.SkipTest("no TLS support (pyOpenSSL)")

        port = reactor.listenSSL(0, Factory.forProtocol(Protocol), ssl.CertificateOptions(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertEqual(
            getattr(port, "_type", None),
            "TLS",
            followChange("no longer marks its own TLS ports with _type", "markTLS"),
        )
        clone = tcp.Port(0, Factory())
        markTLS(clone)
        self.assertEqual(clone._type, port._type, followChange("marks its TLS ports differently", "markTLS"))


class ChildReaderTests(unittest.TestCase):
    """
    L{childReader} finds the reader of a child's pipe in
    C{Process.pipes}.
    """

    async def test_realProcess(self) -> None:
        """
        A process spawned by the reactor keeps its pipes' readers in
        C{pipes}, by child descriptor, and they can stop and start reading.
        """
        import sys

        from twisted.internet.protocol import ProcessProtocol

        ended = Deferred()

        class Quiet(ProcessProtocol):
            def processEnded(self, reason):
                ended.callback(None)

        transport = reactor.spawnProcess(
            Quiet(), sys.executable, [sys.executable, "-c", "import time; time.sleep(30)"], env=None
        )
        try:
            reader = childReader(transport, 1)
            self.assertIsNotNone(reader, followChange("no longer keeps a Process's pipe readers in pipes", "childReader"))
            self.assertTrue(
                callable(getattr(reader, "stopReading", None)) and callable(getattr(reader, "startReading", None)),
                followChange("changed what a Process's pipes hold", "childReader"),
            )
            reader.stopReading()
            reader.startReading()
            self.assertIsNone(childReader(transport, 99))
        finally:
            transport.signalProcess("KILL")
            await ended
        self.assertIsNone(childReader(object(), 1))


# PROXY protocol --------------------------------------------------------------------


def proxyV2(versionCommand: int, familyProtocol: int, body: bytes) -> bytes:
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([versionCommand, familyProtocol]) + len(body).to_bytes(2, "big") + body


class ProxyParserTests(unittest.SynchronousTestCase):
    """
    L{parseProxyV1} and L{parseProxyV2}: C{twisted.protocols.haproxy}'s
    C{V1Parser.parse} and C{V2Parser.parse}, with their exceptions.
    """

    def test_signatures(self) -> None:
        """
        Twisted's parsers know the headers by the signatures of the spec.
        """
        from twisted.protocols.haproxy import _v1parser, _v2parser

        self.assertEqual(PROXY_V1_PREFIX, b"PROXY ", followChange("changed V1Parser.PROXYSTR", "PROXY_V1_PREFIX"))
        self.assertEqual(
            PROXY_V2_SIGNATURE,
            b"\r\n\r\n\x00\r\nQUIT\n",
            followChange("changed V2Parser.PREFIX", "PROXY_V2_SIGNATURE"),
        )
        self.assertTrue(hasattr(_v1parser.V1Parser, "parse"), followChange("no longer has V1Parser.parse", "parseProxyV1"))
        self.assertTrue(hasattr(_v2parser.V2Parser, "parse"), followChange("no longer has V2Parser.parse", "parseProxyV2"))

    def test_exceptions(self) -> None:
        """
        Every error Twisted's parsers raise for a bad header is an
        C{InvalidProxyHeader}.
        """
        from twisted.protocols.haproxy import _exceptions

        for name in ("InvalidNetworkProtocol", "MissingAddressData"):
            self.assertTrue(
                issubclass(getattr(_exceptions, name), InvalidProxyHeader),
                followChange(f"no longer makes {name} an InvalidProxyHeader", "InvalidProxyHeader"),
            )

    def test_v1(self) -> None:
        """
        C{V1Parser.parse} gives a TCP4 or TCP6 line's addresses as Twisted
        addresses, and none for UNKNOWN.
        """
        self.assertEqual(
            parseProxyV1(b"PROXY TCP4 192.0.2.1 198.51.100.1 1234 80"),
            (IPv4Address("TCP", "192.0.2.1", 1234), IPv4Address("TCP", "198.51.100.1", 80)),
            followChange("changed what V1Parser.parse gives for TCP4", "parseProxyV1"),
        )
        self.assertEqual(
            parseProxyV1(b"PROXY TCP6 2001:db8::1 ::1 1234 80"),
            (IPv6Address("TCP", "2001:db8::1", 1234), IPv6Address("TCP", "::1", 80)),
            followChange("changed what V1Parser.parse gives for TCP6", "parseProxyV1"),
        )
        self.assertEqual(
            parseProxyV1(b"PROXY UNKNOWN ::1 ::1 1 2"),
            (None, None),
            followChange("changed what V1Parser.parse gives for UNKNOWN", "parseProxyV1"),
        )

    def test_v1Quirks(self) -> None:
        """
        Twisted refuses a bare C{"PROXY UNKNOWN"} (what HAProxy sends) and
        lets C{ValueError} out for a bad port or a non-ASCII address:
        L{parseProxyV1} reads the first and turns the others into
        C{InvalidProxyHeader}.
        """
        from twisted.protocols.haproxy._v1parser import V1Parser

        try:
            V1Parser.parse(b"PROXY UNKNOWN")
        except InvalidProxyHeader:
            pass
        else:
            self.fail("Twisted now reads a bare 'PROXY UNKNOWN': txcluster._twistedcompat.parseProxyV1 may read it as is")
        self.assertEqual(parseProxyV1(b"PROXY UNKNOWN"), (None, None))
        for line in (b"PROXY TCP4 192.0.2.1 198.51.100.1 http 80", b"PROXY TCP4 192.0.2.\xff 198.51.100.1 1 80"):
            self.assertRaises((ValueError, InvalidProxyHeader), V1Parser.parse, line)
            self.assertRaises(InvalidProxyHeader, parseProxyV1, line)
        for line in (b"PROXY", b"PROXY TCP4", b"PROXY UDP4 1 2 3 4", b"PROXY TCP4 192.0.2.1 198.51.100.1 1"):
            self.assertRaises(InvalidProxyHeader, parseProxyV1, line)

    def test_v2(self) -> None:
        """
        C{V2Parser.parse} gives a PROXY command's IPv4 or IPv6 addresses
        (IPv6 written in full), none for LOCAL or UNSPEC, and ignores the
        TLVs after the addresses.
        """
        tcp4 = bytes([192, 0, 2, 1, 198, 51, 100, 1]) + (1234).to_bytes(2, "big") + (80).to_bytes(2, "big")
        tlvs = b"\x01\x00\x02h2"
        self.assertEqual(
            parseProxyV2(proxyV2(0x21, 0x11, tcp4 + tlvs)),
            (IPv4Address("TCP", "192.0.2.1", 1234), IPv4Address("TCP", "198.51.100.1", 80)),
            followChange("changed what V2Parser.parse gives for TCP over IPv4", "parseProxyV2"),
        )
        tcp6 = bytes(15) + b"\x01" + bytes(15) + b"\x02" + (1).to_bytes(2, "big") + (2).to_bytes(2, "big")
        source, destination = parseProxyV2(proxyV2(0x21, 0x21, tcp6))
        self.assertEqual(
            [(type(a), a.type, ipaddress.ip_address(a.host), a.port) for a in (source, destination)],
            [(IPv6Address, "TCP", ipaddress.ip_address("::1"), 1), (IPv6Address, "TCP", ipaddress.ip_address("::2"), 2)],
            followChange("changed what V2Parser.parse gives for TCP over IPv6", "parseProxyV2"),
        )
        self.assertEqual(parseProxyV2(proxyV2(0x20, 0x00, b"")), (None, None), followChange("changed LOCAL", "parseProxyV2"))
        self.assertEqual(parseProxyV2(proxyV2(0x21, 0x00, b"")), (None, None), followChange("changed UNSPEC", "parseProxyV2"))

    def test_v2Invalid(self) -> None:
        """
        A bad version, command, family or protocol, or too few address
        bytes: C{InvalidProxyHeader}.
        """
        tcp4 = bytes(12)
        for header in (
            proxyV2(0x11, 0x11, tcp4),
            proxyV2(0x23, 0x11, tcp4),
            proxyV2(0x21, 0x41, tcp4),
            proxyV2(0x21, 0x14, tcp4),
            proxyV2(0x21, 0x11, tcp4[:11]),
            proxyV2(0x21, 0x31, tcp4),
        ):
            self.assertRaises(InvalidProxyHeader, parseProxyV2, header)


class GenericHTTPChannelTests(unittest.SynchronousTestCase):
    """
    L{channelOfGenericHTTP}: the C{HTTPChannel} behind C{Site}'s protocol.
    """

    def test_site(self) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.web import http, resource, server

        from txcluster._twistedcompat import channelOfGenericHTTP

        protocol = server.Site(resource.Resource()).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.assertIsInstance(
            channelOfGenericHTTP(protocol),
            http.HTTPChannel,
            followChange("Site no longer builds a _GenericHTTPChannelProtocol with a _channel", "channelOfGenericHTTP"),
        )
        channel = http.HTTPChannel()
        self.assertIs(channelOfGenericHTTP(channel), channel)
