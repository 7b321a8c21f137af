"""
Deterministic tests of the control socket's protocol (L{txcluster._control})
against a real L{ClusterService} on a fake reactor with fake workers (as in
L{tests.test_master}): the client is an AMP protocol connected in memory,
the time is the fake reactor's.  Also the stale-socket check, on real
files, and the usage sampler.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile

from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.logger import LogLevel
from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from txcluster import _control
from txcluster._control import ControlProtocol, ControlServer, defaultControlPath, removeStaleSocket
from txcluster._controlcommands import (
    CLIENT_COMMANDS,
    BadRequest,
    NoSuchWorker,
    OperationFailed,
    Event,
    LongText,
    Recycle,
    Reload,
    Scale,
    Stacks,
    Status,
    Stop,
    Watch,
)
from txcluster._commands import STACKS_FD, Disconnect
from txcluster._procstats import ProcessUsage, UsageSampler, readUsage

from .test_master import LOCAL, ClusterTestsMixin


class _Client(amp.AMP):
    """
    A control client that records the events it is sent.
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list = []
        self.lost = None

    @Event.responder
    def event(self, event: str) -> dict:
        self.events.append(json.loads(event))
        return {}

    def connectionLost(self, reason) -> None:
        self.lost = reason
        super().connectionLost(reason)


class ControlTestsMixin(ClusterTestsMixin):
    def setUp(self) -> None:
        super().setUp()
        self.stops: list = []

    def connect(self, cluster):
        """
        A L{ControlServer} for C{cluster} (not listening) and a client
        connected to one of its protocols in memory.
        """
        self.server = ControlServer(
            cluster, "/nonexistent/txcluster.sock", reactor=self.reactor, stopMaster=lambda: self.stops.append(True)
        )
        client, protocol, pump = iosim.connectedServerAndClient(lambda: ControlProtocol(self.server), _Client)
        self.pump = pump
        self.protocol = protocol
        return client

    def flushAll(self) -> None:
        """
        Deliver what waits on the control connection and on every worker
        channel, until nothing moves.
        """
        for _ in range(10):
            self.pump.flush()
            self.spawner.flush()

    def call(self, client, command, **arguments):
        """
        Send C{command} and pump until it is answered; the answer (or the
        failure).
        """
        results: list = []
        client.callRemote(command, **arguments).addBoth(results.append)
        for _ in range(100):
            self.flushAll()
            if results:
                break
            self.reactor.advance(0.05)
        self.assertTrue(results, f"{command.__name__} was not answered")
        return results[0]


class StatusTests(ControlTestsMixin, SynchronousTestCase):
    def test_statusNamesEveryWorker(self) -> None:
        """
        L{Status} answers a JSON object with the master's header and one
        object per worker process: its id, pid and state.
        """
        cluster = self.readyCluster(2, listens=[LOCAL])
        client = self.connect(cluster)
        status = json.loads(self.call(client, Status)["status"])
        self.assertEqual(status["pid"], os.getpid())
        self.assertEqual(status["workerCount"], 2)
        self.assertEqual(status["ready"], 2)
        self.assertEqual(status["scheduling"], "rr")
        self.assertEqual(
            [(w["id"], w["pid"], w["state"]) for w in status["workers"]],
            [(1, self.worker(1).pid, "ready"), (2, self.worker(2).pid, "ready")],
        )
        self.assertEqual(len(status["workers"][0]["listens"]), 1)

    def test_statusWaitsBoundedForLoad(self) -> None:
        """
        L{Status} asks the ready workers how many connections they have
        open, but a worker that does not answer delays it by at most the
        server's C{statusWait}.
        """
        cluster = self.readyCluster(2)
        for worker in self.spawner.running():
            worker.holding.add(_control_ping())
        client = self.connect(cluster)
        results: list = []
        client.callRemote(Status).addBoth(results.append)
        self.flushAll()
        self.assertEqual(results, [])
        self.reactor.advance(self.server.statusWait)
        self.flushAll()
        self.assertEqual(len(results), 1)
        self.assertEqual([w["connections"] for w in json.loads(results[0]["status"])["workers"]], [None, None])

    def test_statusHasOpenConnections(self) -> None:
        """
        A worker's open connections are what it said last (here, in a
        heartbeat answer).
        """
        cluster = self.readyCluster(1)
        ping = _control_ping()
        self.worker(1).holding.add(ping)
        client = self.connect(cluster)
        results: list = []
        client.callRemote(Status).addBoth(results.append)
        self.flushAll()
        [received] = [r for r in self.worker(1).received if r.command is ping]
        received.answer(connections=7)
        self.flushAll()
        self.assertEqual(json.loads(results[0]["status"])["workers"][0]["connections"], 7)


