"""
Operating a real master as an operator does: a C{twistd -n txcluster}
master (a child of the test) with real workers running
C{tests/apps/counting.tac}, driven by the real C{txcluster} command (a child
process too) over the master's control socket, scraped on its C{--metrics}
endpoint, and attacked by control clients that misbehave.

Every master gets its own control socket in a fresh temporary directory
(L{MasterProcess} passes C{--control}); every process and connection a test
starts is ended by its cleanups, even when it fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import struct
import sys
import time
from typing import Optional

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.logger import Logger
from twisted.trial import unittest

from txcluster._control import COMMAND_BURST, COMMAND_RATE

from tests._harness import (
    ROOT,
    MasterProcess,
    RecordingLoad,
    app,
    freePort,
    pidAlive,
    sleep,
    socketInodes,
    socketPath,
)
from tests.test_lifecycle_integration import observe

_log = Logger(namespace="tests.test_operations_integration")

#: The installed console script, next to the interpreter running the tests;
#: C{python -m txcluster} where it is not installed (said on stderr: the
#: script itself then goes untested).
SCRIPT = os.path.join(os.path.dirname(sys.executable), "txcluster")
if os.path.exists(SCRIPT):
    COMMAND = [SCRIPT]
else:
    COMMAND = [sys.executable, "-m", "txcluster"]
    sys.stderr.write(
        f"tests.test_operations_integration: no console script at {SCRIPT}; "
        f"running {' '.join(COMMAND)} instead\n"
    )

READY = r"worker \d \(pid \d+\) ready in"
CONTROL_UP = r"control socket: "
METRICS_UP = r"metrics, /healthz and /readyz on "


# Child processes -----------------------------------------------------------------


class _Child(protocol.ProcessProtocol):
    """
    A child's stdout and stderr, and its end.

    @ivar ended: fires with C{(exitCode, signal)} once the child is gone.
    """

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended = defer.Deferred()
        self.status: Optional[tuple] = None
        self._waiters: list = []

    def outReceived(self, data: bytes) -> None:
        self.out += data
        for waiter in list(self._waiters):
            predicate, d = waiter
            if predicate(self.text()):
                self._waiters.remove(waiter)
                d.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def text(self) -> str:
        return self.out.decode("utf-8", "replace")

    def errors(self) -> str:
        return self.err.decode("utf-8", "replace")

    def waitForOutput(self, predicate, timeout: float = 10.0) -> defer.Deferred:
        """
        Fires once C{predicate(stdout so far)} is true.
        """
        if predicate(self.text()):
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append((predicate, d))
        return d.addTimeout(timeout, reactor)

    def processEnded(self, reason) -> None:
        self.status = (getattr(reason.value, "exitCode", None), getattr(reason.value, "signal", None))
        for _, d in self._waiters:
            d.errback(AssertionError(f"the command ended first: {self.status}\n{self.text()}{self.errors()}"))
        self._waiters = []
        self.ended.callback(self.status)


class CommandResult:
    """
    How a C{txcluster} command ended.
    """

    def __init__(self, code: Optional[int], out: str, err: str, took: float) -> None:
        self.code = code
        self.out = out
        self.err = err
        self.took = took

    def __repr__(self) -> str:
        return f"<exit {self.code} after {self.took:.2f} s; stdout {self.out!r}; stderr {self.err!r}>"


def commandEnvironment(pythonpath: str = ROOT) -> dict:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [pythonpath] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return environment


def spawnCommand(testCase, control: str, *args: str, argv0: Optional[list] = None, env=None, **spawnArgs) -> tuple:
    """
    Start C{txcluster --control CONTROL ARGS...}; return C{(child,
    transport)}.  Cleanup kills it if it still runs.
    """
    child = _Child()
    argv = list(argv0 or COMMAND) + ["--control", control, *args]
    transport = reactor.spawnProcess(
        child, argv[0], argv, env=env or commandEnvironment(), childFDs={0: "w", 1: "r", 2: "r"}, **spawnArgs
    )

    async def kill() -> None:
        if transport.pid is not None:
            transport.signalProcess("KILL")
            await observe(child.ended)

    testCase.addCleanup(kill)
    return child, transport


async def txcluster(testCase, control: str, *args: str, timeout: float = 30.0, **kwargs) -> CommandResult:
    """
    Run C{txcluster --control CONTROL ARGS...} to its end.
    """
    started = time.monotonic()
    child, transport = spawnCommand(testCase, control, *args, **kwargs)
    try:
        code, _ = await observe(child.ended).addTimeout(timeout, reactor)
    except defer.TimeoutError:
        raise AssertionError(f"txcluster {' '.join(args)} did not end within {timeout} s: {child.text()}{child.errors()}")
    result = CommandResult(code, child.text(), child.errors(), time.monotonic() - started)
    _log.info("txcluster {args}: {result!r}", args=" ".join(args), result=result)
    return result


async def ended(master: MasterProcess, timeout: float = 15.0) -> tuple:
    """
    C{(exitCode, signal)} of the master's end, within C{timeout} seconds.
    """
    reason = await observe(master.output.ended).addTimeout(timeout, reactor)
    return (getattr(reason, "exitCode", None), getattr(reason, "signal", None))


def parentOf(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


async def gone(pids, seconds: float) -> list:
    """
    Wait up to C{seconds} for every process in C{pids} to be gone; those
    still alive then.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(pidAlive(p) for p in pids):
        await sleep(0.02)
    return [p for p in pids if pidAlive(p)]


