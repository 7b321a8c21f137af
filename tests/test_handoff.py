"""
The handoff's hot path: L{NewConn} and its answer read and written
directly (L{readBox}, L{writeBox}, the worker's parser, the master's), and
the master's L{AnswerReader}, over real socketpairs driven by hand in a
memory reactor.
"""

from __future__ import annotations

import os
import socket

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial import unittest

from txcluster._channel import ANSWER_DELAY, AnswerReader, MasterChannel
from txcluster._commands import NEWCONN_ANSWER_KEYS, NEWCONN_KEYS, NewConn, Ping, readBox, writeBox
from txcluster._process import adoptChannel
from txcluster._twistedcompat import adoptUNIXTransport
from txcluster._workerchannel import WorkerChannel

from tests._transports import pipeDescriptors
from tests.test_process import RawReceiver, socketPair


class WireTests(unittest.SynchronousTestCase):
    """
    L{writeBox} writes what C{AmpBox.serialize} does; L{readBox} reads it
    back, and nothing else.
    """

    def test_writeIsAMPs(self) -> None:
        """
        The answer to L{NewConn} and L{NewConn} itself, written by
        L{writeBox}, are byte for byte AMP's, empty values included.
        """
        for keys, names in (
            (NEWCONN_ANSWER_KEYS, (amp.ANSWER, b"accepted", b"connections")),
            (NEWCONN_KEYS, (amp.ASK, amp.COMMAND, b"fds", b"listenId")),
        ):
            for values in ((b"1a", b"3", b"0"), (b"", b"", b""), (b"x" * 300, b"12", b"7")):
                values = values + (b"9",) * (len(names) - len(values))
                self.assertEqual(writeBox(keys, values), amp.AmpBox(zip(names, values)).serialize())

    def test_readRoundTrip(self) -> None:
        """
        L{readBox} returns the values and the offset after the box, at any
        offset, box after box.
        """
        first = writeBox(NEWCONN_ANSWER_KEYS, (b"1", b"2", b"3"))
        second = writeBox(NEWCONN_ANSWER_KEYS, (b"ff", b"0", b"10"))
        data = b"junk" + first + second
        self.assertEqual(readBox(data, 4, NEWCONN_ANSWER_KEYS), ([b"1", b"2", b"3"], 4 + len(first)))
        self.assertEqual(readBox(data, 4 + len(first), NEWCONN_ANSWER_KEYS), ([b"ff", b"0", b"10"], len(data)))

    def test_incompleteOrOther(self) -> None:
        """
        An incomplete box (cut anywhere), one with other keys, more keys
        or fewer, is not read.
        """
        box = writeBox(NEWCONN_ANSWER_KEYS, (b"1", b"2", b"3"))
        for end in range(len(box)):
            self.assertIsNone(readBox(box[:end], 0, NEWCONN_ANSWER_KEYS), end)
        for other in (
            amp.AmpBox({amp.ANSWER: b"1", b"accepted": b"2"}),
            amp.AmpBox({amp.ANSWER: b"1", b"accepted": b"2", b"connections": b"3", b"more": b"4"}),
            amp.AmpBox({amp.ANSWER: b"1", b"accepted": b"2", b"connectionz": b"3"}),
            amp.AmpBox({amp.ERROR: b"1", amp.ERROR_CODE: b"x", amp.ERROR_DESCRIPTION: b"y"}),
        ):
            self.assertIsNone(readBox(other.serialize(), 0, NEWCONN_ANSWER_KEYS), other)


class _Requests:
    """
    The L{WorkerRequests} an L{AnswerReader} test needs: load reports.
    """

    def __init__(self) -> None:
        self.loads: list = []

    def reportLoad(self, connections: int) -> None:
        self.loads.append(connections)

    def describe(self) -> str:
        return "worker 1 (pid 1)"

    def channelLost(self, reason) -> None:
        pass


