"""
Tests for L{txcluster._handles.HandleTable}: the master's listening sockets,
driven by a fake reactor (L{MemoryReactorClock}: its C{readers} are what
the master would be reading) and a fake C{sendConnections} whose Deferreds
the tests fire by hand.  The sockets are real, on 127.0.0.1 and in a
temporary directory.
"""

from __future__ import annotations

import errno
import os
import resource
import socket

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from txcluster._handles import SHARED, HandleTable
from txcluster._sockets import ListenKey

from tests._harness import socketPath


class FakeHandoffs:
    """
    A fake C{sendConnections}: records each handoff and returns a Deferred
    the test fires with the number of connections taken.
    """

    def __init__(self) -> None:
        self.calls: list = []

    def __call__(self, worker, listenId: int, fds: list) -> defer.Deferred:
        d = defer.Deferred()
        self.calls.append((worker, listenId, list(fds), d))
        return d

    def to(self, worker) -> list:
        return [c for c in self.calls if c[0] == worker]

    def unanswered(self) -> list:
        return [c for c in self.calls if not c[3].called]

    def answer(self, call, accepted=None) -> None:
        call[3].callback(len(call[2]) if accepted is None else accepted)


def isOpen(fd: int) -> bool:
    """
    Whether C{fd} is an open descriptor in this process.
    """
    try:
        os.fstat(fd)
    except OSError as e:
        if e.errno == errno.EBADF:
            return False
        raise
    return True


