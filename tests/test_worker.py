"""
Unit tests for the worker side: L{txcluster._worker} and
L{txcluster._intercept}, with fakes for the channel and the reactor (and,
for the synchronous call, a real socketpair whose far end a thread
answers, since the call blocks).
"""

import json
import os
import socket
import struct
import threading

from twisted.internet import defer, error, reactor, task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol

try:
    from twisted.internet.tcp import makeBinding
except ImportError:  # Twisted before 26.10
    makeBinding = None
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from txcluster import _commands, _worker
from txcluster._intercept import exclusive, interceptListens, isExclusive
from txcluster._twistedcompat import SharedUNIXPort
from txcluster._worker import (
    MasterUnavailable,
    Worker,
    _osError,
    encodeMessage as _encodeMessage,
)

from tests._harness import socketPath


class FakeChannel:
    """
    Stands in for L{_worker.WorkerChannel}: answers C{QueryServer} from a
    script and records every call.
    """

    def __init__(self, answers=None) -> None:
        self.calls: list = []
        self.answers = answers or {}
        self.transport = object()
        self.nextListenId = 1

    def callSync(self, command, **kw):
        self.calls.append((command, kw))
        answer = self.answers.get((kw["kind"], kw["port"], kw["index"]))
        if isinstance(answer, Exception):
            raise answer
        if answer is None:
            answer = {"listenId": self.nextListenId, "scheduling": "rr", "host": "127.0.0.1", "port": 4000 + self.nextListenId, "fd": None}
        self.nextListenId += 1
        return answer

    def callRemote(self, command, **kw):
        self.calls.append((command, kw))
        return defer.succeed({})

    def sent(self, command):
        return [kw for c, kw in self.calls if c is command]


def fakeWorker(answers=None):
    worker = Worker(MemoryReactorClock(), 2, 3, masterPid=1)
    worker.channel = FakeChannel(answers)
    return worker