def _control_ping():
    from txcluster._commands import Ping

    return Ping


class OperationTests(ControlTestsMixin, SynchronousTestCase):
    def test_reload(self) -> None:
        """
        L{Reload} replaces every worker and answers, once the reload is
        over, which pid replaced which.
        """
        cluster = self.readyCluster(2)
        old = {i: self.worker(i).pid for i in (1, 2)}
        client = self.connect(cluster)
        results: list = []
        client.callRemote(Reload).addBoth(results.append)
        started = set(old.values())
        for _ in range(20):
            self.flushAll()
            for worker in self.spawner.running():
                if worker.pid not in started:
                    started.add(worker.pid)
                    worker.start()
            for worker in self.spawner.running():
                if worker.disconnecting and worker.pid in old.values():
                    worker.exit()
            self.reactor.advance(0.1)
            if results:
                break
        summary = results[0]["summary"]
        self.assertIn("reloaded 2 workers", summary)
        for i in (1, 2):
            self.assertIn(f"worker {i}: pid {old[i]} -> pid {self.worker(i).pid}", summary)

    def test_reloadAborted(self) -> None:
        """
        A reload whose replacement fails answers C{FAILED}, naming the
        replacement worker and how it failed; the old workers serve on.
        """
        cluster = self.readyCluster(2)
        old = self.worker(1)
        client = self.connect(cluster)
        results: list = []
        client.callRemote(Reload).addBoth(results.append)
        self.flushAll()
        replacement = self.worker(1)
        self.assertIsNot(replacement, old)
        replacement.exit(3)
        self.flushAll()
        self.assertTrue(results[0].check(OperationFailed))
        self.assertIn(f"replacement worker 1 (pid {replacement.pid})", str(results[0].value))
        self.assertIn("exit code 3", str(results[0].value))
        self.assertTrue(old.running)

    def test_scaleBelowOne(self) -> None:
        """
        L{Scale} to 0 is refused with C{BAD_REQUEST}, naming the count.
        """
        client = self.connect(self.readyCluster(1))
        failure = self.call(client, Scale, count=0)
        self.assertTrue(failure.check(BadRequest))
        self.assertIn("not 0", str(failure.value))

    def test_scaleUp(self) -> None:
        """
        L{Scale} answers once the new workers are ready.
        """
        cluster = self.readyCluster(1)
        client = self.connect(cluster)
        results: list = []
        client.callRemote(Scale, count=2).addBoth(results.append)
        self.flushAll()
        self.assertEqual(results, [])
        self.worker(2).start()
        self.flushAll()
        self.assertIn("scaled from 1 to 2 workers", results[0]["summary"])

    def test_recycleUnknownWorker(self) -> None:
        """
        L{Recycle} of an id no worker has fails with C{NO_SUCH_WORKER}.
        """
        client = self.connect(self.readyCluster(1))
        failure = self.call(client, Recycle, workerId=9)
        self.assertTrue(failure.check(NoSuchWorker))
        self.assertIn("no running worker 9", str(failure.value))

    def test_recycle(self) -> None:
        """
        L{Recycle} starts a replacement, drains the old worker only once
        the replacement is ready, and answers once the old one exited.
        """
        cluster = self.readyCluster(2)
        old = self.worker(1)
        client = self.connect(cluster)
        results: list = []
        client.callRemote(Recycle, workerId=1).addBoth(results.append)
        self.flushAll()
        new = self.worker(1)
        self.assertIsNot(new, old)
        self.assertFalse(old.disconnecting)
        new.start()
        self.flushAll()
        self.reactor.advance(0)
        self.assertTrue(old.disconnecting)
        self.assertEqual(results, [])
        old.exit()
        self.flushAll()
        self.assertEqual(results[0]["summary"].split(": ")[1], f"pid {old.pid} -> pid {new.pid}")
        self.assertEqual(self.worker(2).pid, self.spawner.workers[1].pid)

    def test_stacks(self) -> None:
        """
        L{Stacks} sends the worker C{SIGUSR1} and answers with what it
        writes on its stacks pipe once the pipe is quiet; that dump is not
        logged.
        """
        cluster = self.readyCluster(1)
        client = self.connect(cluster)
        results: list = []
        client.callRemote(Stacks, workerId=1).addBoth(results.append)
        self.flushAll()
        worker = self.worker(1)
        self.assertIn(signal.SIGUSR1, worker.process.signalNumbers())
        worker.process.output(STACKS_FD, b'Current thread 0x1 (most recent call first):\n  File "app.py", line 3 in ')
        worker.process.output(STACKS_FD, b"blockedHere\n")
        self.reactor.advance(0.3)
        self.flushAll()
        self.assertEqual(results[0]["pid"], worker.pid)
        self.assertIn("line 3 in blockedHere", results[0]["stacks"])
        self.assertFalse([m for m in self.messages() if "blockedHere" in m])

    def test_stacksUnanswered(self) -> None:
        """
        A worker that writes no stacks makes L{Stacks} fail with C{FAILED}
        after a few seconds, saying so.
        """
        client = self.connect(self.readyCluster(1))
        failure = self.call(client, Stacks, workerId=1)
        self.assertTrue(failure.check(OperationFailed))
        self.assertIn("no stacks", str(failure.value))

    def test_stacksOfAStartingWorker(self) -> None:
        """
        A worker still starting (its faulthandler not set up yet, so that
        SIGUSR1 would kill it) is not signalled: L{Stacks} fails, saying
        so.
        """
        self.makeCluster(1)
        client = self.connect(self.cluster)
        failure = self.call(client, Stacks, workerId=1)
        self.assertTrue(failure.check(OperationFailed))
        self.assertIn("is still starting", str(failure.value))
        self.assertNotIn(signal.SIGUSR1, self.worker(1).process.signalNumbers())

    def test_unaskedStacksAreLogged(self) -> None:
        """
        A dump on the stacks pipe nobody asked for (a hung worker's) is
        logged as the worker's error output.
        """
        self.readyCluster(1)
        self.worker(1).process.output(STACKS_FD, b"Thread 0x2 (most recent call first):\n")
        self.assertLogged("Thread 0x2 (most recent call first):", LogLevel.warn)

    def test_stop(self) -> None:
        """
        L{Stop} stops the master as C{SIGTERM} does, and answers once the
        cluster has stopped.
        """
        cluster = self.readyCluster(1)
        client = self.connect(cluster)
        results: list = []
        client.callRemote(Stop).addBoth(results.append)
        self.flushAll()
        self.assertEqual(self.stops, [True])
        self.assertEqual(results, [])
        cluster.stopService()
        self.flushAll()
        self.worker(1).exit()
        self.flushAll()
        self.assertIn("stopped: 1 worker process gone", results[0]["summary"])


