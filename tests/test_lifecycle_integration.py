"""
The worker lifecycle as an operator sees it, with a real C{twistd -n
txcluster} master (a child of the test) and real workers: stop signals at
any moment of start-up, an operator's signal to one worker, Ctrl-C to the
whole process group, the master's death while a worker's reactor is
blocked, an application whose shutdown closes its WebSockets when its
worker leaves, and the durations the log shows.
"""

import os
import re
import signal
import stat
import sys
import time

from twisted.internet import defer, protocol, reactor
from twisted.logger import Logger
from twisted.trial import unittest

from tests._harness import (
    MasterProcess,
    RecordingLoad,
    app,
    freePort,
    pidAlive,
    sleep,
    tcp,
)

#: Timings go to trial's log (_trial_temp/test.log), for whoever reads it.
_log = Logger(namespace="tests.test_lifecycle_integration")

#: How long slowstart.tac takes to load, then to start, in these tests: a
#: stop can come while a worker's interpreter starts, while it loads the
#: file, while its services start, or once it is ready.
SLOW = {"SLOW_LOAD": "0.5", "SLOW_START": "0.3"}

#: What a quiet stop never shows.
NOISE = ("Traceback", "KeyboardInterrupt", "could not start", "could not load", "Unhandled")

#: A duration, or any number, that was not rounded for the log.
UNROUNDED = re.compile(r"\d+\.\d{3,}")


def forked(text: str) -> list:
    """
    C{(workerId, pid)} of every worker process the log says was forked, in
    order (a respawned worker appears once per process).
    """
    return [(int(w), int(p)) for w, p in re.findall(r"worker (\d+) \(pid (\d+)\) forked", text)]


def readyPids(text: str, workerId: int) -> list:
    """
    The pids of worker C{workerId}'s processes that became ready, in order.
    """
    return [int(p) for p in re.findall(rf"worker {workerId} \(pid (\d+)\) ready in", text)]


def exitStatus(reason) -> tuple:
    """
    C{(exitCode, signal)} of an ended process (C{signal} is L{None} unless
    a signal ended it).
    """
    return (getattr(reason, "exitCode", None), getattr(reason, "signal", None))


async def ended(master: MasterProcess, timeout: float = 15.0):
    """
    The master's end (its C{processEnded} reason's value), within
    C{timeout} seconds.
    """
    return await within(observe(master.output.ended), timeout)


def observe(d: defer.Deferred) -> defer.Deferred:
    """
    A new Deferred with C{d}'s result, leaving C{d}'s own as it is.
    """
    mine = defer.Deferred()

    def both(result):
        mine.callback(result)
        return result

    if d.called:
        mine.callback(d.result)
    else:
        d.addBoth(both)
    return mine


def within(d: defer.Deferred, seconds: float) -> defer.Deferred:
    """
    C{d}, failed with L{defer.TimeoutError} if it has not fired within
    C{seconds}.
    """
    return d.addTimeout(seconds, reactor)


