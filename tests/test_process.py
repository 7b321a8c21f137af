"""
Unit tests for L{txcluster._process}: the master's channel transport
(L{BatchingUNIXServer}, over real socketpairs driven by hand in a memory
reactor) and L{WorkerOutput}, the C{ProcessProtocol} that relays a
worker's output (fed by hand, with a L{Clock}).
"""

import errno
import math
import os
import resource
import socket
import struct
import sys
import time

from twisted.internet import error, unix
from twisted.internet.interfaces import IFileDescriptorReceiver
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, eventAsJSON, formatEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from txcluster._process import LOG_PAUSE, BatchingUNIXServer, WorkerOutput, adoptChannel, interruptsBlocked
from txcluster._twistedcompat import MAX_FDS_PER_MESSAGE, pendingBytes

from tests._transports import OneProtocol, pipeDescriptors, pump

# Fixtures ---------------------------------------------------------------------


def socketPair(testCase) -> tuple:
    """
    A connected non-blocking UNIX stream socketpair, closed after the test.
    """
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):
        s.setblocking(False)
        testCase.addCleanup(s.close)
    return a, b





def ordinaryTransport(testCase, clock, sock, protocol) -> unix.Server:
    """
    Twisted's own UNIX transport for C{protocol} over C{sock} (C{dup()}ed),
    in the memory reactor C{clock}; its socket is closed after the test.
    """
    transport = unix.Server._fromConnectedSocket(sock.fileno(), OneProtocol(protocol), clock)
    testCase.addCleanup(transport.socket.close)
    return transport


def channel(testCase, clock, sock, protocol) -> BatchingUNIXServer:
    """
    L{adoptChannel} over C{sock}; the transport's socket is closed after
    the test.
    """
    transport = adoptChannel(clock, sock.fileno(), protocol)
    testCase.addCleanup(transport.socket.close)
    return transport





def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def closeLater(testCase, fds) -> None:
    """
    Close the received descriptors C{fds} after the test.
    """
    for fd in fds:
        testCase.addCleanup(_closeQuietly, fd)