class StopTwiceTests(ControlTestsMixin, SynchronousTestCase):
    def test_secondStopDrainsNow(self) -> None:
        """
        L{Stop} while the master is stopping already (in its drain delay)
        does not stop it again: the workers drain at once.
        """
        cluster = self.readyCluster(1, drainDelay=30)
        client = self.connect(cluster)
        cluster.stopService()
        results: list = []
        client.callRemote(Stop).addBoth(results.append)
        self.flushAll()
        self.reactor.advance(0)
        self.flushAll()
        self.assertEqual(self.stops, [])
        self.assertTrue(self.worker(1).commands(Disconnect))
        self.worker(1).exit()
        self.flushAll()
        self.assertIn("stopped", results[0]["summary"])


class StatusDetailTests(ControlTestsMixin, SynchronousTestCase):
    def test_lagOfABlockedWorker(self) -> None:
        """
        A worker that has not answered its heartbeat shows, as its lag,
        how long the ping has waited: a blocked worker does not look
        healthy.
        """
        cluster = self.readyCluster(1, workerTimeout=30)
        self.worker(1).holding.add(_control_ping())
        self.reactor.advance(10)
        self.spawner.flush()
        self.reactor.advance(4)
        [worker] = cluster.statistics().workers
        self.assertEqual(worker.lag, 4.0)

    def test_minReadyFollowsScalingDown(self) -> None:
        """
        Scaled below C{minReady}, the cluster is ready once every worker
        it runs is.
        """
        cluster = self.readyCluster(3, minReady=3)
        self.assertTrue(cluster.isReady())
        cluster.scale(2)
        self.spawner.flush()
        self.assertEqual(cluster.minReady(), 2)
        self.assertTrue(cluster.isReady())

    def test_minReadyAboveWorkers(self) -> None:
        """
        A C{minReady} above C{workers} is refused: the cluster could never
        be ready.
        """
        from txcluster import ClusterConfig

        error = self.assertRaises(ValueError, ClusterConfig, app="a.tac", workers=2, minReady=3)
        self.assertIn("could never be ready", str(error))


