"""
Helpers for the integration tests: run a real cluster (in this process, or
as a C{twistd} subprocess), wait for its events, talk to it on loopback, and
clean up every process and socket even when a test fails.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
import tempfile
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
    leftovers = [] if cluster._processes is None else list(cluster._processes.processes)
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

    @param launcher: a command that runs the rest of the command line (as
        systemd's socket activation would: it C{exec}s it).
    @param runner: C{twistd}, or C{twist} (C{twistdArgs} are then
        C{twist}'s options).
    """

    def __init__(
        self,
        testCase,
        args: list,
        env: Optional[dict] = None,
        twistdArgs: tuple = (),
        executable: str = sys.executable,
        launcher: tuple = (),
        runner: str = "twistd",
    ) -> None:
        self.output = _MasterOutput()
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(
            [ROOT] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        environment.update(env or {})
        #: The master's control socket (each master its own).
        self.control = None
        if not any(a == "--no-control" or a.startswith("--control") for a in args):
            directory = tempfile.mkdtemp(prefix="txc-control-")
            testCase.addCleanup(shutil.rmtree, directory, True)
            self.control = os.path.join(directory, "txcluster.sock")
            args = ["--control", self.control] + list(args)
        if runner == "twist":
            argv = [executable, "-m", "twisted", *twistdArgs, "txcluster"] + args
        else:
            argv = [
                executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "--pidfile=",
                "--logfile=-",
                "-n",
                *twistdArgs,
                "txcluster",
            ] + args
        argv = list(launcher) + argv
        self.transport = reactor.spawnProcess(
            self.output, argv[0], argv, env=environment, childFDs={0: "w", 1: "r", 2: "r"}
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

    def __init__(
        self, port: int, concurrency: int = 4, path: str = "/", maxRequests: int = 20_000, pause: float = 0.0
    ) -> None:
        self.url = f"http://127.0.0.1:{port}{path}"
        self.concurrency = concurrency
        self.maxRequests = maxRequests
        self.pause = pause
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
                if self.pause:
                    await sleep(self.pause)

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


# Recorded loopback load ------------------------------------------------------


class RequestRecord:
    """
    One HTTP/1.0 request on its own connection, as the client saw it.

    @ivar start: C{time.monotonic()} when the connection was attempted.
    @ivar end: when its outcome was known.
    @ivar clientPort: the client's local port once connected (the peer
        port of the server's socket for this connection), else L{None}.
    @ivar answer: the body's line ("worker <id> <pid>") of a 200 answer.
    @ivar error: what went wrong: C{refused} (no one listened), C{dropped}
        (the connection closed before a whole answer came), C{timeout} (no
        whole answer within the load's timeout), or C{HTTP <status>}.
    """

    __slots__ = ("path", "start", "end", "clientPort", "answer", "error", "reason")

    def __init__(self, path: str, start: float) -> None:
        self.path = path
        self.start = start
        self.end: Optional[float] = None
        self.clientPort: Optional[int] = None
        self.answer: Optional[str] = None
        self.error: Optional[str] = None
        self.reason: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.answer is not None

    def __repr__(self) -> str:
        outcome = self.answer if self.ok else f"{self.error} ({self.reason})"
        return (
            f"<{self.path} from :{self.clientPort} [{self.start:.3f}, "
            f"{self.end if self.end is None else round(self.end, 3)}]: {outcome}>"
        )


_STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3}) ")


def judgeAnswer(record, data: bytes, reason) -> None:
    """
    Fill C{record} (its C{end}, and C{answer}, or C{error} and C{reason}
    unless an error is set already) from the whole of an HTTP/1.0 answer,
    C{data}, its connection lost for C{reason}.
    """
    record.end = time.monotonic()
    head, _, body = data.partition(b"\r\n\r\n")
    status = _STATUS.match(head)
    if record.error is not None:
        pass
    elif status is None or not body.endswith(b"\n"):
        record.error = "dropped"
        record.reason = f"{type(reason.value).__name__} after {len(data)} bytes: {data[:80]!r}"
    elif status.group(1) != b"200":
        record.error = f"HTTP {status.group(1).decode()}"
        record.reason = body[:200].decode("utf-8", "replace")
    else:
        record.answer = body.decode().strip()