class ListenTests(unittest.SynchronousTestCase):
    def test_indexesShareEphemeralPorts(self):
        """
        A worker's n-th concurrent listen on the same address gets index n,
        so that every worker's n-th listen(0) maps to one key; a closed
        listen frees its index.
        """
        worker = fakeWorker()
        first = worker.listenStream("tcp4", "127.0.0.1", 0, Factory())
        second = worker.listenStream("tcp4", "127.0.0.1", 0, Factory())
        other = worker.listenStream("tcp4", "127.0.0.1", 8080, Factory())
        indexes = [(kw["port"], kw["index"]) for kw in worker.channel.sent(_commands.QueryServer)]
        self.assertEqual(indexes, [(0, 0), (0, 1), (8080, 0)])
        first.stopListening()
        worker.listenStream("tcp4", "127.0.0.1", 0, Factory())
        self.assertEqual(worker.channel.sent(_commands.QueryServer)[-1]["index"], 0)
        self.assertTrue(second.listening and other.listening)

    def test_portReportsTheRealAddress(self):
        """
        The port a listen returns provides IListeningPort, reports the
        master's bound address, starts its factory, and announces Listening.
        """
        worker = fakeWorker()
        factory = Factory()
        starts = []
        factory.doStart = lambda: starts.append(True)
        port = worker.listenStream("tcp4", "", 0, factory)
        self.assertTrue(verifyObject(IListeningPort, port))
        self.assertEqual(port.getHost(), IPv4Address("TCP", "127.0.0.1", 4001))
        self.assertEqual(starts, [True])
        self.assertEqual(worker.channel.sent(_commands.Listening), [{"listenId": 1}])
        v6 = worker.listenStream("tcp6", "::1", 0, Factory())
        self.assertIsInstance(v6.getHost(), IPv6Address)

    def test_unixPathsAreAbsolute(self):
        """
        A relative UNIX path is made absolute (the master's directory may
        differ); an abstract name is kept.
        """
        worker = fakeWorker()
        worker.listenStream("unix", "app.sock", 0, Factory())
        worker.listenStream("unix", "\0abstract", 0, Factory())
        addresses = [kw["address"] for kw in worker.channel.sent(_commands.QueryServer)]
        self.assertEqual(addresses, [os.path.abspath("app.sock"), "\0abstract"])
        port = worker._ports[1]
        self.assertIsInstance(port.getHost(), UNIXAddress)

    def test_namesAreResolvedInTheWorker(self):
        """
        An interface given by name is resolved by the worker (the master
        takes numeric addresses only); a name that does not resolve is a
        CannotListenError naming it.
        """
        worker = fakeWorker()
        worker.listenStream("tcp4", "localhost", 0, Factory())
        self.assertEqual(worker.channel.sent(_commands.QueryServer)[0]["address"], "127.0.0.1")
        with self.assertRaises(error.CannotListenError) as e:
            worker.listenStream("tcp4", "no-such-host.invalid", 0, Factory())
        self.assertIn("no-such-host.invalid", str(e.exception))
        self.assertEqual(len(worker.channel.sent(_commands.QueryServer)), 1)

    def test_bindErrorBecomesCannotListen(self):
        """
        BindFailed from the master becomes CannotListenError carrying the
        OS error (errno and message); nothing is remembered, so the same
        listen can be tried again.
        """
        worker = fakeWorker({("tcp4", 80, 0): _commands.BindFailed("98 Address already in use")})
        with self.assertRaises(error.CannotListenError) as e:
            worker.listenStream("tcp4", "127.0.0.1", 80, Factory())
        self.assertEqual(e.exception.socketError.errno, 98)
        self.assertIn("127.0.0.1:80", str(e.exception))
        self.assertIn("Address already in use", str(e.exception))
        self.assertEqual(worker._ports, {})
        self.assertEqual(worker._indexes[("tcp4", "127.0.0.1", 80)], set())

    def test_refusedAndUnavailable(self):
        """
        A refused listen raises CannotListenError with a PermissionError; a
        master that cannot be reached raises it too.
        """
        worker = fakeWorker({
            ("tcp4", 81, 0): _commands.ListenRefused("tcp:0.0.0.0:81: not allowed"),
            ("tcp4", 82, 0): MasterUnavailable("gone"),
        })
        with self.assertRaises(error.CannotListenError) as e:
            worker.listenStream("tcp4", "", 81, Factory())
        self.assertIsInstance(e.exception.socketError, PermissionError)
        with self.assertRaises(error.CannotListenError) as e:
            worker.listenStream("tcp4", "", 82, Factory())
        self.assertIsInstance(e.exception.socketError, MasterUnavailable)

    def test_noListenWhileDisconnecting(self):
        """
        A worker that is leaving the cluster does not start new listens.
        """
        worker = fakeWorker()
        worker.disconnecting = True
        with self.assertRaises(error.CannotListenError):
            worker.listenStream("tcp4", "", 0, Factory())
        self.assertEqual(worker.channel.sent(_commands.QueryServer), [])

    def test_stopListeningClosesOnce(self):
        """
        stopListening sends Close once, stops the factory, and fires.
        """
        worker = fakeWorker()
        factory = Factory()
        stops = []
        factory.doStop = lambda: stops.append(True)
        port = worker.listenStream("tcp4", "", 0, factory)
        d1, d2 = port.stopListening(), port.stopListening()
        self.successResultOf(d1)
        self.successResultOf(d2)
        self.assertEqual(worker.channel.sent(_commands.Close), [{"listenId": 1}])
        self.assertEqual(stops, [True])

    def test_leastBusyReportsLoad(self):
        """
        On a least-busy handle, the worker reports its open connections when
        some closed (openings travel in NewConn answers), at most every
        LOAD_REPORT_INTERVAL.
        """
        worker = fakeWorker({("tcp4", 0, 0): {"listenId": 9, "scheduling": "least-busy", "host": "127.0.0.1", "port": 5000, "fd": None}})
        worker.listenStream("tcp4", "", 0, Factory())

        class Connection:
            def connectionLost(self, reason):
                pass

        connections = [Connection() for _ in range(3)]
        for c in connections:
            worker.tracker.track(c)
        worker.reactor.advance(1)
        self.assertEqual(worker.channel.sent(_commands.LoadReport), [])
        connections[0].connectionLost(None)
        connections[1].connectionLost(None)
        worker.reactor.advance(_commands.LOAD_REPORT_INTERVAL / 2)
        self.assertEqual(worker.channel.sent(_commands.LoadReport), [])
        worker.reactor.advance(_commands.LOAD_REPORT_INTERVAL)
        self.assertEqual(worker.channel.sent(_commands.LoadReport), [{"connections": 1}])


class AdoptionTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.worker = fakeWorker()
        self.port = self.worker.listenStream("tcp4", "127.0.0.1", 0, Factory.forProtocol(Protocol))
        self.pairs = [socket.socketpair() for _ in range(3)]
        for a, b in self.pairs:
            self.addCleanup(a.close)
            self.addCleanup(b.close)

    def fds(self):
        return [os.dup(a.fileno()) for a, b in self.pairs]

    def test_adoptsInOrderAndClosesItsCopies(self):
        """
        NewConn's connections are adopted in order, non-blocking, with the
        port's factory and family; the received descriptors are closed
        (adoption duplicates them) and the answer is how many were taken.
        """
        fds = self.fds()
        self.assertEqual(self.worker._adopt(self.port.listenId, fds), 3)
        adopted = self.worker.reactor.adoptedStreamConnections
        self.assertEqual([fd for fd, family, factory in adopted], fds)
        self.assertEqual({family for fd, family, factory in adopted}, {socket.AF_INET})
        for fd in fds:
            self.assertRaises(OSError, os.fstat, fd)
        for a, b in self.pairs:
            self.assertFalse(os.get_blocking(a.fileno()))

    def test_refusesAfterStopListening(self):
        """
        Connections for a listen the worker closed are refused (0 taken)
        and their descriptors closed.
        """
        self.port.stopListening()
        fds = self.fds()
        self.assertEqual(self.worker._adopt(self.port.listenId, fds), 0)
        self.assertEqual(self.worker.reactor.adoptedStreamConnections, [])
        for fd in fds:
            self.assertRaises(OSError, os.fstat, fd)

    def test_refusesUnknownListenAndWhileLeaving(self):
        """
        An unknown listen id, or a worker that is disconnecting, takes
        nothing.
        """
        fds = self.fds()
        self.assertEqual(self.worker._adopt(99, fds), 0)
        self.worker.disconnecting = True
        fds = self.fds()
        self.assertEqual(self.worker._adopt(self.port.listenId, fds), 0)
        for fd in fds:
            self.assertRaises(OSError, os.fstat, fd)

    def test_brokenConnectionIsTakenAndLogged(self):
        """
        A descriptor that cannot be adopted counts as taken (giving it to
        another worker would not help) and is logged.
        """
        notASocket, w = os.pipe()
        os.close(w)
        self.assertEqual(self.worker._adopt(self.port.listenId, [notASocket]), 1)
        self.assertRaises(OSError, os.fstat, notASocket)


class _Connection:
    """
    A connection a worker tracks: it can be aborted.
    """

    def __init__(self) -> None:
        self.aborted = False

    def connectionLost(self, reason):
        pass

    def abortConnection(self):
        self.aborted = True
        self.connectionLost(None)


def leavingWorker():
    """
    A fake worker whose reactor stops are recorded in C{worker.stops}.
    """
    worker = fakeWorker()
    worker.stops = []
    worker._stopReactor = lambda: worker.stops.append(True)
    return worker


