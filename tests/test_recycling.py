"""
Tests for L{txcluster._recycling}: recycling by memory (C{--max-memory})
and by age (C{--max-lifetime}) through the ready-gated replace path, one
worker at a time across the pool; on a fake reactor with fake workers.
"""

from __future__ import annotations

from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from txcluster import WorkerDisconnected, WorkerRecycling, _recycling
from txcluster._procstats import MemoryUsage
from txcluster._recycling import MEMORY_SAMPLES

from tests.test_master import ClusterTestsMixin

MiB = 1024 * 1024


class RecyclingTestsMixin(ClusterTestsMixin):
    def turn(self) -> None:
        """
        One reactor turn: what was called later with no delay runs.
        """
        self.reactor.advance(0)
        self.spawner.flush()


class LifetimeTests(RecyclingTestsMixin, SynchronousTestCase):
    """
    C{maxLifetime}: a worker process that served this long is replaced.
    """

    def test_recycledAfterItsLifetime(self) -> None:
        """
        A worker ready for C{maxLifetime} seconds gets a replacement; it
        serves until the replacement is ready, then drains; the event and
        the log say why.
        """
        self.readyCluster(1, maxLifetime=60)
        old = self.worker(1)
        self.advance(59.5)
        self.assertEqual(len(self.spawner.workers), 1)
        self.advance(0.5)
        self.assertEqual(len(self.spawner.workers), 2)
        self.assertEqual(self.eventsOf(WorkerRecycling), [WorkerRecycling(1, old.pid, "lifetime")])
        self.assertLogged(f"worker 1 (pid {old.pid}) has served for 60 s (--max-lifetime): recycling it")
        self.assertEqual(self.cluster.statistics().workers[0].recycling, "lifetime")
        self.assertFalse(old.disconnectRequested)
        new = self.worker(1)
        new.start()
        self.assertTrue(old.disconnectRequested)
        self.assertEqual(self.eventsOf(WorkerDisconnected), [WorkerDisconnected(1, old.pid, "replaced")])
        old.exit(0)
        self.assertEqual(self.spawner.running(), [new])

    def test_theReplacementHasALifetimeToo(self) -> None:
        """
        The fresh process's lifetime starts when it is ready.
        """
        self.readyCluster(1, maxLifetime=10)
        first = self.worker(1)
        self.advance(10)
        second = self.worker(1)
        self.advance(3)
        second.start()
        first.exit(0)
        self.advance(9.5)
        self.assertEqual(len(self.spawner.workers), 2)
        self.advance(0.5)
        self.assertEqual(len(self.spawner.workers), 3)

    def test_oneAtATime(self) -> None:
        """
        Workers whose lifetimes end together are replaced one after the
        other: the second replacement starts once the first is ready.
        """
        self.readyCluster(3, maxLifetime=30)
        self.advance(30)
        self.assertEqual(len(self.spawner.workers), 4)
        self.assertEqual([e.workerId for e in self.eventsOf(WorkerRecycling)], [1])
        self.worker(1).start()
        self.turn()
        self.assertEqual(len(self.spawner.workers), 5)
        self.assertEqual([e.workerId for e in self.eventsOf(WorkerRecycling)], [1, 2])
        self.assertEqual(self.cluster.statistics().workers[-1].recycling, "lifetime")
        self.worker(2).start()
        self.turn()
        self.worker(3).start()
        self.turn()
        self.assertEqual([e.workerId for e in self.eventsOf(WorkerRecycling)], [1, 2, 3])
        self.assertEqual(len(self.spawner.workers), 6)

    def test_jitter(self) -> None:
        """
        Each process's lifetime is C{maxLifetime} plus a random
        0..C{maxLifetimeJitter}.
        """
        asked = []

        def uniform(low, high):
            asked.append((low, high))
            return high

        self.patch(_recycling.random, "uniform", uniform)
        self.readyCluster(1, maxLifetime=10, maxLifetimeJitter=5)
        self.assertEqual(asked, [(0.0, 5.0)])
        self.advance(14.5)
        self.assertEqual(len(self.spawner.workers), 1)
        self.advance(0.5)
        self.assertEqual(len(self.spawner.workers), 2)

    def test_failedReplacementIsRetried(self) -> None:
        """
        A replacement that dies before it is ready leaves the old process
        serving; recycling is tried again after a backoff.
        """
        self.readyCluster(1, maxLifetime=10, maxRestarts=10)
        old = self.worker(1)
        self.advance(10)
        self.worker(1).exit(1)
        self.assertLogged("recycling worker 1 (pid", LogLevel.error)
        self.assertLogged("it serves on, and is tried again in")
        self.assertFalse(old.disconnectRequested)
        self.assertEqual(len(self.spawner.workers), 2)
        self.advance(5)
        self.assertEqual(len(self.spawner.workers), 3)
        self.worker(1).start()
        self.assertTrue(old.disconnectRequested)

    def test_brokenDeployDoesNotGiveUp(self) -> None:
        """
        Replacements that keep failing (the code on disk is broken) leave
        the old process serving, however many: they do not count towards
        C{maxRestarts}, so the master does not give up on healthy workers.
        """
        self.readyCluster(1, maxLifetime=1, maxRestarts=1)
        old = self.worker(1)
        for attempt in range(4):
            self.advance(40)
            replacement = self.worker(1)
            self.assertIsNot(replacement, old)
            replacement.exit(1)
        self.assertEqual(self.gaveUp, [])
        self.assertEqual(self.spawner.running(), [old])
        self.assertEqual(self.cluster.statistics().failures, 0)

    def test_stopCancels(self) -> None:
        """
        Once the cluster stops, no lifetime replaces anything.
        """
        self.readyCluster(2, maxLifetime=10)
        self.cluster.stopService()
        self.advance(20)
        self.assertEqual(len(self.spawner.workers), 2)

    def test_reloadTakesPrecedence(self) -> None:
        """
        A worker whose lifetime ends while a reload replaces it is not
        replaced twice.
        """
        self.readyCluster(1, maxLifetime=10)
        self.advance(9)
        self.cluster.reload()
        self.assertEqual(len(self.spawner.workers), 2)
        self.advance(1)
        self.assertEqual(len(self.spawner.workers), 2)
        self.assertEqual(self.eventsOf(WorkerRecycling), [])

    def test_afterAFailedReload(self) -> None:
        """
        A lifetime that ends while a reload replaces the worker waits: if
        the reload's replacement fails, the old process is recycled later.
        """
        self.readyCluster(1, maxLifetime=10, maxRestarts=10)
        old = self.worker(1)
        self.advance(9)
        reload = self.cluster.reload()
        self.advance(1)
        self.worker(1).exit(4)
        self.failureResultOf(reload)
        self.advance(2)
        self.assertEqual([e.reason for e in self.eventsOf(WorkerRecycling)], ["lifetime"])
        self.assertEqual(self.eventsOf(WorkerRecycling)[0].pid, old.pid)

    def test_off(self) -> None:
        """
        C{maxLifetime=0} (the default) never recycles.
        """
        self.readyCluster(1)
        self.advance(86400, step=3600)
        self.assertEqual(len(self.spawner.workers), 1)