# Masters -------------------------------------------------------------------------


class Cluster:
    """
    A master running counting.tac on C{port}, with C{metricsPort} when
    started with C{--metrics}.
    """

    def __init__(self, master: MasterProcess, port: int, metricsPort: Optional[int]) -> None:
        self.master = master
        self.port = port
        self.metricsPort = metricsPort

    @property
    def control(self) -> str:
        return self.master.control

    def text(self) -> str:
        return self.master.output.text()


async def startCluster(
    testCase, *args: str, workers: int = 2, metrics: bool = False, control: Optional[str] = None, wait: bool = True
) -> Cluster:
    """
    A master of C{workers} counting.tac workers (graceful timeout 2 s),
    once its control socket is served and every worker is ready.
    """
    port = freePort()
    metricsPort = freePort() if metrics else None
    options = ["--app", app("counting.tac"), "--workers", str(workers), "--graceful-timeout", "2"]
    if metricsPort is not None:
        options += ["--metrics", f"tcp:{metricsPort}:interface=127.0.0.1"]
    if control is not None:
        options += ["--control", control]
    master = MasterProcess(testCase, options + list(args), env={"COUNTING_PORT": str(port)})
    if control is not None:
        master.control = control
    cluster = Cluster(master, port, metricsPort)
    if wait:
        await master.waitFor(CONTROL_UP)
        await master.waitFor(READY, count=workers)
        if metrics:
            await master.waitFor(METRICS_UP)
    return cluster


async def status(testCase, cluster: Cluster) -> dict:
    """
    What C{txcluster status --json} prints, parsed (the command must
    succeed).
    """
    result = await txcluster(testCase, cluster.control, "status", "--json")
    testCase.assertEqual(result.code, 0, result)
    return json.loads(result.out)


def pidsOf(answer: dict) -> dict:
    return {w["id"]: w["pid"] for w in answer["workers"]}


async def get(port: int, path: str = "/", timeout: float = 10.0):
    """
    One HTTP/1.0 GET on loopback; its L{RequestRecord}.
    """
    return await RecordingLoad(port, timeout=timeout).request(path)


async def fetch(port: int, path: str) -> tuple:
    """
    C{(status, body)} of a GET on the master's metrics endpoint.
    """
    import treq

    response = await treq.get(f"http://127.0.0.1:{port}{path}", persistent=False, timeout=10)
    body = await response.text()
    return response.code, body


def answeredPid(record) -> int:
    """
    The pid in counting.tac's answer ("pid N").
    """
    return int(record.answer.split()[1])


# 1. status -------------------------------------------------------------------


