"""
txcluster as the per-host layer under a real balancer: two hosts, each a
network namespace (L{tests._netns}) running its own C{twistd -n txcluster}
master with 2 workers of C{tests/apps/whoclient.tac} under
C{--proxy-protocol} and C{--scheduling sticky}, behind a real HAProxy in
the test's namespace that sends PROXY v2 headers and health-checks each
master's C{/readyz}; clients connect to HAProxy from several loopback
source addresses (127.0.0.2 ... 127.0.0.9) under continuous load.

Every process the test starts (both masters, HAProxy, C{txcluster}
commands) is a child of the test, stopped by pid in its cleanups; every
namespace and veth is removed by them too, even when the test fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.logger import Logger
from twisted.trial import unittest

from txcluster._proxy import clientKey, preferred

from tests import _netns
from tests._harness import MasterProcess, app, freePort, judgeAnswer, sleep
from tests.test_lifecycle_integration import observe
from tests.test_operations_integration import METRICS_UP, READY, ended, txcluster

_log = Logger(namespace="tests.test_multihost_integration")

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

#: Where the clients connect from: all of 127/8 is local, so each is a
#: distinct client address to HAProxy and, through its PROXY header, to the
#: application.
SOURCES = [f"127.0.0.{n}" for n in range(2, 10)]

DRAIN_DELAY = 2.0

#: What the test needs from C{twistd txcluster --help}.
NEEDED = {
    "--proxy-protocol": r"--proxy-protocol\b",
    "--proxy-allow-from": r"--proxy-allow-from=",
    "--proxy-timeout": r"--proxy-timeout=",
    "--scheduling sticky": r"--scheduling=.{0,200}?\bsticky\b",
    "--metrics": r"--metrics=",
    "--drain-delay": r"--drain-delay=",
}


def missingOptions() -> list:
    """
    The options of L{NEEDED} that C{twistd txcluster --help} does not
    offer (yet).
    """
    result = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "txcluster", "--help"],
        capture_output=True, text=True, timeout=60,
    )
    text = re.sub(r"\s+", " ", result.stdout)
    return [name for name, pattern in NEEDED.items() if not re.search(pattern, text)]


# Clients bound to a source address -------------------------------------------------


class Exchange:
    """
    One HTTP/1.0 GET on its own connection, as the client saw it.

    @ivar source: the address the client socket was bound to.
    @ivar answer: the body's line of a 200 answer.
    @ivar error: C{refused}, C{connect failed}, C{dropped} (closed before a
        whole answer), C{timeout} or C{HTTP <status>}.
    """

    __slots__ = ("source", "start", "end", "answer", "error", "reason")

    def __init__(self, source: Optional[str], start: float) -> None:
        self.source = source
        self.start = start
        self.end: Optional[float] = None
        self.answer: Optional[str] = None
        self.error: Optional[str] = None
        self.reason: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.answer is not None

    def who(self) -> tuple:
        """
        C{(workerId, pid, client)} from "worker <id> <pid> client <host>".
        """
        fields = self.answer.split()
        return int(fields[1]), int(fields[2]), fields[4]

    def __repr__(self) -> str:
        outcome = self.answer if self.ok else f"{self.error} ({self.reason})"
        end = "-" if self.end is None else f"{self.end:.3f}"
        return f"<from {self.source} [{self.start:.3f}, {end}]: {outcome}>"


class _Exchanging(protocol.Protocol):
    def __init__(self, exchange: Exchange, preamble: bytes) -> None:
        self.exchange = exchange
        self.preamble = preamble
        self.data = b""
        self.done = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.preamble + b"GET / HTTP/1.0\r\nHost: txcluster\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        judgeAnswer(self.exchange, self.data, reason)
        self.done.callback(self.exchange)


class _Quiet(protocol.Factory):
    """
    Builds the one protocol it is given, without a log line per
    connection (the load makes thousands).
    """

    noisy = False

    def __init__(self, client: protocol.Protocol) -> None:
        self.client = client

    def buildProtocol(self, addr) -> protocol.Protocol:
        return self.client


async def exchange(
    host: str,
    port: int,
    source: Optional[str] = None,
    preamble: bytes = b"",
    timeout: float = 10.0,
    record: Optional[Exchange] = None,
) -> Exchange:
    """
    One GET to C{host:port} from C{source} (bound, any port), after
    C{preamble}; its L{Exchange} (C{record}, or a new one), whatever
    happened.
    """
    if record is None:
        record = Exchange(source, time.monotonic())
    endpoint = TCP4ClientEndpoint(
        reactor, host, port, timeout=timeout, bindAddress=None if source is None else (source, 0)
    )
    client = _Exchanging(record, preamble)
    attempt = endpoint.connect(_Quiet(client))

    def expire() -> None:
        record.error, record.reason = "timeout", f"no whole answer within {timeout} s"
        if not attempt.called:
            attempt.cancel()
        elif client.transport is not None:
            client.transport.abortConnection()

    timer = reactor.callLater(timeout, expire)
    try:
        await attempt
    except Exception as e:
        record.end = time.monotonic()
        if record.error is None:
            record.error = "refused" if isinstance(e, error.ConnectionRefusedError) else "connect failed"
            record.reason = repr(e)
    else:
        await client.done
    finally:
        if timer.active():
            timer.cancel()
    return record


class SourcedLoad:
    """
    Continuous load on C{127.0.0.1:port}: C{perSource} loops for each
    source address, each one GET per connection after the other (a short
    pause between), until stopped.

    @ivar records: every L{Exchange}, in the order they started.
    """

    def __init__(self, port: int, sources: list, perSource: int = 2, pause: float = 0.02) -> None:
        self.port = port
        self.sources = sources
        self.perSource = perSource
        self.pause = pause
        self.records: list = []
        self._running = False
        self._loops: list = []

    def start(self) -> "SourcedLoad":
        self._running = True
        self._loops = [
            defer.ensureDeferred(self._loop(source)) for source in self.sources for _ in range(self.perSource)
        ]
        return self

    async def _loop(self, source: str) -> None:
        while self._running:
            record = Exchange(source, time.monotonic())
            self.records.append(record)
            await exchange("127.0.0.1", self.port, source, record=record)
            await sleep(self.pause)

    async def stop(self) -> None:
        self._running = False
        await defer.gatherResults(self._loops)

    def done(self) -> list:
        return [r for r in self.records if r.end is not None]

    def between(self, start: float, end: float) -> list:
        """
        The finished exchanges that started at or after C{start} and ended
        by C{end}.
        """
        return [r for r in self.done() if r.start >= start and r.end is not None and r.end <= end]


# A real HAProxy ----------------------------------------------------------------------


class _Output(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.lines: list = []
        self.ended = defer.Deferred()
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        self._partial += data
        *whole, self._partial = self._partial.split(b"\n")
        now = time.monotonic()
        for line in whole:
            self.lines.append((now, line.decode("utf-8", "replace")))

    errReceived = outReceived

    def text(self) -> str:
        return "\n".join(f"{at:.3f} {line}" for at, line in self.lines)

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value)


class _Stats(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"show stat\n")

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.done.callback(self.data.decode("utf-8", "replace"))


class HAProxy:
    """
    C{haproxy -db} (foreground) as a child of the test, on a configuration
    made for C{hosts}; its stats socket polled every 50 ms, each server's
    status change kept with its time.

    @ivar port: the frontend's port on 127.0.0.1.
    @ivar changes: C{(time, server, status)} of every status seen change.
    """

    POLL = 0.05

    def __init__(self, testCase, hosts: list) -> None:
        self.port = freePort()
        directory = tempfile.mkdtemp(prefix="txc-haproxy-")
        testCase.addCleanup(shutil.rmtree, directory, True)
        self.socket = os.path.join(directory, "stats.sock")
        self.config = os.path.join(directory, "haproxy.cfg")
        with open(self.config, "w") as f:
            f.write(self.configuration(hosts))
        checked = subprocess.run([HAPROXY, "-c", "-f", self.config], capture_output=True, text=True, timeout=30)
        if checked.returncode != 0:
            raise AssertionError(f"haproxy -c rejects the generated configuration:\n{checked.stdout}{checked.stderr}")
        self.changes: list = []
        self.status: dict = {}
        self.output = _Output()
        self.transport = reactor.spawnProcess(
            self.output, HAPROXY, [HAPROXY, "-db", "-f", self.config], env={"PATH": os.environ.get("PATH", "")},
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        self.pid = self.transport.pid
        _log.info("haproxy (pid {pid}) on 127.0.0.1:{port}", pid=self.pid, port=self.port)
        testCase.addCleanup(self.stop)
        self._polling = defer.ensureDeferred(self._poll())

    def configuration(self, hosts: list) -> str:
        servers = "\n".join(
            f"    server {h.name} {h.address}:{h.appPort} source {h.peer} check port {h.metricsPort}"
            for h in hosts
        )
        return f"""\