class DrainTests(unittest.SynchronousTestCase):
    def test_disconnectStopsTheApplicationAtOnce(self):
        """
        disconnect() closes every listen and starts the reactor's shutdown
        (the application's stopService) at once; its Deferred fires once
        the open connections have ended.
        """
        worker = leavingWorker()
        worker.leaveRequested = True
        worker.listenStream("tcp4", "", 0, Factory())
        c = _Connection()
        worker.tracker.track(c)
        d = worker.disconnect(timeout=10)
        self.assertEqual(worker.channel.sent(_commands.Close), [{"listenId": 1}])
        self.assertEqual(worker.stops, [True])
        self.assertNoResult(d)
        c.connectionLost(None)
        self.successResultOf(d)
        self.assertFalse(c.aborted)
        self.assertEqual(self.successResultOf(worker.disconnect()), None)
        self.assertEqual(worker.stops, [True])

    def test_disconnectEndsBeforeTheMastersDeadline(self):
        """
        The worker waits for its connections for a little less than it was
        given, so that it ends by itself before the master kills it: the
        connections still open then are closed.
        """
        worker = leavingWorker()
        c = _Connection()
        worker.tracker.track(c)
        d = worker.disconnect(timeout=5)
        worker.reactor.advance(_worker.ownDeadline(5) - 0.01)
        self.assertNoResult(d)
        self.assertFalse(c.aborted)
        worker.reactor.advance(0.02)
        self.successResultOf(d)
        self.assertTrue(c.aborted)
        self.assertEqual(worker.openConnections, 0)

    def test_ownDeadline(self):
        """
        A tenth of the time given, at least half a second and at most a
        second, is left for the application's shutdown and the exit.
        """
        self.assertEqual(_worker.ownDeadline(30), 29.0)
        self.assertEqual(_worker.ownDeadline(8), 7.2)
        self.assertEqual(_worker.ownDeadline(2), 1.5)
        self.assertEqual(_worker.ownDeadline(0.3), 0.0)
        self.assertEqual(_worker.ownDeadline(0), 0.0)

    def test_leavingOnItsOwnTellsTheMaster(self):
        """
        A worker that leaves without being asked (its application called
        disconnect(), it was sent SIGTERM) tells the master why, so that
        the master replaces it without calling it a failure.
        """
        worker = leavingWorker()
        worker.disconnect()
        self.assertEqual(worker.channel.sent(_commands.Leaving), [{"why": "disconnect()"}])
        worker = leavingWorker()
        worker.disconnect(3, "SIGTERM")
        self.assertEqual(worker.channel.sent(_commands.Leaving), [{"why": "SIGTERM"}])

    def test_askedToLeaveSaysNothing(self):
        """
        A worker the master asked to leave does not tell it anything.
        """
        worker = leavingWorker()
        worker.leaveRequested = True
        worker.disconnect(3)
        self.assertEqual(worker.channel.sent(_commands.Leaving), [])

    def test_theApplicationStoppedTheReactor(self):
        """
        When the application stops the reactor itself, the worker's
        shutdown trigger leaves the cluster (telling the master) and makes
        the shutdown wait for the open connections.
        """
        worker = leavingWorker()
        worker.listenStream("tcp4", "", 0, Factory())
        c = _Connection()
        worker.tracker.track(c)
        d = worker.beforeShutdown()
        self.assertEqual(
            worker.channel.sent(_commands.Leaving), [{"why": "the application stopped the reactor"}]
        )
        self.assertEqual(worker.channel.sent(_commands.Close), [{"listenId": 1}])
        self.assertEqual(worker.stops, [])
        self.assertNoResult(d)
        c.connectionLost(None)
        self.successResultOf(d)

    def test_masterGoneExitsSoon(self):
        """
        When the channel closes under a worker that was not leaving, it
        makes sure to be gone within ORPHAN_EXIT_SECONDS and stops.
        """
        worker = leavingWorker()
        timers = []
        self.patch(_worker, "exitSoon", timers.append)
        worker._masterGone(None)
        self.assertEqual(timers, [_worker.ORPHAN_EXIT_SECONDS])
        self.assertEqual(worker.stops, [True])
        self.assertIsNone(worker.channel)


