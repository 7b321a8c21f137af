"""
C{twistd txcluster} as a user runs it: a real master process (a child of
the test) with real workers, driven by signals.
"""

import os
import re
import socket
import sys

from twisted.internet import utils
from twisted.trial import unittest

from tests._harness import ROOT, MasterProcess, app, freePort, pidAlive, sleep, tcp, whoami, workerOf


def twistd(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return utils.getProcessOutputAndValue(
        sys.executable,
        ["-c", "from twisted.scripts.twistd import run; run()", "--pidfile=", "-n", "txcluster", *args],
        env=env,
    )



from twisted import version as _version

twistedVersion = (_version.major, _version.minor)

class CommandLineTests(unittest.TestCase):
    timeout = 60

    async def test_badOptionIsNamed(self):
        """
        A bad value is a usage error naming the option, and nothing starts.
        """
        # twistd exits 1 after a usage error since Twisted 26.10 (0 before).
        failing = twistedVersion >= (26, 10)
        for args, option in [
            (["--app", app("whoami.tac"), "--workers", "0"], "--workers"),
            (["--app", app("whoami.tac"), "--workers", "many"], "--workers"),
            (["--app", app("whoami.tac"), "--scheduling", "random"], "--scheduling"),
            (["--app", app("whoami.tac"), "--graceful-timeout", "-1"], "--graceful-timeout"),
        ]:
            out, err, code = await twistd(*args)
            if failing:
                self.assertNotEqual(code, 0, args)
            self.assertIn(option, (out + err).decode(), args)
            self.assertNotIn(b"forked", out + err)

    async def test_missingAppIsAnErrorBeforeSpawning(self):
        """
        A missing --app, or an app file that does not exist, is reported
        before any worker is spawned.
        """
        failing = twistedVersion >= (26, 10)
        out, err, code = await twistd("--workers", "2")
        if failing:
            self.assertNotEqual(code, 0)
        self.assertIn("--app is required", (out + err).decode())
        out, err, code = await twistd("--app", "/nonexistent/app.tac")
        if failing:
            self.assertNotEqual(code, 0)
        self.assertIn("/nonexistent/app.tac", (out + err).decode())
        self.assertIn("no such file", (out + err).decode())
        self.assertNotIn(b"forked", out + err)

    async def test_helpListsEveryOption(self):
        """
        --help documents every option in the README's table.
        """
        out, err, code = await twistd("--help")
        self.assertEqual(code, 0)
        with open(os.path.join(ROOT, "README.md")) as f:
            readme = f.read()
        documented = set(re.findall(r"^\| `--([a-z-]+)", readme, re.M))
        offered = set(re.findall(r"--([a-z][a-z-]+)=", out.decode()))
        self.assertTrue(documented, "the README has no options table")
        self.assertEqual(documented, offered)


class SignalTests(unittest.TestCase):
    timeout = 60

    async def test_sigtermDrainsAndExitsZero(self):
        """
        SIGTERM stops the master gracefully: workers are told to disconnect,
        exit 0, and the master exits 0.
        """
        port = freePort()
        master = MasterProcess(
            self,
            ["--app", app("whoami.tac"), "--workers", "2"],
            env={"WHOAMI_LISTEN": f"tcp:{port}:interface=127.0.0.1"},
        )
        await master.waitFor(r"worker \d \(pid \d+\) ready", count=2)
        self.assertEqual({workerOf(await whoami(tcp(port))) for _ in range(4)}, {1, 2})
        master.signal("TERM")
        reason = await master.output.ended
        self.assertEqual(reason.exitCode, 0, master.output.text())
        text = master.output.text()
        self.assertEqual(len(re.findall(r"worker \d \(pid \d+\) disconnecting \(stop\)", text)), 2)
        self.assertEqual(len(re.findall(r"worker \d \(pid \d+\) exited \(exit code 0\)", text)), 2)
        for pid in master.workerPids().values():
            self.assertFalse(pidAlive(pid))

    async def test_processTitles(self):
        """
        ps shows each process's role: the master and each worker, with its
        id, name themselves and the application.
        """
        master = MasterProcess(self, ["--app", app("whoami.tac"), "--workers", "2"])
        await master.waitFor(r"worker \d \(pid \d+\) ready", count=2)

        def title(pid):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().replace(b"\0", b" ").decode().strip()

        self.assertEqual(title(master.pid), "txcluster master [whoami.tac]")
        for workerId, pid in master.workerPids().items():
            self.assertEqual(title(pid), f"txcluster worker {workerId} [whoami.tac]")

    async def test_workersRunTheMastersReactor(self):
        """
        The workers run the kind of reactor twistd was given (--reactor).
        """
        master = MasterProcess(self, ["--app", app("whoami.tac"), "--workers", "1"], twistdArgs=("--reactor", "poll"))
        await master.waitFor(r"worker 1 \(pid \d+\) ready")
        text = master.output.text()
        self.assertIn("reactor class: twisted.internet.pollreactor.PollReactor", text)
        self.assertRegex(text, r"worker 1 \(pid \d+\) loading .*whoami\.tac with PollReactor")

    async def test_masterKilledTakesWorkersWithIt(self):
        """
        When the master is SIGKILLed, every worker notices its channel
        closing and exits within 2 seconds.
        """
        master = MasterProcess(self, ["--app", app("whoami.tac"), "--workers", "2"])
        await master.waitFor(r"worker \d \(pid \d+\) ready", count=2)
        pids = list(master.workerPids().values())
        self.assertEqual(len(pids), 2)
        master.signal("KILL")
        await master.output.ended
        for _ in range(20):
            if not any(pidAlive(pid) for pid in pids):
                break
            await sleep(0.1)
        self.assertEqual([pid for pid in pids if pidAlive(pid)], [])

    async def test_workerOutputIsTagged(self):
        """
        A worker's stdout and stderr lines and its log events reach the
        master's log tagged with its worker id and pid.
        """
        master = MasterProcess(
            self,
            ["--app", app("broken.tac"), "--workers", "1", "--max-restarts", "0"],
        )
        reason = await master.output.ended
        text = master.output.text()
        pid = master.workerPids()[1]
        self.assertIn(f"[worker 1 pid {pid}] broken app: about to fail", text)
        self.assertIn(f"[worker 1 pid {pid}] broken app: on stderr", text)
        self.assertRegex(text, rf"\[worker 1 pid {pid}\] worker 1 \(pid {pid}\) could not load")
        self.assertNotEqual(reason.exitCode, 0)


class BootFailureTests(unittest.TestCase):
    timeout = 90

    async def test_appThatCannotStartGivesUp(self):
        """
        An app that raises at startup is respawned with backoff, then the
        master gives up: it logs which worker failed and how, with the
        traceback, and exits non-zero within the restart window.
        """
        master = MasterProcess(
            self,
            ["--app", app("broken.tac"), "--workers", "2", "--max-restarts", "3", "--restart-window", "60"],
        )
        reason = await master.output.ended
        text = master.output.text()
        self.assertEqual(reason.exitCode, 1, text)
        self.assertIn("giving up: more than 3 worker failures within 60 s", text)
        giveUp = text[text.index("giving up"):]
        self.assertIn("exit code 4", giveUp)
        self.assertIn("KeyError: 'missing setting'", giveUp)
        self.assertIn("backing off", text)

    async def test_synchronousListenFailureExitsNonZero(self):
        """
        A worker whose reactor.listenTCP fails (the port is taken) says so,
        naming the address, and exits with code 3.
        """
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        self.addCleanup(holder.close)
        busy = holder.getsockname()[1]
        master = MasterProcess(
            self,
            ["--app", app("whoami.tac"), "--workers", "1", "--max-restarts", "0"],
            env={"WHOAMI_TCP_SYNC": str(busy)},
        )
        reason = await master.output.ended
        text = master.output.text()
        self.assertNotEqual(reason.exitCode, 0)
        self.assertIn("exit code 3", text)
        self.assertIn(f"cannot listen on tcp:127.0.0.1:{busy}: Address already in use", text)
        self.assertIn(f"Couldn't listen on 127.0.0.1:{busy}", text)