async def gone(pids, seconds: float) -> list:
    """
    Wait up to C{seconds} for every process in C{pids} to be gone; return
    those still alive then.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(pidAlive(p) for p in pids):
        await sleep(0.02)
    return [p for p in pids if pidAlive(p)]


def get(port: int, path: str = "/") -> defer.Deferred:
    """
    One HTTP/1.0 GET on loopback; fires with its L{RequestRecord}.
    """
    return RecordingLoad(port, timeout=10).request(path)


class StopTests:
    """
    Assertions about a master's stop, for the test cases below.
    """

    def assertQuietCleanStop(self, master: MasterProcess, reason, signalName: str) -> None:
        """
        The master took C{signalName} as a graceful stop and exited 0, no
        traceback or failed boot was logged, and every worker it forked
        exited 0 (and is gone).
        """
        text = master.output.text()
        self.assertEqual(exitStatus(reason), (0, None), text)
        for noise in NOISE + ("killed by", " died "):
            self.assertNotIn(noise, text, f"{noise!r} in the log:\n{text}")
        self.assertIn(f"{signalName}: stopping gracefully", text, text)
        for workerId, pid in forked(text):
            self.assertIn(f"worker {workerId} (pid {pid}) exited (exit code 0)", text, text)
            self.assertFalse(pidAlive(pid), (workerId, pid))
        self.assertRoundedDurations(text)

    def assertRoundedDurations(self, text: str) -> None:
        """
        No line of C{text} shows a number with more than two decimals.
        """
        self.assertEqual([line for line in text.splitlines() if UNROUNDED.search(line)], [])


# 1. A stop at any moment of start-up ------------------------------------------


class StartUpStopTests(unittest.TestCase, StopTests):
    """
    SIGTERM or SIGINT to the master while its workers start (slowstart.tac:
    the file takes 0.5 s to load, its services 0.3 s to start, then it
    listens on tcp:0 on loopback): the master stops gracefully, quietly.

    Each moment is given by a line of the log, and a delay after it, so that
    it falls in the same phase of the start-up however fast the machine
    is: twistd's first line ("twistd ... starting up", by which time the
    txcluster plugin has built its service; before it, nothing of
    txcluster has run yet and a signal has the interpreter's default
    effect), the first "forked", a worker's "slowstart: loading" (it loads
    the file) and "slowstart: starting" (it starts the application's
    services), and both workers ready.
    """

    timeout = 30

    def startMaster(self) -> MasterProcess:
        return MasterProcess(self, ["--app", app("slowstart.tac"), "--workers", "2"], env=SLOW)

    async def stopAt(self, signalName: str, pattern: str, delay: float = 0.0, count: int = 1) -> None:
        master = self.startMaster()
        await master.waitFor(pattern, count=count)
        if delay:
            await sleep(delay)
        sent = time.monotonic()
        master.signal(signalName)
        reason = await ended(master)
        took = time.monotonic() - sent
        _log.info("{test}: the stop took {took:.2f} s", test=self.id(), took=took)
        self.assertQuietCleanStop(master, reason, "SIG" + signalName)
        # Nothing waits for the graceful timeout (30 s): at worst for a
        # worker to finish loading and starting the application.
        self.assertLess(took, 10, master.output.text())


TWISTD_STARTS = r"starting up"
FORKED = r"worker \d \(pid \d+\) forked"
LOADING = r"slowstart: loading"
STARTING = r"slowstart: starting"
READY = r"worker \d \(pid \d+\) ready"

#: (name, what the docstring says, pattern, count, delay)
MOMENTS = [
    ("AtTwistdsFirstLine", "as soon as twistd logs that it starts", TWISTD_STARTS, 1, 0.0),
    ("RightAfterTheFirstFork", "the moment the first worker is forked (the master's reactor is not running yet)",
     FORKED, 1, 0.0),
    ("After0_1s", "0.1 s after twistd's first line", TWISTD_STARTS, 1, 0.1),
    ("After0_3s", "0.3 s after twistd's first line", TWISTD_STARTS, 1, 0.3),
    ("After0_6s", "0.6 s after twistd's first line", TWISTD_STARTS, 1, 0.6),
    ("After1_0s", "1.0 s after twistd's first line", TWISTD_STARTS, 1, 1.0),
    ("WhileAWorkerLoadsTheApp", "while a worker loads the application file", LOADING, 1, 0.1),
    ("WhileAWorkerStartsTheApp", "while a worker starts the application's services", STARTING, 1, 0.1),
    ("OnceTheWorkersAreReady", "once both workers are ready", READY, 2, 0.0),
]


def _addMoments(cls, moments):
    for name, when, pattern, count, delay in moments:
        for signalName in ("TERM", "INT"):
            def test(self, pattern=pattern, count=count, delay=delay, signalName=signalName):
                return defer.ensureDeferred(self.stopAt(signalName, pattern, delay, count))

            test.__name__ = f"test_{signalName.lower()}{name}"
            test.__doc__ = (
                f"SIG{signalName} to the master {when}: a quiet, graceful stop (no traceback, "
                "no failed boot); every worker exits 0, and so does the master."
            )
            setattr(cls, test.__name__, test)


_addMoments(StartUpStopTests, MOMENTS)


# 2. An operator's signal to one worker ----------------------------------------


class WorkerSignalTests(unittest.TestCase, StopTests):
    """
    Signals an operator sends to one worker process.
    """

    timeout = 40

    def startMaster(self, *args) -> tuple:
        port = freePort()
        master = MasterProcess(
            self,
            ["--app", app("web.tac"), "--workers", "2", "--max-restarts", "1", *args],
            env={"WEB_LISTEN": f"tcp:{port}:interface=127.0.0.1"},
        )
        return master, port

    async def test_sigtermToAWorkerIsNotAFailure(self):
        """
        SIGTERM to a worker makes it leave gracefully on its own: it exits
        0, is replaced under its id, and its exit is not counted as a
        failure.  With --max-restarts 1, three in a row (each once the
        replacement is ready) leave the master serving with 2 workers.
        """
        master, port = self.startMaster()
        await master.waitFor(r"worker \d \(pid \d+\) ready", count=2)
        terminated = []
        for n in range(1, 4):
            (pid,) = readyPids(master.output.text(), 1)[-1:]
            os.kill(pid, signal.SIGTERM)
            terminated.append(pid)
            await master.waitFor(r"worker 1 \(pid \d+\) ready", count=n + 1, timeout=15)
        await sleep(0.3)
        text = master.output.text()
        self.assertIsNotNone(master.transport.pid, text)
        self.assertNotIn("giving up", text)
        for pid in terminated:
            self.assertIn(f"worker 1 (pid {pid}) is leaving on its own (SIGTERM)", text)
            self.assertIn(
                f"worker 1 (pid {pid}) exited (exit code 0) after leaving on its own (SIGTERM); "
                "not counted as a failure",
                text,
            )
            self.assertFalse(pidAlive(pid))
        current = {1: readyPids(text, 1)[-1], 2: readyPids(text, 2)[-1]}
        self.assertNotIn(current[1], terminated)
        answers = {(await get(port)).answer for _ in range(4)}
        self.assertEqual(answers, {f"worker {i} {pid}" for i, pid in current.items()})
        master.signal("TERM")
        self.assertQuietCleanStop(master, await ended(master), "SIGTERM")

    async def test_sigkillToAWorkerIsAFailure(self):
        """
        SIGKILL to a worker is a crash: it is respawned, and counts as a
        failure.  With --max-restarts 1, two within the window make the
        master give up and exit 1.
        """
        master, port = self.startMaster()
        await master.waitFor(r"worker \d \(pid \d+\) ready", count=2)
        first = readyPids(master.output.text(), 1)[-1]
        os.kill(first, signal.SIGKILL)
        await master.waitFor(r"worker 1 \(pid \d+\) ready", count=2, timeout=15)
        self.assertIsNotNone(master.transport.pid)
        second = readyPids(master.output.text(), 1)[-1]
        os.kill(second, signal.SIGKILL)
        reason = await ended(master)
        text = master.output.text()
        self.assertEqual(exitStatus(reason), (1, None), text)
        self.assertIn(f"worker 1 (pid {first}) died (killed by SIGKILL)", text)
        self.assertIn(f"worker 1 (pid {second}) died (killed by SIGKILL)", text)
        self.assertIn(
            f"giving up: more than 1 worker failures within 60 s; the last was worker 1 (pid {second}), "
            "which was killed by SIGKILL",
            text,
        )
        self.assertNotIn("not counted as a failure", text)
        worker2 = readyPids(text, 2)[-1]
        self.assertIn(f"worker 2 (pid {worker2}) exited (exit code 0)", text)
        self.assertRoundedDurations(text)


# 3. Ctrl-C to the whole process group -----------------------------------------


class ProcessGroupInterruptTests(unittest.TestCase, StopTests):
    """
    A terminal's Ctrl-C: SIGINT to the master's whole process group (the
    master in a session of its own, its workers with it) while the workers
    boot.  No worker dies of it; the master stops them gracefully.
    """

    timeout = 30

    def startMaster(self) -> MasterProcess:
        # A launcher that puts the master in a new session (and process
        # group) of its own, then runs the interpreter the harness asked
        # for with the same arguments and pid.
        directory = self.mktemp()
        os.makedirs(directory)
        launcher = os.path.join(directory, "setsid-python")
        with open(launcher, "w") as f:
            f.write(
                f"#!{sys.executable}\n"
                "import os, sys\n"
                "os.setsid()\n"
                "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n"
            )
        os.chmod(launcher, os.stat(launcher).st_mode | stat.S_IXUSR)
        return MasterProcess(self, ["--app", app("slowstart.tac"), "--workers", "2"], env=SLOW, executable=launcher)

    async def interruptGroup(self, master: MasterProcess) -> None:
        """
        SIGINT to the master's process group, which holds its workers and
        not this test.
        """
        pgid = os.getpgid(master.pid)
        self.assertEqual(pgid, master.pid)
        self.assertNotEqual(pgid, os.getpgrp())
        for _, pid in forked(master.output.text()):
            if pidAlive(pid):
                self.assertEqual(os.getpgid(pid), pgid)
        sent = time.monotonic()
        os.killpg(pgid, signal.SIGINT)
        reason = await ended(master)
        _log.info("{test}: the stop took {took:.2f} s", test=self.id(), took=time.monotonic() - sent)
        self.assertQuietCleanStop(master, reason, "SIGINT")
        self.assertEqual(len(forked(master.output.text())), 2, master.output.text())

    async def test_whileTheWorkersInterpretersStart(self):
        """
        Ctrl-C just after both workers were forked, while their
        interpreters start: no worker dies of it.
        """
        master = self.startMaster()
        await master.waitFor(r"worker \d \(pid \d+\) forked", count=2)
        await sleep(0.02)
        await self.interruptGroup(master)

    async def test_whileTheWorkersImport(self):
        """
        Ctrl-C 0.1 s after both workers were forked, while they import
        Twisted and txcluster: no worker dies of it.
        """
        master = self.startMaster()
        await master.waitFor(r"worker \d \(pid \d+\) forked", count=2)
        await sleep(0.1)
        await self.interruptGroup(master)

    async def test_whileTheWorkersLoadTheApp(self):
        """
        Ctrl-C while both workers load the application file: no worker
        dies of KeyboardInterrupt in the middle of it.
        """
        master = self.startMaster()
        await master.waitFor(r"worker \d \(pid \d+\) loading", count=2)
        await sleep(0.1)
        await self.interruptGroup(master)

    async def test_whileTheWorkersStartTheApp(self):
        """
        Ctrl-C while the workers start the application's services: no
        worker dies of it.
        """
        master = self.startMaster()
        await master.waitFor(r"worker \d \(pid \d+\) loading", count=2)
        await sleep(0.65)
        await self.interruptGroup(master)

    async def test_onceTheWorkersAreReady(self):
        """
        Ctrl-C once both workers serve: the workers ignore it and leave
        when the master asks.
        """
        master = self.startMaster()
        await master.waitFor(r"worker \d \(pid \d+\) ready", count=2)
        await self.interruptGroup(master)


# 4. The master's death while a worker's reactor is blocked ---------------------


def blockedInSleep(pid: int):
    """
    Whether C{pid} sleeps in the kernel's nanosleep (L{None}: the kernel
    does not say).
    """
    try:
        with open(f"/proc/{pid}/wchan") as f:
            where = f.read().strip()
    except OSError:
        return None
    if where in ("", "0"):
        return None
    return "nanosleep" in where


class MasterDeathTests(unittest.TestCase):
    timeout = 30

    async def test_masterKilledWhileAWorkersReactorIsBlocked(self):
        """
        When the master is SIGKILLed while the workers' reactors are blocked
        in a synchronous call (time.sleep(30) in a request handler), every
        worker process is gone within 2 seconds all the same.
        """
        port = freePort()
        master = MasterProcess(
            self,
            ["--app", app("blocking.tac"), "--workers", "2"],
            env={"WEB_LISTEN": f"tcp:{port}:interface=127.0.0.1"},
        )
        await master.waitFor(r"worker \d \(pid \d+\) ready", count=2)
        pids = [pid for _, pid in forked(master.output.text())]
        self.assertEqual(len(pids), 2)
        blocked = set()
        for _ in range(2):
            record = await get(port, "/block?seconds=30")
            self.assertTrue(record.ok, record)
            blocked.add(int(record.answer.split()[2]))
        self.assertEqual(blocked, set(pids))
        await sleep(0.5)
        for pid in pids:
            self.assertNotEqual(blockedInSleep(pid), False, pid)
        sent = time.monotonic()
        master.signal("KILL")
        await ended(master)
        self.assertEqual(await gone(pids, 2.0), [])
        _log.info("{test}: the workers were gone {took:.3f} s after the kill", test=self.id(),
                  took=time.monotonic() - sent)


# 5. A leaving worker's application shuts down at once --------------------------


def websocketClient():
    """
    The Autobahn WebSocket client protocol these tests use (L{None} without
    Autobahn).
    """
    try:
        from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
    except ImportError:
        return None, None

    class Client(WebSocketClientProtocol):
        """
        Records the first message (the server's "worker <id> <pid>") and
        how the connection closed.
        """

        def __init__(self):
            super().__init__()
            self.who = None
            self.served = defer.Deferred()
            self.closed = defer.Deferred()

        def onMessage(self, payload, isBinary):
            if self.who is None:
                self.who = payload.decode()
                self.served.callback(self.who)

        def onClose(self, wasClean, code, reason):
            if not self.served.called:
                self.served.errback(ConnectionError(f"closed before its first message: {code} {reason}"))
            self.closed.callback((wasClean, code, reason))

    return WebSocketClientFactory, Client


class WebSocketShutdownTests(unittest.TestCase, StopTests):
    """
    websocket.tac closes its WebSockets (code 1000) in a C{before shutdown}
    trigger.  A worker that leaves starts that shutdown at once, so a stop
    or reload waits for the close handshakes, not for --graceful-timeout.
    """

    timeout = 40

    def setUp(self):
        self.factoryClass, self.clientClass = websocketClient()
        if self.factoryClass is None:
            raise unittest.SkipTest("autobahn is not installed (pip install autobahn)")

    def startMaster(self) -> tuple:
        port = freePort()
        master = MasterProcess(
            self,
            ["--app", app("websocket.tac"), "--workers", "2", "--graceful-timeout", "30"],
            env={"WS_LISTEN": f"tcp:{port}:interface=127.0.0.1"},
        )
        return master, port

    async def connect(self, port: int, count: int) -> list:
        """
        C{count} WebSocket clients, each once it was told which worker
        serves it.
        """
        clients = []
        for _ in range(count):
            factory = self.factoryClass(f"ws://127.0.0.1:{port}/")
            factory.protocol = self.clientClass
            factory.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=10, closeHandshakeTimeout=5)
            client = await tcp(port).connect(factory)
            self.addCleanup(self._abort, client)
            clients.append(client)
        for client in clients:
            await within(client.served, 10)
        return clients

    @staticmethod
    def _abort(client) -> None:
        transport = getattr(client, "transport", None)
        if transport is not None and transport.connected:
            transport.abortConnection()

    async def closes(self, clients) -> list:
        """
        How each of C{clients} closed: C{(wasClean, code, reason)}.
        """
        return [await within(c.closed, 15) for c in clients]

    @staticmethod
    def pids(clients) -> set:
        return {int(c.who.split()[2]) for c in clients}

    async def test_stopClosesEveryWebSocketAtOnce(self):
        """
        SIGTERM to the master (--graceful-timeout 30) with 6 WebSockets open
        across 2 workers: each sees a clean close with code 1000, and the
        stop is over in well under the graceful timeout; exit 0.
        """
        master, port = self.startMaster()
        await master.waitFor(r"worker \d \(pid \d+\) ready", count=2)
        clients = await self.connect(port, 6)
        self.assertEqual(self.pids(clients), {pid for _, pid in forked(master.output.text())})
        sent = time.monotonic()
        master.signal("TERM")
        codes = await self.closes(clients)
        reason = await ended(master)
        took = time.monotonic() - sent
        _log.info("{test}: the stop took {took:.2f} s", test=self.id(), took=took)
        self.assertEqual([(clean, code) for clean, code, _ in codes], [(True, 1000)] * 6)
        self.assertLess(took, 5, master.output.text())
        self.assertQuietCleanStop(master, reason, "SIGTERM")
        self.assertEqual(master.output.text().count("disconnecting (stop): it has 30 s to finish"), 2)

    async def test_reloadClosesTheOldWorkersWebSockets(self):
        """
        SIGHUP (rolling reload) with 6 WebSockets open across 2 workers:
        every client of the old workers sees a clean close with code 1000,
        the reload completes quickly, and new connections are served by the
        new workers.
        """
        master, port = self.startMaster()
        await master.waitFor(r"worker \d \(pid \d+\) ready", count=2)
        clients = await self.connect(port, 6)
        old = {pid for _, pid in forked(master.output.text())}
        self.assertEqual(self.pids(clients), old)
        sent = time.monotonic()
        master.signal("HUP")
        codes = await self.closes(clients)
        await master.waitFor(r"reload complete", timeout=20)
        took = time.monotonic() - sent
        _log.info("{test}: the reload took {took:.2f} s", test=self.id(), took=took)
        self.assertEqual([(clean, code) for clean, code, _ in codes], [(True, 1000)] * 6)
        # The graceful timeout is 30 s per old worker: nothing waited for it.
        self.assertLess(took, 10, master.output.text())
        text = master.output.text()
        new = {pid for _, pid in forked(text)} - old
        self.assertEqual(len(new), 2, text)
        for pid in old:
            self.assertRegex(text, rf"worker \d \(pid {pid}\) exited \(exit code 0\)")
        fresh = await self.connect(port, 4)
        self.assertEqual(self.pids(fresh), new)
        master.signal("TERM")
        await self.closes(fresh)
        self.assertQuietCleanStop(master, await ended(master), "SIGTERM")


# 6. Durations in the log are rounded --------------------------------------------


class _HalfRequest(protocol.Protocol):
    """
    Sends the start of an HTTP request and never finishes it: the
    connection stays open in the worker.
    """

    def connectionMade(self):
        self.transport.write(b"GET / HTTP/1.1\r\n")


class LogDurationTests(unittest.TestCase, StopTests):
    timeout = 40

    async def test_durationsAreRounded(self):
        """
        Every duration the master and its workers log is rounded ("it has
        2.5 s to finish", never 2.4999871...): the heartbeat timeout, the
        respawn backoff, the boot time, the graceful timeout and the time
        a leaving worker waited for its connections.
        """
        port = freePort()
        master = MasterProcess(
            self,
            [
                "--app", app("blocking.tac"), "--workers", "1",
                "--graceful-timeout", "2.5", "--worker-timeout", "1.5",
            ],
            env={"WEB_LISTEN": f"tcp:{port}:interface=127.0.0.1"},
        )
        await master.waitFor(r"worker 1 \(pid \d+\) ready")
        # Block the reactor: the heartbeat catches it, the worker is killed
        # and respawned after a backoff.
        record = await get(port, "/block?seconds=30")
        self.assertTrue(record.ok, record)
        await master.waitFor(r"worker 1 \(pid \d+\) ready", count=2, timeout=20)
        # A connection that stays open makes the stop use the worker's
        # whole deadline.
        from twisted.internet.endpoints import connectProtocol

        held = await connectProtocol(tcp(port), _HalfRequest())
        self.addCleanup(lambda: held.transport.connected and held.transport.abortConnection())
        await sleep(0.3)
        master.signal("TERM")
        reason = await ended(master)
        text = master.output.text()
        self.assertEqual(exitStatus(reason), (0, None), text)
        self.assertRoundedDurations(text)
        self.assertRegex(text, r"worker 1 \(pid \d+\) ready in \d+\.\d\d s")
        self.assertRegex(text, r"has not answered a heartbeat for \d+(\.\d)? s: its reactor is blocked")
        self.assertRegex(text, r"backing off for \d(\.\d\d?)? s")
        self.assertIn("master stopping: 1 worker processes, graceful timeout 2.5 s", text)
        self.assertRegex(text, r"worker 1 \(pid \d+\) disconnecting \(stop\): it has 2\.5 s to finish")
        self.assertRegex(text, r"1 connection still open after \d(\.\d)? s; closing it")