class MemoryTests(RecyclingTestsMixin, SynchronousTestCase):
    """
    C{maxMemory}: a worker whose unique memory stays over the limit for
    L{MEMORY_SAMPLES} samples in a row is replaced.
    """

    def setUp(self) -> None:
        super().setUp()
        self.usage: dict[int, int] = {}
        self.read: list[int] = []

        def readMemory(pid):
            self.read.append(pid)
            if pid not in self.usage:
                return None
            return MemoryUsage(self.usage[pid], "uss")

        self.patch(_recycling, "readMemory", readMemory)

    def test_recycledAfterSamplesInARow(self) -> None:
        """
        Sampled every C{memoryInterval} seconds; the third sample in a row
        over the limit recycles the worker, with what it used in the log.
        """
        self.readyCluster(2, maxMemory=100, memoryInterval=5)
        one, two = self.worker(1), self.worker(2)
        self.usage = {one.pid: 150 * MiB, two.pid: 50 * MiB}
        self.advance(5 * (MEMORY_SAMPLES - 1))
        self.assertEqual(len(self.spawner.workers), 2)
        self.assertEqual(self.read.count(one.pid), MEMORY_SAMPLES - 1)
        self.advance(5)
        self.assertEqual(len(self.spawner.workers), 3)
        self.assertEqual(self.eventsOf(WorkerRecycling), [WorkerRecycling(1, one.pid, "memory")])
        self.assertLogged(
            f"worker 1 (pid {one.pid}) uses 150.0 MiB of unique memory (USS), over --max-memory "
            "100.0 MiB for 3 samples in a row: recycling it",
            LogLevel.warn,
        )
        (first,) = [w for w in self.cluster.statistics().workers if w.pid == one.pid]
        self.assertEqual((first.memory, first.recycling), (150 * MiB, "memory"))
        self.worker(1).start()
        self.assertTrue(one.disconnectRequested)
        self.assertFalse(two.disconnectRequested)

    def test_aPeakIsNotALeak(self) -> None:
        """
        Samples over the limit that are not in a row recycle nothing.
        """
        self.readyCluster(1, maxMemory=100, memoryInterval=1)
        pid = self.worker(1).pid
        for used in (150, 150, 90, 150, 150, 90, 150):
            self.usage[pid] = used * MiB
            self.advance(1)
        self.assertEqual(len(self.spawner.workers), 1)

    def test_oneAtATime(self) -> None:
        """
        Two leaking workers are replaced one after the other.
        """
        self.readyCluster(2, maxMemory=100, memoryInterval=1)
        one, two = self.worker(1), self.worker(2)
        self.usage = {one.pid: 200 * MiB, two.pid: 200 * MiB}
        self.advance(MEMORY_SAMPLES)
        self.assertEqual([e.workerId for e in self.eventsOf(WorkerRecycling)], [1])
        self.advance(3)
        self.assertEqual(len(self.spawner.workers), 3)
        self.worker(1).start()
        self.turn()
        self.assertEqual([e.workerId for e in self.eventsOf(WorkerRecycling)], [1, 2])
        self.assertEqual(len(self.spawner.workers), 4)

    def test_startingWorkersAreNotSampled(self) -> None:
        """
        Only ready workers that serve are sampled (a booting app may peak).
        """
        self.makeCluster(1, maxMemory=100, memoryInterval=1)
        self.usage[self.worker(1).pid] = 500 * MiB
        self.advance(10)
        self.assertEqual(self.read, [])

    def test_restartReasonInTheMetrics(self) -> None:
        """
        The replacement counts as a restart for C{memory}.
        """
        self.readyCluster(1, maxMemory=100, memoryInterval=1)
        self.usage[self.worker(1).pid] = 200 * MiB
        self.advance(MEMORY_SAMPLES)
        self.assertEqual(self.cluster.recorder.statistics().restarts, {1: {"memory": 1}})

    def test_off(self) -> None:
        """
        C{maxMemory=0} (the default) never samples.
        """
        self.readyCluster(1)
        self.advance(60)
        self.assertEqual(self.read, [])