class StatusTests(unittest.TestCase):
    """
    C{txcluster status}, in JSON and as a table, against the master's real
    processes.
    """

    timeout = 30

    async def test_statusNamesTheRealProcesses(self):
        """
        C{status --json} names the master's pid and exactly the pids of the
        worker processes the master forked (live, in C{/proc}, children of
        the master), every one C{ready}; the table's header names the
        master's pid and it has one row per worker, with its id, pid and
        state.
        """
        cluster = await startCluster(self)
        forked = cluster.master.workerPids()
        answer = await status(self, cluster)
        self.assertEqual(answer["pid"], cluster.master.pid)
        self.assertEqual(answer["workerCount"], 2)
        self.assertEqual(answer["ready"], 2)
        self.assertEqual(pidsOf(answer), forked)
        self.assertEqual([w["state"] for w in answer["workers"]], ["ready", "ready"])
        for pid in forked.values():
            self.assertTrue(pidAlive(pid), pid)
            self.assertEqual(parentOf(pid), cluster.master.pid)
        self.assertEqual(
            [w["listens"] for w in answer["workers"]], [[f"tcp:127.0.0.1:{cluster.port}"]] * 2
        )

        table = await txcluster(self, cluster.control, "status")
        self.assertEqual(table.code, 0, table)
        lines = table.out.splitlines()
        self.assertTrue(lines[0].startswith(f"master pid {cluster.master.pid},"), table.out)
        self.assertIn("workers: 2/2 ready", lines[1])
        header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["ID", "PID", "STATE"])
        rows = [line.split() for line in lines[header + 1 :] if line.strip()]
        self.assertEqual([(int(r[0]), int(r[1]), r[2]) for r in rows], [(i, p, "ready") for i, p in sorted(forked.items())])


# 2.-4. reload, scale, recycle --------------------------------------------------


class OperationTests(unittest.TestCase):
    """
    C{txcluster reload}, C{scale} and C{recycle}: the processes change as
    the command says, and its exit code and summary say what happened.
    """

    timeout = 45

    async def test_reloadUnderLoad(self):
        """
        C{txcluster reload} while 4 loops send requests: it exits 0 once
        every worker process was replaced, its summary names each worker's
        old and new pid, the old processes are gone, no request failed, and
        every request started after the command returned was answered by a
        new process.
        """
        cluster = await startCluster(self)
        before = cluster.master.workerPids()
        load = RecordingLoad(cluster.port, concurrency=4)
        self.addCleanup(load.stop)
        load.start()
        deadline = time.monotonic() + 10
        while len(load.succeeded()) < 20 and time.monotonic() < deadline:
            await sleep(0.05)
        self.assertGreaterEqual(len(load.succeeded()), 20, load.summary())
        result = await txcluster(self, cluster.control, "reload")
        returned = time.monotonic()
        self.assertEqual(result.code, 0, result)
        after = pidsOf(await status(self, cluster))
        await sleep(0.5)
        await load.stop()

        self.assertEqual(set(after), {1, 2})
        self.assertFalse(set(after.values()) & set(before.values()), (before, after))
        self.assertEqual(after, cluster.master.workerPids())
        self.assertRegex(result.out, r"^reloaded 2 workers in \d+\.\d s")
        for workerId in (1, 2):
            self.assertIn(f"worker {workerId}: pid {before[workerId]} -> pid {after[workerId]}", result.out)
        self.assertEqual(await gone(before.values(), 3), [])
        self.assertEqual(load.failed(), [], load.summary())
        late = [r for r in load.succeeded() if r.start > returned]
        self.assertTrue(late, load.summary())
        self.assertEqual({answeredPid(r) for r in late} - set(after.values()), set())

    async def test_scaleUpAndDown(self):
        """
        C{scale 3} exits 0 once a third worker is ready, C{scale 1} once
        workers 2 and 3 have exited; status follows each time.  C{scale 0}
        is refused: exit 1, naming 0, and the cluster keeps its worker.
        """
        cluster = await startCluster(self)
        first = cluster.master.workerPids()
        up = await txcluster(self, cluster.control, "scale", "3")
        self.assertEqual(up.code, 0, up)
        self.assertIn("scaled from 2 to 3 workers", up.out)
        three = await status(self, cluster)
        self.assertEqual(three["workerCount"], 3)
        self.assertEqual([w["state"] for w in three["workers"]], ["ready"] * 3)
        self.assertEqual({i: p for i, p in pidsOf(three).items() if i < 3}, first)
        self.assertTrue(pidAlive(pidsOf(three)[3]))

        down = await txcluster(self, cluster.control, "scale", "1")
        self.assertEqual(down.code, 0, down)
        self.assertIn("scaled from 3 to 1 worker in", down.out)
        one = await status(self, cluster)
        self.assertEqual(one["workerCount"], 1)
        self.assertEqual(pidsOf(one), {1: first[1]})
        removed = [first[2], pidsOf(three)[3]]
        self.assertEqual([p for p in removed if pidAlive(p)], [])

        zero = await txcluster(self, cluster.control, "scale", "0")
        self.assertEqual(zero.code, 1, zero)
        self.assertEqual(zero.out, "")
        self.assertRegex(zero.err, r"^txcluster scale: .*\b0\b")
        self.assertEqual(pidsOf(await status(self, cluster)), {1: first[1]})

    async def test_recycleOneWorker(self):
        """
        C{recycle 1} exits 0 once worker 1 runs a new process (its summary
        names the old and the new pid) and the old one has exited; worker 2
        keeps its process.  C{recycle 9} exits 1 naming worker 9, and
        changes nothing.
        """
        cluster = await startCluster(self)
        before = cluster.master.workerPids()
        result = await txcluster(self, cluster.control, "recycle", "1")
        self.assertEqual(result.code, 0, result)
        after = pidsOf(await status(self, cluster))
        self.assertNotEqual(after[1], before[1])
        self.assertEqual(after[2], before[2])
        self.assertIn(f"pid {before[1]} -> pid {after[1]}", result.out)
        self.assertFalse(pidAlive(before[1]))
        self.assertTrue(pidAlive(after[1]))

        missing = await txcluster(self, cluster.control, "recycle", "9")
        self.assertEqual(missing.code, 1, missing)
        self.assertEqual(missing.out, "")
        self.assertRegex(missing.err, r"^txcluster recycle: .*\b9\b")
        self.assertEqual(pidsOf(await status(self, cluster)), after)


