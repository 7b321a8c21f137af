"""
Supervision with real worker processes: respawn, rolling reload under load,
scaling, the reactor heartbeat and recycling.
"""

import os
import signal

from twisted.internet import defer
from twisted.trial import unittest

from txcluster import ReloadFailed, WorkerDisconnected, WorkerExited, WorkerReady

from tests._harness import (
    LoadGenerator,
    LogCapture,
    MasterProcess,
    app,
    freePort,
    listeningPort,
    pidAlive,
    sleep,
    startCluster,
    workerOf,
)


def pidsById(cluster) -> dict:
    return {w.workerId: w.pid for w in cluster.statistics().workers if w.state == "ready"}


class RespawnTests(unittest.TestCase):
    timeout = 60

    async def test_killedWorkerIsReplacedWithItsId(self):
        """
        A worker killed with SIGKILL is respawned at once (it had stayed up)
        with the same worker id, and serves again.
        """
        cluster, events = await startCluster(self, app("web.tac"), workers=2, stableAfter=0.5)
        await sleep(0.6)
        before = pidsById(cluster)
        os.kill(before[2], signal.SIGKILL)
        ready = await events.wait(lambda e: isinstance(e, WorkerReady) and e.workerId == 2 and e.pid != before[2])
        after = pidsById(cluster)
        self.assertEqual(after[1], before[1])
        self.assertEqual(after[2], ready.pid)
        self.assertNotEqual(after[2], before[2])
        (stats,) = [w for w in cluster.statistics().workers if w.workerId == 2]
        self.assertEqual(stats.restarts, 1)
        port = listeningPort(events)
        answers = {await whoami_http(port) for _ in range(4)}
        self.assertIn(f"worker 2 {ready.pid}", answers)