class AnswerReaderTests(unittest.SynchronousTestCase):
    """
    L{AnswerReader} takes a channel a L{NewConn} went out on out of the
    reactor's readers, reads its answers when told (before a dispatch) and
    hands it back after L{ANSWER_DELAY}.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.reader = AnswerReader(self.clock)
        mine, self.worker = socketPair(self)
        self.requests = _Requests()
        self.channel = MasterChannel(self.requests, self.clock.seconds)
        self.transport = adoptChannel(self.clock, mine.fileno(), self.channel)
        self.addCleanup(self.transport.socket.close)
        self.receiver = RawReceiver(self, self.worker)

    def handOff(self):
        (fd,) = pipeDescriptors(self, 1)
        taken = self.channel.sendConnections(1, [fd])
        self.reader.handedOff(self.channel)
        self.receiver.drain()
        (box,) = amp.parseString(self.receiver.messages[-1][0])
        return taken, box

    def answer(self, box, accepted=1, connections=0) -> None:
        self.worker.sendall(writeBox(NEWCONN_ANSWER_KEYS, (box[amp.ASK], b"%d" % accepted, b"%d" % connections)))

    def test_readLater(self) -> None:
        """
        After a handoff the channel is not a reader: its answer waits until
        L{AnswerReader.readAnswers}, which fires the handoff's Deferred and
        reports the load; the channel stays out of the readers meanwhile.
        """
        self.assertIn(self.transport, self.clock.getReaders())
        taken, box = self.handOff()
        self.assertEqual(box[amp.COMMAND], NewConn.commandName)
        self.assertNotIn(self.transport, self.clock.getReaders())
        self.answer(box, connections=5)
        self.assertNoResult(taken)
        self.reader.readAnswers()
        self.assertEqual(self.successResultOf(taken), 1)
        self.assertEqual(self.requests.loads, [5])
        self.assertNotIn(self.transport, self.clock.getReaders())
        self.assertEqual(self.channel.handoffsUnanswered, 0)

    def test_backToTheReactor(self) -> None:
        """
        L{ANSWER_DELAY} after the first handoff the answers are read and
        the channel is a reader again, answered or not; no timer is left.
        """
        taken, box = self.handOff()
        later, _ = self.handOff()
        self.answer(box)
        self.clock.advance(ANSWER_DELAY)
        self.assertEqual(self.successResultOf(taken), 1)
        self.assertNoResult(later)
        self.assertIn(self.transport, self.clock.getReaders())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_channelClosed(self) -> None:
        """
        A channel whose worker closed it is handed back to the reactor
        when read, so that the reactor finds the end as it does for every
        connection.
        """
        taken, box = self.handOff()
        unanswered, _ = self.handOff()
        self.answer(box)
        self.worker.close()
        self.reader.readAnswers()
        self.assertEqual(self.successResultOf(taken), 1)
        self.assertNotIn(self.transport, self.clock.getReaders())
        self.reader.readAnswers()
        self.assertIn(self.transport, self.clock.getReaders())
        self.assertNoResult(unanswered)

    def test_forgetCancelsTheTimer(self) -> None:
        """
        A channel lost while it waits is forgotten, and with no channel left
        the timer is cancelled.
        """
        taken, _ = self.handOff()
        self.transport.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(taken)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_otherTransportsStayReaders(self) -> None:
        """
        A channel over any other transport (the unit tests' fakes) is
        left to the reactor.
        """

        class Other:
            connected = True
            disconnecting = False

        channel = MasterChannel(_Requests(), self.clock.seconds)
        channel.transport = Other()
        self.reader.handedOff(channel)
        self.assertIsNone(channel.answerReader)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class _Owner:
    """
    The L{ChannelOwner} of a L{WorkerChannel} test: records adoptions.
    """

    count = 1
    leaveRequested = False
    agent = None

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.adopted: list = []
        self.openConnections = 0

    def _adopt(self, listenId: int, fds: list) -> int:
        self.adopted.append((listenId, [os.fstat(fd).st_ino for fd in fds]))
        for fd in fds:
            os.close(fd)
        self.openConnections += len(fds)
        return len(fds)

    def _deliver(self, message) -> None:
        self.adopted.append(("message", message))

    def _masterGone(self, reason) -> None:
        pass

    def disconnect(self, timeout=None, why=None) -> None:
        pass


class WorkerParserTests(unittest.SynchronousTestCase):
    """
    The worker reads L{NewConn} boxes on its fast path and answers them
    with L{writeBox}; whatever else comes, in between or cut anywhere, is
    AMP's, in the order it came.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.owner = _Owner(self.clock)
        self.channel = WorkerChannel(self.owner)
        mine, self.master = socketPair(self)
        self.transport = adoptUNIXTransport(self.clock, mine.fileno(), self.channel)
        self.addCleanup(self.transport.socket.close)
        self.receiver = RawReceiver(self, self.master)
        self.sent = 0

    def newConn(self, tag: bytes, listenId: int, count: int) -> tuple:
        # Descriptors are named by their ordinal on the channel.
        fds = pipeDescriptors(self, count)
        ordinals = range(self.sent, self.sent + count)
        self.sent += count
        box = writeBox(NEWCONN_KEYS, (tag, NewConn.commandName, b",".join(b"%d" % i for i in ordinals), b"%d" % listenId))
        return box, fds

    def test_inOrderWithOtherCommands(self) -> None:
        """
        Two NewConns, a ToWorker between them, all in one message with
        every descriptor, arrive cut at every size: the connections are
        adopted in order, the message is delivered between them, and each
        NewConn is answered with AMP's bytes.
        """
        from txcluster._commands import ToWorker

        for cut in (None, 1, 7, 30):
            first, firstFds = self.newConn(b"a1", 3, 2)
            message = amp.AmpBox({amp.COMMAND: ToWorker.commandName, b"message": b'"hi"'}).serialize()
            second, secondFds = self.newConn(b"a2", 3, 1)
            data = first + message + second
            sent = firstFds + secondFds
            pieces = [data] if cut is None else [data[i : i + cut] for i in range(0, len(data), cut)]
            self.master.sendmsg(
                [pieces[0]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, b"".join(fd.to_bytes(4, "little", signed=True) for fd in sent))]
            )
            self.transport.doRead()
            for piece in pieces[1:]:
                self.master.sendall(piece)
                self.transport.doRead()
            inodes = [os.fstat(fd).st_ino for fd in sent]
            self.assertEqual(
                self.owner.adopted,
                [(3, inodes[:2]), ("message", "hi"), (3, inodes[2:])],
                cut,
            )
            self.owner.adopted.clear()
        self.receiver.drain()
        answers = amp.parseString(self.receiver.data())
        self.assertEqual(
            [(a[amp.ANSWER], a[b"accepted"]) for a in answers if b"accepted" in a],
            [(b"a1", b"2"), (b"a2", b"1")] * 4,
        )

    def test_otherCommandsAreAMPs(self) -> None:
        """
        A box that starts like a NewConn but is another command goes to
        AMP's dispatch (which answers Ping).
        """
        self.master.sendall(amp.AmpBox({amp.ASK: b"p1", amp.COMMAND: Ping.commandName}).serialize())
        self.transport.doRead()
        self.receiver.drain()
        (answer,) = amp.parseString(self.receiver.data())
        self.assertEqual(answer, {amp.ANSWER: b"p1", b"connections": b"0"})
