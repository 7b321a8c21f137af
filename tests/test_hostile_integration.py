"""
A real misbehaving worker: a cluster of two real workers of
C{tests/apps/hostile.tac} under HTTP load on loopback, where worker 2 is
told to attack the master through its channel.  The master must log it
(with its id and pid), kill it and respawn it, and keep serving through
worker 1 meanwhile.
"""

from __future__ import annotations

import signal
import time

from twisted.internet import defer
from twisted.trial import unittest

from txcluster import WorkerExited, WorkerReady

from tests._harness import LoadGenerator, LogCapture, app, listeningPort, sleep, startCluster

#: How many requests each load loop keeps in flight: at most this many may
#: be inside the hostile worker when it is killed.
CONCURRENCY = 4


def pidsById(cluster) -> dict:
    return {w.workerId: w.pid for w in cluster.statistics().workers if w.state == "ready"}


class HostileWorkerTests(unittest.TestCase):
    """
    Each test runs one attack from worker 2 of a real cluster under load.
    """

    timeout = 40

    async def attack(self, kind: str, what: str) -> None:
        """
        Start two workers of hostile.tac and HTTP load on their port, have
        worker 2 run attack C{kind}, and check that:

          - the master logged worker 2 (with its pid) as misbehaving with
            C{what}, and nothing as an unhandled error;
          - worker 2 was killed (SIGKILL, not an expected exit) and
            respawned with the same id and a new pid, which serves;
          - worker 1 kept its pid and kept serving;
          - the load lost at most the requests that were inside worker 2
            when it was killed: no more than one per load loop, all between
            the attack and the replacement being ready.
        """
        logs = LogCapture(self)
        cluster, events = await startCluster(
            self, app("hostile.tac"), workers=2, minRestartDelay=0.05, maxRestartDelay=0.1
        )
        port = listeningPort(events)
        before = pidsById(cluster)
        load = LoadGenerator(port, concurrency=CONCURRENCY).start()
        self.addCleanup(load.stop)
        await sleep(0.3)
        attackedAt = time.monotonic()
        cluster.sendMessage(2, {"cmd": "attack", "kind": kind}).addErrback(lambda f: None)
        replacement = await events.wait(
            lambda e: isinstance(e, WorkerReady) and e.workerId == 2 and e.pid != before[2], timeout=25
        )
        readyAt = time.monotonic()
        # The replacement must get some of the load too.
        await sleep(0.5)
        await load.stop()

        text = logs.text()
        self.assertIn(f"worker 2 (pid {before[2]}) misbehaved: it {what}", text)
        self.assertNotIn("Unhandled", text)
        self.assertEqual([e for e in logs.events if "log_failure" in e], [])
        (exited,) = [e for e in events.of(WorkerExited) if e.pid == before[2]]
        self.assertEqual(exited.signal, signal.SIGKILL)
        self.assertFalse(exited.expected)
        self.assertEqual(pidsById(cluster), {1: before[1], 2: replacement.pid})
        self.assertEqual(cluster.gaveUp, [])
        self.assertTrue(cluster.running)

        self.assertGreater(load.succeeded, 50, load.summary())
        self.assertIn(f"worker 1 {before[1]}", load.answeredBy)
        self.assertIn(f"worker 2 {replacement.pid}", load.answeredBy)
        self.assertLessEqual(len(load.failures), CONCURRENCY, load.summary())
        for at, why in load.failures:
            self.assertTrue(attackedAt <= at <= readyAt, (at - attackedAt, readyAt - attackedAt, why))

    def test_garbage(self):
        """
        A worker writing an HTTP request on its channel is replaced; the
        other worker serves throughout.
        """
        return defer.ensureDeferred(self.attack("garbage", "sent a key of 18245 bytes (at most 255)"))

    def test_hugeKey(self):
        """
        A worker sending a 256-byte key is replaced.
        """
        return defer.ensureDeferred(self.attack("huge-key", "sent a key of 256 bytes"))

    def test_emptyBox(self):
        """
        A worker sending an empty box is replaced.
        """
        return defer.ensureDeferred(self.attack("empty-box", "sent a box that is neither a command nor an answer"))

    def test_unknownCommand(self):
        """
        A worker sending a command the master does not know is replaced.
        """
        return defer.ensureDeferred(self.attack("unknown", "sent an unknown command b'Bogus'"))

    def test_badArguments(self):
        """
        A worker sending a QueryServer whose port is not a number is
        replaced.
        """
        return defer.ensureDeferred(self.attack("bad-arguments", "sent a malformed QueryServer (ValueError"))

    def test_strayAnswer(self):
        """
        A worker answering a request the master never sent is replaced.
        """
        return defer.ensureDeferred(
            self.attack("stray-answer", "answered a request the master never sent (tag b'feedface')")
        )

    def test_descriptor(self):
        """
        A worker sending the master a file descriptor is replaced.
        """
        return defer.ensureDeferred(self.attack("descriptor", "sent a file descriptor"))

    def test_absurdListens(self):
        """
        A worker making more than 20 absurd listens in a row is replaced.
        """
        return defer.ensureDeferred(
            self.attack("listens", "made more than 20 requests the master refused within 60 s")
        )

    def test_flood(self):
        """
        A worker sending messages as fast as the master reads them is
        replaced once it has spent its burst, with the real rate limit.
        """
        return defer.ensureDeferred(self.attack("flood", "sent commands faster than 10000 a second"))