class HandleTableTestsMixin:
    """
    Builds a L{HandleTable} on a fake reactor and cleans up its sockets and
    the test's client connections.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.sent = FakeHandoffs()
        self.logs: list = []
        globalLogPublisher.addObserver(self.logs.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs.append)

    def makeTable(self, scheduling: str = "rr", **kw) -> HandleTable:
        table = HandleTable(self.reactor, scheduling, self.sent, **kw)
        self.addCleanup(table.closeAll)
        return table

    def tcpKey(self, index: int = 0, port: int = 0) -> ListenKey:
        return ListenKey("tcp4", "127.0.0.1", port, index)

    def connect(self, handle, count: int = 1) -> list:
        """
        Open C{count} client connections to C{handle}'s address (they wait
        in its accept queue until the reactor reads).
        """
        clients = []
        for _ in range(count):
            if handle.key.kind == "unix":
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.connect(handle.host)
            else:
                client = socket.create_connection((handle.host, handle.port))
            self.addCleanup(client.close)
            clients.append(client)
        return clients

    def readAll(self) -> None:
        """
        Let every reader the fake reactor has read once, as a reactor
        iteration would.
        """
        for reader in list(self.reactor.readers):
            reader.doRead()

    def closeLater(self, fds) -> None:
        for fd in fds:
            self.addCleanup(_closeQuietly, fd)

    def messages(self) -> list:
        return [formatEvent(e) for e in self.logs]


def _closeQuietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class BindTests(HandleTableTestsMixin, SynchronousTestCase):
    """
    L{HandleTable.query} binds each key once.
    """

    def test_bindOncePerKey(self) -> None:
        """
        Two workers asking for the same key share one handle and one socket;
        both are its members.
        """
        table = self.makeTable()
        first = table.query("w1", self.tcpKey())
        second = table.query("w2", self.tcpKey())
        self.assertIs(first, second)
        self.assertEqual(first.members, {"w1", "w2"})
        self.assertEqual(len(table.handles()), 1)
        self.assertNotEqual(first.port, 0)
        self.assertEqual(first.sock.getsockname(), ("127.0.0.1", first.port))
        self.assertEqual(first.describe(), f"tcp:127.0.0.1:{first.port}")

    def test_indexMakesADistinctSocket(self) -> None:
        """
        The same address with another index is another key: a second
        ephemeral port.
        """
        table = self.makeTable()
        first = table.query("w1", self.tcpKey(index=0))
        second = table.query("w1", self.tcpKey(index=1))
        self.assertIsNot(first, second)
        self.assertNotEqual(first.port, second.port)
        self.assertNotEqual(first.listenId, second.listenId)
        self.assertIs(table.get(second.listenId), second)

    def test_roundRobinReads(self) -> None:
        """
        A round-robin handle has a dispatcher and the reactor reads its
        socket from the start.
        """
        table = self.makeTable()
        handle = table.query("w1", self.tcpKey())
        self.assertIsNotNone(handle.dispatcher)
        self.assertEqual(handle.scheduling, "rr")
        self.assertIn(handle.reader, self.reactor.readers)
        self.assertEqual(handle.reader.fileno(), handle.sock.fileno())

    def test_sharedDoesNotRead(self) -> None:
        """
        With shared scheduling the master neither reads nor dispatches: the
        workers accept on the socket themselves.
        """
        table = self.makeTable(SHARED)
        handle = table.query("w1", self.tcpKey())
        self.assertEqual(handle.scheduling, SHARED)
        self.assertIsNone(handle.dispatcher)
        self.assertEqual(self.reactor.readers, set())

    def test_udpIsAlwaysShared(self) -> None:
        """
        A datagram key is shared even when the table's scheduling is
        round-robin.
        """
        table = self.makeTable()
        handle = table.query("w1", ListenKey("udp4", "127.0.0.1", 0, 0))
        self.assertEqual(handle.scheduling, SHARED)
        self.assertEqual(handle.sock.type, socket.SOCK_DGRAM)
        self.assertEqual(handle.describe(), f"udp:127.0.0.1:{handle.port}")
        self.assertEqual(self.reactor.readers, set())

    def test_bindErrorLeavesNoKey(self) -> None:
        """
        A bind error reaches the caller as the C{OSError}, leaves nothing
        behind, and a later query for the same key binds afresh.
        """
        blocker = socket.socket()
        self.addCleanup(blocker.close)
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        table = self.makeTable()
        exc = self.assertRaises(OSError, table.query, "w1", self.tcpKey(port=port))
        self.assertEqual(exc.errno, errno.EADDRINUSE)
        self.assertEqual(table.handles(), [])
        self.assertEqual(self.reactor.readers, set())
        blocker.close()
        handle = table.query("w1", self.tcpKey(port=port))
        self.assertEqual(handle.port, port)

    def test_unixSocket(self) -> None:
        """
        A UNIX key binds its path with the mode asked for.
        """
        path = socketPath(self)
        table = self.makeTable()
        handle = table.query("w1", ListenKey("unix", path, 0, 0), mode=0o600)
        self.assertEqual(handle.describe(), f"unix:{path}")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)


class HandoffTests(HandleTableTestsMixin, SynchronousTestCase):
    """
    Accepted connections go to listening members; answers release the
    master's copies.
    """

    def listeningTable(self, workers=("w1",), **kw):
        table = self.makeTable(**kw)
        handle = None
        for worker in workers:
            handle = table.query(worker, self.tcpKey())
            table.listening(worker, handle.listenId)
        return table, handle

    def test_listeningOnlyForMembers(self) -> None:
        """
        C{listening} from a worker that did not query the handle, or for an
        unknown listen id, is refused with L{None}.
        """
        table, handle = self.listeningTable()
        self.assertIsNone(table.listening("stranger", handle.listenId))
        self.assertIsNone(table.listening("w1", handle.listenId + 100))
        self.assertIs(table.listening("w1", handle.listenId), handle)

    def test_acceptedConnectionsAreHandedOff(self) -> None:
        """
        Connections accepted while a member listens are handed to it with
        real descriptors of the accepted connections.
        """
        table, handle = self.listeningTable()
        (client,) = self.connect(handle)
        self.readAll()
        self.assertEqual(len(self.sent.calls), 1)
        worker, listenId, fds, _ = self.sent.calls[0]
        self.closeLater(fds)
        self.assertEqual((worker, listenId, len(fds)), ("w1", handle.listenId, 1))
        accepted = socket.socket(fileno=os.dup(fds[0]))
        self.addCleanup(accepted.close)
        self.assertEqual(accepted.getpeername(), client.getsockname())
        self.assertEqual(handle.accepted, 1)

    def test_answerReleasesTheMastersCopies(self) -> None:
        """
        Once the worker answers that it took the connections, the master
        closes its copies.
        """
        table, handle = self.listeningTable()
        self.connect(handle, 2)
        self.readAll()
        fds = [fd for call in self.sent.calls for fd in call[2]]
        self.closeLater(fds)
        self.assertEqual(len(fds), 2)
        self.assertTrue(all(isOpen(fd) for fd in fds))
        for call in list(self.sent.calls):
            self.sent.answer(call)
        self.assertEqual([isOpen(fd) for fd in fds], [False, False])
        self.assertEqual(table.dropped, 0)

    def test_connectionsWaitForAListener(self) -> None:
        """
        Connections accepted before any member listens wait in the master
        and go out when one does.
        """
        table = self.makeTable()
        handle = table.query("w1", self.tcpKey())
        self.connect(handle, 2)
        self.readAll()
        self.assertEqual(self.sent.calls, [])
        self.assertEqual(handle.dispatcher.pending, 2)
        table.listening("w1", handle.listenId)
        self.closeLater(fd for call in self.sent.calls for fd in call[2])
        self.assertEqual(sum(len(call[2]) for call in self.sent.calls), 2)
        self.assertEqual(handle.dispatcher.pending, 0)

    def test_roundRobin(self) -> None:
        """
        Single connections go to the listening workers in turn.
        """
        table, handle = self.listeningTable(workers=("w1", "w2"))
        for _ in range(4):
            self.connect(handle)
            self.readAll()
            call = self.sent.calls[-1]
            self.closeLater(call[2])
            self.sent.answer(call)
        self.assertEqual([call[0] for call in self.sent.calls], ["w1", "w2", "w1", "w2"])

    def test_refusalRedistributes(self) -> None:
        """
        Connections a worker refuses go to another worker, and the refusing
        worker gets nothing more until it listens again.
        """
        table, handle = self.listeningTable(workers=("w1", "w2"))
        self.connect(handle)
        self.readAll()
        (first,) = self.sent.calls
        self.closeLater(first[2])
        self.sent.answer(first, 0)
        self.assertTrue(isOpen(first[2][0]))
        self.assertEqual(len(self.sent.calls), 2)
        second = self.sent.calls[1]
        self.assertNotEqual(second[0], first[0])
        self.assertEqual(second[2], first[2])
        self.sent.answer(second)
        self.assertFalse(isOpen(first[2][0]))
        self.connect(handle)
        self.readAll()
        third = self.sent.calls[2]
        self.closeLater(third[2])
        self.assertEqual(third[0], second[0])

    def test_lostChannelRedistributes(self) -> None:
        """
        A handoff that fails because the worker's channel closed goes to
        another worker.
        """
        table, handle = self.listeningTable(workers=("w1", "w2"))
        self.connect(handle)
        self.readAll()
        (first,) = self.sent.calls
        self.closeLater(first[2])
        first[3].errback(ConnectionDone())
        self.assertEqual(len(self.sent.calls), 2)
        self.assertNotEqual(self.sent.calls[1][0], first[0])
        self.assertEqual(self.sent.calls[1][2], first[2])

    def test_errorAnswerCountsAsTaken(self) -> None:
        """
        A worker that answers a handoff with an error may have adopted the
        connections: the master closes its copies rather than serve them
        twice, and reports the worker as misbehaving.
        """
        reports = []
        table, handle = self.listeningTable(
            workers=("w1", "w2"), badAnswer=lambda worker, why: reports.append((worker, why))
        )
        self.connect(handle)
        self.readAll()
        (first,) = self.sent.calls
        self.closeLater(first[2])
        first[3].errback(ValueError("the worker broke"))
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(len(self.sent.calls), 1)
        self.assertFalse(isOpen(first[2][0]))
        ((worker, why),) = reports
        self.assertEqual(worker, first[0])
        self.assertIn("answered a handoff of 1 connections on", why)
        self.assertIn("the worker broke", why)

    def test_loseRedistributesUnanswered(self) -> None:
        """
        C{lose} sends what a dead worker had not answered to the others.
        """
        table, handle = self.listeningTable(workers=("w1", "w2"))
        self.connect(handle)
        self.readAll()
        (first,) = self.sent.calls
        self.closeLater(first[2])
        table.lose(first[0], keepOrphans=True)
        self.assertEqual(len(self.sent.calls), 2)
        self.assertEqual(self.sent.calls[1][2], first[2])
        self.assertNotIn(first[0], handle.members)
        # A late answer from the dead worker changes nothing.
        self.sent.answer(first)
        self.assertTrue(isOpen(first[2][0]))

    def test_loseKeepsOrphans(self) -> None:
        """
        With C{keepOrphans}, a handle whose last worker is lost stays open
        and keeps its queue for the replacement.
        """
        table, handle = self.listeningTable()
        self.connect(handle)
        self.readAll()
        (first,) = self.sent.calls
        self.closeLater(first[2])
        table.lose("w1", keepOrphans=True)
        self.assertIs(table.get(handle.listenId), handle)
        self.assertIsNotNone(handle.sock)
        self.assertEqual(handle.dispatcher.pending, 1)
        table.query("w1b", self.tcpKey())
        table.listening("w1b", handle.listenId)
        self.assertEqual(self.sent.calls[-1][0], "w1b")
        self.assertEqual(self.sent.calls[-1][2], first[2])

    def test_loseWithoutOrphans(self) -> None:
        """
        Without C{keepOrphans}, losing the last worker closes the handle and
        the connections waiting on it (counted as dropped).
        """
        table, handle = self.listeningTable()
        self.connect(handle)
        self.readAll()
        (first,) = self.sent.calls
        self.closeLater(first[2])
        table.lose("w1", keepOrphans=False)
        self.assertIsNone(table.get(handle.listenId))
        self.assertIsNone(handle.sock)
        self.assertEqual(self.reactor.readers, set())
        self.assertFalse(isOpen(first[2][0]))
        self.assertEqual(table.dropped, 1)
        self.assertIn(f"closed 1 accepted connections on {handle.describe()}: no worker listens on it", self.messages())

    def test_maxPendingPausesAccepting(self) -> None:
        """
        While C{maxPending} connections wait for a worker the reactor stops
        reading the socket; it reads again once no more than half wait.
        """
        table = self.makeTable(maxPending=4)
        handle = table.query("w1", self.tcpKey())
        self.connect(handle, 4)
        self.readAll()
        self.assertEqual(handle.dispatcher.pending, 4)
        self.assertNotIn(handle.reader, self.reactor.readers)
        self.connect(handle, 1)
        self.readAll()
        self.assertEqual(handle.dispatcher.pending, 4)
        table.listening("w1", handle.listenId)
        self.closeLater(fd for call in self.sent.calls for fd in call[2])
        self.assertIn(handle.reader, self.reactor.readers)
        self.readAll()
        self.closeLater(fd for call in self.sent.calls for fd in call[2])
        self.assertEqual(handle.accepted, 5)

    def test_reportLoad(self) -> None:
        """
        With least-busy scheduling, connections go to the worker that
        reported the fewest open connections.
        """
        table, handle = self.listeningTable(workers=("w1", "w2"), scheduling="least-busy")
        table.reportLoad("w1", 10)
        table.reportLoad("w2", 1)
        self.connect(handle)
        self.readAll()
        self.closeLater(self.sent.calls[0][2])
        self.assertEqual(self.sent.calls[0][0], "w2")

    def test_leaveAll(self) -> None:
        """
        A worker taken out of every rotation gets no new connections, but
        its answer to an earlier handoff still counts.
        """
        table, handle = self.listeningTable(workers=("w1", "w2"))
        self.connect(handle)
        self.readAll()
        (first,) = self.sent.calls
        self.closeLater(first[2])
        table.leaveAll(first[0])
        self.sent.answer(first)
        self.assertFalse(isOpen(first[2][0]))
        for _ in range(2):
            self.connect(handle)
            self.readAll()
            self.closeLater(self.sent.calls[-1][2])
            self.sent.answer(self.sent.calls[-1])
        self.assertEqual(first[0], "w1")
        self.assertEqual([call[0] for call in self.sent.calls[1:]], ["w2", "w2"])

    def test_statistics(self) -> None:
        """
        C{statistics} describes each handle: address, scheduling, workers,
        accepted count and the dispatcher's queue.
        """
        table, handle = self.listeningTable(workers=("w1", "w2"))
        self.connect(handle)
        self.readAll()
        self.closeLater(self.sent.calls[0][2])
        (stats,) = table.statistics()
        self.assertEqual(stats.listenId, handle.listenId)
        self.assertEqual(stats.address, handle.describe())
        self.assertEqual((stats.scheduling, stats.workers, stats.accepted), ("rr", 2, 1))
        self.assertEqual(stats.dispatch.pending, 0)
        self.assertEqual(sum(m.inFlight for m in stats.dispatch.members), 1)


class OutOfResourcesTests(HandleTableTestsMixin, SynchronousTestCase):
    """
    An C{accept()} that fails for lack of descriptors pauses accepting for
    C{resourcePause} seconds instead of spinning on a readable socket.
    """

    def readWithoutDescriptors(self) -> None:
        """
        Read with this process's descriptor limit lowered so that the next
        new descriptor fails with C{EMFILE}.
        """
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowestFree = os.dup(0)
        os.close(lowestFree)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowestFree, hard))
        try:
            self.readAll()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def test_pauseThenResume(self) -> None:
        """
        After C{EMFILE} the socket is not read until C{resourcePause} has
        passed, even if the dispatcher runs meanwhile (here: a worker
        answers); then accepting resumes and the waiting connection goes
        out.
        """
        table = self.makeTable(resourcePause=0.5)
        handle = table.query("w1", self.tcpKey())
        table.listening("w1", handle.listenId)
        self.connect(handle, 2)
        handle.reader.acceptLimit = 1
        self.readAll()
        (first,) = self.sent.calls
        self.closeLater(first[2])
        self.readWithoutDescriptors()
        self.assertEqual(len(self.sent.calls), 1)
        self.assertNotIn(handle.reader, self.reactor.readers)
        self.assertTrue(
            any(m.startswith(f"cannot accept on {handle.describe()}") for m in self.messages())
        )
        self.sent.answer(first)
        self.assertNotIn(handle.reader, self.reactor.readers)
        self.reactor.advance(0.5)
        self.assertIn(handle.reader, self.reactor.readers)
        self.readAll()
        self.assertEqual(len(self.sent.calls), 2)
        self.closeLater(self.sent.calls[1][2])

    def test_closedWhilePaused(self) -> None:
        """
        A handle closed while accepting is paused is not read again when
        the pause ends.
        """
        table = self.makeTable(resourcePause=0.5)
        handle = table.query("w1", self.tcpKey())
        self.connect(handle)
        self.readWithoutDescriptors()
        self.assertNotIn(handle.reader, self.reactor.readers)
        table.close("w1", handle.listenId)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(0.5)
        self.assertEqual(self.reactor.readers, set())


class CloseTests(HandleTableTestsMixin, SynchronousTestCase):
    """
    Workers leave handles with C{close}; the last one out closes the socket.
    """

    def test_lastCloseClosesTheSocket(self) -> None:
        """
        The socket stays open while a member remains, and closes (and stops
        being read) when the last member closes; a later query binds afresh.
        """
        table = self.makeTable()
        handle = table.query("w1", self.tcpKey())
        table.query("w2", self.tcpKey())
        sock = handle.sock
        table.close("w1", handle.listenId)
        self.assertIsNotNone(handle.sock)
        self.assertEqual(handle.members, {"w2"})
        table.close("w2", handle.listenId)
        self.assertIsNone(handle.sock)
        self.assertEqual(sock.fileno(), -1)
        self.assertEqual(self.reactor.readers, set())
        self.assertIsNone(table.get(handle.listenId))
        again = table.query("w1", self.tcpKey())
        self.assertIsNot(again, handle)

    def test_closeByStranger(self) -> None:
        """
        C{close} from a worker that is not a member changes nothing.
        """
        table = self.makeTable()
        handle = table.query("w1", self.tcpKey())
        self.assertIsNone(table.close("w2", handle.listenId))
        self.assertIsNone(table.close("w1", handle.listenId + 1))
        self.assertIsNotNone(handle.sock)

    def test_lastCloseUnlinksUNIXPath(self) -> None:
        """
        Closing a UNIX socket's handle removes its path.
        """
        path = socketPath(self)
        table = self.makeTable()
        handle = table.query("w1", ListenKey("unix", path, 0, 0))
        self.assertTrue(os.path.exists(path))
        table.close("w1", handle.listenId)
        self.assertFalse(os.path.exists(path))

    def test_abstractUNIXName(self) -> None:
        """
        A UNIX socket in the abstract namespace (a name starting with a NUL
        byte) has no path: closing it unlinks nothing and does not fail.
        """
        name = "\0txcluster-test-" + str(os.getpid())
        table = self.makeTable()
        handle = table.query("w1", ListenKey("unix", name, 0, 0))
        self.assertEqual(handle.sock.getsockname(), name.encode())
        table.close("w1", handle.listenId)
        self.assertIsNone(handle.sock)
        self.assertEqual(table.handles(), [])

    def test_closeReleasesWaitingConnections(self) -> None:
        """
        Connections waiting on a handle its last worker closes are closed
        and counted as dropped.
        """
        table = self.makeTable()
        handle = table.query("w1", self.tcpKey())
        (client,) = self.connect(handle)
        self.readAll()
        table.close("w1", handle.listenId)
        self.assertEqual(table.dropped, 1)
        client.settimeout(5)
        self.assertEqual(client.recv(1), b"")


class ShutdownTests(HandleTableTestsMixin, SynchronousTestCase):
    """
    C{stopAccepting}, C{whenIdle} and C{closeAll}.
    """

    def test_stopAcceptingTakesWhatWaits(self) -> None:
        """
        C{stopAccepting} accepts the connections already waiting in the
        kernel, closes the listening socket and hands them out; C{whenIdle}
        fires once they are answered.
        """
        table = self.makeTable()
        handle = table.query("w1", self.tcpKey())
        table.listening("w1", handle.listenId)
        self.connect(handle, 3)
        table.stopAccepting()
        self.assertIsNone(handle.sock)
        self.assertEqual(self.reactor.readers, set())
        fds = [fd for call in self.sent.calls for fd in call[2]]
        self.closeLater(fds)
        self.assertEqual(len(fds), 3)
        idle = table.whenIdle()
        self.assertNoResult(idle)
        for call in list(self.sent.calls):
            self.sent.answer(call)
        self.assertIsNone(self.successResultOf(idle))
        # No new socket is read after stopAccepting, even for a new key.
        other = table.query("w1", self.tcpKey(index=1))
        self.assertNotIn(other.reader, self.reactor.readers)

    def test_whenIdleAtOnce(self) -> None:
        """
        C{whenIdle} fires at once when nothing waits.
        """
        table = self.makeTable()
        table.query("w1", self.tcpKey())
        self.successResultOf(table.whenIdle())

    def test_whenIdleCancelled(self) -> None:
        """
        A cancelled C{whenIdle} Deferred fails with L{CancelledError} and is
        forgotten: the table going idle later does not fire it again.
        """
        table = self.makeTable()
        handle = table.query("w1", self.tcpKey())
        table.listening("w1", handle.listenId)
        self.connect(handle)
        self.readAll()
        (call,) = self.sent.calls
        self.closeLater(call[2])
        idle = table.whenIdle()
        idle.cancel()
        self.failureResultOf(idle, defer.CancelledError)
        self.sent.answer(call)
        self.assertIsNone(self.successResultOf(call[3]))
        self.assertFalse(isOpen(call[2][0]))
        self.successResultOf(table.whenIdle())

    def test_closeAll(self) -> None:
        """
        C{closeAll} closes every socket and releases every waiting
        connection.
        """
        path = socketPath(self)
        table = self.makeTable()
        tcp = table.query("w1", self.tcpKey())
        unix = table.query("w1", ListenKey("unix", path, 0, 0))
        self.connect(tcp, 2)
        self.readAll()
        table.closeAll()
        self.assertEqual(table.handles(), [])
        self.assertIsNone(tcp.sock)
        self.assertIsNone(unix.sock)
        self.assertFalse(os.path.exists(path))
        self.assertEqual(table.dropped, 2)
        self.assertEqual(self.reactor.readers, set())

    def test_closeOrphans(self) -> None:
        """
        C{closeOrphans} closes the handles no worker shares and keeps the
        others.
        """
        table = self.makeTable()
        kept = table.query("w1", self.tcpKey(index=0))
        orphan = table.query("w2", self.tcpKey(index=1))
        table.lose("w2", keepOrphans=True)
        self.assertIsNotNone(orphan.sock)
        table.closeOrphans()
        self.assertIsNone(orphan.sock)
        self.assertEqual(table.handles(), [kept])

    def test_unknownScheduling(self) -> None:
        """
        An unknown scheduling is refused.
        """
        self.assertRaises(ValueError, HandleTable, self.reactor, "random", self.sent)
