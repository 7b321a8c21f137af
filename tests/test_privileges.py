"""
Privilege separation with a real unprivileged user: a root master binds
what was declared (a privileged port), workers run as the user, and workers
may not have the master bind anything else.

These tests need root (to create the user and bind a port below 1024) and a
checkout the user can read; otherwise they are skipped, saying why.
"""

import os
import pwd
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile

from twisted.trial import unittest

from tests._harness import APPS, ROOT, MasterProcess, app, tcp, whoami, workerOf

USER = "txcluster-test"


def _uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise LookupError(pid)


def _privilegedPort() -> int:
    for port in range(600, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise unittest.SkipTest("no free port below 1024 on 127.0.0.1")


class UnprivilegedUser:
    """
    A system user made for the test (and removed afterwards, if the test
    made it), and a Python it can run with twisted and this checkout on its
    path.

    The interpreter running the tests may live where an unprivileged user
    cannot reach (pyenv under C{/root}); the same minor version of the
    system's Python runs the master and workers instead, with this
    checkout and the test environment's site-packages on C{PYTHONPATH}.
    """

    def __init__(self, testCase) -> None:
        if os.geteuid() != 0:
            raise unittest.SkipTest("privilege separation tests need root")
        try:
            self.entry = pwd.getpwnam(USER)
        except KeyError:
            result = subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
                capture_output=True,
            )
            if result.returncode != 0:
                raise unittest.SkipTest(f"cannot create a test user: {result.stderr.decode().strip()}")
            testCase.addCleanup(subprocess.run, ["userdel", USER], capture_output=True)
            self.entry = pwd.getpwnam(USER)
        paths = sysconfig.get_paths()
        self.pythonpath = os.pathsep.join(dict.fromkeys([ROOT, paths["purelib"], paths["platlib"]]))
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        candidates = [sys.executable] + [os.path.join(d, version) for d in ("/usr/bin", "/usr/local/bin")]
        reasons = []
        for python in candidates:
            reason = self._probe(python)
            if reason is None:
                self.python = python
                break
            reasons.append(f"{python}: {reason}")
        else:
            raise unittest.SkipTest(f"user {USER} cannot run txcluster from {ROOT}: " + "; ".join(reasons))

    def _probe(self, python: str):
        if not os.path.exists(python):
            return "not installed"
        try:
            probe = subprocess.run(
                [python, "-c", "import twisted, txcluster._workermain"],
                user=self.entry.pw_uid,
                group=self.entry.pw_gid,
                extra_groups=[],
                env={"PYTHONPATH": self.pythonpath, "PATH": os.environ.get("PATH", "")},
                cwd="/",
                capture_output=True,
                timeout=30,
            )
        except OSError as e:
            return str(e)
        if probe.returncode != 0:
            return (probe.stderr.decode().strip().splitlines() or ["failed"])[-1]
        return None

    def master(self, testCase, args, env=None, twistdArgs=(), launcher=()):
        environment = dict(env or {}, PYTHONPATH=self.pythonpath)
        if "--uid" in twistdArgs:
            # The master binds its control socket once it runs as the user:
            # in a directory of the user's (as systemd's RuntimeDirectory=).
            directory = tempfile.mkdtemp(prefix="txc-control-")
            testCase.addCleanup(shutil.rmtree, directory, True)
            os.chown(directory, self.entry.pw_uid, self.entry.pw_gid)
            args = ["--control", os.path.join(directory, "txcluster.sock")] + list(args)
        return MasterProcess(
            testCase, args, env=environment, twistdArgs=twistdArgs, executable=self.python, launcher=launcher
        )