# 5. stacks -------------------------------------------------------------------


class StacksTests(unittest.TestCase):
    """
    C{txcluster stacks} on a worker whose reactor is blocked.
    """

    timeout = 30

    async def test_stacksOfABlockedWorker(self):
        """
        While worker 1's reactor is blocked in counting.tac's
        C{blockedForStacks} (a C{/block?seconds=3} request; rr scheduling
        hands requests in turn, so one more is sent until the master says
        it handed one to worker 1), C{stacks 1} exits 0 and prints worker
        1's pid and a stack through C{blockedForStacks}.  The worker is not
        killed: it answers the blocked request itself, and keeps its pid.
        C{stacks 9} exits 1 naming worker 9.
        """
        cluster = await startCluster(self)
        pids = cluster.master.workerPids()
        blocked = []
        for _ in range(3):
            blocked.append(defer.ensureDeferred(get(cluster.port, "/block?seconds=3", timeout=20)))
            deadline = time.monotonic() + 5
            handed = {}
            while time.monotonic() < deadline:
                handed = {w["id"]: w["handed"] for w in (await status(self, cluster))["workers"]}
                if sum(handed.values()) >= len(blocked):
                    break
                await sleep(0.05)
            if handed.get(1):
                break
        self.assertTrue(handed.get(1), handed)

        for _ in range(10):
            result = await txcluster(self, cluster.control, "stacks", "1")
            if result.code != 0 or "blockedForStacks" in result.out:
                break
            # Handed, but not yet in the application's code.
            await sleep(0.1)
        self.assertEqual(result.code, 0, result)
        self.assertTrue(result.out.startswith(f"worker 1 (pid {pids[1]}):\n"), result.out)
        self.assertIn("in blockedForStacks", result.out)
        self.assertIn("counting.tac", result.out)

        records = await defer.gatherResults(blocked)
        self.assertEqual([r for r in records if not r.ok], [], records)
        self.assertIn(pids[1], [answeredPid(r) for r in records])
        self.assertTrue(pidAlive(pids[1]))
        answer = await status(self, cluster)
        self.assertEqual(pidsOf(answer), pids)
        self.assertEqual([w["restarts"] for w in answer["workers"]], [0, 0])
        self.assertNotIn(f"pid {pids[1]}) died", cluster.text())

        missing = await txcluster(self, cluster.control, "stacks", "9")
        self.assertEqual(missing.code, 1, missing)
        self.assertEqual(missing.out, "")
        self.assertRegex(missing.err, r"^txcluster stacks: .*\b9\b")


# 6. watch --------------------------------------------------------------------


