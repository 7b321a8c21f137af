"""
Helpers for the integration tests: run a real cluster (in this process, or
as a C{twistd} subprocess), wait for its events, talk to it on loopback, and
clean up every process and socket even when a test fails.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
from typing import Callable, Optional

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, connectProtocol
from twisted.protocols.basic import LineReceiver

from txcluster import ClusterConfig, ClusterService, WorkerListening, WorkerReady

HERE = os.path.dirname(os.path.abspath(__file__))
APPS = os.path.join(HERE, "apps")
ROOT = os.path.dirname(HERE)


def app(name: str) -> str:
    return os.path.join(APPS, name)


class EventLog:
    """
    Records a cluster's events and fires Deferreds when one matches.
    """

    def __init__(self) -> None:
        self.events: list = []
        self._waiters: list = []

    def __call__(self, event) -> None:
        self.events.append(event)
        for waiter in list(self._waiters):
            predicate, d = waiter
            if predicate(event):
                self._waiters.remove(waiter)
                d.callback(event)

    def of(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def wait(self, predicate: Callable, timeout: float = 20.0, past: bool = False) -> defer.Deferred:
        """
        A Deferred firing with the first (future, or with C{past} also
        already seen) event matching C{predicate}.
        """
        if past:
            for event in self.events:
                if predicate(event):
                    return defer.succeed(event)
        d = defer.Deferred()
        waiter = (predicate, d)
        self._waiters.append(waiter)
        call = reactor.callLater(timeout, self._timeout, waiter, timeout)
        d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return d

    def _timeout(self, waiter, timeout) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            waiter[1].errback(defer.TimeoutError(f"no matching cluster event within {timeout} s"))

    def waitCount(self, kind, count: int, timeout: float = 20.0, where=lambda e: True) -> defer.Deferred:
        """
        Fire once C{count} events of C{kind} (matching C{where}) were seen.
        """
        d = defer.Deferred()

        def check(_=None):
            if len([e for e in self.of(kind) if where(e)]) >= count and not d.called:
                d.callback(None)
                return True
            return False

        if check():
            return d
        return self.wait(lambda e: isinstance(e, kind) and where(e) and check(), timeout).addCallback(
            lambda _: None
        )


async def startCluster(testCase, appPath: str, workers: int = 2, env: Optional[dict] = None, **config):
    """
    Start a L{ClusterService} in this process with real worker processes;
    return C{(cluster, events)} once every worker is ready.  Cleanup stops
    it (and SIGKILLs any worker that outlives the stop).
    """
    environment = dict(os.environ)
    environment.update(env or {})
    config.setdefault("gracefulTimeout", 5.0)
    config.setdefault("startTimeout", 20.0)
    gaveUp: list = []
    cluster = ClusterService(
        ClusterConfig(app=appPath, workers=workers, env=environment, **config),
        onGiveUp=gaveUp.append,
    )
    cluster.gaveUp = gaveUp
    events = EventLog()
    cluster.addObserver(events)
    testCase.addCleanup(stopCluster, cluster)
    cluster.startService()
    await events.waitCount(WorkerReady, workers, timeout=config["startTimeout"] + 10)
    return cluster, events


async def stopCluster(cluster: ClusterService) -> None:
    """
    Stop C{cluster} if it runs, then make sure none of its processes is left.
    """
    if cluster.running:
        stopped = cluster.stopService()
        timer = reactor.callLater(cluster.config.gracefulTimeout + 10, stopped.cancel)
        try:
            await stopped
        except defer.CancelledError:
            pass
        finally:
            if timer.active():
                timer.cancel()
    leftovers = list(cluster._processes)
    for process in leftovers:
        try:
            process.transport.signalProcess("KILL")
        except Exception:
            pass
    if leftovers:
        await defer.DeferredList([p.exited for p in leftovers])


def listeningPort(events: EventLog, index: int = 0) -> int:
    """
    The port of the C{index}-th distinct TCP address the workers listen on.
    """
    seen = []
    for e in events.of(WorkerListening):
        if e.address.startswith("tcp") and e.port not in seen:
            seen.append(e.port)
    return seen[index]


class _Line(LineReceiver):
    delimiter = b"\n"

    def __init__(self) -> None:
        self.lines: list = []
        self.done = defer.Deferred()
        self.firstLine = defer.Deferred()

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line.decode())
        if not self.firstLine.called:
            self.firstLine.callback(line.decode())

    def connectionLost(self, reason) -> None:
        if not self.firstLine.called:
            self.firstLine.errback(reason)
        self.done.callback(self.lines)


async def whoami(endpoint, timeout: float = 10.0) -> str:
    """
    Connect, read the first line ("worker <id> <pid>"), disconnect.
    """
    proto = await connectProtocol(endpoint, _Line())
    call = reactor.callLater(timeout, proto.transport.abortConnection)
    try:
        return await proto.firstLine
    finally:
        if call.active():
            call.cancel()
        proto.transport.loseConnection()
        await proto.done


def tcp(port: int) -> TCP4ClientEndpoint:
    return TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)


def unix(path: str) -> UNIXClientEndpoint:
    return UNIXClientEndpoint(reactor, path, timeout=10)


def workerOf(line: str) -> int:
    return int(line.split()[1])


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


# A real master process -----------------------------------------------------


class _MasterOutput(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended = defer.Deferred()
        self._waiters: list = []

    def outReceived(self, data: bytes) -> None:
        self.output += data
        self._check()

    errReceived = outReceived

    def _check(self) -> None:
        text = self.text()
        for waiter in list(self._waiters):
            pattern, count, d = waiter
            if len(re.findall(pattern, text)) >= count:
                self._waiters.remove(waiter)
                d.callback(text)

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def processEnded(self, reason) -> None:
        self.reason = reason
        for pattern, count, d in self._waiters:
            d.errback(AssertionError(f"the master ended before {pattern!r} appeared:\n{self.text()}"))
        self._waiters = []
        self.ended.callback(reason.value)


class MasterProcess:
    """
    C{twistd -n txcluster ...} as a child of the test, with its log on
    stdout.
    """

    def __init__(self, testCase, args: list, env: Optional[dict] = None) -> None:
        self.output = _MasterOutput()
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(
            [ROOT] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        environment.update(env or {})
        argv = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--pidfile=",
            "--logfile=-",
            "-n",
            "txcluster",
        ] + args
        self.transport = reactor.spawnProcess(
            self.output, sys.executable, argv, env=environment, childFDs={0: "w", 1: "r", 2: "r"}
        )
        self.pid = self.transport.pid
        testCase.addCleanup(self.cleanUp)

    def waitFor(self, pattern: str, count: int = 1, timeout: float = 30.0) -> defer.Deferred:
        d = defer.Deferred()
        waiter = (pattern, count, d)
        self.output._waiters.append(waiter)
        self.output._check()
        if not d.called:
            def expire():
                if waiter in self.output._waiters:
                    self.output._waiters.remove(waiter)
                    d.errback(AssertionError(
                        f"{pattern!r} did not appear {count} times within {timeout} s:\n{self.output.text()}"
                    ))
            call = reactor.callLater(timeout, expire)
            d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return d

    def workerPids(self) -> dict:
        """
        C{{workerId: pid}} of the workers the log says were forked.
        """
        return {int(w): int(p) for w, p in re.findall(r"worker (\d+) \(pid (\d+)\) forked", self.output.text())}

    def signal(self, name: str) -> None:
        self.transport.signalProcess(name if name in ("KILL", "TERM", "INT") else getattr(signal, "SIG" + name))

    async def cleanUp(self) -> None:
        if self.transport.pid is not None:
            self.transport.signalProcess("KILL")
            await self.output.ended
        # Workers notice the master's death by themselves; make sure.
        deadline = time.monotonic() + 5
        for pid in self.workerPids().values():
            while pidAlive(pid) and time.monotonic() < deadline:
                await sleep(0.05)
            if pidAlive(pid) and isWorkerProcess(pid):
                os.kill(pid, signal.SIGKILL)


def pidAlive(pid: int) -> bool:
    """
    Whether C{pid} is a live process (a zombie counts as dead).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def isWorkerProcess(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"txcluster" in f.read()
    except OSError:
        return False


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoadGenerator:
    """
    Bounded HTTP load on loopback: C{concurrency} loops, each sending GETs
    on a new connection (C{Connection: close}) one after the other, until
    stopped.  Every request's outcome is recorded.

    @ivar failures: C{(time, reason)} of every failed request.
    @ivar answeredBy: how many requests each "worker <id> <pid>" answered.
    """

    def __init__(self, port: int, concurrency: int = 4, path: str = "/", maxRequests: int = 20_000) -> None:
        self.url = f"http://127.0.0.1:{port}{path}"
        self.concurrency = concurrency
        self.maxRequests = maxRequests
        self.succeeded = 0
        self.failures: list = []
        self.answeredBy: dict = {}
        self._running = False
        self._loops: list = []

    def start(self) -> "LoadGenerator":
        self._running = True
        self._loops = [defer.ensureDeferred(self._loop()) for _ in range(self.concurrency)]
        return self

    async def _loop(self) -> None:
        import treq

        while self._running and self.succeeded + len(self.failures) < self.maxRequests:
            try:
                response = await treq.get(self.url, persistent=False, timeout=15)
                body = await response.text()
                if response.code != 200:
                    raise RuntimeError(f"HTTP {response.code}")
            except Exception as e:
                self.failures.append((time.monotonic(), repr(e)))
                await sleep(0.01)
            else:
                self.succeeded += 1
                who = body.strip()
                self.answeredBy[who] = self.answeredBy.get(who, 0) + 1

    async def stop(self) -> None:
        self._running = False
        await defer.gatherResults(self._loops)

    def pids(self) -> set:
        return {int(who.split()[2]) for who in self.answeredBy}

    def summary(self) -> str:
        return f"{self.succeeded} succeeded, {len(self.failures)} failed: {self.failures[:5]}"


class LogCapture:
    """
    Every log event emitted while a test runs, formatted (worker events
    relayed by the master included).
    """

    def __init__(self, testCase) -> None:
        from twisted.logger import globalLogPublisher

        self.lines: list = []
        self.events: list = []
        globalLogPublisher.addObserver(self)
        testCase.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event) -> None:
        from twisted.logger import formatEvent

        self.events.append(event)
        self.lines.append(f"[{event.get('log_system', '-')}] {formatEvent(event)}")

    def text(self) -> str:
        return "\n".join(self.lines)