class ReloadTests(unittest.TestCase):
    timeout = 90

    async def test_reloadDuringStartUpLeavesNoOldCode(self):
        """
        A reload asked for while the workers still start (they may have
        loaded the application before it changed) waits for them and
        replaces them too: when it is done, every worker runs the code as
        of the reload, in a process started after it was asked for.
        """
        import tempfile

        from txcluster import ClusterConfig, ClusterService, WorkerForked

        from tests._harness import EventLog, stopCluster

        fd, versionFile = tempfile.mkstemp()
        os.close(fd)
        self.addCleanup(os.unlink, versionFile)
        with open(versionFile, "w") as f:
            f.write("old")
        environment = dict(os.environ, VERSION_FILE=versionFile, SLOW_LOAD="0.5")
        cluster = ClusterService(
            ClusterConfig(app=app("version.tac"), workers=2, env=environment, gracefulTimeout=5, startTimeout=20)
        )
        events = EventLog()
        cluster.addObserver(events)
        self.addCleanup(stopCluster, cluster)
        cluster.startService()
        await events.waitCount(WorkerForked, 2)
        with open(versionFile, "w") as f:
            f.write("new")
        forkedBefore = {e.pid for e in events.of(WorkerForked)}
        await cluster.reload()
        ready = pidsById(cluster)
        self.assertEqual(sorted(ready), [1, 2])
        self.assertEqual(set(ready.values()) & forkedBefore, set())
        import treq

        port = listeningPort(events)
        answers = set()
        for _ in range(10):
            response = await treq.get(f"http://127.0.0.1:{port}/", persistent=False, timeout=10)
            answers.add((await response.text()).strip())
        self.assertEqual({a.split()[-1] for a in answers}, {"new"}, answers)
        self.assertFalse(any(pidAlive(pid) for pid in forkedBefore))

    async def test_reloadUnderLoadFailsNothing(self):
        """
        A rolling reload under continuous load replaces every worker (new
        pids, same ids) and fails zero requests.
        """
        cluster, events = await startCluster(self, app("web.tac"), workers=2)
        port = listeningPort(events)
        before = pidsById(cluster)
        load = LoadGenerator(port, concurrency=4).start()
        await sleep(0.5)
        await cluster.reload()
        await sleep(0.5)
        await load.stop()
        after = pidsById(cluster)
        self.assertEqual(sorted(after), [1, 2])
        self.assertEqual(set(before.values()) & set(after.values()), set())
        self.assertEqual(load.failures, [], load.summary())
        self.assertGreater(load.succeeded, 50, load.summary())
        self.assertTrue(set(after.values()) <= load.pids(), (after, load.answeredBy))
        old = {e.pid: e for e in events.of(WorkerExited)}
        for pid in before.values():
            self.assertTrue(old[pid].expected)
            self.assertEqual(old[pid].exitCode, 0)

    async def test_readyGatesTheOldWorkersDrain(self):
        """
        During a reload each old worker is only told to disconnect after its
        replacement is ready, one worker at a time.
        """
        cluster, events = await startCluster(self, app("web.tac"), workers=2)
        before = pidsById(cluster)
        start = len(events.events)
        await cluster.reload()
        sequence = [
            (type(e).__name__, e.workerId, "old" if e.pid in before.values() else "new")
            for e in events.events[start:]
            if type(e).__name__ in ("WorkerForked", "WorkerReady", "WorkerDisconnected")
        ]
        self.assertEqual(
            sequence,
            [
                ("WorkerForked", 1, "new"),
                ("WorkerReady", 1, "new"),
                ("WorkerDisconnected", 1, "old"),
                ("WorkerForked", 2, "new"),
                ("WorkerReady", 2, "new"),
                ("WorkerDisconnected", 2, "old"),
            ],
        )

    async def test_failedReplacementAbortsReload(self):
        """
        A replacement that cannot start aborts the reload: the old worker
        keeps serving, and the reload's Deferred fails with ReloadFailed.
        """
        cluster, events = await startCluster(self, app("web.tac"), workers=1, maxRestarts=5)
        before = pidsById(cluster)
        port = listeningPort(events)
        # The next process to load web.tac will find a broken listen description.
        cluster.config.env["WEB_LISTEN"] = "tcp:notaport"
        logs = LogCapture(self)
        with self.assertRaises(ReloadFailed):
            await cluster.reload()
        self.assertEqual(pidsById(cluster), before)
        self.assertIn("reload aborted", logs.text())
        self.assertEqual(workerOf(await whoami_http(port)), 1)


async def whoami_http(port):
    import treq

    response = await treq.get(f"http://127.0.0.1:{port}/", persistent=False)
    return (await response.text()).strip()


class ScaleTests(unittest.TestCase):
    timeout = 90

    async def test_scaleUpAndDownUnderLoad(self):
        """
        scale() adds workers (ready when the Deferred fires) and drains the
        highest-numbered ones, never failing a request.
        """
        cluster, events = await startCluster(self, app("web.tac"), workers=1)
        port = listeningPort(events)
        load = LoadGenerator(port, concurrency=4).start()
        await cluster.scale(3)
        self.assertEqual(sorted(pidsById(cluster)), [1, 2, 3])
        await sleep(0.5)
        await cluster.scale(1)
        self.assertEqual(sorted(pidsById(cluster)), [1])
        await load.stop()
        self.assertEqual(load.failures, [], load.summary())
        self.assertEqual({workerOf(w) for w in load.answeredBy}, {1, 2, 3})
        with self.assertRaises(ValueError):
            await cluster.scale(0)

    async def test_signals(self):
        """
        SIGTTIN to the master adds a worker, SIGTTOU removes one.
        """
        port = freePort()
        master = MasterProcess(
            self, ["--app", app("web.tac"), "--workers", "1"], env={"WEB_LISTEN": f"tcp:{port}:interface=127.0.0.1"}
        )
        await master.waitFor(r"worker 1 \(pid \d+\) ready")
        master.signal("TTIN")
        await master.waitFor(r"worker 2 \(pid \d+\) ready")
        master.signal("TTOU")
        await master.waitFor(r"worker 2 \(pid \d+\) exited \(exit code 0\)")
        self.assertIn("scaling up from 1 to 2 workers", master.output.text())
        self.assertIn("scaling down from 2 to 1 workers", master.output.text())
        master.signal("TTOU")
        await sleep(0.5)
        self.assertEqual(workerOf(await whoami_http(port)), 1)