class WatchTests(unittest.TestCase):
    """
    C{txcluster watch --json}, a long-running command.
    """

    timeout = 40

    async def test_watchSeesTheLifecycleUntilTheMasterStops(self):
        """
        C{watch --json} prints one JSON object a line: a C{fork} of the new
        process and an C{exit} of the old one when worker 1 is recycled,
        the C{fork} of worker 3 on C{scale 3}; once C{txcluster stop} has
        stopped the master it prints C{stopping} and the workers' exits,
        says "the master stopped" and exits 0.
        """
        cluster = await startCluster(self)
        before = cluster.master.workerPids()
        watch, transport = spawnCommand(self, cluster.control, "watch", "--json")
        # The command connects, then asks to watch at once: wait until it
        # holds its socket, and for the one round trip.
        deadline = time.monotonic() + 10
        while not socketInodes(transport.pid) and time.monotonic() < deadline:
            await sleep(0.02)
        self.assertTrue(socketInodes(transport.pid), "the watch never connected")
        await sleep(0.3)

        def events(text: str) -> list:
            return [json.loads(line) for line in text.splitlines() if line.strip()]

        def seen(**fields):
            return lambda text: any(all(e.get(k) == v for k, v in fields.items()) for e in events(text))

        recycled = await txcluster(self, cluster.control, "recycle", "1")
        self.assertEqual(recycled.code, 0, recycled)
        new = pidsOf(await status(self, cluster))[1]
        await watch.waitForOutput(seen(event="exit", workerId=1, pid=before[1]))
        self.assertTrue(seen(event="fork", workerId=1, pid=new)(watch.text()), watch.text())
        exit1 = [e for e in events(watch.text()) if e["event"] == "exit" and e["pid"] == before[1]][0]
        self.assertEqual((exit1["exitCode"], exit1["signal"], exit1["expected"]), (0, None, True))

        scaled = await txcluster(self, cluster.control, "scale", "3")
        self.assertEqual(scaled.code, 0, scaled)
        third = pidsOf(await status(self, cluster))[3]
        await watch.waitForOutput(seen(event="fork", workerId=3, pid=third))

        stopped = await txcluster(self, cluster.control, "stop")
        self.assertEqual(stopped.code, 0, stopped)
        self.assertEqual(await observe(watch.ended).addTimeout(10, reactor), (0, None), watch.errors())
        self.assertIn("the master stopped", watch.errors())
        record = events(watch.text())
        names = [e["event"] for e in record]
        self.assertIn("stopping", names)
        self.assertEqual(
            {e["pid"] for e in record[names.index("stopping") :] if e["event"] == "exit"},
            {new, before[2], third},
        )
        for e in record:
            self.assertIsInstance(e["time"], float)
        self.assertEqual(await ended(cluster.master), (0, None))


# 7. stop ---------------------------------------------------------------------


class StopTests(unittest.TestCase):
    """
    C{txcluster stop}.
    """

    timeout = 30

    async def test_stopWaitsForTheWorkersAndTheMasterExitsZero(self):
        """
        C{txcluster stop} exits 0 once both worker processes are gone (its
        summary says 2), the master exits 0 right after, having logged a
        graceful stop, and the control socket file is removed.
        """
        cluster = await startCluster(self)
        pids = cluster.master.workerPids()
        self.assertTrue(stat.S_ISSOCK(os.lstat(cluster.control).st_mode))
        result = await txcluster(self, cluster.control, "stop")
        self.assertEqual(result.code, 0, result)
        self.assertIn("stopped: 2 worker processes gone", result.out)
        self.assertEqual([p for p in pids.values() if pidAlive(p)], [])
        self.assertEqual(await ended(cluster.master, 10), (0, None), cluster.text())
        text = cluster.text()
        self.assertIn("txcluster stop: stopping gracefully", text)
        for workerId, pid in pids.items():
            self.assertIn(f"worker {workerId} (pid {pid}) exited (exit code 0)", text)
        self.assertNotIn("Traceback", text)
        self.assertFalse(os.path.lexists(cluster.control), os.listdir(os.path.dirname(cluster.control)))


# 8. No master, a stale socket, a live one ------------------------------------