class WatchTests(ControlTestsMixin, SynchronousTestCase):
    def test_watchSeesEvents(self) -> None:
        """
        After L{Watch}, every lifecycle event reaches the client as an
        L{Event}: a JSON object naming it, the worker and the time.
        """
        cluster = self.readyCluster(1)
        client = self.connect(cluster)
        self.call(client, Watch)
        cluster.scale(2)
        self.flushAll()
        self.worker(2).start()
        self.flushAll()
        names = [e["event"] for e in client.events]
        self.assertEqual(names[:2], ["fork", "online"])
        self.assertIn("ready", names)
        self.assertEqual(client.events[0]["workerId"], 2)
        self.assertEqual(client.events[0]["pid"], self.worker(2).pid)

    def test_watcherThatDoesNotRead(self) -> None:
        """
        A watcher whose transport stays full gets its events queued, up to
        L{WATCH_BACKLOG}; one more and it is cut off and logged.  The
        master is not affected.
        """
        self.patch(_control, "WATCH_BACKLOG", 5)
        cluster = self.readyCluster(1)
        client = self.connect(cluster)
        self.call(client, Watch)
        self.protocol.pauseProducing()
        for _ in range(6):
            cluster._emit(_events_stopping())
        self.assertLogged("did not read 5 events; cutting it off", LogLevel.warn)
        self.flushAll()
        self.assertIsNotNone(client.lost)

    def test_watcherBacklogInBytes(self) -> None:
        """
        A watcher that does not read is cut off once its queued events are
        over L{WATCH_BACKLOG_BYTES}, however few they are.
        """
        self.patch(_control, "WATCH_BACKLOG_BYTES", 1000)
        cluster = self.readyCluster(1)
        client = self.connect(cluster)
        self.call(client, Watch)
        self.protocol.pauseProducing()
        from txcluster._events import WorkerMessage

        cluster._emit(WorkerMessage(1, 1, "x" * 2000))
        self.assertLogged("did not read 0 MiB of events; cutting it off", LogLevel.warn)

    def test_watcherLeaves(self) -> None:
        """
        A watcher that disconnects is no longer an observer.
        """
        cluster = self.readyCluster(1)
        client = self.connect(cluster)
        self.call(client, Watch)
        observers = len(cluster._observers)
        client.transport.loseConnection()
        self.flushAll()
        self.assertEqual(len(cluster._observers), observers - 1)