def _closeQuietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def needDescriptors(count: int) -> None:
    """
    Skip unless this process may have C{count} more descriptors open.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count + 256:
        raise unittest.SkipTest(f"RLIMIT_NOFILE is {soft}: the test needs {count} descriptors more")








class RawReceiver:
    """
    The far end of a socketpair read with C{recvmsg}: each message's bytes
    and descriptors, as the kernel delivers them.
    """

    def __init__(self, testCase, sock) -> None:
        self.testCase = testCase
        self.sock = sock
        #: C{(bytes, [descriptor, ...])} per C{recvmsg}.
        self.messages: list = []

    def drain(self) -> None:
        room = socket.CMSG_SPACE(4 * (MAX_FDS_PER_MESSAGE + 8))
        while True:
            try:
                data, ancillary, flags, _ = self.sock.recvmsg(1 << 20, room)
            except BlockingIOError:
                return
            fds = []
            for level, kind, packed in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fds.extend(struct.unpack(f"{len(packed) // 4}i", packed[: len(packed) // 4 * 4]))
            closeLater(self.testCase, fds)
            self.testCase.assertFalse(flags & socket.MSG_CTRUNC, "descriptors were cut off on reception")
            if not data and not fds:
                return
            self.messages.append((data, fds))

    def data(self) -> bytes:
        return b"".join(data for data, _ in self.messages)

    def descriptors(self) -> list:
        return [fd for _, fds in self.messages for fd in fds]


def sendThrough(clock, transport, receiver: RawReceiver) -> None:
    """
    Write everything C{transport} holds to C{receiver}, by hand.
    """
    for _ in range(100_000):
        if transport not in clock.getWriters():
            receiver.drain()
            return
        result = transport.doWrite()
        if result is not None:
            raise AssertionError(f"doWrite() failed: {result!r}")
        receiver.drain()
    raise AssertionError("the transport never finished writing")


class DescriptorList(amp.Argument):
    """
    Several descriptors in one argument, each sent as L{amp.Descriptor}
    sends one (what the master's C{NewConn} carries).
    """

    _one = amp.Descriptor()

    def toStringProto(self, inObject, proto):
        return b",".join(self._one.toStringProto(fd, proto) for fd in inObject)

    def fromStringProto(self, inString, proto):
        return [self._one.fromStringProto(part, proto) for part in inString.split(b",")] if inString else []


class Take(amp.Command):
    arguments = [(b"fds", DescriptorList()), (b"payload", amp.Unicode())]
    response = [(b"count", amp.Integer())]


class Plain(amp.Command):
    arguments = [(b"payload", amp.Unicode())]
    response = [(b"length", amp.Integer())]


class Taker(amp.AMP):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []

    @Take.responder
    def take(self, fds, payload):
        self.calls.append(("take", fds, payload))
        return {"count": len(fds)}

    @Plain.responder
    def plain(self, payload):
        self.calls.append(("plain", payload))
        return {"length": len(payload)}


@implementer(IFileDescriptorReceiver)
class Recorder(Protocol):
    """
    Records what Twisted's transport delivers, in order.
    """

    def __init__(self) -> None:
        self.events: list = []

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self.events.append(("fd", descriptor))

    def dataReceived(self, data: bytes) -> None:
        self.events.append(("data", data))


# BatchingUNIXServer ---------------------------------------------------------------


class BatchingUNIXServerTests(unittest.SynchronousTestCase):
    """
    L{BatchingUNIXServer} (through L{adoptChannel}) sends every queued
    descriptor with the pending bytes, up to L{MAX_FDS_PER_MESSAGE} per
    C{sendmsg}, to an ordinary receiver.
    """

    count = 300

    def setUp(self) -> None:
        needDescriptors(5 * self.count)
        self.clock = MemoryReactorClock()

    def test_adoptChannel(self) -> None:
        """
        L{adoptChannel} connects the protocol with a L{BatchingUNIXServer}
        over a copy of the descriptor.
        """
        mine, _ = socketPair(self)
        protocol = Protocol()
        transport = channel(self, self.clock, mine, protocol)
        self.assertIsInstance(transport, BatchingUNIXServer)
        self.assertIs(protocol.transport, transport)
        self.assertNotEqual(transport.fileno(), mine.fileno())

    def test_batchesInOrderWithTheBytesIntact(self) -> None:
        """
        300 descriptors queued with 300 kB written (in several writes)
        arrive in order, in as few messages as C{SCM_MAX_FD} allows (253,
        then 47), all of them with the first two bytes; the bytes arrive
        intact.
        """
        mine, peer = socketPair(self)
        transport = channel(self, self.clock, mine, Protocol())
        receiver = RawReceiver(self, peer)
        sent = pipeDescriptors(self, self.count)
        payload = os.urandom(300_000)
        for fd in sent:
            transport.sendFileDescriptor(fd)
        for start in range(0, len(payload), 100_000):
            transport.write(payload[start : start + 100_000])
        sendThrough(self.clock, transport, receiver)
        self.assertEqual(receiver.data(), payload)
        self.assertEqual([inode(fd) for fd in receiver.descriptors()], [inode(fd) for fd in sent])
        carrying = [(len(data), len(fds)) for data, fds in receiver.messages if fds]
        self.assertEqual(len(carrying), math.ceil(self.count / MAX_FDS_PER_MESSAGE), carrying)
        self.assertEqual([fds for _, fds in carrying], [MAX_FDS_PER_MESSAGE, self.count - MAX_FDS_PER_MESSAGE])
        before = 0
        for data, fds in receiver.messages:
            if fds:
                last = before
            before += len(data)
        self.assertEqual(last, 1, "the last descriptors did not come with the second byte")

    def test_ordinaryTwistedReceiverGetsDescriptorsBeforeTheirBox(self) -> None:
        """
        A real AMP on Twisted's own UNIX transport receives a command naming
        300 descriptors (and one naming 5, with a command without any in
        between) with every descriptor, in order, already there when the
        box is parsed; the answers come back.
        """
        mine, peer = socketPair(self)
        sender, taker = amp.AMP(), Taker()
        senderTransport = channel(self, self.clock, mine, sender)
        takerTransport = ordinaryTransport(self, self.clock, peer, taker)
        many, few = pipeDescriptors(self, self.count), pipeDescriptors(self, 5)
        text = "\N{SNOWMAN}" * 20_000
        answers = [
            sender.callRemote(Take, fds=many, payload=text),
            sender.callRemote(Plain, payload="between"),
            sender.callRemote(Take, fds=few, payload="few"),
        ]
        pump(self.clock, [senderTransport, takerTransport])
        for call in taker.calls:
            if call[0] == "take":
                closeLater(self, call[1])
        self.assertEqual([call[0] for call in taker.calls], ["take", "plain", "take"])
        _, gotMany, gotText = taker.calls[0]
        _, gotFew, gotFewText = taker.calls[2]
        self.assertEqual([inode(fd) for fd in gotMany], [inode(fd) for fd in many])
        self.assertEqual([inode(fd) for fd in gotFew], [inode(fd) for fd in few])
        self.assertEqual((gotText, gotFewText), (text, "few"))
        self.assertEqual(taker._descriptors, {}, "descriptors were left unclaimed")
        self.assertEqual(
            [self.successResultOf(d) for d in answers],
            [{"count": self.count}, {"length": 7}, {"count": 5}],
        )

    def test_socketFull(self) -> None:
        """
        While the socket takes nothing, C{doWrite} sends neither bytes nor
        descriptors and keeps them all queued; once the peer reads, they
        arrive, in order, with the bytes intact.
        """
        mine, peer = socketPair(self)
        transport = channel(self, self.clock, mine, Protocol())
        receiver = RawReceiver(self, peer)
        filler = os.urandom(4 << 20)
        transport.write(filler)
        while True:
            before = pendingBytes(transport)
            self.assertIsNone(transport.doWrite())
            if pendingBytes(transport) == before:
                break
        sent = pipeDescriptors(self, self.count)
        for fd in sent:
            transport.sendFileDescriptor(fd)
        transport.write(b"box")
        pending = pendingBytes(transport)
        self.assertEqual(transport.doWrite(), None)
        self.assertEqual(transport._sendmsgQueue, sent, "descriptors left the queue while the socket was full")
        self.assertEqual(pendingBytes(transport), pending)
        sendThrough(self.clock, transport, receiver)
        self.assertEqual(receiver.data(), filler + b"box")
        self.assertEqual([inode(fd) for fd in receiver.descriptors()], [inode(fd) for fd in sent])
        self.assertEqual(transport._sendmsgQueue, [])

    def test_overrun(self) -> None:
        """
        More queued descriptors than pending bytes is
        C{FileDescriptorOverrun}, as with Twisted's own transport, and
        nothing is sent; as many bytes as descriptors is enough (though a
        byte per 253 would do: a box keeps Twisted's rule).
        """
        for count, length in ((3, 2), (self.count, self.count - 1), (1, 0)):
            results = []
            for adopt in (channel, ordinaryTransport):
                mine, peer = socketPair(self)
                transport = adopt(self, self.clock, mine, Protocol())
                for fd in pipeDescriptors(self, count):
                    transport.sendFileDescriptor(fd)
                transport.write(b"x" * length)
                results.append(transport.doWrite())
                receiver = RawReceiver(self, peer)
                receiver.drain()
                self.assertEqual(receiver.messages, [], (count, length, adopt))
                self.assertEqual(len(transport._sendmsgQueue), count)
            batching, twisted = results
            self.assertIsInstance(batching, error.FileDescriptorOverrun, (count, length))
            self.assertIsInstance(twisted, error.FileDescriptorOverrun, (count, length))
        mine, peer = socketPair(self)
        transport = channel(self, self.clock, mine, Protocol())
        sent = pipeDescriptors(self, self.count)
        for fd in sent:
            transport.sendFileDescriptor(fd)
        transport.write(b"y" * self.count)
        receiver = RawReceiver(self, peer)
        sendThrough(self.clock, transport, receiver)
        self.assertEqual(receiver.data(), b"y" * self.count)
        self.assertEqual([inode(fd) for fd in receiver.descriptors()], [inode(fd) for fd in sent])

    def test_writesAtOnce(self) -> None:
        """
        With nothing buffered, C{write} sends the bytes, and the
        descriptors queued before them, in the call: the peer has them
        without a C{doWrite}, and the transport never asked the reactor to
        write (no writer turned on and off per box).
        """
        mine, peer = socketPair(self)
        transport = channel(self, self.clock, mine, Protocol())
        receiver = RawReceiver(self, peer)
        sent = pipeDescriptors(self, 3)
        for fd in sent:
            transport.sendFileDescriptor(fd)
        self.assertNotIn(transport, self.clock.getWriters())
        transport.write(b"box")
        self.assertNotIn(transport, self.clock.getWriters())
        self.assertEqual((pendingBytes(transport), transport._sendmsgQueue), (0, []))
        receiver.drain()
        self.assertEqual(receiver.data(), b"box")
        self.assertEqual([inode(fd) for fd in receiver.descriptors()], [inode(fd) for fd in sent])
        transport.write(b"more")
        receiver.drain()
        self.assertEqual(receiver.data(), b"boxmore")
        self.assertNotIn(transport, self.clock.getWriters())

    def test_writesWhatTheSocketLeavesLater(self) -> None:
        """
        What the socket does not take in the call waits, in order, for the
        reactor's writable event; a write meanwhile queues behind it rather
        than jumping ahead.
        """
        mine, peer = socketPair(self)
        transport = channel(self, self.clock, mine, Protocol())
        receiver = RawReceiver(self, peer)
        filler = os.urandom(4 << 20)
        transport.write(filler)
        self.assertGreater(pendingBytes(transport), 0)
        self.assertIn(transport, self.clock.getWriters())
        (fd,) = pipeDescriptors(self, 1)
        transport.sendFileDescriptor(fd)
        transport.write(b"after")
        self.assertEqual(transport._sendmsgQueue, [fd])
        sendThrough(self.clock, transport, receiver)
        self.assertEqual(receiver.data(), filler + b"after")
        self.assertEqual([inode(d) for d in receiver.descriptors()], [inode(fd)])

    def test_failedWriteIsTheReactors(self) -> None:
        """
        A write to a socket whose peer is gone is left to the reactor's
        C{doWrite}, which reports the connection lost as it does for
        Twisted's transport.
        """
        mine, peer = socketPair(self)
        transport = channel(self, self.clock, mine, Protocol())
        peer.close()
        transport.write(b"lost")
        self.assertIn(transport, self.clock.getWriters())
        self.assertIsInstance(transport.doWrite(), Exception)

    def test_bytesAlone(self) -> None:
        """
        With no descriptor queued the transport writes bytes as Twisted's
        does: no ancillary data.
        """
        mine, peer = socketPair(self)
        transport = channel(self, self.clock, mine, Protocol())
        receiver = RawReceiver(self, peer)
        transport.write(b"hello ")
        transport.write(b"world")
        sendThrough(self.clock, transport, receiver)
        self.assertEqual(receiver.data(), b"hello world")
        self.assertEqual(receiver.descriptors(), [])

    def test_maxFdsPerMessageIsTheKernelsLimit(self) -> None:
        """
        L{MAX_FDS_PER_MESSAGE} descriptors fit in one C{sendmsg}; one more
        does not (Linux's C{SCM_MAX_FD}).
        """
        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("SCM_MAX_FD is Linux's")
        mine, peer = socketPair(self)
        fds = pipeDescriptors(self, MAX_FDS_PER_MESSAGE + 1)
        packed = struct.pack(f"{MAX_FDS_PER_MESSAGE}i", *fds[:MAX_FDS_PER_MESSAGE])
        self.assertEqual(mine.sendmsg([b"a"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, packed)]), 1)
        receiver = RawReceiver(self, peer)
        receiver.drain()
        self.assertEqual(len(receiver.descriptors()), MAX_FDS_PER_MESSAGE)
        packed = struct.pack(f"{len(fds)}i", *fds)
        with self.assertRaises(OSError) as raised:
            mine.sendmsg([b"b"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, packed)])
        self.assertEqual(raised.exception.errno, errno.EINVAL)


# WorkerOutput -------------------------------------------------------------------------


class FakeProcess:
    """
    The C{IProcessTransport} L{WorkerOutput} reads: a pid.
    """

    pid = 4321


def record(event: dict) -> bytes:
    """
    C{event} as a worker writes it on fd 4.
    """
    return b"\x1e" + eventAsJSON(event).encode("utf-8") + b"\n"


def workerEvent(**fields) -> dict:
    event = {
        "log_format": "hello",
        "log_level": LogLevel.info,
        "log_namespace": "app",
        "log_system": "-",
        "log_time": 1000.0,
    }
    event.update(fields)
    return event


class WorkerOutputTests(unittest.SynchronousTestCase):
    """
    L{WorkerOutput} relays a worker's stdout and stderr lines and its JSON
    log records as the worker's, at a bounded rate.
    """

    system = "worker 7 pid 4321"

    def setUp(self) -> None:
        self.clock = Clock()
        self.relayed: list = []
        self.ended: list = []
        self.logged: list = []

        def observe(event):
            if event.get("log_namespace") in ("txcluster.worker", "txcluster.master") and event.get("workerId") == 7:
                self.logged.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def output(self, **kw) -> WorkerOutput:
        output = WorkerOutput(7, self.ended.append, self.relayed.append, clock=self.clock, **kw)
        output.makeConnection(FakeProcess())
        return output

    def lines(self) -> list:
        return [formatEvent(e) for e in self.logged]

    # Lines ----------------------------------------------------------------

    def test_stdoutLines(self) -> None:
        """
        Each stdout line (fd 1) is an info event of the worker's: its
        text, C{stream} C{stdout}, its id and pid, and system
        C{worker N pid P}; C{\\r\\n} endings and empty lines go.
        """
        output = self.output()
        output.childDataReceived(1, b"hello\r\n\nworld\n")
        self.assertEqual(self.lines(), ["hello", "world"])
        event = self.logged[0]
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(
            (event["stream"], event["workerId"], event["pid"], event["log_system"]),
            ("stdout", 7, 4321, self.system),
        )
        self.assertEqual(self.relayed, [])
        self.assertEqual(list(output.stderrTail), [])

    def test_stderrLines(self) -> None:
        """
        Each stderr line (fd 2) is a warn event, and goes to C{stderrTail}.
        """
        output = self.output()
        output.childDataReceived(2, b"oops\nagain\n")
        self.assertEqual(self.lines(), ["oops", "again"])
        self.assertEqual({e["log_level"] for e in self.logged}, {LogLevel.warn})
        self.assertEqual(
            (self.logged[0]["stream"], self.logged[0]["workerId"], self.logged[0]["pid"], self.logged[0]["log_system"]),
            ("stderr", 7, 4321, self.system),
        )
        self.assertEqual(list(output.stderrTail), ["oops", "again"])

    def test_stderrTailIsBounded(self) -> None:
        """
        C{stderrTail} keeps the last C{tailLines} lines.
        """
        output = self.output(tailLines=3)
        output.childDataReceived(2, b"".join(b"%d\n" % i for i in range(10)))
        self.assertEqual(list(output.stderrTail), ["7", "8", "9"])

    def test_partialLines(self) -> None:
        """
        A partial line waits for its newline, on each fd separately, and is
        relayed when its fd closes.
        """
        output = self.output()
        output.childDataReceived(1, b"hel")
        output.childDataReceived(2, b"err")
        self.assertEqual(self.lines(), [])
        output.childDataReceived(1, b"lo\nwor")
        self.assertEqual(self.lines(), ["hello"])
        output.childConnectionLost(1)
        self.assertEqual(self.lines(), ["hello", "wor"])
        output.childConnectionLost(2)
        self.assertEqual(self.lines(), ["hello", "wor", "err"])
        self.assertEqual(self.logged[-1]["log_level"], LogLevel.warn)

    def test_longLineCut(self) -> None:
        """
        A line longer than C{maxLine} does not wait for its newline: once
        more than C{maxLine} bytes of it are buffered they are relayed as a
        line, and the rest follows; nothing is lost, and no piece is longer
        than C{maxLine} and the chunk that went over it.
        """
        output = self.output()
        chunk = 8192
        line = bytes(ord("a") + i % 26 for i in range(3 * output.maxLine + 100))
        for start in range(0, len(line), chunk):
            output.childDataReceived(1, line[start : start + chunk])
            self.assertLessEqual(len(output._buffers.get(1, b"")), output.maxLine)
        output.childDataReceived(1, b"\nnext\n")
        pieces = self.lines()
        self.assertEqual(pieces[-1], "next")
        self.assertGreater(len(pieces[:-1]), 1)
        self.assertEqual("".join(pieces[:-1]).encode(), line)
        self.assertLessEqual(max(len(p) for p in pieces[:-1]), output.maxLine + chunk)

    def test_longLineInOneChunk(self) -> None:
        """
        A chunk that leaves more than C{maxLine} bytes without a newline is
        relayed at once: nothing is kept.
        """
        output = self.output()
        output.childDataReceived(1, b"z" * (output.maxLine + 1))
        self.assertEqual(self.lines(), ["z" * (output.maxLine + 1)])
        self.assertEqual(output._buffers.get(1, b""), b"")

    def test_floodWithoutNewlines(self) -> None:
        """
        1 MB without a newline on fd 1, in one chunk or in the reactor's
        8 kB reads, leaves no more than C{maxLine} bytes buffered.
        """
        flood = b"f" * (1 << 20)
        output = self.output()
        output.childDataReceived(1, flood)
        self.assertLessEqual(len(output._buffers.get(1, b"")), output.maxLine)
        output = self.output()
        for start in range(0, len(flood), 8192):
            output.childDataReceived(1, flood[start : start + 8192])
            self.assertLessEqual(len(output._buffers.get(1, b"")), output.maxLine)
        # With the budget spent the line is dropped once it is cut, and
        # the rest of it skipped, not buffered.
        output = self.output(rate=1, burst=1)
        output.childDataReceived(1, b"one\n")
        for start in range(0, len(flood), 8192):
            output.childDataReceived(1, flood[start : start + 8192])
            self.assertLessEqual(len(output._buffers.get(1, b"")), output.maxLine)
        self.assertEqual(output._buffers.get(1, b""), b"")
        self.assertEqual(output.dropped, 1)

    # JSON records -----------------------------------------------------------

    def test_relayedAsTheWorkers(self) -> None:
        """
        A JSON record on fd 4 is published as the worker's, whatever it
        claims: namespace C{txcluster.worker} (its own kept as
        C{workerNamespace}), system C{worker N pid P} (its own as
        C{workerLogSystem}), the real worker id and pid; its level, format,
        fields and time are kept.
        """
        output = self.output()
        output.childDataReceived(
            4,
            record(
                workerEvent(
                    log_namespace="txcluster.master",
                    log_system="master",
                    workerId=99,
                    pid=1,
                    log_level=LogLevel.warn,
                    log_format="hi {who}",
                    who="there",
                    log_time=123.5,
                )
            ),
        )
        (event,) = self.relayed
        self.assertEqual(
            {k: event[k] for k in ("log_namespace", "workerNamespace", "log_system", "workerLogSystem", "workerId", "pid")},
            {
                "log_namespace": "txcluster.worker",
                "workerNamespace": "txcluster.master",
                "log_system": self.system,
                "workerLogSystem": "master",
                "workerId": 7,
                "pid": 4321,
            },
        )
        self.assertEqual((event["log_level"], event["log_time"], event["who"]), (LogLevel.warn, 123.5, "there"))
        self.assertEqual(formatEvent(event), "hi there")
        self.assertEqual(self.logged, [])

    def test_bogusLevel(self) -> None:
        """
        A C{log_level} that is not a L{LogLevel} (a string, a number, a
        level of a name L{LogLevel} has not) is C{info}.
        """
        output = self.output()
        output.childDataReceived(4, record(workerEvent(log_level="error")))
        output.childDataReceived(4, record(workerEvent(log_level=40)))
        uuid = eventAsJSON({"l": LogLevel.info}).split('"__class_uuid__": "')[1].split('"')[0]
        output.childDataReceived(
            4, b'\x1e{"log_format": "x", "log_level": {"__class_uuid__": "%s", "name": "levelWithName"}}\n' % uuid.encode()
        )
        output.childDataReceived(
            4, b'\x1e{"log_format": "x", "log_level": {"__class_uuid__": "%s", "name": "bogus"}}\n' % uuid.encode()
        )
        self.assertEqual([e["log_level"] for e in self.relayed], [LogLevel.info] * 4)

    def test_privateKeysDropped(self) -> None:
        """
        Of the logging system's C{log_*} keys only the format, level, time
        and flattened fields are kept (the namespace and system are the
        master's): a failure, a logger, a source, a trace are dropped;
        other fields are kept.
        """
        captured = []
        logger = Logger(namespace="app", source=self, observer=captured.append)
        try:
            1 / 0
        except ZeroDivisionError:
            logger.failure("it broke: {detail}", detail="division")
        event = dict(captured[0], log_trace=[["a", "b"]], log_io="raw", extra="kept")
        self.assertIn("log_failure", event)
        output = self.output()
        output.childDataReceived(4, record(event))
        (relayed,) = self.relayed
        self.assertEqual(
            {k for k in relayed if k.startswith("log_")},
            {"log_format", "log_level", "log_time", "log_flattened", "log_namespace", "log_system"},
        )
        self.assertEqual((relayed["extra"], relayed["detail"]), ("kept", "division"))
        self.assertEqual(formatEvent(relayed), "it broke: division")

    def test_formatKinds(self) -> None:
        """
        A C{log_format} of L{None} (or none) stays L{None}: an event
        without text, as in the worker; another non-string becomes its
        string.  A C{log_time} that is not a number becomes the master's
        time.
        """
        output = self.output()
        output.childDataReceived(4, record(workerEvent(log_format=None)))
        output.childDataReceived(4, b'\x1e{"log_level": {"name": "info"}, "field": 1}\n')
        output.childDataReceived(4, b'\x1e{"log_format": 42, "log_time": 5.0}\n')
        before = time.time()
        output.childDataReceived(4, record(workerEvent(log_time=True)))
        output.childDataReceived(4, record(workerEvent(log_time="noon")))
        after = time.time()
        self.assertEqual([e["log_format"] for e in self.relayed[:3]], [None, None, "42"])
        self.assertEqual([formatEvent(e) for e in self.relayed[:3]], ["", "", "42"])
        for event in self.relayed[3:]:
            self.assertTrue(before <= event["log_time"] <= after, event["log_time"])

    def test_unreadable(self) -> None:
        """
        A record that is not JSON, or not a JSON object, is logged as "wrote
        an unreadable log record" (as a warning of the worker's) and not
        relayed; an empty record is nothing.
        """
        output = self.output()
        output.childDataReceived(4, b"\x1enot json\n\x1e[1, 2]\n\x1e\n")
        self.assertEqual(self.relayed, [])
        self.assertEqual(
            self.lines(),
            [
                "worker 7 (pid 4321) wrote an unreadable log record: b'not json'",
                "worker 7 (pid 4321) wrote an unreadable log record: b'[1, 2]'",
            ],
        )
        self.assertEqual({(e["log_level"], e["log_system"]) for e in self.logged}, {(LogLevel.warn, self.system)})

    def test_errorsFeedTheTail(self) -> None:
        """
        An event at error level or above goes to C{stderrTail} (its
        formatted lines); one below does not.
        """
        output = self.output()
        output.childDataReceived(4, record(workerEvent(log_level=LogLevel.info, log_format="fine")))
        output.childDataReceived(4, record(workerEvent(log_level=LogLevel.error, log_format="failed: {why}", why="because")))
        output.childDataReceived(4, record(workerEvent(log_level=LogLevel.critical, log_format="one\ntwo")))
        self.assertEqual(list(output.stderrTail), ["failed: because", "one", "two"])

    def test_workerTraceback(self) -> None:
        """
        A C{workerTraceback} (a failure's traceback, as text) is appended to
        the event's format.
        """
        traceback = "Traceback (most recent call last):\nValueError: bad"
        output = self.output()
        output.childDataReceived(4, record(workerEvent(log_level=LogLevel.error, log_format="boom", workerTraceback=traceback)))
        (event,) = self.relayed
        self.assertEqual(event["log_format"], "boom\n{workerTraceback}")
        self.assertEqual(formatEvent(event), "boom\n" + traceback)
        self.assertEqual(list(output.stderrTail), ["boom"] + traceback.splitlines())

    # Rate limit ----------------------------------------------------------------

    def test_burstThenDropped(self) -> None:
        """
        With C{rate=10, burst=5}, of 20 lines at once 5 are relayed and 15
        dropped; one warning says so after C{noteInterval}, and no other
        follows.
        """
        output = self.output(rate=10, burst=5)
        output.childDataReceived(1, b"".join(b"line %d\n" % i for i in range(20)))
        self.assertEqual(self.lines(), [f"line {i}" for i in range(5)])
        self.assertEqual(output.dropped, 15)
        del self.logged[:]
        self.clock.advance(WorkerOutput.noteInterval / 2)
        self.assertEqual(self.logged, [])
        self.clock.advance(WorkerOutput.noteInterval / 2)
        self.assertEqual(self.lines(), ["worker 7 (pid 4321) wrote more than 10 lines a second: 15 dropped"])
        # The master says it, about the worker: not a line the worker wrote.
        self.assertEqual((self.logged[0]["log_level"], self.logged[0]["log_namespace"]), (LogLevel.warn, "txcluster.master"))
        self.clock.advance(10 * WorkerOutput.noteInterval)
        self.assertEqual(len(self.logged), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_budgetRefills(self) -> None:
        """
        Lines are relayed again as the budget refills: C{rate} a second, up
        to C{burst}.
        """
        output = self.output(rate=10, burst=5)
        output.childDataReceived(1, b"x\n" * 6)
        self.assertEqual(output.dropped, 1)
        self.clock.advance(0.2)
        del self.logged[:]
        output.childDataReceived(1, b"a\nb\nc\n")
        self.assertEqual(self.lines(), ["a", "b"])
        self.assertEqual(output.dropped, 2)
        self.clock.advance(100)
        del self.logged[:]
        output.childDataReceived(1, b"".join(b"%d\n" % i for i in range(7)))
        self.assertEqual(self.lines(), [str(i) for i in range(5)])

    def test_allStreamsShareTheBudget(self) -> None:
        """
        stdout and stderr lines and log records spend one budget.
        """
        output = self.output(rate=10, burst=3)
        output.childDataReceived(1, b"out\n")
        output.childDataReceived(4, record(workerEvent()))
        output.childDataReceived(2, b"err\n")
        output.childDataReceived(4, record(workerEvent()))
        output.childDataReceived(1, b"out\n")
        self.assertEqual((len(self.logged), len(self.relayed), output.dropped), (2, 1, 2))

    def test_droppedPartialLineSkipped(self) -> None:
        """
        A partial line dropped with the spent budget is dropped whole: the
        rest of it, in later chunks, is skipped (not relayed as a
        fragment), and the lines after it are relayed.
        """
        output = self.output(rate=10, burst=1)
        output.childDataReceived(1, b"one\ntwo\nthree-par")
        self.assertEqual(self.lines(), ["one"])
        self.assertEqual(output.dropped, 2)
        self.clock.advance(100)
        del self.logged[:]
        output.childDataReceived(1, b"tial-and")
        output.childDataReceived(1, b"-more\nfour\n")
        self.assertEqual(self.lines(), ["four"])
        self.assertEqual(output.dropped, 2)

    def test_droppedCutLineSkipped(self) -> None:
        """
        A long line whose cut piece is dropped is dropped whole too: the
        rest of it is skipped, not relayed as a fragment.
        """
        output = self.output(rate=10, burst=1)
        output.childDataReceived(1, b"one\n")
        output.childDataReceived(1, b"x" * (output.maxLine + 10))
        self.assertEqual(output.dropped, 1)
        self.clock.advance(100)
        del self.logged[:]
        output.childDataReceived(1, b"rest of the long line\nnext\n")
        self.assertEqual(self.lines(), ["next"])
        self.assertEqual(output.dropped, 1)

    def test_processEnded(self) -> None:
        """
        When the process ends its partial lines and record are relayed, the
        dropped lines not yet reported are (at once, the pending note
        cancelled), and C{ended} is called with the reason.
        """
        output = self.output(rate=10, burst=3)
        output.childDataReceived(1, b"a\nb\nc\nd\ne\n")
        output.childDataReceived(1, b"tail")
        output.childDataReceived(2, b"last words")
        output.childDataReceived(4, record(workerEvent(log_format="final"))[:-1])
        self.assertEqual(self.ended, [])
        reason = Failure(error.ProcessDone(0))
        output.processEnded(reason)
        self.assertEqual(
            self.lines(),
            ["a", "b", "c", "tail", "last words", "worker 7 (pid 4321) wrote more than 10 lines a second: 2 dropped"],
        )
        self.assertEqual([formatEvent(e) for e in self.relayed], ["final"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.ended, [reason])

    def test_processEndedWithoutDrops(self) -> None:
        """
        With nothing dropped the end logs no note.
        """
        output = self.output()
        output.childDataReceived(1, b"ok\n")
        output.processEnded(Failure(error.ProcessDone(0)))
        self.assertEqual(self.lines(), ["ok"])
        self.assertEqual(len(self.ended), 1)


class _Reader:
    """
    A pipe reader of a child process (C{Process.pipes[fd]}): records
    whether it reads.
    """

    def __init__(self) -> None:
        self.reading = True
        self.calls: list = []

    def stopReading(self) -> None:
        self.reading = False
        self.calls.append("stop")

    def startReading(self) -> None:
        self.reading = True
        self.calls.append("start")


class _PipedProcess(FakeProcess):
    def __init__(self) -> None:
        self.pipes = {1: _Reader(), 2: _Reader(), 4: _Reader()}


class PauseTests(unittest.SynchronousTestCase):
    """
    A worker over its budget has the pipe it floods read only every
    L{LOG_PAUSE}: its writes wait meanwhile, and the master reads a full
    pipe per pause instead of waking up for every write.
    """

    def test_pausedWhileOver(self) -> None:
        """
        Dropping lines stops reading that pipe for LOG_PAUSE seconds; the
        others go on.
        """
        clock = Clock()
        output = WorkerOutput(7, lambda reason: None, lambda event: None, clock=clock, rate=10, burst=5)
        process = _PipedProcess()
        output.makeConnection(process)
        output.childDataReceived(1, b"line\n" * 4)
        self.assertEqual(process.pipes[1].calls, [])
        output.childDataReceived(1, b"line\n" * 4)
        self.assertEqual(process.pipes[1].calls, ["stop"])
        self.assertEqual(process.pipes[2].calls, [])
        output.childDataReceived(1, b"line\n" * 4)
        self.assertEqual(process.pipes[1].calls, ["stop"])
        clock.advance(LOG_PAUSE)
        self.assertEqual(process.pipes[1].calls, ["stop", "start"])
        self.assertEqual(output.dropped, 7)

    def test_endCancelsTheResume(self) -> None:
        """
        A process that ends while a pipe is paused leaves no timer behind.
        """
        clock = Clock()
        output = WorkerOutput(7, lambda reason: None, lambda event: None, clock=clock, rate=10, burst=1)
        process = _PipedProcess()
        output.makeConnection(process)
        output.childDataReceived(2, b"a\nb\n")
        output.processEnded(Failure(error.ProcessDone(0)))
        self.assertEqual(clock.getDelayedCalls(), [])


class InterruptsBlockedTests(unittest.SynchronousTestCase):
    def test_blockedMeanwhile(self) -> None:
        """
        SIGINT is blocked in this thread inside L{interruptsBlocked} (a
        process spawned meanwhile inherits the mask), and the mask is what
        it was afterwards.
        """
        import signal

        before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
        with interruptsBlocked():
            self.assertIn(signal.SIGINT, signal.pthread_sigmask(signal.SIG_BLOCK, set()))
        self.assertEqual(signal.pthread_sigmask(signal.SIG_BLOCK, set()), before)