class SocketPathTests(unittest.TestCase):
    """
    What is, or is not, at the control socket's path.
    """

    timeout = 40

    async def test_noMaster(self):
        """
        C{status} against a path with nothing there exits 3 and says so in
        one line naming the path, with nothing on stdout.
        """
        path = socketPath(self, "nothing.sock")
        result = await txcluster(self, path, "status")
        self.assertEqual(result.code, 3, result)
        self.assertEqual(result.out, "")
        self.assertEqual(len(result.err.splitlines()), 1, result)
        self.assertIn(path, result.err)

    async def test_staleSocketIsReplaced(self):
        """
        A master SIGKILLed leaves its socket file behind: C{status} against
        it exits 3 (nothing answers).  The next master started with the
        same C{--control} removes it, serves its own there, and answers
        C{status} with its own pid.
        """
        first = await startCluster(self)
        path = first.control
        first.master.signal("KILL")
        self.assertEqual((await ended(first.master))[1], signal.SIGKILL)
        self.assertTrue(stat.S_ISSOCK(os.lstat(path).st_mode), "the killed master's socket file is not there")
        stale = await txcluster(self, path, "status")
        self.assertEqual(stale.code, 3, stale)
        self.assertIn(path, stale.err)

        second = await startCluster(self, control=path)
        self.assertIn(f"removing the stale control socket {path}", second.text())
        answer = await status(self, second)
        self.assertEqual(answer["pid"], second.master.pid)
        self.assertEqual(pidsOf(answer), second.master.workerPids())

    async def test_secondMasterOnALiveSocketFails(self):
        """
        A second master started with the control socket of a live one
        fails (a non-zero exit) before it forks any worker, and its output
        names the path; the first master keeps its socket and answers as
        before.
        """
        first = await startCluster(self)
        second = await startCluster(self, control=first.control, wait=False)
        code, _ = await ended(second.master, 20)
        text = second.text()
        self.assertNotEqual(code, 0, text)
        self.assertIn(first.control, text)
        self.assertIn("already running", text)
        self.assertNotIn(CONTROL_UP, text)
        self.assertNotIn("forked", text)
        self.assertTrue(stat.S_ISSOCK(os.lstat(first.control).st_mode))
        answer = await status(self, first)
        self.assertEqual(answer["pid"], first.master.pid)
        self.assertEqual(pidsOf(answer), first.master.workerPids())
        # Whatever the failed master forked does not outlive it.
        self.assertEqual(await gone(second.master.workerPids().values(), 5), [])


# 9.-10. /metrics, /healthz, /readyz --------------------------------------------


def familySum(text: str, sample: str, **labels) -> float:
    """
    The sum of the values of every sample named C{sample} (with C{labels})
    in an exposition.
    """
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


class MetricsTests(unittest.TestCase):
    """
    The master's C{/metrics}: the applications' own counters, added up
    across the workers and across their processes.
    """

    timeout = 40

    async def scrape(self, cluster: Cluster) -> str:
        code, body = await fetch(cluster.metricsPort, "/metrics")
        self.assertEqual(code, 200, body)
        return body

    async def requests(self, cluster: Cluster, count: int, path: str) -> None:
        records = [await get(cluster.port, path) for _ in range(count)]
        self.assertEqual([r for r in records if not r.ok], [])

    async def test_applicationCountersSurviveAReload(self):
        """
        After N requests the sum over workers of C{app_requests_total} is
        N.  K more requests (not scraped before), a C{txcluster reload}
        and M more: it is N+K+M (what an old process counted is kept once
        it is gone).  C{txcluster_connections_handed_total} sums to at
        least N+K+M, and C{txcluster_workers{state="ready"}} is 2.
        """
        cluster = await startCluster(self, metrics=True)
        N, K, M = 10, 5, 7
        await self.requests(cluster, N, "/n")
        text = await self.scrape(cluster)
        self.assertEqual(familySum(text, "app_requests_total"), N, text)
        self.assertEqual(familySum(text, "app_requests_total", path="/n"), N)
        workers = set(re.findall(r'^app_requests_total\{[^}]*worker="(\d+)"', text, re.M))
        self.assertTrue(workers and workers <= {"1", "2"}, text)

        await self.requests(cluster, K, "/k")
        reloaded = await txcluster(self, cluster.control, "reload")
        self.assertEqual(reloaded.code, 0, reloaded)
        await self.requests(cluster, M, "/m")
        text = await self.scrape(cluster)
        self.assertEqual(
            {path: familySum(text, "app_requests_total", path=path) for path in ("/n", "/k", "/m")},
            {"/n": N, "/k": K, "/m": M},
            text,
        )
        self.assertEqual(familySum(text, "app_requests_total"), N + K + M)
        self.assertGreaterEqual(familySum(text, "txcluster_connections_handed_total"), N + K + M, text)
        self.assertEqual(familySum(text, "txcluster_workers", state="ready"), 2, text)


