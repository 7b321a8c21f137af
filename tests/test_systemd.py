"""
Tests for L{txcluster._systemd}: the notify protocol, spoken to a real
datagram socket by a cluster of fake workers on a fake clock, and the
checks made of sockets systemd passes.
"""

from __future__ import annotations

import os
import socket
import uuid

from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from txcluster import _systemd
from txcluster._access import BadListenDescription, Inherited, parseDeclared
from txcluster._handles import HandleTable
from txcluster._sockets import ListenKey
from txcluster._systemd import (
    SYSTEMD_VARIABLES,
    InheritedSocketError,
    Notifier,
    SystemdNotify,
    inheritSocket,
    notifyAddress,
    removeFromEnvironment,
    watchdogInterval,
)

from tests.test_master import ClusterTestsMixin


def datagramSocket(testCase, abstract: bool = False) -> tuple[socket.socket, str]:
    """
    A bound datagram socket standing for systemd's notify socket, and the
    address C{$NOTIFY_SOCKET} would hold for it.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    testCase.addCleanup(sock.close)
    if abstract:
        name = f"txcluster-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        directory = testCase.mktemp()
        os.mkdir(directory)
        address = os.path.join(directory, "notify")
        sock.bind(address)
    sock.setblocking(False)
    return sock, address


def received(sock: socket.socket) -> list[dict]:
    """
    Every datagram waiting on C{sock}, each as a dict of its fields.
    """
    messages = []
    while True:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return messages
        messages.append(dict(line.split("=", 1) for line in data.decode("utf-8").split("\n")))


class NotifierTests(SynchronousTestCase):
    def test_path(self) -> None:
        """
        A path in C{$NOTIFY_SOCKET} is used as it is; each datagram holds
        C{NAME=value} lines.
        """
        sock, address = datagramSocket(self)
        self.assertEqual(notifyAddress({"NOTIFY_SOCKET": address}), address)
        notifier = Notifier(address)
        self.addCleanup(notifier.close)
        self.assertTrue(notifier.send(READY=1, STATUS="2/2 workers ready"))
        self.assertEqual(sock.recv(4096), b"READY=1\nSTATUS=2/2 workers ready")

    def test_abstract(self) -> None:
        """
        C{@name} is the abstract socket C{name}.
        """
        sock, address = datagramSocket(self, abstract=True)
        notifier = Notifier(notifyAddress({"NOTIFY_SOCKET": address}))
        self.addCleanup(notifier.close)
        notifier.send(STOPPING=1)
        self.assertEqual(received(sock), [{"STOPPING": "1"}])

    def test_notSet(self) -> None:
        """
        No C{$NOTIFY_SOCKET} (or an empty one): not under systemd's notify.
        """
        self.assertIsNone(notifyAddress({}))
        self.assertIsNone(notifyAddress({"NOTIFY_SOCKET": ""}))

    def test_unreachableIsLoggedOnce(self) -> None:
        """
        A socket nobody listens on makes C{send} return false and log a
        warning once per reason; the master carries on.
        """
        logs = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(logs.append)
        self.addCleanup(globalLogPublisher.removeObserver, logs.append)
        notifier = Notifier(os.path.join(self.mktemp(), "gone"))
        self.addCleanup(notifier.close)
        self.assertFalse(notifier.send(READY=1))
        self.assertFalse(notifier.send(STATUS="x"))
        warnings = [e for e in logs if e.get("log_level") == LogLevel.warn and "notify systemd" in e["log_format"]]
        self.assertEqual(len(warnings), 1)


class WatchdogIntervalTests(SynchronousTestCase):
    def test_half(self) -> None:
        """
        Half of C{$WATCHDOG_USEC}, in seconds.
        """
        self.assertEqual(watchdogInterval({"WATCHDOG_USEC": "30000000"}, 7), 15.0)

    def test_pid(self) -> None:
        """
        Only when C{$WATCHDOG_PID} is unset or this process.
        """
        self.assertEqual(watchdogInterval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "7"}, 7), 1.0)
        self.assertIsNone(watchdogInterval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "8"}, 7))

    def test_notAsked(self) -> None:
        """
        Unset, zero or malformed: no watchdog.
        """
        for environ in ({}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "soon"}, {"WATCHDOG_USEC": "-5"}):
            self.assertIsNone(watchdogInterval(environ, 7), environ)


class EnvironmentTests(SynchronousTestCase):
    def test_workersDoNotSeeSystemd(self) -> None:
        """
        A worker's environment has none of what systemd told the master.
        """
        from txcluster._process import workerEnvironment

        base = {name: "x" for name in SYSTEMD_VARIABLES}
        base["HOME"] = "/home/app"
        env = workerEnvironment(base, 1, 2, "twisted.internet.epollreactor")
        self.assertEqual([name for name in SYSTEMD_VARIABLES if name in env], [])
        self.assertEqual(env["HOME"], "/home/app")
        self.assertEqual(removeFromEnvironment({"NOTIFY_SOCKET": "/x", "A": "b"}), {"A": "b"})


class NotifyTests(ClusterTestsMixin, SynchronousTestCase):
    """
    L{SystemdNotify} tells a real datagram socket what a cluster of fake
    workers does, in order.
    """

    def notifying(self, environ=None, **config):
        sock, address = datagramSocket(self)
        cluster = self.makeCluster(start=False, **config)
        environ = dict(environ or {}, NOTIFY_SOCKET=address)
        notify = SystemdNotify(cluster, Notifier(notifyAddress(environ)), environ, pid=4242)
        cluster.startService()
        notify.startService()
        self.addCleanup(lambda: notify.running and notify.stopService())
        self.notify = notify
        return sock

    def turn(self) -> None:
        self.reactor.advance(0)
        self.spawner.flush()

    def test_readyOnlyOnceEveryWorkerIs(self) -> None:
        """
        C{MAINPID} and a C{STATUS} at start; C{READY=1} only after the last
        worker is ready, with a C{STATUS} saying so.
        """
        sock = self.notifying(workers=2)
        self.assertEqual(received(sock), [{"MAINPID": "4242", "STATUS": "starting 2 workers"}])
        self.worker(1).start()
        self.turn()
        before = received(sock)
        self.assertNotIn("READY", {name for message in before for name in message})
        self.assertIn({"STATUS": "1/2 workers ready, 0 connections handed"}, before)
        self.worker(2).start()
        self.assertEqual(
            received(sock), [{"READY": "1", "MAINPID": "4242", "STATUS": "2/2 workers ready, 0 connections handed"}]
        )
        self.assertLogged("cluster ready: telling systemd (READY=1)")

    def test_minReady(self) -> None:
        """
        With C{minReady}, C{READY=1} once that many are ready.
        """
        sock = self.notifying(workers=2, minReady=1)
        received(sock)
        self.worker(1).start()
        self.assertEqual([m for m in received(sock) if "READY" in m][0]["STATUS"], "1/2 workers ready, 0 connections handed")

    def test_reload(self) -> None:
        """
        A reload is C{RELOADING=1} with C{MONOTONIC_USEC} (now, on the
        monotonic clock), progress in C{STATUS}, then C{READY=1} once the
        last old worker is gone.
        """
        import time

        sock = self.notifying(workers=2)
        old = [self.worker(1), self.worker(2)]
        for worker in old:
            worker.start()
        received(sock)
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        d = self.cluster.reload()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        (reloading,) = received(sock)
        self.assertEqual(reloading["RELOADING"], "1")
        self.assertTrue(before <= int(reloading["MONOTONIC_USEC"]) <= after)
        self.assertEqual(reloading["STATUS"], "reloading 0/2; 2/2 workers ready, 0 connections handed")
        self.worker(1).start()
        self.turn()
        self.assertIn("reloading 1/2", " ".join(m.get("STATUS", "") for m in received(sock)))
        self.worker(2).start()
        self.turn()
        self.assertNotIn("READY", {name for m in received(sock) for name in m})
        for worker in old:
            worker.exit(0)
        self.successResultOf(d)
        self.assertEqual(
            [m for m in received(sock) if "READY" in m],
            [{"READY": "1", "STATUS": "2/2 workers ready, 0 connections handed"}],
        )

    def test_failedReload(self) -> None:
        """
        A reload that fails ends in C{READY=1} too (the old workers serve),
        with a C{STATUS} naming why.
        """
        sock = self.notifying(workers=1)
        self.worker(1).start()
        received(sock)
        d = self.cluster.reload()
        self.worker(1).exit(3)
        self.failureResultOf(d)
        (ready,) = [m for m in received(sock) if "READY" in m]
        self.assertTrue(ready["STATUS"].startswith("reload failed: replacement worker 1 (pid"), ready)
        self.assertTrue(ready["STATUS"].endswith("the old workers serve on; 1/1 workers ready, 0 connections handed"), ready)

    def test_reloadBeforeReady(self) -> None:
        """
        A reload asked for before systemd was told C{READY=1} says nothing
        of reloading (systemd is still waiting for the start).
        """
        sock = self.notifying(workers=1)
        received(sock)
        self.cluster.reload()
        self.assertNotIn("RELOADING", {name for m in received(sock) for name in m})

    def test_stopping(self) -> None:
        """
        A stop is C{STOPPING=1} at once, with a C{STATUS}.
        """
        sock = self.notifying(workers=2)
        self.worker(1).start()
        self.worker(2).start()
        received(sock)
        self.cluster.stopService()
        self.assertEqual(received(sock)[0], {"STOPPING": "1", "STATUS": "stopping: 2 worker processes to finish"})

    def test_statusRefresh(self) -> None:
        """
        C{STATUS} is refreshed every L{_systemd.STATUS_INTERVAL} seconds
        when it changed (the count of connections handed since the master
        started), and not sent again when it did not.
        """
        sock = self.notifying(workers=1)
        self.worker(1).start()
        received(sock)
        self.reactor.advance(_systemd.STATUS_INTERVAL)
        self.assertEqual(received(sock), [])
        self.cluster.recorder.handed(1, 3)
        self.reactor.advance(_systemd.STATUS_INTERVAL)
        self.assertEqual(received(sock), [{"STATUS": "1/1 workers ready, 3 connections handed"}])

    def test_watchdog(self) -> None:
        """
        C{WATCHDOG=1} every half C{$WATCHDOG_USEC} while the reactor runs,
        until the cluster's stop is over.
        """
        sock = self.notifying({"WATCHDOG_USEC": "2000000"}, workers=1)
        received(sock)
        self.reactor.advance(1)
        self.reactor.advance(1)
        self.assertEqual([m for m in received(sock) if "WATCHDOG" in m], [{"WATCHDOG": "1"}] * 2)
        stopped = self.notify.stopService()
        self.cluster.stopService()
        self.reactor.advance(1)
        self.assertEqual([m for m in received(sock) if "WATCHDOG" in m], [{"WATCHDOG": "1"}])
        self.assertNoResult(stopped)
        for worker in self.spawner.running():
            worker.exit(0)
        self.successResultOf(stopped)
        self.reactor.advance(5)
        self.assertEqual([m for m in received(sock) if "WATCHDOG" in m], [])

    def test_watchdogForAnotherProcess(self) -> None:
        """
        No C{WATCHDOG=1} when systemd watches another pid.
        """
        sock = self.notifying({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, workers=1)
        self.reactor.advance(5)
        self.assertEqual([m for m in received(sock) if "WATCHDOG" in m], [])


class InheritedDescriptionTests(SynchronousTestCase):
    def test_parse(self) -> None:
        """
        Twisted's C{systemd:} endpoint syntax, by index or by name.
        """
        self.assertEqual(
            parseDeclared("systemd:domain=INET:index=0"),
            Inherited("INET", 0, None, "systemd:domain=INET:index=0"),
        )
        self.assertEqual(
            parseDeclared("systemd:domain=UNIX:name=web"),
            Inherited("UNIX", None, "web", "systemd:domain=UNIX:name=web"),
        )
        self.assertTrue(parseDeclared("systemd:domain=INET6:index=1").isStream)

    def test_bad(self) -> None:
        """
        A bad description is refused, saying what is wrong.
        """
        for description, why in [
            ("systemd:index=0", "needs domain=INET, INET6 or UNIX"),
            ("systemd:domain=IPX:index=0", "needs domain=INET, INET6 or UNIX"),
            ("systemd:domain=INET", "exactly one of index=N"),
            ("systemd:domain=INET:index=0:name=web", "exactly one of index=N"),
            ("systemd:domain=INET:index=first", "index must be a whole number"),
        ]:
            with self.assertRaises(BadListenDescription) as caught:
                parseDeclared(description)
            self.assertIn(why, str(caught.exception))

    def test_nothingPassed(self) -> None:
        """
        Without systemd's variables, a C{systemd:} listen is an error that
        says what to do.
        """
        with self.assertRaises(InheritedSocketError) as caught:
            inheritSocket(None, parseDeclared("systemd:domain=INET:index=0"), {})
        self.assertIn("--listen systemd:domain=INET:index=0: systemd passed no sockets", str(caught.exception))


class InheritedSocketTests(SynchronousTestCase):
    """
    What the master makes of a socket systemd passed (here: made by the
    test, as systemd would).
    """

    def listening(self, family, address, **options) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, options.get("v6only", 0))
        sock.bind(address)
        sock.listen(5)
        return sock

    def test_keys(self) -> None:
        """
        A socket is known by its address; a dual-stack C{[::]} socket also
        serves what listens on C{0.0.0.0}.
        """
        sock = self.listening(socket.AF_INET, ("127.0.0.1", 0))
        port = sock.getsockname()[1]
        self.assertEqual(_systemd._keysOf(sock), (ListenKey("tcp4", "127.0.0.1", port, 0), ()))
        try:
            dual = self.listening(socket.AF_INET6, ("::", 0))
        except OSError:
            raise self.skipTest("no IPv6 here")
        port = dual.getsockname()[1]
        self.assertEqual(
            _systemd._keysOf(dual),
            (ListenKey("tcp6", "::", port, 0), (ListenKey("tcp4", "0.0.0.0", port, 0),)),
        )
        only = self.listening(socket.AF_INET6, ("::", 0), v6only=1)
        self.assertEqual(_systemd._keysOf(only), (ListenKey("tcp6", "::", only.getsockname()[1], 0), ()))

    def test_unixKey(self) -> None:
        """
        A UNIX socket is known by its path.
        """
        path = os.path.abspath(self.mktemp())
        sock = self.listening(socket.AF_UNIX, path)
        self.assertEqual(_systemd._keysOf(sock), (ListenKey("unix", path, 0, 0), ()))

    def test_checked(self) -> None:
        """
        A passed descriptor that is not a listening stream socket of the
        domain named is refused, saying which it is.
        """

        def passing(fileno):
            self.patch(_systemd, "_endpoint", lambda reactor, description: type("E", (), {"fileno": fileno})())

        datagram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(datagram.close)
        idle = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(idle.close)
        unix = self.listening(socket.AF_UNIX, os.path.abspath(self.mktemp()))
        with open(os.devnull) as notASocket:
            for fileno, description, why in [
                (datagram.fileno(), "systemd:domain=INET:index=0", "is not a stream socket"),
                (idle.fileno(), "systemd:domain=INET:index=0", "is not listening"),
                (unix.fileno(), "systemd:domain=INET:index=0", "is an AF_UNIX socket, not AF_INET"),
                (notASocket.fileno(), "systemd:domain=INET:index=0", "is not a socket"),
            ]:
                passing(fileno)
                with self.assertRaises(InheritedSocketError) as caught:
                    inheritSocket(None, parseDeclared(description), {})
                self.assertIn(f"--listen {description}: descriptor {fileno} {why}", str(caught.exception))
        # Refused descriptors are left open: they are systemd's.
        os.fstat(datagram.fileno())

    def test_served(self) -> None:
        """
        A good one is served non-blocking and close-on-exec, under its
        keys; closing the table leaves the UNIX socket file (systemd's).
        """
        path = os.path.abspath(self.mktemp())
        unix = self.listening(socket.AF_UNIX, path)
        fileno = os.dup(unix.fileno())
        self.patch(_systemd, "_endpoint", lambda reactor, description: type("E", (), {"fileno": fileno})())
        inherited = inheritSocket(None, parseDeclared("systemd:domain=UNIX:name=web"), {})
        self.assertFalse(inherited.sock.getblocking())
        self.assertFalse(inherited.sock.get_inheritable())
        from twisted.internet.testing import MemoryReactorClock

        table = HandleTable(MemoryReactorClock(), "rr", lambda *a: None)
        handle = table.inherit(inherited.key, inherited.sock, inherited.aliases)
        self.assertTrue(handle.declared and handle.inherited)
        self.assertEqual(table.unused(), [handle])
        table.closeAll()
        self.assertTrue(os.path.exists(path))
