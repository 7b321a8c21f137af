"""
A real C{twistd -n txcluster} master under what systemd gives a service: a
real C{$NOTIFY_SOCKET} datagram socket (bound by the test) records what the
master says and when; sockets passed as systemd passes them (a launcher
that binds them, moves them to descriptors 3.. and execs the master, and
Debian's C{systemd-socket-activate} where it is installed); a leaking
application recycled by C{--max-memory} under load; the master run by
C{twist}.  Every process and socket is ended by the test's cleanups.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid

from twisted.internet import defer, protocol, reactor
from twisted.logger import eventFromJSON, formatEvent
from twisted.trial import unittest

from tests._harness import APPS, MasterProcess, RecordingLoad, app, freePort, pidAlive, sleep, tcp, whoami, workerOf
from tests.test_lifecycle_integration import observe
from tests.test_operations_integration import ended

READY = r"worker \d \(pid \d+\) ready in"


class NotifyRecorder(protocol.DatagramProtocol):
    """
    Stands for systemd's notify socket: every datagram, as a dict of its
    fields, with when it came.
    """

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self._waiters: list = []

    def datagramReceived(self, data: bytes, address) -> None:
        fields = dict(line.split("=", 1) for line in data.decode("utf-8").split("\n") if line)
        fields["_at"] = time.monotonic()
        self.messages.append(fields)
        for waiter in list(self._waiters):
            name, value, after, d = waiter
            if fields.get(name) == value and len(self.messages) > after:
                self._waiters.remove(waiter)
                d.callback(fields)

    def next(self, name: str, value: str = "1", timeout: float = 30.0) -> defer.Deferred:
        """
        The next datagram (from now on) with C{name=value}.
        """
        d = defer.Deferred()
        self._waiters.append((name, value, len(self.messages), d))
        return d.addTimeout(timeout, reactor)

    def names(self) -> list:
        """
        The non-STATUS fields of every message, in order (C{READY},
        C{RELOADING}, ...).
        """
        return [n for m in self.messages for n in m if n not in ("STATUS", "MAINPID", "MONOTONIC_USEC", "_at")]


def notifySocket(testCase, abstract: bool = False) -> tuple[NotifyRecorder, str]:
    recorder = NotifyRecorder()
    if abstract:
        name = f"txcluster-test-{uuid.uuid4().hex}"
        port = reactor.listenUNIXDatagram("\0" + name, recorder)
        address = "@" + name
    else:
        directory = tempfile.mkdtemp(prefix="txc-notify-")
        testCase.addCleanup(shutil.rmtree, directory, True)
        address = os.path.join(directory, "notify")
        port = reactor.listenUNIXDatagram(address, recorder)
    testCase.addCleanup(port.stopListening)
    return recorder, address


async def get(port: int, timeout: float = 10.0) -> str:
    records = RecordingLoad(port, concurrency=1, limit=1, timeout=timeout).start()
    await records.finished()
    (record,) = records.records
    if not record.ok:
        raise AssertionError(f"GET failed: {record!r}")
    return record.answer


class NotifyTests(unittest.TestCase):
    timeout = 90

    async def _lifecycle(self, abstract: bool) -> None:
        recorder, address = notifySocket(self, abstract)
        port = freePort()
        master = MasterProcess(
            self,
            [
                "--app", app("slowstart.tac"), "--workers", "2", "--drain-delay", "1",
                "--graceful-timeout", "10",
            ],
            env={
                "NOTIFY_SOCKET": address,
                "WATCHDOG_USEC": "400000",
                "SLOW_LOAD": "0.3",
                "SLOW_START": "0.6",
                "WEB_LISTEN": f"tcp:{port}:interface=127.0.0.1",
            },
        )
        try:
            ready = await recorder.next("READY")
        except defer.TimeoutError:
            raise AssertionError(f"no READY=1: {recorder.messages}\n{master.output.text()}")
        # READY=1 came only once both workers were ready: right away,
        # every worker answers.
        answers = {(await get(port)).split()[2] for _ in range(6)}
        self.assertEqual(len(answers), 2, master.output.text())
        self.assertEqual(ready["MAINPID"], str(master.pid))
        self.assertEqual(ready["STATUS"], "2/2 workers ready, 0 connections handed")
        before = [m.get("STATUS") for m in recorder.messages[: recorder.messages.index(ready)]]
        self.assertEqual(before[0], "starting 2 workers")
        self.assertNotIn("READY", {n for m in recorder.messages[: recorder.messages.index(ready)] for n in m})

        old = set(master.workerPids().values())
        reloading = recorder.next("RELOADING")
        reloaded = recorder.next("READY")
        master.signal("HUP")
        started = await reloading
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.assertLess(abs(now - int(started["MONOTONIC_USEC"])), 10_000_000)
        self.assertTrue(started["STATUS"].startswith("reloading 0/2"), started)
        await reloaded
        # READY=1 again only once the reload is over: the old workers are gone.
        self.assertEqual([pid for pid in old if pidAlive(pid)], [])
        self.assertTrue(set((await get(port)).split()[2:3]) <= set(map(str, master.workerPids().values())) - set(map(str, old)))

        stopping = recorder.next("STOPPING")
        master.signal("TERM")
        await stopping
        # Said before the drain: the workers still run (--drain-delay 1).
        workers = set(master.workerPids().values()) - old
        self.assertTrue(all(pidAlive(pid) for pid in workers), master.output.text())
        self.assertEqual(await ended(master), (0, None))
        names = recorder.names()
        self.assertEqual(
            [n for n in names if n != "WATCHDOG"], ["READY", "RELOADING", "READY", "STOPPING"], recorder.messages
        )
        self.assertGreaterEqual(names.count("WATCHDOG"), 3)

    def test_lifecycle(self):
        """
        C{READY=1} once every worker is ready; C{RELOADING=1} with
        C{MONOTONIC_USEC} on C{SIGHUP}, then C{READY=1} once the old
        workers are gone; C{STOPPING=1} on C{SIGTERM}, before the workers
        drain; C{WATCHDOG=1} all along (C{$WATCHDOG_USEC}).
        """
        return defer.ensureDeferred(self._lifecycle(abstract=False))

    def test_abstractSocket(self):
        """
        The same with an abstract C{$NOTIFY_SOCKET} (C{@name}).
        """
        return defer.ensureDeferred(self._lifecycle(abstract=True))


class SocketActivationTests(unittest.TestCase):
    timeout = 90

    async def _activated(self, launcher: tuple, port: int, launched: str, extra: str = "") -> None:
        master = MasterProcess(
            self,
            ["--app", app("counting.tac"), "--workers", "2", "--listen", "systemd:domain=INET:name=web"],
            env={"COUNTING_PORT": str(port)},
            launcher=launcher,
        )
        # systemd's point: the socket takes connections before the service
        # is up; this one waits in the backlog and is served.
        await master.waitFor(launched)
        early = RecordingLoad(port, concurrency=1, limit=1, timeout=30).start()
        await master.waitFor(READY, 2)
        await early.finished()
        self.assertTrue(early.records[0].ok, early.records)
        text = master.output.text()
        self.assertIn(f"serving tcp:127.0.0.1:{port} passed by systemd (descriptor 3, --listen systemd:domain=INET:name=web)", text)
        self.assertNotIn(f"bound tcp:127.0.0.1:{port}", text)
        answers = {await get(port) for _ in range(6)}
        self.assertEqual(answers, {f"pid {pid}" for pid in master.workerPids().values()})
        if extra:
            self.assertIn(extra, text)
        master.signal("TERM")
        self.assertEqual(await ended(master), (0, None))

    def test_launcher(self):
        """
        A socket passed as systemd passes it (descriptor 3, C{LISTEN_PID},
        C{LISTEN_FDS}, C{LISTEN_FDNAMES}) is served by the master, which
        binds nothing itself; every worker whose app listens on its
        address shares it; a passed socket no C{--listen} names is logged.
        """
        port, other = freePort(), freePort()
        launcher = (sys.executable, os.path.join(APPS, "activate.py"), f"web=127.0.0.1:{port}", f"admin=127.0.0.1:{other}", "--")
        return defer.ensureDeferred(
            self._activated(
                launcher, port, "activate: passing", "systemd passed descriptor 4 (name admin) and no --listen names it"
            )
        )

    def test_systemdSocketActivate(self):
        """
        The same with Debian's C{systemd-socket-activate}.
        """
        tool = shutil.which("systemd-socket-activate")
        if tool is None:
            raise unittest.SkipTest("systemd-socket-activate is not installed (Debian's systemd package)")
        port = freePort()
        launcher = [tool, "-l", f"127.0.0.1:{port}", "--fdname=web"]
        # It passes on only the variables it is told to.
        for name in ("PYTHONPATH", "COUNTING_PORT", "PATH", "HOME"):
            launcher += ["-E", name]
        return defer.ensureDeferred(self._activated(tuple(launcher), port, "Listening on"))

    def test_dualStack(self):
        """
        systemd's C{ListenStream=PORT} is a dual-stack C{[::]:PORT} socket:
        an app listening on C{tcp:PORT} (all IPv4 interfaces) shares it,
        and IPv4 clients are served, in C{rr} and in C{shared} mode.
        """
        if not socket.has_ipv6:
            raise unittest.SkipTest("no IPv6 here")

        async def run(scheduling):
            port = freePort()
            launcher = (sys.executable, os.path.join(APPS, "activate.py"), f"web=[::]:{port}", "--")
            master = MasterProcess(
                self,
                ["--app", app("whoami.tac"), "--workers", "2", "--scheduling", scheduling,
                 "--listen", "systemd:domain=INET6:name=web"],
                env={"WHOAMI_LISTEN": f"tcp:{port}", "WHOAMI_CLOSE": "1"},
                launcher=launcher,
            )
            await master.waitFor(READY, 2)
            self.assertIn(f"serving tcp:[::]:{port} passed by systemd", master.output.text())
            seen = {workerOf(await whoami(tcp(port))) for _ in range(8)}
            if scheduling == "rr":
                self.assertEqual(seen, {1, 2}, master.output.text())
            else:
                # Which worker accepts is the kernel's choice.
                self.assertTrue(seen and seen <= {1, 2}, master.output.text())
            self.assertNotIn("could not adopt", master.output.text())
            master.signal("TERM")
            self.assertEqual(await ended(master), (0, None))

        async def both():
            await run("rr")
            await run("shared")

        return defer.ensureDeferred(both())

    def test_nothingPassed(self):
        """
        Without systemd's sockets, C{--listen systemd:...} is refused with
        a message naming the option; nothing starts.
        """

        async def run():
            master = MasterProcess(
                self, ["--app", app("counting.tac"), "--listen", "systemd:domain=INET:index=0"]
            )
            await ended(master)
            text = master.output.text()
            self.assertIn("--listen systemd:domain=INET:index=0: systemd passed no sockets to this process", text)
            self.assertEqual(master.workerPids(), {})

        return defer.ensureDeferred(run())


class MaxMemoryTests(unittest.TestCase):
    timeout = 120

    def test_leakingWorkerRecycledUnderLoad(self):
        """
        Under continuous load, a leaking worker whose unique memory stays
        over C{--max-memory} is replaced by a fresh process, ready before
        the old one stops taking connections: no request fails.
        """

        async def run():
            port = freePort()
            master = MasterProcess(
                self,
                ["--app", app("leaking.tac"), "--workers", "2", "--max-memory", "60", "--memory-interval", "0.2"],
                env={"LEAKING_PORT": str(port), "LEAK_KB": "256"},
            )
            await master.waitFor(READY, 2)
            first = set(master.workerPids().values())
            load = RecordingLoad(port, concurrency=4, limit=2000).start()
            try:
                await master.waitFor(r"over --max-memory 60\.0 MiB for 3 samples in a row: recycling it", 1, timeout=60)
                await master.waitFor(READY, 3, timeout=30)
                await master.waitFor(r"disconnecting \(replaced\)", 1, timeout=30)
                # The load goes on a while, served by the fresh worker too.
                await sleep(1.0)
            finally:
                await load.stop()
            failed = [r for r in load.records if not r.ok]
            self.assertEqual(failed, [], master.output.text()[-3000:])
            served = {r.answer.split()[1] for r in load.records}
            self.assertTrue(served - set(map(str, first)), "no fresh worker served")
            self.assertIn("uses", master.output.text())
            master.signal("TERM")
            self.assertEqual(await ended(master, timeout=40), (0, None))

        return defer.ensureDeferred(run())


class TwistTests(unittest.TestCase):
    timeout = 60

    def test_twist(self):
        """
        C{twist txcluster} runs the same cluster: the master is named, its
        workers serve, C{SIGTERM} stops it with status 0.
        """

        async def run():
            port = freePort()
            master = MasterProcess(
                self,
                ["--app", app("counting.tac"), "--workers", "2"],
                env={"COUNTING_PORT": str(port)},
                twistdArgs=("--log-format=text",),
                runner="twist",
            )
            await master.waitFor(READY, 2)
            with open(f"/proc/{master.pid}/cmdline", "rb") as f:
                self.assertIn(b"txcluster master [counting.tac]", f.read())
            answers = {await get(port) for _ in range(6)}
            self.assertEqual(answers, {f"pid {pid}" for pid in master.workerPids().values()})
            master.signal("TERM")
            self.assertEqual(await ended(master), (0, None))

        return defer.ensureDeferred(run())

    def test_jsonLog(self):
        """
        With C{twist --log-format=json}, every record is JSON (a JSON text
        sequence), the master's and its workers' alike.
        """

        async def run():
            port = freePort()
            master = MasterProcess(
                self,
                ["--app", app("counting.tac"), "--workers", "1"],
                env={"COUNTING_PORT": str(port)},
                twistdArgs=("--log-format=json",),
                runner="twist",
            )
            await master.waitFor('"log_namespace": "txcluster.worker"', 1)
            await master.waitFor(r"ready in", 1)
            master.signal("TERM")
            await ended(master)
            records = [r for r in master.output.text().split("\x1e") if r.strip()]
            events = [eventFromJSON(r.strip()) for r in records]
            messages = [formatEvent(e) for e in events]
            self.assertTrue(any(m.startswith("worker 1 (pid ") and " ready in " in m for m in messages), messages)
            self.assertTrue(any(e.get("log_namespace") == "txcluster.worker" for e in events))
            for record in records:
                json.loads(record)

        return defer.ensureDeferred(run())