class MetricsTests(unittest.SynchronousTestCase):
    def test_lastMetricsOnceDrained(self):
        """
        A leaving worker whose application uses prometheus_client sends the
        master its last metrics (FinalMetrics) once its connections are
        gone; the shutdown waits for the master's answer.
        """
        import prometheus_client

        served = prometheus_client.Counter("test_worker_served", "Requests.")
        self.addCleanup(prometheus_client.REGISTRY.unregister, served)
        served.inc(3)
        worker = leavingWorker()
        answer = defer.Deferred()
        calls = worker.channel.calls
        worker.channel.callRemote = lambda command, **kw: (calls.append((command, kw)), answer)[1]
        c = _Connection()
        worker.tracker.track(c)
        d = worker.beforeShutdown()
        self.assertEqual(worker.channel.sent(_commands.FinalMetrics), [])
        c.connectionLost(None)
        [sent] = worker.channel.sent(_commands.FinalMetrics)
        self.assertIn("\ntest_worker_served_total 3.0\n", sent["metrics"])
        self.assertNoResult(d)
        answer.callback({})
        self.successResultOf(d)

    def test_masterThatDoesNotAnswer(self):
        """
        A master that does not take the last metrics within
        FINAL_METRICS_TIMEOUT does not hold up the exit.
        """
        import prometheus_client  # noqa: F401

        worker = leavingWorker()
        worker.channel.callRemote = lambda command, **kw: defer.Deferred()
        d = worker.beforeShutdown()
        self.assertNoResult(d)
        worker.reactor.advance(_worker.FINAL_METRICS_TIMEOUT)
        self.successResultOf(d)

    def test_noPrometheusNoMetrics(self):
        """
        A worker whose application does not use prometheus_client has no
        metrics to give and does not import it for that.
        """
        import sys

        self.patch(sys, "modules", {k: v for k, v in sys.modules.items() if not k.startswith("prometheus_client")})
        worker = leavingWorker()
        self.assertEqual(worker.metricsText(), "")
        self.successResultOf(worker.beforeShutdown())
        self.assertEqual(worker.channel.sent(_commands.FinalMetrics), [])
        self.assertNotIn("prometheus_client", sys.modules)

    def test_metricsTooLarge(self):
        """
        Metrics too large for the channel are not sent (the master keeps
        its last report): the worker says so once.
        """
        import prometheus_client  # noqa: F401

        self.patch(_commands.CompressedText, "PIECES", 0)
        worker = leavingWorker()
        logged = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.assertRaises(_commands.MetricsUnavailable, worker.metricsText)
        self.assertRaises(_commands.MetricsUnavailable, worker.metricsText)
        self.assertEqual(len([e for e in logged if "too large to report" in e.get("log_format", "")]), 1)
        self.successResultOf(worker.beforeShutdown())
        self.assertEqual(worker.channel.sent(_commands.FinalMetrics), [])


class MessageTests(unittest.SynchronousTestCase):
    def test_encodeLimit(self):
        """
        Messages are JSON; one that does not fit in an AMP value is refused
        with MessageTooLarge saying how big it was.
        """
        self.assertEqual(json.loads(_encodeMessage({"a": [1, 2]})), {"a": [1, 2]})
        with self.assertRaises(_commands.MessageTooLarge) as e:
            _encodeMessage("x" * 70000)
        self.assertIn("65535", str(e.exception))
        with self.assertRaises(TypeError):
            _encodeMessage(object())

    def test_observers(self):
        """
        Message observers get every message; one that raises does not stop
        the others.
        """
        worker = fakeWorker()
        seen = []

        def broken(message):
            raise RuntimeError("observer bug")

        worker.addMessageObserver(broken)
        worker.addMessageObserver(seen.append)
        worker._deliver({"hello": 1})
        self.assertEqual(seen, [{"hello": 1}])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        worker.removeMessageObserver(broken)
        worker.removeMessageObserver(seen.append)
        worker._deliver(2)
        self.assertEqual(seen, [{"hello": 1}])

    def test_osError(self):
        """
        BindFailed's description becomes an OSError with its errno.
        """
        e = _osError("13 Permission denied")
        self.assertEqual((e.errno, e.strerror), (13, "Permission denied"))
        self.assertEqual(str(_osError("weird")), "weird")


class ClusterPort:
    """
    What the recording worker returns for a listen.
    """


class InterceptTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.reactor.udpPorts = {}
        # MemoryReactor has no listenUDP: record like its other listens.
        self.reactor.listenUDP = lambda port, protocol, interface="", maxPacketSize=8192: (
            self.reactor.udpPorts.setdefault(port, (protocol, interface, maxPacketSize))
        )
        self.calls = []
        worker = self

        class Recorder:
            def listenStream(self, *args):
                worker.calls.append(("stream",) + args)
                return ClusterPort()

            def listenDatagram(self, *args):
                worker.calls.append(("datagram",) + args)
                return ClusterPort()

        interceptListens(self.reactor, Recorder())

    def test_tcp(self):
        """
        listenTCP asks the master, with the kind its interface implies.
        """
        f = Factory()
        self.assertIsInstance(self.reactor.listenTCP(8080, f), ClusterPort)
        self.reactor.listenTCP(0, f, backlog=7, interface="::1")
        self.assertEqual(self.calls, [("stream", "tcp4", "", 8080, f, 50), ("stream", "tcp6", "::1", 0, f, 7)])

    def test_exclusiveBindsLocally(self):
        """
        An exclusive factory, or a reusePort binding, binds in the worker
        (the reactor's own listenTCP); a plain binding asks the master.
        """
        f = exclusive(Factory())
        self.assertTrue(isExclusive(f))
        self.reactor.listenTCP(9000, f)
        self.assertEqual(self.calls, [])
        self.assertEqual(self.reactor.tcpServers[-1][:2], (9000, f))
        if makeBinding is None:
            return
        self.reactor.listenTCP(makeBinding("127.0.0.1", 9001, reusePort=True), Factory())
        self.assertEqual(self.calls, [])
        g = Factory()
        self.reactor.listenTCP(makeBinding("127.0.0.1", 9002), g)
        self.assertEqual(self.calls, [("stream", "tcp4", "127.0.0.1", 9002, g, 50)])

    def test_ssl(self):
        """
        listenSSL asks the master for a TCP socket and wraps the factory in
        TLS in the worker.
        """
        from twisted.protocols.tls import TLSMemoryBIOFactory

        f = Factory()
        from twisted.internet.ssl import CertificateOptions

        port = self.reactor.listenSSL(443, f, CertificateOptions(), interface="127.0.0.1")
        (call,) = self.calls
        self.assertEqual(call[:4], ("stream", "tcp4", "127.0.0.1", 443))
        self.assertIsInstance(call[4], TLSMemoryBIOFactory)
        self.assertIs(call[4].wrappedFactory, f)
        self.assertIsInstance(port, ClusterPort)
        self.assertEqual(port._type, "TLS")

    def test_unixAndUDP(self):
        """
        listenUNIX (bytes paths decoded) and listenUDP ask the master;
        exclusive UDP protocols bind locally.
        """
        f = Factory()
        self.reactor.listenUNIX(b"/tmp/x.sock", f, mode=0o600)
        p = DatagramProtocol()
        self.reactor.listenUDP(53, p, interface="127.0.0.1")
        self.assertEqual(
            self.calls,
            [("stream", "unix", "/tmp/x.sock", 0, f, 50, 0o600), ("datagram", "udp4", "127.0.0.1", 53, p, 8192)],
        )
        self.reactor.listenUDP(54, exclusive(DatagramProtocol()))
        self.assertEqual(len(self.calls), 2)
        self.assertEqual(self.reactor.udpPorts[54][0].__class__, DatagramProtocol)


