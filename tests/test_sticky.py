"""
Tests for C{--scheduling sticky} in the master: L{ClientKeys} on real
loopback connections (their peers bound to chosen source addresses, their
PROXY headers peeked at and left in place), and a cluster of fake workers
dispatching by client.
"""

from __future__ import annotations

import os
import socket

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from txcluster._proxy import clientKey
from txcluster._sticky import PEEK_INTERVAL, ClientKeys, peerKey
from twisted.internet.address import IPv4Address

from tests.test_master import LOCAL, ClusterTestsMixin

HEADER = b"PROXY TCP4 203.0.113.%d 127.0.0.1 5555 80\r\n"


def key(host: str) -> bytes:
    return clientKey(IPv4Address("TCP", host, 1))


class Connections:
    """
    A listening socket on 127.0.0.1 and accepted connections from chosen
    source addresses, closed when the test ends.
    """

    def __init__(self, testCase) -> None:
        self.testCase = testCase
        self.server = socket.socket()
        testCase.addCleanup(self.server.close)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)

    def accept(self, source: str = "127.0.0.1", send: bytes = b""):
        client = socket.socket()
        self.testCase.addCleanup(client.close)
        client.bind((source, 0))
        client.connect(self.server.getsockname())
        if send:
            client.sendall(send)
        accepted, _ = self.server.accept()
        self.testCase.addCleanup(accepted.close)
        return client, accepted.fileno()


class ClientKeysTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.connections = Connections(self)
        self.admitted: list = []

    def test_peer(self) -> None:
        """
        Without C{--proxy-protocol} a connection is its peer's address,
        known at once.
        """
        keys = ClientKeys(self.clock)
        _, fd = self.connections.accept("127.0.0.7")
        keys.admit([fd], self.admitted.extend)
        self.assertEqual((self.admitted, keys.keyOf(fd), peerKey(fd)), ([fd], key("127.0.0.7"), key("127.0.0.7")))

    def test_header(self) -> None:
        """
        Under C{--proxy-protocol} it is the header's source, and the
        header stays for the worker to read.
        """
        keys = ClientKeys(self.clock, proxyProtocol=True)
        _, fd = self.connections.accept(send=HEADER % 9 + b"GET /")
        keys.admit([fd], self.admitted.extend)
        self.assertEqual((self.admitted, keys.keyOf(fd)), ([fd], key("203.0.113.9")))
        self.assertEqual(os.read(fd, 100), HEADER % 9 + b"GET /")

    def test_headerInPieces(self) -> None:
        """
        A header not whole yet is waited for (and counted as waiting).
        """
        keys = ClientKeys(self.clock, proxyProtocol=True)
        client, fd = self.connections.accept(send=b"PROXY TCP4 203.0")
        keys.admit([fd], self.admitted.extend)
        self.assertEqual((self.admitted, keys.waiting), ([], 1))
        client.sendall((HEADER % 4)[len(b"PROXY TCP4 203.0") :])
        self.clock.advance(PEEK_INTERVAL)
        self.assertEqual((self.admitted, keys.keyOf(fd), keys.waiting), ([fd], key("203.0.113.4"), 0))

    def test_slowOrMissing(self) -> None:
        """
        No header within the timeout, a bad one, or the end of the stream:
        the peer's address (the worker judges the header).
        """
        keys = ClientKeys(self.clock, proxyProtocol=True, timeout=1.0)
        _, silent = self.connections.accept("127.0.0.3")
        _, bad = self.connections.accept("127.0.0.4", send=b"GET / HTTP/1.1\r\n\r\n")
        closing, ended = self.connections.accept("127.0.0.5")
        closing.close()
        keys.admit([silent, bad, ended], self.admitted.extend)
        self.assertEqual(self.admitted, [bad, ended])
        self.clock.advance(0.5)
        self.assertEqual(self.admitted, [bad, ended])
        self.clock.advance(0.6)
        self.assertEqual(self.admitted, [bad, ended, silent])
        self.assertEqual([keys.keyOf(fd) for fd in (silent, bad, ended)], [key("127.0.0.3"), key("127.0.0.4"), key("127.0.0.5")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_untrustedAreNotWaitedFor(self) -> None:
        """
        A peer that may not send a header is not waited for: keyed by its
        address at once (its worker closes it).
        """
        from txcluster._proxy import AllowList

        keys = ClientKeys(self.clock, proxyProtocol=True, allow=AllowList.fromStrings(["127.0.0.2"]))
        _, stranger = self.connections.accept("127.0.0.8")
        _, balancer = self.connections.accept("127.0.0.2")
        keys.admit([stranger, balancer], self.admitted.extend)
        self.assertEqual((self.admitted, keys.waiting), ([stranger], 1))

    def test_waitingIsBounded(self) -> None:
        """
        At most L{MAX_WAITING} connections wait for their header; the next
        ones are keyed by their peer at once.
        """
        from txcluster import _sticky

        self.patch(_sticky, "MAX_WAITING", 2)
        keys = ClientKeys(self.clock, proxyProtocol=True)
        fds = [self.connections.accept()[1] for _ in range(3)]
        keys.admit(fds, self.admitted.extend)
        self.assertEqual((self.admitted, keys.waiting), ([fds[2]], 2))

    def test_stop(self) -> None:
        """
        On stop, what waits goes on at once, by its peer.
        """
        keys = ClientKeys(self.clock, proxyProtocol=True)
        _, fd = self.connections.accept("127.0.0.6")
        keys.admit([fd], self.admitted.extend)
        keys.stop()
        self.assertEqual((self.admitted, keys.keyOf(fd), self.clock.getDelayedCalls()), ([fd], key("127.0.0.6"), []))


class StickyClusterTests(ClusterTestsMixin, SynchronousTestCase):
    """
    A sticky cluster of fake workers.
    """

    def connectFrom(self, source: str, send: bytes = b""):
        handle = self.handle()
        client = socket.socket()
        self.addCleanup(client.close)
        client.bind((source, 0))
        client.connect((handle.host, handle.port))
        if send:
            client.sendall(send)
        for reader in list(self.reactor.readers):
            reader.doRead()
        self.spawner.flush()

    def owner(self, before: dict) -> int:
        (workerId,) = [w.workerId for w in self.spawner.running() if len(w.connections) > before[w]]
        return workerId

    def counts(self) -> dict:
        return {w: len(w.connections) for w in self.spawner.running()}

    def test_oneClientOneWorker(self) -> None:
        """
        Every connection of a client address goes to the same worker; the
        clients spread over the workers.
        """
        self.readyCluster(3, listens=[LOCAL], scheduling="sticky")
        owners = {}
        for round in range(3):
            for n in range(2, 12):
                before = self.counts()
                self.connectFrom(f"127.0.0.{n}")
                owners.setdefault(n, set()).add(self.owner(before))
        self.assertTrue(all(len(o) == 1 for o in owners.values()), owners)
        self.assertGreater(len({next(iter(o)) for o in owners.values()}), 1)

    def test_proxyHeader(self) -> None:
        """
        Under C{--proxy-protocol} the client is the header's: one source
        address, many clients; the worker gets the header unread.
        """
        self.readyCluster(3, listens=[LOCAL], scheduling="sticky", proxyProtocol=True)
        owners = {}
        for n in list(range(1, 10)) * 2:
            before = self.counts()
            self.connectFrom("127.0.0.1", HEADER % n)
            owners.setdefault(n, set()).add(self.owner(before))
        self.assertTrue(all(len(o) == 1 for o in owners.values()), owners)
        self.assertGreater(len({next(iter(o)) for o in owners.values()}), 1)
        worker = self.worker(next(iter(owners[1])))
        self.assertTrue(os.read(worker.connections[0], 100).startswith(b"PROXY TCP4 203.0.113."))

    def test_replacementTakesTheClients(self) -> None:
        """
        A recycled worker's clients go to its replacement (same id).
        """
        cluster = self.readyCluster(2, listens=[LOCAL], scheduling="sticky")
        before = self.counts()
        self.connectFrom("127.0.0.9")
        workerId = self.owner(before)
        old = self.worker(workerId)
        cluster.recycle(workerId)
        self.worker(workerId).start([LOCAL])
        new = self.worker(workerId)
        self.assertIsNot(new, old)
        self.connectFrom("127.0.0.9")
        self.assertEqual(len(new.connections), 1)