global
    maxconn 4096
    stats socket {self.socket} mode 600 level admin
    # In the foreground (-db) HAProxy writes server state changes on stderr.

defaults
    # TCP, not HTTP: each client connection is one connection to a host,
    # with its own PROXY header (no server-side connection reuse), and
    # HAProxy neither parses nor retries the request.
    mode tcp
    timeout connect 2s
    timeout client 15s
    timeout server 15s
    timeout check 1s
    # No retry, no redispatch: a connection a host refuses or drops
    # reaches the client as a failure, so nothing here hides a lost
    # request.
    retries 0

frontend clients
    bind 127.0.0.1:{self.port}
    default_backend hosts

backend hosts
    # balance source: one client address, one host (the masters' sticky
    # dispatch then picks one worker in it), so each client stays on one
    # worker end to end; round-robin would spread a client over both
    # hosts.  hash-type consistent: when a host leaves only its clients
    # move, and they come back to it when it returns.
    balance source
    hash-type consistent
    option httpchk GET /readyz
    http-check expect status 200
    # The checks go to the master's --metrics port (no PROXY header: with
    # "port" HAProxy sends none on checks); fall 1 takes a host out at its
    # first 503, rise 2 takes it back after two 200s.
    default-server send-proxy-v2 inter 200ms fall 1 rise 2
{servers}
"""

    async def stats(self) -> dict:
        """
        C{{server: status}} of the C{hosts} backend, from C{show stat}.
        """
        client = await UNIXClientEndpoint(reactor, self.socket, timeout=2).connect(_Quiet(_Stats()))
        text = await observe(client.done).addTimeout(2, reactor)
        lines = text.splitlines()
        header = lines[0].lstrip("# ").split(",")
        found = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname") == "hosts" and row.get("svname") not in ("BACKEND", "FRONTEND"):
                found[row["svname"]] = row["status"]
        return found

    async def _poll(self) -> None:
        while self.transport.pid is not None:
            try:
                current = await self.stats()
            except Exception:
                # Not listening yet, or gone.
                current = {}
            now = time.monotonic()
            for server, status in current.items():
                if self.status.get(server) != status:
                    self.changes.append((now, server, status))
                    _log.info("haproxy: server {server} is {status}", server=server, status=status)
            self.status.update(current)
            await sleep(self.POLL)

    async def waitStatus(self, server: str, wanted: Callable[[str], bool], timeout: float) -> float:
        """
        Wait until C{wanted(status of server)}; the time it was first seen.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if wanted(self.status.get(server, "")):
                return [at for at, s, _ in self.changes if s == server][-1]
            await sleep(self.POLL / 2)
        raise AssertionError(
            f"haproxy: server {server} still {self.status.get(server)!r} after {timeout} s; "
            f"changes {self.changes}\n{self.output.text()}"
        )

    async def stop(self) -> None:
        if self.transport.pid is not None:
            self.transport.signalProcess("TERM")
            try:
                await observe(self.output.ended).addTimeout(5, reactor)
            except defer.TimeoutError:
                if self.transport.pid is not None:
                    self.transport.signalProcess("KILL")
                await observe(self.output.ended)
        await self._polling