class HealthTests(unittest.TestCase):
    """
    C{/healthz} and C{/readyz}, and C{--drain-delay}.
    """

    timeout = 40

    async def test_healthAndReadiness(self):
        """
        C{/readyz}, asked over and over from the master's start, answers
        503 ("not ready") until both workers are ready, then 200;
        C{/healthz} answers 200 with a JSON body counting 2 ready workers
        of 2.
        """
        cluster = await startCluster(self, metrics=True, wait=False)
        answers = []
        started = time.monotonic()
        while time.monotonic() - started < 20:
            try:
                code, body = await fetch(cluster.metricsPort, "/readyz")
            except Exception as e:
                # Not bound yet.
                answers.append((None, repr(e)))
            else:
                answers.append((code, json.loads(body)))
                if code == 200:
                    break
            await sleep(0.02)
        code, body = answers[-1]
        self.assertEqual(code, 200, answers)
        self.assertEqual((body["status"], body["ready"], body["minReady"]), ("ready", 2, 2), body)
        await cluster.master.waitFor(READY, count=2, timeout=2)
        for earlier in answers[:-1]:
            if earlier[0] is not None:
                self.assertEqual((earlier[0], earlier[1]["status"]), (503, "not ready"), answers)
                self.assertLess(earlier[1]["ready"], 2, answers)
        _log.info("/readyz: {answers}", answers=answers)

        code, body = await fetch(cluster.metricsPort, "/healthz")
        self.assertEqual(code, 200, body)
        health = json.loads(body)
        self.assertEqual((health["status"], health["ready"], health["workers"]), ("ok", 2, 2), health)

    async def test_drainDelay(self):
        """
        With C{--drain-delay 2}, after SIGTERM to the master C{/readyz}
        answers 503 within 0.5 s, while application requests made during
        the delay are all answered, and C{txcluster status} says the
        cluster is stopping with both workers still there; a SIGHUP or
        SIGTTIN meanwhile is not acted on; the master exits 0 once the
        delay and the drain are over, not before the delay.
        """
        cluster = await startCluster(self, "--drain-delay", "2", metrics=True)
        self.assertEqual((await fetch(cluster.metricsPort, "/readyz"))[0], 200)
        sent = time.monotonic()
        cluster.master.signal("TERM")
        answers = []
        while time.monotonic() - sent < 2:
            answers.append((time.monotonic() - sent,) + await fetch(cluster.metricsPort, "/readyz"))
            if answers[-1][1] == 503:
                break
            await sleep(0.02)
        took, code, body = answers[-1]
        self.assertEqual(code, 503, answers)
        self.assertLess(took, 0.5, answers)
        self.assertEqual(json.loads(body)["stopping"], True)
        during = await status(self, cluster)
        self.assertEqual((during["stopping"], during["ready"]), (True, 2), during)

        # A reload or scaling signal meanwhile (the default actions kill or
        # suspend a process) is logged and not acted on.
        cluster.master.signal("HUP")
        cluster.master.signal("TTIN")
        records = []
        while time.monotonic() - sent < 1.6:
            records.append(await get(cluster.port, "/during"))
            await sleep(0.1)
        self.assertGreaterEqual(len(records), 5)
        self.assertEqual([r for r in records if not r.ok], [], records)
        self.assertTrue(all(r.end - sent < 2 for r in records), records)

        self.assertEqual(await ended(cluster.master, 15), (0, None), cluster.text())
        self.assertGreaterEqual(time.monotonic() - sent, 2)
        self.assertIn("--drain-delay", cluster.text())
        self.assertEqual(cluster.text().count("signal not acted on"), 2, cluster.text())


# 11. Hostile control clients ---------------------------------------------------


class _RawClient(protocol.Protocol):
    """
    A control client that writes what it is told and records what comes
    back, and when it is cut off.
    """

    def __init__(self) -> None:
        self.received = b""
        self.lost = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.lost.callback(None)


def ampBox(*pairs: tuple) -> bytes:
    """
    One AMP box on the wire: each key and value behind its 16-bit length,
    then an empty key.
    """
    return b"".join(struct.pack("!H", len(k)) + k + struct.pack("!H", len(v)) + v for k, v in pairs) + b"\x00\x00"


async def rawClient(testCase, path: str) -> tuple:
    """
    A L{_RawClient} connected to C{path}; cleanup aborts it.
    """
    client = await connectProtocol(UNIXClientEndpoint(reactor, path, timeout=5), _RawClient())

    async def close():
        if not client.lost.called:
            client.transport.abortConnection()
            await observe(client.lost)

    testCase.addCleanup(close)
    return client