def _events_stopping():
    from txcluster._events import ClusterStopping

    return ClusterStopping(0.0)


class HostileClientTests(ControlTestsMixin, SynchronousTestCase):
    def test_garbage(self) -> None:
        """
        Bytes that are not AMP cut the client off, with a log line; the
        cluster serves on.
        """
        cluster = self.readyCluster(1)
        client = self.connect(cluster)
        client.transport.write(b"\xff\xff" + b"x" * 70000)
        self.flushAll()
        self.assertIsNotNone(client.lost)
        self.assertTrue([m for m in self.messages(LogLevel.warn) if "cutting it off" in m])
        self.assertTrue(cluster.isReady())

    def test_flood(self) -> None:
        """
        A client sending commands faster than L{COMMAND_RATE} after a burst
        of L{COMMAND_BURST} is cut off.
        """
        self.patch(_control, "COMMAND_BURST", 10)
        client = self.connect(self.readyCluster(1))
        calls = [client.callRemote(Watch) for _ in range(30)]
        self.flushAll()
        for call in calls:
            call.addErrback(lambda f: f.trap(ConnectionDone))
        self.assertLogged("sent commands faster than 100 a second; cutting it off", LogLevel.warn)
        self.assertIsNotNone(client.lost)

    def test_unknownCommand(self) -> None:
        """
        An unknown command is answered with AMP's C{UNHANDLED} error; the
        client stays connected.
        """
        client = self.connect(self.readyCluster(1))

        class Shutdown(amp.Command):
            arguments = []
            response = []

        failure = self.call(client, Shutdown)
        self.assertTrue(failure.check(amp.UnhandledCommand))
        self.assertIsNone(client.lost)

    def test_malformedArguments(self) -> None:
        """
        A command whose arguments do not parse (a count that is not a
        number) cuts the client off, naming the command; nothing is done.
        """
        cluster = self.readyCluster(1)
        client = self.connect(cluster)
        client.transport.write(amp.AmpBox(_command=b"Scale", _ask=b"1", count=b"many").serialize())
        self.flushAll()
        self.assertLogged("sent a malformed Scale (ValueError); cutting it off", LogLevel.warn)
        self.assertEqual(cluster.workerCount(), 1)

    def test_allowedUsersAreTheMastersNow(self) -> None:
        """
        Who may connect is decided at each connection: after twistd's
        C{--uid}, the user the master runs as then.
        """
        client = self.connect(self.readyCluster(1))
        self.patch(_control.os, "getuid", lambda: 54321)
        self.patch(_control.os, "geteuid", lambda: 54321)
        self.assertEqual(self.server.allowedUIDs(), frozenset({0, 54321}))
        self.assertIsNone(client.lost)

    def test_answerBoxes(self) -> None:
        """
        The master asks a client nothing that needs an answer: an answer
        box cuts it off.
        """
        client = self.connect(self.readyCluster(1))
        client.transport.write(amp.AmpBox(_answer=b"1").serialize())
        self.flushAll()
        self.assertLogged("sent a box that is not a command; cutting it off", LogLevel.warn)

    def test_otherUser(self) -> None:
        """
        A peer whose uid is neither root nor the master's is refused and
        logged, before it can send anything.
        """
        self.patch(_control, "peerCredentials", lambda transport: (4321, 12345, 12345))
        client = self.connect(self.readyCluster(1))
        self.flushAll()
        self.assertIsNotNone(client.lost)
        self.assertLogged("refused control client pid 4321 (uid 12345)", LogLevel.warn)

    def test_tooManyClients(self) -> None:
        """
        More than L{MAX_CLIENTS} clients at once: the next is refused.
        """
        self.patch(_control, "MAX_CLIENTS", 1)
        cluster = self.readyCluster(1)
        self.connect(cluster)
        _, _, pump = iosim.connectedServerAndClient(lambda: ControlProtocol(self.server), _Client)
        pump.flush()
        self.assertLogged("1 control clients already", LogLevel.warn)