class PrivilegeTests(unittest.TestCase):
    timeout = 60

    async def test_rootMasterUnprivilegedWorkers(self):
        """
        A root master binds the declared privileged port at start-up; the
        workers run as the unprivileged user and serve it; a worker's
        request for an undeclared listen is refused (declared-only is the
        default here), naming the rule.
        """
        unprivileged = UnprivilegedUser(self)
        user = unprivileged.entry
        port = _privilegedPort()
        description = f"tcp:{port}:interface=127.0.0.1"
        master = unprivileged.master(
            self,
            ["--app", app("whoami.tac"), "--workers", "2", "--user", USER, "--listen", description],
            env={"WHOAMI_LISTEN": f"{description} tcp:0:interface=127.0.0.1"},
        )
        await master.waitFor(r"worker \d \(pid \d+\) ready", count=2)
        text = master.output.text()
        self.assertIn(f"declared tcp:127.0.0.1:{port} (--listen {description})", text)
        self.assertIn(f"workers run as uid {user.pw_uid}, gid {user.pw_gid}", text)
        for pid in master.workerPids().values():
            self.assertEqual(_uid(pid), user.pw_uid)
        self.assertEqual(_uid(master.pid), 0)
        self.assertEqual({workerOf(await whoami(tcp(port))) for _ in range(4)}, {1, 2})
        self.assertRegex(
            text,
            r"may not listen on tcp:127\.0\.0\.1:0: the master is privileged and the workers "
            r"are not, so only the listens declared with --listen are allowed",
        )

    async def test_socketActivationNeedsNoPrivilege(self):
        """
        Under socket activation the master needs no privilege at all: the
        launcher (systemd) binds the privileged port as root and runs the
        master as the user (C{User=}); master and workers run as the user
        and serve the port.
        """
        unprivileged = UnprivilegedUser(self)
        user = unprivileged.entry
        port = _privilegedPort()
        launcher = (unprivileged.python, os.path.join(APPS, "activate.py"), f"web=127.0.0.1:{port}", "--")
        master = unprivileged.master(
            self,
            ["--app", app("whoami.tac"), "--workers", "2", "--no-control", "--listen", "systemd:domain=INET:name=web"],
            env={"WHOAMI_LISTEN": f"tcp:{port}:interface=127.0.0.1", "ACTIVATE_USER": USER},
            launcher=launcher,
        )
        await master.waitFor(r"worker \d \(pid \d+\) ready", count=2)
        self.assertIn(f"serving tcp:127.0.0.1:{port} passed by systemd", master.output.text())
        self.assertEqual(_uid(master.pid), user.pw_uid)
        for pid in master.workerPids().values():
            self.assertEqual(_uid(pid), user.pw_uid)
        self.assertEqual({workerOf(await whoami(tcp(port))) for _ in range(4)}, {1, 2})

    async def test_allowListenOpensMore(self):
        """
        --allow-listen lets unprivileged workers have the master bind what
        its rules match (here: ephemeral ports on loopback).
        """
        master = UnprivilegedUser(self).master(
            self,
            ["--app", app("whoami.tac"), "--workers", "1", "--user", USER, "--allow-listen", "tcp:0:interface=127.0.0.1"],
            env={"WHOAMI_LISTEN": "tcp:0:interface=127.0.0.1"},
        )
        await master.waitFor(r"worker 1 \(pid \d+\) listening on tcp:127\.0\.0\.1:(\d+)")
        import re

        port = int(re.search(r"listening on tcp:127\.0\.0\.1:(\d+)", master.output.text()).group(1))
        self.assertEqual(workerOf(await whoami(tcp(port))), 1)

    async def test_masterDropsPrivilegesToo(self):
        """
        With twistd's --uid/--gid, the master binds the declared privileged
        port while still root, then runs as the user itself, and so do its
        workers.
        """
        unprivileged = UnprivilegedUser(self)
        user = unprivileged.entry
        port = _privilegedPort()
        description = f"tcp:{port}:interface=127.0.0.1"
        master = unprivileged.master(
            self,
            ["--app", app("whoami.tac"), "--workers", "2", "--listen", description],
            env={"WHOAMI_LISTEN": description},
            twistdArgs=("--uid", str(user.pw_uid), "--gid", str(user.pw_gid)),
        )
        await master.waitFor(r"worker \d \(pid \d+\) ready", count=2)
        self.assertEqual(_uid(master.pid), user.pw_uid)
        for pid in master.workerPids().values():
            self.assertEqual(_uid(pid), user.pw_uid)
        self.assertEqual({workerOf(await whoami(tcp(port))) for _ in range(4)}, {1, 2})
