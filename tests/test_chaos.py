"""
The chaos suite: txcluster's promises under continuous loopback load with
every request's outcome recorded (L{RecordingLoad}), while workers are
killed, reloaded and scaled, and the master is stopped or killed.

Each scenario is bounded in time and load (a few concurrent connections on
127.0.0.1); the whole file runs in about a minute on two cores.
"""

import os
import random
import shutil
import signal
import tempfile
import time

from attrs import frozen
from twisted.trial import unittest

from txcluster import WorkerReady

from tests._harness import (
    MasterProcess,
    RecordingLoad,
    app,
    connectionsInside,
    freePort,
    listeningPort,
    pidAlive,
    sleep,
    startCluster,
    stopProcess,
    unix,
    whoami,
    workerOf,
)

#: The kill scenario: this many SIGKILLs, one every 1.5 to 2.5 s (about 24 s).
KILLS = 12
KILL_INTERVAL = 2.0


def readyPids(cluster) -> dict:
    return {w.workerId: w.pid for w in cluster.statistics().workers if w.state == "ready"}


def mixedPaths(n: int) -> str:
    """
    One request in three takes 50 ms inside the worker, so that killing a
    worker finds some requests inside it.
    """
    return "/slow?seconds=0.05" if n % 3 == 0 else "/"