class HostileControlClientTests(unittest.TestCase):
    """
    Control clients that do not play by the rules, against a live master:
    each is cut off or refused, logged, and the operator's C{status} still
    works.
    """

    timeout = 40

    async def test_garbageIsCutOff(self):
        """
        A client that writes bytes that are not AMP (an HTTP request) is
        disconnected with nothing answered, the master logs "cutting it
        off" naming the client's pid, and C{status} still works.
        """
        cluster = await startCluster(self)
        client = await rawClient(self, cluster.control)
        client.transport.write(b"GET / HTTP/1.0\r\nHost: txcluster\r\n\r\n" + bytes(range(256)))
        await observe(client.lost).addTimeout(5, reactor)
        self.assertEqual(client.received, b"")
        await cluster.master.waitFor(rf"control client pid {os.getpid()} \(uid {os.getuid()}\) .*; cutting it off", timeout=5)
        answer = await status(self, cluster)
        self.assertEqual(answer["pid"], cluster.master.pid)
        self.assertEqual(answer["ready"], 2)

    async def test_floodIsCutOff(self):
        """
        A client that writes 2000 C{Status} commands at once is cut off
        for sending "faster than" the master's rate, having had at most
        the burst answered; a C{status} run at the same time answers, and
        the master serves on.
        """
        cluster = await startCluster(self)
        client = await rawClient(self, cluster.control)
        flood = b"".join(ampBox((b"_command", b"Status"), (b"_ask", b"%x" % n)) for n in range(1, 2001))
        # The operator's status is on its way (connected, its answer
        # pending) when the flood arrives.
        started = time.monotonic()
        operator, transport = spawnCommand(self, cluster.control, "status", "--json")
        while operator.status is None and not socketInodes(transport.pid) and time.monotonic() - started < 10:
            await sleep(0.005)
        _log.info("the flood starts {when:.2f} s after the operator's status (pending: {pending})",
                  when=time.monotonic() - started, pending=operator.status is None)
        client.transport.write(flood)
        await observe(client.lost).addTimeout(10, reactor)
        await cluster.master.waitFor(
            rf"control client pid {os.getpid()} \(uid {os.getuid()}\) sent commands faster than "
            rf"{COMMAND_RATE:.0f} a second; cutting it off",
            timeout=5,
        )
        answered = client.received.count(b"\x00\x06_answer")
        self.assertLessEqual(answered, COMMAND_BURST)
        self.assertEqual(await observe(operator.ended).addTimeout(10, reactor), (0, None), operator.errors())
        self.assertEqual(json.loads(operator.text())["pid"], cluster.master.pid)
        after = await status(self, cluster)
        self.assertEqual((after["pid"], after["ready"]), (cluster.master.pid, 2))
        self.assertEqual(pidsOf(after), cluster.master.workerPids())

    async def test_otherUserIsRefused(self):
        """
        The control socket is mode 0600: a user other than root and the
        master's cannot connect (C{txcluster status} as that user exits 3,
        "permission denied").  With its permissions loosened (the file 0666,
        its directory 0711), that user's C{status} reaches the master and
        is refused on its peer credentials: the master logs "refused
        control client" with the user's uid, the command gets no answer (it
        exits 3), and the master serves root's C{status} as before.  Needs
        root, to make the user.
        """
        from tests.test_privileges import UnprivilegedUser

        user = UnprivilegedUser(self)
        uid, gid = user.entry.pw_uid, user.entry.pw_gid
        cluster = await startCluster(self)
        path = cluster.control
        self.assertEqual(stat.S_IMODE(os.lstat(path).st_mode), 0o600)
        asUser = dict(
            argv0=[user.python, "-m", "txcluster"],
            env={"PYTHONPATH": user.pythonpath, "PATH": os.environ.get("PATH", "")},
            uid=uid,
            gid=gid,
            path="/",
        )

        denied = await txcluster(self, path, "status", **asUser)
        self.assertEqual(denied.code, 3, denied)
        self.assertIn("permission denied", denied.err)
        self.assertNotIn("refused control client", cluster.text())

        os.chmod(os.path.dirname(path), 0o711)
        os.chmod(path, 0o666)
        refused = await txcluster(self, path, "status", **asUser)
        self.assertEqual(refused.code, 3, refused)
        self.assertEqual(refused.out, "")
        await cluster.master.waitFor(rf"refused control client pid \d+ \(uid {uid}\)", timeout=5)
        answer = await status(self, cluster)
        self.assertEqual(answer["pid"], cluster.master.pid)
