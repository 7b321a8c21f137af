"""
L{txcluster._loadboard}: the load board in shared memory, and the fair
accept gate over a real Twisted TCP port driven by hand.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from twisted.internet import tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from txcluster._commands import ENV_LOAD_SLOT
from txcluster._loadboard import ACCEPT_PAUSE, FREE, SLOTS, YIELD, AcceptGate, LoadBoard

from tests.test_master import LOCAL, ClusterTestsMixin


def board(testCase) -> tuple[LoadBoard, int]:
    made, fd = LoadBoard.create()
    testCase.addCleanup(os.close, fd)
    testCase.addCleanup(made.close)
    return made, fd


class LoadBoardTests(unittest.SynchronousTestCase):
    """
    Slots, and each worker's allowance from what the others hold.
    """

    def test_slots(self) -> None:
        """
        A new board is all free; C{assign} takes the first free slot not
        taken (reading 0), C{free} gives it back.
        """
        b, _ = board(self)
        self.assertEqual([b.read(s) for s in (0, 1, SLOTS - 1)], [FREE] * 3)
        self.assertEqual(b.assign(set()), 0)
        self.assertEqual(b.assign(set()), 1)
        b.free(0)
        self.assertEqual(b.assign({0}), 2)
        self.assertEqual(b.assign(set()), 0)
        self.assertEqual(b.read(0), 0)

    def test_allowance(self) -> None:
        """
        Alone, a worker has no limit; with others it may hold its share of
        the cluster's connections (counting the next one) plus one.
        """
        b, _ = board(self)
        me, other = b.assign(set()), b.assign(set())
        b.free(other)
        b.write(me, 50)
        self.assertIsNone(b.allowance(me))
        b.write(other, 0)
        b.write(me, 0)
        self.assertEqual(b.allowance(me), 2)
        b.write(me, 2)
        self.assertEqual(b.allowance(me), 1)
        b.write(me, 3)
        self.assertEqual(b.allowance(me), 0)
        b.write(other, 14)
        b.write(me, 16)
        self.assertEqual(b.allowance(me), 1)
        b.write(me, 17)
        self.assertEqual(b.allowance(me), 0)
        self.assertEqual(b.allowance(other), 3)

    def test_sharedWithAnotherProcess(self) -> None:
        """
        A process that inherits the board's descriptor writes to the same
        memory.
        """
        b, fd = board(self)
        slot = b.assign(set())
        code = (
            "import sys; from txcluster._loadboard import LoadBoard; "
            "LoadBoard(int(sys.argv[1])).write(int(sys.argv[2]), 42)"
        )
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        subprocess.run([sys.executable, "-c", code, str(fd), str(slot)], pass_fds=[fd], env=env, check=True, timeout=30)
        self.assertEqual(b.read(slot), 42)


class _Counting(Factory):
    """
    Counts the connections it builds on the board, as a worker's tracker
    does.
    """

    protocol = Protocol

    def __init__(self, board: LoadBoard, slot: int) -> None:
        self.board = board
        self.slot = slot
        self.held = 0

    def buildProtocol(self, addr):
        self.held += 1
        self.board.write(self.slot, self.held)
        self.board.writeAccepted(self.slot, self.held)
        return Factory.buildProtocol(self, addr)


class AcceptGateTests(unittest.SynchronousTestCase):
    """
    L{AcceptGate} over a real listening port in a memory reactor: each
    C{doRead} the reactor makes accepts no more than the share allows.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.board, _ = board(self)
        self.me = self.board.assign(set())
        self.other = self.board.assign(set())
        self.factory = _Counting(self.board, self.me)
        self.port = tcp.Port(0, self.factory, interface="127.0.0.1", reactor=self.clock)
        self.port.startListening()
        self.addCleanup(self.port.connectionLost, None)
        self.gate = AcceptGate(self.port, self.board, self.me, self.clock, lambda: self.factory.held)
        self.addCleanup(self.gate.stop)

    def connect(self, count: int) -> None:
        address = self.port.getHost()
        for _ in range(count):
            client = socket.create_connection((address.host, address.port))
            self.addCleanup(client.close)

    def test_alone(self) -> None:
        """
        The only worker on the board accepts what waits, as Twisted would.
        """
        self.board.free(self.other)
        self.connect(5)
        self.port.numberAccepts = 100
        self.port.doRead()
        self.assertEqual(self.factory.held, 5)

    def test_takesItsShare(self) -> None:
        """
        Of a burst, a worker takes what keeps it at its share plus one
        (with the next connection counted: 2, then 1 more), then stops
        reading for L{ACCEPT_PAUSE}; when the other took what waited
        meanwhile, it reads again and takes its share of what comes.
        """
        self.connect(8)
        self.port.doRead()
        self.assertEqual(self.factory.held, 2)
        self.port.doRead()
        self.assertEqual(self.factory.held, 3)
        self.port.doRead()
        self.assertEqual(self.factory.held, 3)
        self.assertNotIn(self.port, self.clock.getReaders())
        # The other worker takes its share.
        self.board.write(self.other, 5)
        self.clock.advance(ACCEPT_PAUSE)
        self.assertIn(self.port, self.clock.getReaders())
        self.assertEqual(self.factory.held, 3)
        self.port.doRead()
        self.assertEqual(self.factory.held, 6)

    def test_nobodyElseTakes(self) -> None:
        """
        When what waits is still there after the pause, nobody else is
        taking it: after its share (3), the worker takes one, then two,
        then four... at each pause, until none waits.
        """
        self.connect(20)
        self.port.doRead()
        held = [self.factory.held]
        for _ in range(6):
            self.port.doRead()
            self.clock.advance(ACCEPT_PAUSE)
            held.append(self.factory.held)
        self.assertEqual(held, [2, 3, 4, 6, 10, 18, 20])

    def test_othersAccepting(self) -> None:
        """
        A worker over its share while the others accept too (short
        connections on a busy cluster) does not pause: it takes one per
        C{doRead}, as they do, and none while it holds L{YIELD} more than
        their average; it keeps reading.
        """
        self.connect(10)
        self.board.write(self.other, 2)
        held = []
        for n in range(1, 7):
            # The other worker accepts too.
            self.board.writeAccepted(self.other, n)
            self.port.doRead()
            held.append(self.factory.held)
        # Its share plus one (3, then 4), one more, then none at 2 + YIELD.
        self.assertEqual(held, [3, 4, 5, 5, 5, 5])
        self.assertEqual(2 + YIELD, 5)
        self.assertIn(self.port, self.clock.getReaders())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_staleActivityDoesNotCount(self) -> None:
        """
        What the others accepted long ago does not make them active: after
        an idle while, a burst that finds one worker over its share pauses
        it.
        """
        self.board.writeAccepted(self.other, 7)
        self.clock.advance(10)
        self.connect(5)
        self.port.doRead()
        self.port.doRead()
        self.clock.advance(ACCEPT_PAUSE)
        self.port.doRead()
        self.assertEqual(self.factory.held, 3)
        self.assertNotIn(self.port, self.clock.getReaders())

    def test_stop(self) -> None:
        """
        Once stopped, a pending pause is cancelled.
        """
        self.connect(5)
        for _ in range(3):
            self.port.doRead()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.gate.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class MasterSlotTests(ClusterTestsMixin, unittest.SynchronousTestCase):
    """
    Under shared scheduling the master gives each worker process a slot on
    one board, frees it when the process is gone, and closes the board with
    the last one; other schedulings have none.
    """

    def test_slots(self) -> None:
        """
        Each worker gets the board's descriptor and its own slot; a
        replacement gets a free one; with every worker gone the board is
        closed.
        """
        self.readyCluster(2, listens=[LOCAL], scheduling="shared", stableAfter=0)
        first, second = self.spawner.workers
        self.assertIsNotNone(first.board)
        self.assertEqual(first.board, second.board)
        self.assertEqual({first.env[ENV_LOAD_SLOT], second.env[ENV_LOAD_SLOT]}, {"0", "1"})
        first.kill()
        self.advance(1.0)
        replacement = self.spawner.latest(first.workerId)
        self.assertEqual(replacement.env[ENV_LOAD_SLOT], first.env[ENV_LOAD_SLOT])
        fd = first.board
        os.fstat(fd)
        d = self.cluster.stopService()
        self.spawner.flush()
        second.exit(0)
        replacement.exit(0)
        self.successResultOf(d)
        with self.assertRaises(OSError):
            os.fstat(fd)

    def test_noFairAccept(self) -> None:
        """
        With C{fairAccept} off (C{--no-fair-accept}) shared workers get no
        board: they accept as Twisted does.
        """
        self.readyCluster(2, listens=[LOCAL], scheduling="shared", fairAccept=False)
        for worker in self.spawner.workers:
            self.assertIsNone(worker.board)
            self.assertNotIn(ENV_LOAD_SLOT, worker.env)

    def test_rrHasNone(self) -> None:
        """
        Round-robin workers get no board.
        """
        self.readyCluster(2, listens=[LOCAL])
        for worker in self.spawner.workers:
            self.assertIsNone(worker.board)
            self.assertNotIn(ENV_LOAD_SLOT, worker.env)