async def waitUntil(condition, timeout: float, interval: float = 0.05) -> bool:
    """
    Poll C{condition} until it holds or C{timeout} seconds passed; whether
    it held.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await sleep(interval)
    return True


@frozen(repr=False)
class Kill:
    """
    One worker killed by the test: it was stopped (SIGSTOP) at C{stoppedAt},
    found to hold the connections from C{inside} (client ports), and killed
    (SIGKILL) at C{killedAt}; C{eventIndex} is where the cluster's event log
    was then.
    """

    workerId: int
    pid: int
    stoppedAt: float
    inside: frozenset
    killedAt: float
    eventIndex: int

    def __repr__(self) -> str:
        return f"<kill worker {self.workerId} pid {self.pid} at {self.killedAt:.3f}, {len(self.inside)} inside>"


class WorkerKillTests(unittest.TestCase):
    timeout = KILLS * KILL_INTERVAL * 1.25 + 40

    async def test_onlyRequestsInsideAKilledWorkerFail(self):
        """
        Killing a random worker with SIGKILL every ~2 s, 12 times, under
        continuous load (6 connections at a time, a third of the requests
        taking 50 ms in the worker) fails only requests that were inside the
        killed worker; nothing the master had accepted and not yet handed
        over is lost (C{statistics().dropped} stays 0); every killed worker
        is replaced with the same id and a new pid.

        The accounting: just before each kill the test stops the victim
        with SIGSTOP (so its file descriptor table holds still), reads which
        client connections it holds (its fds' socket inodes, matched in
        C{/proc/net/tcp} to the client's port), then sends SIGKILL.  A
        connection the master had handed to the victim but the victim had
        not yet taken is still the master's, so it is not in that list and
        must not fail: the master hands it to another worker.  Every failed
        request must therefore be one of the connections found inside a
        killed worker, must have started before that worker was stopped
        and ended after it was killed, and must have failed as a dropped
        connection (closed before a whole answer), never as a refusal or a
        timeout.  The victims and intervals come from a seed printed with
        the figures; C{TXCLUSTER_CHAOS_SEED} replays one.
        """
        cluster, events = await startCluster(
            self, app("web.tac"), workers=3, stableAfter=0.5, maxRestarts=1000
        )
        port = listeningPort(events)
        seed = int(os.environ.get("TXCLUSTER_CHAOS_SEED", random.randrange(2**32)))
        rng = random.Random(seed)
        load = RecordingLoad(port, concurrency=6, path=mixedPaths).start()
        kills = []
        while len(kills) < KILLS:
            await sleep(KILL_INTERVAL * rng.uniform(0.75, 1.25))
            ready = sorted(readyPids(cluster).items())
            self.assertNotEqual(ready, [], "no worker was ready")
            workerId, pid = rng.choice(ready)
            stoppedAt = time.monotonic()
            self.assertTrue(stopProcess(pid), f"worker {workerId} (pid {pid}) did not stop")
            inside = frozenset(connectionsInside(pid, port))
            os.kill(pid, signal.SIGKILL)
            kills.append(Kill(workerId, pid, stoppedAt, inside, time.monotonic(), len(events.events)))
        await sleep(0.5)
        await load.stop()
        killedPids = {k.pid for k in kills}

        def replaced(kill):
            return any(
                isinstance(e, WorkerReady) and e.workerId == kill.workerId and e.pid != kill.pid
                for e in events.events[kill.eventIndex:]
            )

        def settled():
            pids = readyPids(cluster)
            return sorted(pids) == [1, 2, 3] and not set(pids.values()) & killedPids

        await waitUntil(lambda: settled() and all(replaced(k) for k in kills), timeout=15)

        context = f"seed {seed}, {kills}, {load.summary()}"
        self.assertEqual([k for k in kills if not replaced(k)], [], context)
        self.assertEqual(sorted(readyPids(cluster)), [1, 2, 3], context)
        stats = cluster.statistics()
        self.assertEqual(stats.dropped, 0, context)
        self.assertEqual(stats.pending, 0, context)
        self.assertEqual(cluster.gaveUp, [], context)
        unaccounted = []
        for record in load.failed():
            if record.error != "dropped" or not any(
                record.clientPort in k.inside and record.start <= k.stoppedAt and record.end >= k.killedAt
                for k in kills
            ):
                unaccounted.append(record)
        self.assertEqual(unaccounted, [], context)
        self.assertGreater(len(load.succeeded()), 1000, context)
        # The accounting was exercised: the victims held connections.
        self.assertGreater(sum(len(k.inside) for k in kills), 0, context)
        self.assertLessEqual(len(load.failed()), sum(len(k.inside) for k in kills), context)
        print(
            f"\nkill chaos: seed {seed}, {len(load.records)} requests, {len(load.failed())} failed, "
            f"{len(kills)} kills, {sum(len(k.inside) for k in kills)} connections inside the victims"
        )


class ReloadChaosTests(unittest.TestCase):
    timeout = 60

    async def test_threeRollingReloadsFailNothing(self):
        """
        Three rolling reloads in a row under continuous load fail no
        request and lose nothing in the master; each replaces every worker
        (same ids, new pids), and every generation of workers serves.
        """
        cluster, events = await startCluster(self, app("web.tac"), workers=2)
        port = listeningPort(events)
        load = RecordingLoad(port, concurrency=6, path=mixedPaths).start()
        generations = [readyPids(cluster)]
        for _ in range(3):
            await sleep(0.3)
            await cluster.reload()
            generations.append(readyPids(cluster))
        await sleep(0.3)
        await load.stop()
        context = f"{generations}, {load.summary()}"
        self.assertEqual(load.failed(), [], context)
        self.assertEqual(cluster.statistics().dropped, 0, context)
        for before, after in zip(generations, generations[1:]):
            self.assertEqual(sorted(after), [1, 2], context)
            self.assertEqual(set(before.values()) & set(after.values()), set(), context)
        every = {pid for generation in generations for pid in generation.values()}
        self.assertEqual(len(every), 8, context)
        self.assertEqual(every - load.pids(), set(), context)
        print(f"\nreload chaos: {len(load.records)} requests, {len(load.failed())} failed, 3 reloads")

    async def test_sharedUnixListenSurvivesReload(self):
        """
        With shared scheduling, a rolling reload keeps an application's UNIX
        socket reachable: its path still exists, clients connect to it, and
        every new worker listens on it.
        """
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "app.sock")
        cluster, events = await startCluster(
            self,
            app("whoami.tac"),
            workers=2,
            scheduling="shared",
            env={"WHOAMI_LISTEN": f"unix:{path}", "WHOAMI_CLOSE": "1"},
        )
        await cluster.reload()
        listens = {w.pid: w.listens for w in cluster.statistics().workers}
        self.assertTrue(os.path.exists(path), f"{path} is gone after the reload")
        answers = [workerOf(await whoami(unix(path))) for _ in range(4)]
        self.assertEqual(set(answers) - {1, 2}, set(), answers)
        self.assertEqual(list(listens.values()), [(f"unix:{path}",)] * 2, listens)



class ScaleChaosTests(unittest.TestCase):
    timeout = 60

    async def test_scalingUpAndDownRepeatedlyFailsNothing(self):
        """
        Scaling 1 -> 3 -> 1 -> 2 -> 1 under continuous load fails no
        request and loses nothing in the master; after each step exactly
        the workers 1..N are ready, and every worker id served.
        """
        cluster, events = await startCluster(self, app("web.tac"), workers=1)
        port = listeningPort(events)
        load = RecordingLoad(port, concurrency=6, path=mixedPaths).start()
        steps = []
        for count in (3, 1, 2, 1):
            await sleep(0.3)
            await cluster.scale(count)
            steps.append(readyPids(cluster))
            self.assertEqual(sorted(steps[-1]), list(range(1, count + 1)), steps)
        await sleep(0.3)
        await load.stop()
        context = f"{steps}, {load.summary()}"
        self.assertEqual(load.failed(), [], context)
        self.assertEqual(cluster.statistics().dropped, 0, context)
        self.assertEqual({int(who.split()[1]) for who in load.answeredBy()}, {1, 2, 3}, context)
        print(f"\nscale chaos: {len(load.records)} requests, {len(load.failed())} failed, 4 scalings")


class MasterSignalChaosTests(unittest.TestCase):
    timeout = 60

    async def startMaster(self, workers: int = 2):
        port = freePort()
        master = MasterProcess(
            self,
            ["--app", app("web.tac"), "--workers", str(workers)],
            env={"WEB_LISTEN": f"tcp:{port}:interface=127.0.0.1"},
        )
        await master.waitFor(r"worker \d \(pid \d+\) ready", count=workers)
        return master, port

    async def requestsInside(self, master, port, path: str, count: int):
        """
        Send C{count} requests and wait until every one is inside a worker.
        """
        load = RecordingLoad(port, timeout=15)
        requests = [load.request(path) for _ in range(count)]
        pids = list(master.workerPids().values())

        def allInside():
            held = set().union(*(connectionsInside(pid, port) for pid in pids))
            return all(r.clientPort is not None and r.clientPort in held for r in load.records)

        self.assertTrue(await waitUntil(allInside, 5), load.records)
        return load, requests

    async def test_sigtermCompletesEveryRequestInFlight(self):
        """
        SIGTERM to a real master while six 1-second requests are inside its
        workers: every one of them completes with a 200 answer, after the
        signal, and the master exits 0 with no worker left.
        """
        master, port = await self.startMaster()
        load, requests = await self.requestsInside(master, port, "/slow?seconds=1", 6)
        signalledAt = time.monotonic()
        master.signal("TERM")
        for request in requests:
            await request
        reason = await master.output.ended
        self.assertEqual(load.failed(), [], load.summary())
        self.assertEqual(len(load.succeeded()), 6)
        self.assertTrue(all(r.end > signalledAt for r in load.records), load.records)
        self.assertEqual(reason.exitCode, 0, master.output.text())
        self.assertEqual([pid for pid in master.workerPids().values() if pidAlive(pid)], [])
        print(
            f"\nsigterm chaos: {len(load.succeeded())} of {len(load.records)} in-flight requests answered 200, "
            f"the last {max(r.end for r in load.records) - signalledAt:.2f} s after SIGTERM; exit code {reason.exitCode}"
        )

    async def test_masterKillTakesEveryWorkerWithinTwoSeconds(self):
        """
        SIGKILL to a real master while its workers are busy with 30-second
        requests: no worker is alive 2 s later, and the requests they held
        are closed, not left hanging.
        """
        master, port = await self.startMaster()
        load, requests = await self.requestsInside(master, port, "/slow?seconds=30", 4)
        pids = list(master.workerPids().values())
        self.assertEqual(len(pids), 2)
        master.signal("KILL")
        killedAt = time.monotonic()
        await waitUntil(lambda: not any(pidAlive(pid) for pid in pids), timeout=2.0, interval=0.02)
        goneAfter = time.monotonic() - killedAt
        self.assertEqual([pid for pid in pids if pidAlive(pid)], [])
        for request in requests:
            await request
        self.assertEqual([r.error for r in load.records], ["dropped"] * 4, load.records)
        self.assertTrue(all(r.end - killedAt < 2.5 for r in load.records), load.records)
        print(f"\nmaster kill chaos: both workers gone {goneAfter:.2f} s after SIGKILL, 4 of 4 requests dropped")