class _Exchange(protocol.Protocol):
    """
    Send one request, read until the server closes, judge the answer.
    """

    def __init__(self, record: RequestRecord, done: Callable[[], None]) -> None:
        self.record = record
        self.done = done
        self.data = b""

    def connectionMade(self) -> None:
        self.record.clientPort = self.transport.getHost().port
        self.transport.write(b"GET " + self.record.path.encode() + b" HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        judgeAnswer(self.record, self.data, reason)
        self.done()


class _ExchangeFactory(protocol.ClientFactory):
    def __init__(self, record: RequestRecord, done: defer.Deferred) -> None:
        self.record = record
        self.finished = done

    def buildProtocol(self, addr):
        return _Exchange(self.record, lambda: self.finished.called or self.finished.callback(None))

    def clientConnectionFailed(self, connector, reason) -> None:
        self.record.end = time.monotonic()
        if self.record.error is None:
            refused = "refused" in reason.getErrorMessage().lower()
            self.record.error = "refused" if refused else "connect failed"
            self.record.reason = reason.getErrorMessage()
        if not self.finished.called:
            self.finished.callback(None)


class RecordingLoad:
    """
    Bounded HTTP load on loopback that records every request: C{concurrency}
    loops, each sending one HTTP/1.0 GET per connection after the other,
    until stopped or until C{limit} requests were started.

    @param path: the path of the C{n}-th request, from C{n}.
    @ivar records: every L{RequestRecord}, in the order they started.
    """

    def __init__(
        self,
        port: int,
        concurrency: int = 4,
        path: Callable[[int], str] = lambda n: "/",
        limit: Optional[int] = None,
        timeout: float = 10.0,
    ) -> None:
        self.port = port
        self.concurrency = concurrency
        self.path = path
        self.limit = limit
        self.timeout = timeout
        self.records: list = []
        self._running = False
        self._loops: list = []

    def start(self) -> "RecordingLoad":
        self._running = True
        self._loops = [defer.ensureDeferred(self._loop()) for _ in range(self.concurrency)]
        return self

    def finished(self) -> defer.Deferred:
        """
        Fires once every loop has ended (after L{stop} or at C{limit}).
        """
        return defer.gatherResults(self._loops)

    async def stop(self) -> None:
        self._running = False
        await self.finished()

    def request(self, path: str) -> defer.Deferred:
        """
        One recorded request; the Deferred fires with its L{RequestRecord}.
        """
        record = RequestRecord(path, time.monotonic())
        self.records.append(record)
        done = defer.Deferred()
        connector = reactor.connectTCP("127.0.0.1", self.port, _ExchangeFactory(record, done), timeout=self.timeout)

        def expire():
            if record.end is None:
                record.error = "timeout"
                record.reason = f"no whole answer within {self.timeout} s"
                connector.disconnect()
                transport = getattr(connector, "transport", None)
                if transport is not None and hasattr(transport, "abortConnection"):
                    transport.abortConnection()

        call = reactor.callLater(self.timeout, expire)
        done.addBoth(lambda _: (call.active() and call.cancel(), record)[1])
        return done

    async def _loop(self) -> None:
        while self._running and (self.limit is None or len(self.records) < self.limit):
            record = await self.request(self.path(len(self.records)))
            if not record.ok:
                await sleep(0.01)

    def succeeded(self) -> list:
        return [r for r in self.records if r.ok]

    def failed(self) -> list:
        return [r for r in self.records if r.end is not None and not r.ok]

    def answeredBy(self) -> dict:
        """
        How many requests each "worker <id> <pid>" answered.
        """
        counts: dict = {}
        for r in self.succeeded():
            counts[r.answer] = counts.get(r.answer, 0) + 1
        return counts

    def pids(self) -> set:
        return {int(who.split()[2]) for who in self.answeredBy()}

    def summary(self) -> str:
        failed = self.failed()
        return f"{len(self.succeeded())} succeeded, {len(failed)} failed: {failed[:5]}"


# What a process holds, from /proc ---------------------------------------------


def openFileCount(pid: int) -> int:
    """
    How many file descriptors C{pid} has open.
    """
    return len(os.listdir(f"/proc/{pid}/fd"))


def residentKilobytes(pid: int) -> int:
    """
    C{pid}'s resident set size (VmRSS), in kB.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ValueError(f"no VmRSS for pid {pid}")


def socketInodes(pid: int) -> set:
    """
    The inodes of the sockets C{pid} has open (its C{socket:[inode]} fds).
    """
    inodes = set()
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(os.path.join(base, name))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _hexAddress(text: str, six: bool) -> tuple:
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    if six:
        # Four host-order 32-bit words.
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        return socket.inet_ntop(socket.AF_INET6, raw), int(port, 16)
    return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)


def inetSockets(table: str) -> list:
    """
    The rows of C{/proc/net/TABLE} (C{tcp}, C{tcp6}, C{udp}, C{udp6}) as
    C{(inode, state, (localHost, localPort), (remoteHost, remotePort))};
    state C{0A} is TCP's LISTEN.
    """
    rows = []
    six = table.endswith("6")
    try:
        with open(f"/proc/net/{table}") as f:
            lines = f.readlines()[1:]
    except OSError:
        return rows
    for line in lines:
        fields = line.split()
        rows.append((int(fields[9]), fields[3], _hexAddress(fields[1], six), _hexAddress(fields[2], six)))
    return rows


def unixSockets() -> list:
    """
    The rows of C{/proc/net/unix} as C{(inode, listening, path)}; C{path}
    is C{""} for an unnamed socket and starts with C{@} for an abstract one.
    """
    rows = []
    with open("/proc/net/unix") as f:
        lines = f.readlines()[1:]
    for line in lines:
        fields = line.split()
        listening = bool(int(fields[3], 16) & 0x10000)  # __SO_ACCEPTCON
        rows.append((int(fields[6]), listening, fields[7] if len(fields) > 7 else ""))
    return rows


def connectionsInside(pid: int, serverPort: int) -> set:
    """
    The client ports of the TCP connections to C{serverPort} whose server
    socket C{pid} holds.
    """
    inodes = socketInodes(pid)
    return {
        remote[1]
        for table in ("tcp", "tcp6")
        for inode, state, local, remote in inetSockets(table)
        if inode in inodes and local[1] == serverPort and state != "0A"
    }


def stopProcess(pid: int, timeout: float = 2.0) -> bool:
    """
    SIGSTOP C{pid} and wait (blocking, briefly) until it is stopped, so that
    its file descriptor table holds still.  Whether it stopped.
    """
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if state in ("T", "t", "Z", "X"):
            return state in ("T", "t")
        time.sleep(0.001)
    return False


def socketPath(testCase, name: str = "s.sock") -> str:
    """
    A UNIX socket path in a fresh directory under the system's temporary
    directory (removed after the test): trial's own temporary directory,
    below a checkout anywhere, can exceed the 107 bytes a socket path may
    have.
    """
    import shutil
    import tempfile

    directory = tempfile.mkdtemp(prefix="txc-")
    testCase.addCleanup(shutil.rmtree, directory, True)
    return os.path.join(directory, name)