class HeartbeatTests(unittest.TestCase):
    timeout = 60

    async def test_blockedReactorIsDumpedAndReplaced(self):
        """
        A worker whose reactor blocks stops answering the heartbeat: the
        master has it dump its stack into the log, kills it and respawns it.
        """
        logs = LogCapture(self)
        cluster, events = await startCluster(
            self, app("whoami.tac"), workers=1, workerTimeout=1.0, env={"WHOAMI_LISTEN": "tcp:0:interface=127.0.0.1"}
        )
        (pid,) = pidsById(cluster).values()
        cluster.sendMessage(1, {"cmd": "freeze", "seconds": 60}).addErrback(lambda f: None)
        replaced = await events.wait(lambda e: isinstance(e, WorkerReady) and e.pid != pid, timeout=20)
        exited = [e for e in events.of(WorkerExited) if e.pid == pid]
        self.assertEqual(exited[0].signal, signal.SIGKILL)
        text = logs.text()
        self.assertIn(f"worker 1 (pid {pid}) has not answered a heartbeat", text)
        self.assertRegex(text, r"most recent call first")
        self.assertRegex(text, r'whoami\.tac", line \d+ in command')
        self.assertFalse(pidAlive(pid))
        self.assertNotEqual(replaced.pid, pid)


class RecycleTests(unittest.TestCase):
    timeout = 90

    def limits(self, *limits):
        """
        Give the worker processes these connection limits, in spawn order
        (then 10,000 each).
        """
        from txcluster import _processes

        given = list(limits)
        self.patch(_processes, "requestLimit", lambda maxRequests, jitter: given.pop(0) if given else 10_000)

    async def test_aRecycledWorkerTakesNoMoreThanItsLimit(self):
        """
        A worker that was sent its --max-requests connections takes no more
        while another worker can take them (here worker 2, far from its
        limit), is replaced through the zero-drop path, and its fresh
        replacement takes connections as soon as it is ready.
        """
        self.limits(10, 100)
        cluster, events = await startCluster(self, app("web.tac"), workers=2, maxRequests=1)
        port = listeningPort(events)
        before = pidsById(cluster)
        load = LoadGenerator(port, concurrency=2, maxRequests=90, pause=0.1).start()
        replaced = await events.wait(
            lambda e: isinstance(e, WorkerDisconnected) and e.pid == before[1] and e.reason == "replaced", timeout=30
        )
        await defer.gatherResults(load._loops)
        self.assertEqual(load.failures, [], load.summary())
        self.assertEqual(load.answeredBy[f"worker 1 {before[1]}"], 10, load.answeredBy)
        fresh = pidsById(cluster)[1]
        self.assertNotEqual(fresh, replaced.pid)
        self.assertGreater(load.answeredBy.get(f"worker 1 {fresh}", 0), 0, load.answeredBy)
        self.assertEqual(pidsById(cluster)[2], before[2])

    async def test_theOnlyWorkerServesOnUntilItsReplacementIsReady(self):
        """
        A worker over its limit that is the only one serving keeps serving
        until its replacement is ready: no request fails.
        """
        self.limits(5)
        cluster, events = await startCluster(self, app("web.tac"), workers=1, maxRequests=1)
        port = listeningPort(events)
        (original,) = pidsById(cluster).values()
        load = LoadGenerator(port, concurrency=2).start()
        await events.wait(
            lambda e: isinstance(e, WorkerDisconnected) and e.pid == original and e.reason == "replaced",
            past=True,
        )
        await sleep(0.3)
        await load.stop()
        self.assertEqual(load.failures, [], load.summary())
        self.assertGreater(load.answeredBy[f"worker 1 {original}"], 5, load.answeredBy)
        self.assertEqual(len(load.pids()), 2, load.answeredBy)