def isUp(status: str) -> bool:
    return status == "UP"


def isDown(status: str) -> bool:
    return status.startswith("DOWN")


# The test ------------------------------------------------------------------------


def forkedPids(master: MasterProcess) -> set:
    """
    Every worker pid C{master} forked, replaced ones too.
    """
    return {int(p) for p in re.findall(r"worker \d+ \(pid (\d+)\) forked", master.output.text())}


class MultiHostTests(unittest.TestCase):
    """
    Two txcluster hosts behind a real HAProxy.
    """

    timeout = 120

    def startMaster(self, host) -> MasterProcess:
        args = [
            "--app", app("whoclient.tac"),
            "--workers", "2",
            "--graceful-timeout", "5",
            "--proxy-protocol",
            "--proxy-allow-from", f"{host.peer}/32",
            "--scheduling", "sticky",
            "--metrics", f"tcp:{host.metricsPort}:interface={host.address}",
            "--drain-delay", str(DRAIN_DELAY),
        ]
        return MasterProcess(
            self, args, env={"WHOCLIENT_LISTEN": f"tcp:{host.appPort}:interface={host.address}"},
            launcher=host.launcher,
        )

    async def started(self, master: MasterProcess, readyCount: int = 2) -> MasterProcess:
        await master.waitFor(READY, count=readyCount, timeout=30)
        await master.waitFor(METRICS_UP, timeout=10)
        return master

    async def test_twoHostsBehindHAProxy(self):
        """
        Under continuous load from 8 client addresses through HAProxy
        (C{send-proxy-v2}, C{balance source}, checks on C{/readyz}) to two
        hosts of 2 sticky workers each: every answer names the client's
        own source address; while the hosts are stable each client address
        is answered by one worker of one host, the one rendezvous hashing
        of that address ranks first; after a rolling reload of host A each
        client is back on the same host and worker id, in a new process; a
        SIGTERM to host B's master makes HAProxy mark B down before B stops
        accepting (B keeps accepting for the drain delay, and says so), no
        request started after that reaches B, and B's master exits 0;
        started again, B is marked up and its clients return to it, on the
        same worker ids; no request fails at any point.
        """
        missing = missingOptions()
        if missing:
            raise unittest.SkipTest(f"twistd txcluster --help offers no {', '.join(missing)} (yet)")
        if not os.access(HAPROXY, os.X_OK):
            raise unittest.SkipTest(f"no HAProxy at {HAPROXY} (Debian's haproxy package; .ci/run installs it)")

        began = time.monotonic()
        a, b = hosts = _netns.hosts(self, 2)
        _log.info("hosts: {hosts!r}", hosts=hosts)
        masters = {"a": self.startMaster(a), "b": self.startMaster(b)}
        await defer.gatherResults([defer.ensureDeferred(self.started(m)) for m in masters.values()])
        balancer = HAProxy(self, hosts)
        await balancer.waitStatus("a", isUp, 10)
        await balancer.waitStatus("b", isUp, 10)
        ids = set(masters["a"].workerPids())

        load = SourcedLoad(balancer.port, SOURCES)
        self.addCleanup(load.stop)
        load.start()
        marks = {"load": time.monotonic()}

        hostMasters = [("a", masters["a"]), ("b", masters["b"])]
        known: dict = {}

        def hostOf(pid: int) -> str:
            if pid not in known:
                known[pid] = next((name for name, m in hostMasters if pid in forkedPids(m)), "?")
            return known[pid]

        def placement(records: list) -> dict:
            """
            C{{source: {(host, workerId), ...}}} of the answered records.
            """
            where: dict = {}
            for r in records:
                if r.ok:
                    workerId, pid, _ = r.who()
                    where.setdefault(r.source, set()).add((hostOf(pid), workerId))
            return where

        def timeline() -> str:
            return (
                f"marks (s since start): { {k: round(v - began, 3) for k, v in marks.items()} }\n"
                f"haproxy changes: {[(round(t - began, 3), s, st) for t, s, st in balancer.changes]}\n"
                f"haproxy output:\n{balancer.output.text()}\n"
                f"--- host a ---\n{masters['a'].output.text()}\n"
                + "".join(f"--- host b ({i}) ---\n{m.output.text()}\n" for i, (_, m) in enumerate(hostMasters[1:]))
            )

        def failures() -> list:
            return [r for r in load.done() if not r.ok]

        def noFailuresSoFar(phase: str) -> None:
            failed = failures()
            if failed:
                self.fail(
                    f"{phase}: {len(failed)} of {len(load.done())} requests failed "
                    f"(times in s since the start):\n"
                    + "\n".join(
                        f"  from {r.source} [{r.start - began:.3f}, {r.end - began:.3f}]: {r.error} ({r.reason})"
                        for r in failed
                    )
                    + f"\n{timeline()}"
                )

        # 1. Stable hosts.
        await sleep(3)
        marks["stable"] = time.monotonic()
        noFailuresSoFar("stable hosts")
        wrongClient = [r for r in load.done() if r.ok and r.who()[2] != r.source]
        self.assertEqual(wrongClient, [], "the application must see each client's own source address")
        stable = placement(load.between(marks["load"], marks["stable"]))
        self.assertEqual(set(stable), set(SOURCES), (stable, failures()))
        moving = {source: where for source, where in stable.items() if len(where) != 1}
        self.assertEqual(moving, {}, f"client addresses answered by more than one worker: {moving}")
        first = {source: next(iter(where)) for source, where in stable.items()}
        byHost = {name: sorted(s for s, (h, _) in first.items() if h == name) for name in "ab"}
        self.assertTrue(
            byHost["a"] and byHost["b"],
            f"HAProxy's source hash put every client on one host, so B's leave would show nothing: {first}",
        )
        ranked = {s: preferred(clientKey(IPv4Address("TCP", s, 0)), ids) for s in SOURCES}
        self.assertEqual({s: w for s, (_, w) in first.items()}, ranked, "each client on its first-ranked worker id")
        _log.info("placement: {first}", first=first)

        # 2. A rolling reload of host A.
        before = dict(masters["a"].workerPids())
        marks["reload"] = time.monotonic()
        result = await txcluster(self, masters["a"].control, "reload", timeout=40)
        marks["reloaded"] = time.monotonic()
        self.assertEqual(result.code, 0, result)
        await masters["a"].waitFor(READY, count=4, timeout=10)
        await balancer.waitStatus("a", isUp, 5)
        after = dict(masters["a"].workerPids())
        self.assertFalse(set(before.values()) & set(after.values()), (before, after))
        await sleep(0.5)
        marks["stable2"] = time.monotonic()
        await sleep(2.5)
        marks["stable2end"] = time.monotonic()
        noFailuresSoFar("host A's reload")
        stable2Records = load.between(marks["stable2"], marks["stable2end"])
        stable2 = placement(stable2Records)
        self.assertEqual(
            {s: next(iter(w)) if len(w) == 1 else w for s, w in stable2.items()}, first,
            "after host A's reload each client is on the same host and worker id",
        )
        onA = {r.who()[1] for r in stable2Records if r.ok and r.source in byHost["a"]}
        self.assertTrue(onA and onA <= set(after.values()), (onA, before, after))

        # 3. SIGTERM to host B: HAProxy takes it out before it stops accepting.
        oldB = masters["b"]
        accepting: list = []

        async def probeB() -> None:
            # Straight to B's app port from the balancer's address, with a
            # PROXY v1 header, until B refuses: when B stops accepting.
            header = f"PROXY TCP4 127.0.0.99 {b.address} 40000 {b.appPort}\r\n".encode()
            while oldB.transport.pid is not None:
                record = await exchange(b.address, b.appPort, preamble=header, timeout=5)
                accepting.append(record)
                if record.error == "refused":
                    return
                await sleep(0.05)

        marks["term"] = time.monotonic()
        oldB.signal("TERM")
        probing = defer.ensureDeferred(probeB())
        marks["bDown"] = await balancer.waitStatus("b", isDown, DRAIN_DELAY + 1)
        self.assertEqual(await ended(oldB, 20), (0, None), oldB.output.text())
        marks["bEnded"] = time.monotonic()
        await probing
        refused = [r for r in accepting if r.error == "refused"]
        marks["bRefused"] = refused[0].start if refused else marks["bEnded"]
        lastAnswered = max((r.end for r in accepting if r.ok), default=None)
        noFailuresSoFar("host B's SIGTERM")
        self.assertRegex(oldB.output.text(), r"stopping: not ready any more; .*--drain-delay")
        self.assertLess(marks["bDown"] - marks["term"], DRAIN_DELAY, timeline())
        self.assertLess(marks["bDown"], marks["bRefused"], timeline())
        self.assertIsNotNone(lastAnswered, accepting)
        self.assertGreaterEqual(lastAnswered - marks["term"], DRAIN_DELAY * 0.9, (accepting, timeline()))
        self.assertEqual(
            {r.who()[2] for r in accepting if r.ok}, {"127.0.0.99"}, "B parsed the v1 header of the probes"
        )
        lateOnB = [
            r for r in load.done() if r.ok and r.start > marks["bDown"] and hostOf(r.who()[1]) == "b"
        ]
        self.assertEqual(lateOnB, [], f"requests reached B after HAProxy marked it down\n{timeline()}")

        # 4. B again: HAProxy picks its return up; its clients come back.
        await sleep(0.5)
        masters["b"] = self.startMaster(b)
        hostMasters.append(("b", masters["b"]))
        await self.started(masters["b"])
        marks["bUp"] = await balancer.waitStatus("b", isUp, 10)
        await sleep(2.5)
        marks["end"] = time.monotonic()
        await load.stop()
        noFailuresSoFar("host B's return")
        back = placement(load.between(marks["bUp"] + 0.1, marks["end"]))
        self.assertEqual(
            {s: next(iter(w)) if len(w) == 1 else w for s, w in back.items()}, first,
            f"after B's return each client is back on its host and worker id\n{timeline()}",
        )
        newB = set(masters["b"].workerPids().values())
        reachedB = {r.who()[1] for r in load.between(marks["bUp"], marks["end"]) if r.ok} & newB
        self.assertTrue(reachedB, "no request reached the restarted B")

        # Throughout: every answer names its client, and nothing failed.
        wrongClient = [r for r in load.done() if r.ok and r.who()[2] != r.source]
        self.assertEqual(wrongClient, [], "the application must see each client's own source address")
        _log.info(
            "{count} requests, none failed, in {took:.1f} s; timeline {marks}",
            count=len(load.done()), took=time.monotonic() - began,
            marks={k: round(v - began, 3) for k, v in marks.items()},
        )