class SynchronousCallTests(unittest.TestCase):
    """
    L{_worker.WorkerChannel.callSync} over a real socketpair, answered by a
    thread playing the master.
    """

    timeout = 10

    def setUp(self):
        self.patch(_worker, "exitSoon", lambda seconds: None)
        self.worker = Worker(reactor, 1, 1)
        self.worker._stopReactor = lambda: None
        ours, self.master = socket.socketpair()
        self.addCleanup(self.master.close)
        self.channel = self.worker.connect(os.dup(ours.fileno()))
        ours.close()
        self.addCleanup(self._disconnect)
        self.messages = []
        self.worker.addMessageObserver(self.messages.append)

    async def _disconnect(self):
        # Wait until the channel really is gone, while exitSoon is still
        # patched: a worker whose channel closes makes sure it exits.
        if self.channel.transport is not None:
            self.channel.transport.loseConnection()
        for _ in range(200):
            if self.channel.transport is None:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        self.assertIsNone(self.channel.transport)

    def playMaster(self, before=(), answer=True, close=False):
        """
        In a thread: read boxes until QueryServer, then send the boxes in
        C{before}, then the answer (or close the socket).
        """

        def run():
            buffer = b""
            while True:
                data = self.master.recv(65536)
                if not data:
                    return
                buffer += data
                boxes = amp.parseString(buffer)
                queries = [b for b in boxes if b.get(b"_command") == b"QueryServer"]
                if queries:
                    break
            for box in before:
                self.master.sendall(amp.AmpBox(box).serialize())
            if close:
                self.master.shutdown(socket.SHUT_RDWR)
            elif answer:
                self.master.sendall(
                    amp.AmpBox(
                        {
                            b"_answer": queries[0][b"_ask"],
                            b"listenId": b"7",
                            b"scheduling": b"rr",
                            b"host": b"127.0.0.1",
                            b"port": b"4321",
                        }
                    ).serialize()
                )

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)

    def query(self, **kw):
        return self.channel.callSync(
            _commands.QueryServer, kind="tcp4", address="", port=0, index=0, backlog=50, mode=0o666, **kw
        )

    async def test_answerWhileCommandsWait(self):
        """
        The call returns the master's answer; commands that arrived before
        it wait, and run afterwards in arrival order, outside the call.
        """
        self.playMaster(
            before=[
                {b"_command": b"ToWorker", b"message": b'"first"'},
                {b"_command": b"ToWorker", b"message": b'"second"'},
            ]
        )
        answer = self.query()
        self.assertEqual((answer["listenId"], answer["port"], answer["host"]), (7, 4321, "127.0.0.1"))
        self.assertEqual(self.messages, [])
        await task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.messages, ["first", "second"])

    async def test_channelClosed(self):
        """
        A channel that closes while the call waits raises MasterUnavailable.
        """
        self.playMaster(close=True)
        with self.assertRaises(MasterUnavailable):
            self.query()

    async def test_timeout(self):
        """
        A master that does not answer in time raises MasterUnavailable
        naming the command.
        """
        self.playMaster(answer=False)
        with self.assertRaises(MasterUnavailable) as e:
            self.query(timeout=0.3)
        self.assertIn("QueryServer", str(e.exception))

    async def test_lateAnswerDescriptorClosed(self):
        """
        An answer that arrives after the call gave up has its descriptor
        closed: nothing else would ever close it.
        """
        readEnd, writeEnd = os.pipe()
        self.addCleanup(os.close, readEnd)
        asked = threading.Event()

        def run():
            buffer = b""
            while b"QueryServer" not in buffer:
                buffer += self.master.recv(65536)
            (query,) = [b for b in amp.parseString(buffer) if b.get(b"_command") == b"QueryServer"]
            asked.wait(5)
            answer = amp.AmpBox(
                {
                    b"_answer": query[b"_ask"],
                    b"listenId": b"7",
                    b"scheduling": b"shared",
                    b"host": b"127.0.0.1",
                    b"port": b"4321",
                    b"fd": b"0",
                }
            ).serialize()
            self.master.sendmsg([answer], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", writeEnd))])
            os.close(writeEnd)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        with self.assertRaises(MasterUnavailable):
            self.query(timeout=0.2)
        asked.set()
        # The worker's reactor reads the late answer; once its copy of the
        # pipe's write end is closed (the thread closed its own), the read
        # end sees the end of the pipe.
        os.set_blocking(readEnd, False)
        for _ in range(200):
            await task.deferLater(reactor, 0.01, lambda: None)
            try:
                if os.read(readEnd, 1) == b"":
                    break
            except BlockingIOError:
                continue
        else:
            self.fail("the late answer's descriptor was not closed")


class SharedUNIXPortTests(unittest.TestCase):
    """
    L{SharedUNIXPort}: a worker's copy of the master's UNIX socket.
    """

    async def test_leavesTheMastersSocketAlone(self):
        """
        Starting and stopping a shared UNIX port keeps the socket file, its
        permissions, and the master's listening socket working.
        """
        path = socketPath(self)
        master = socket.socket(socket.AF_UNIX)
        self.addCleanup(master.close)
        master.bind(path)
        os.chmod(path, 0o600)
        master.listen(5)
        fd = os.dup(master.fileno())
        os.set_blocking(fd, False)
        port = SharedUNIXPort.adopt(reactor, fd, Factory.forProtocol(Protocol))
        os.close(fd)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        await port.stopListening()
        self.assertTrue(os.path.exists(path))
        client = socket.socket(socket.AF_UNIX)
        self.addCleanup(client.close)
        client.connect(path)
        accepted, _ = master.accept()
        accepted.close()
