"""
No leaks: a real master (a C{twistd} subprocess) that has handed out tens
of thousands of connections and replaced its workers dozens of times holds
exactly the file descriptors it held before, and about the same memory.
"""

import os
import re
import signal
import time

from twisted.trial import unittest

from tests._harness import (
    MasterProcess,
    RecordingLoad,
    app,
    connectionsInside,
    freePort,
    openFileCount,
    residentKilobytes,
    sleep,
    stopProcess,
)

#: Connections pushed through the master after the warm-up (about 1,000 a
#: second on two cores, all processes included).
CONNECTIONS = 20_000
WARM_UP = 1_000
CONCURRENCY = 16
WORKERS = 3
#: Each worker is recycled after 200 (+ up to 25) connections: about 35
#: recycles in the run.  Spawning a worker costs about a quarter of a
#: second of CPU, so the restarts, not the connections, set the pace.
MAX_REQUESTS = 200
#: What the test does every CHAOS_INTERVAL seconds meanwhile: SIGKILL a
#: ready worker (ids in turn, so each id is killed twice: the master backs
#: off 0.5 s, then 1 s, before respawning a worker that dies soon after it
#: started), or SIGHUP the master (a rolling reload of all three).
CHAOS = ["kill", "reload", "kill", "kill", "reload", "kill", "reload", "kill", "reload", "kill"]
CHAOS_INTERVAL = 2.0


def workerStates(master) -> dict:
    """
    C{{pid: state}} of every worker process the master's log mentions:
    C{forked}, C{ready} or C{ended}.
    """
    text = master.output.text()
    states = {}
    for pid in re.findall(r"worker \d+ \(pid (\d+)\) forked", text):
        states[int(pid)] = "forked"
    for pid in re.findall(r"worker \d+ \(pid (\d+)\) ready", text):
        states[int(pid)] = "ready"
    for pid in re.findall(r"worker \d+ \(pid (\d+)\) (?:exited|died)", text):
        states[int(pid)] = "ended"
    return states


def readyWorkers(master) -> dict:
    """
    C{{pid: workerId}} of the workers the log says are ready and running.
    """
    text = master.output.text()
    ids = {int(p): int(w) for w, p in re.findall(r"worker (\d+) \(pid (\d+)\) forked", text)}
    return {pid: ids[pid] for pid, state in workerStates(master).items() if state == "ready"}


class LeakTests(unittest.TestCase):
    timeout = 150

    async def settle(self, master, port: int, gone=(), timeout: float = 20.0) -> None:
        """
        Wait until the cluster is quiet: C{WORKERS} workers ready, every
        other worker (the pids in C{gone} included) ended, and no accepted
        connection held by the master (none waits for a worker), for half a
        second in a row.
        """
        deadline = time.monotonic() + timeout
        quietSince = None
        while True:
            states = workerStates(master)
            live = [state for state in states.values() if state != "ended"]
            quiet = (
                live == ["ready"] * WORKERS
                and all(states.get(pid) == "ended" for pid in gone)
                and not connectionsInside(master.pid, port)
            )
            now = time.monotonic()
            if not quiet:
                quietSince = None
            elif quietSince is None:
                quietSince = now
            elif now - quietSince >= 0.5:
                return
            if now > deadline:
                self.fail(f"the cluster did not settle: {states}\n{master.output.text()[-3000:]}")
            await sleep(0.1)

    async def test_descriptorsAndMemoryComeBackAfterManyConnectionsAndRestarts(self):
        """
        After a warm-up, 20,000 connections (16 at a time, each closed after
        one HTTP/1.0 request) through a real master with three workers,
        which are recycled every ~300 connections, killed with SIGKILL six
        times and reloaded (SIGHUP) four times (about 50 worker restarts in
        all), leave the master, once the cluster has settled, with exactly
        as many open file descriptors as before and a resident set less
        than 5 % bigger.  The only requests that fail are connections that
        were inside a killed worker, dropped.
        """
        port = freePort()
        master = MasterProcess(
            self,
            [
                "--app", app("web.tac"),
                "--workers", str(WORKERS),
                "--max-requests", str(MAX_REQUESTS),
                "--max-requests-jitter", str(MAX_REQUESTS // 8),
                "--max-restarts", "1000",
            ],
            env={"WEB_LISTEN": f"tcp:{port}:interface=127.0.0.1"},
        )
        await master.waitFor(r"worker \d \(pid \d+\) ready", count=WORKERS)
        warmUp = RecordingLoad(port, concurrency=CONCURRENCY, limit=WARM_UP).start()
        await warmUp.finished()
        await self.settle(master, port)
        fdsBefore = openFileCount(master.pid)
        rssBefore = residentKilobytes(master.pid)
        forkedBefore = len(workerStates(master))

        started = time.monotonic()
        load = RecordingLoad(port, concurrency=CONCURRENCY, limit=CONNECTIONS).start()
        killed = []
        reloads = 0
        inside = 0
        for action in CHAOS:
            await sleep(CHAOS_INTERVAL)
            if action == "reload":
                reloads += 1
                master.signal("HUP")
                await master.waitFor(r"reload complete", count=reloads, timeout=30)
                continue
            ready = readyWorkers(master)
            victims = [pid for pid, workerId in ready.items() if workerId == len(killed) % WORKERS + 1]
            if not victims:
                victims = list(ready)
            pid = victims[0]
            if stopProcess(pid):
                inside += len(connectionsInside(pid, port))
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        await load.finished()
        loadSeconds = time.monotonic() - started
        await self.settle(master, port, gone=killed)
        fdsAfter = openFileCount(master.pid)
        rssAfter = residentKilobytes(master.pid)
        restarts = len(workerStates(master)) - forkedBefore
        recycles = master.output.text().count("recycling it")

        figures = (
            f"{len(load.records)} connections in {loadSeconds:.1f} s, {len(load.failed())} failed; "
            f"{restarts} restarts ({len(killed)} kills, {reloads} reloads, {recycles} recycles "
            f"in all); "
            f"fds {fdsBefore} -> {fdsAfter}; VmRSS {rssBefore} kB -> {rssAfter} kB "
            f"({100.0 * (rssAfter - rssBefore) / rssBefore:+.1f} %)"
        )
        self.assertEqual(len(load.records), CONNECTIONS, figures)
        self.assertEqual(len(killed), CHAOS.count("kill"), figures)
        self.assertGreaterEqual(restarts, 45, figures)
        # Only connections inside the killed workers failed, as dropped.
        self.assertEqual({r.error for r in load.failed()} - {"dropped"}, set(), figures)
        self.assertLessEqual(len(load.failed()), inside, figures)
        self.assertEqual(fdsAfter, fdsBefore, figures)
        self.assertLess(rssAfter, rssBefore * 1.05, figures)
        print(f"\nleaks: {figures}")