class LongTextTests(SynchronousTestCase):
    def test_roundTrip(self) -> None:
        """
        L{LongText} carries text longer than one AMP value in pieces.
        """
        argument = LongText()
        text = "é" * 100_000
        strings: dict = {}
        argument.toBox(b"status", strings, {"status": text}, None)
        self.assertGreater(len(strings), 1)
        self.assertTrue(all(len(v) <= 65535 for v in strings.values()))
        objects: dict = {}
        argument.fromBox(b"status", dict(strings), objects, None)
        self.assertEqual(objects["status"], text)

    def test_commandsOnOneScreen(self) -> None:
        """
        Every client command is declared in L{txcluster._controlcommands}.
        """
        self.assertEqual(
            {c.__name__ for c in CLIENT_COMMANDS}, {"Status", "Reload", "Scale", "Recycle", "Stop", "Stacks", "Watch"}
        )


class SocketPathTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="txc-")
        self.addCleanup(os.rmdir, self.directory)
        self.path = os.path.join(self.directory, "c.sock")
        self.addCleanup(lambda: os.path.exists(self.path) and os.unlink(self.path))

    def test_defaultUnderSystemd(self) -> None:
        """
        Under systemd the default is in the first C{RUNTIME_DIRECTORY}.
        """
        self.assertEqual(
            defaultControlPath({"RUNTIME_DIRECTORY": "/run/app:/run/other"}, "/srv"), "/run/app/txcluster.sock"
        )
        self.assertEqual(defaultControlPath({}, "/srv"), "/srv/txcluster.sock")

    def test_staleSocketIsRemoved(self) -> None:
        """
        A socket file nobody listens on (its master died) is removed.
        """
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(self.path)
        dead.close()
        removeStaleSocket(self.path)
        self.assertFalse(os.path.exists(self.path))

    def test_liveMaster(self) -> None:
        """
        A socket some process listens on is an error naming the path.
        """
        live = socket.socket(socket.AF_UNIX)
        self.addCleanup(live.close)
        live.bind(self.path)
        live.listen(1)
        error = self.assertRaises(CannotListenError, removeStaleSocket, self.path)
        self.assertIn(self.path, str(error))
        self.assertIn("already running", str(error))

    def test_notASocket(self) -> None:
        """
        A path that is a regular file is left alone and is an error.
        """
        with open(self.path, "w") as f:
            f.write("keep me")
        error = self.assertRaises(CannotListenError, removeStaleSocket, self.path)
        self.assertIn("not a socket", str(error))
        self.assertTrue(os.path.exists(self.path))


class UsageTests(SynchronousTestCase):
    def test_readOwnUsage(self) -> None:
        """
        L{readUsage} reads this process's memory and CPU time from /proc.
        """
        usage = readUsage(os.getpid())
        self.assertGreater(usage.rss, 1024 * 1024)
        self.assertGreater(usage.cpuSeconds, 0)
        self.assertIsNone(readUsage(-1))

    def test_cpuPercentSinceLastSample(self) -> None:
        """
        The CPU share is over the time since the last sample (since the
        process started, the first time).
        """
        now = [100.0]
        usages = iter([ProcessUsage(1, 5.0), ProcessUsage(1, 6.0)])
        sampler = UsageSampler(lambda: now[0], lambda pid: next(usages))
        self.assertEqual(sampler.sample("p", 1, 90.0)[1], 50.0)
        now[0] = 104.0
        self.assertEqual(sampler.sample("p", 1, 90.0)[1], 25.0)
