"""
Deterministic tests of L{txcluster.ClusterService}, the master: no process
is started and no time passes but the fake reactor's.  The workers are
L{txcluster.testing.FakeWorker}s whose side of the channel the tests play;
the reactor is a L{MemoryReactorClock}.  The listening sockets the master
binds when a fake worker asks are real (127.0.0.1), so that the file
descriptors it hands out are real too.

Also the tests of the fakes themselves (L{txcluster.testing}).
"""

from __future__ import annotations

import errno
import inspect
import os
import signal
import socket

from twisted.internet.error import (
    ConnectionDone,
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
)
from twisted.internet.interfaces import (
    IProcessTransport,
    IReactorFDSet,
    IReactorTime,
    ITransport,
    IUNIXTransport,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from txcluster import (
    ClusterConfig,
    ClusterService,
    ClusterStopped,
    ReloadFailed,
    ReloadFinished,
    ReloadStarted,
    WorkerDisconnected,
    WorkerExited,
    WorkerForked,
    WorkerListening,
    WorkerMessage,
    WorkerOnline,
    WorkerReady,
)
from txcluster import _commands, _processes
from txcluster._commands import (
    BindFailed,
    Disconnect,
    Leaving,
    ListenRefused,
    NewConn,
    Ping,
    ToMaster,
    UnknownListen,
    WorkerLeaving,
)
from txcluster._master import CHANNEL_LOST_GRACE, STACK_DUMP_GRACE
from txcluster._policy import requestLimit
from txcluster._process import spawnWorker
from txcluster.testing import (
    FakeChannel,
    FakeProcess,
    FakeSpawner,
    FakeUNIXTransport,
)

LOCAL = ("tcp4", "127.0.0.1", 0)


class ClusterTestsMixin:
    """
    Builds a L{ClusterService} on a fake reactor with a L{FakeSpawner}, and
    records its events, its log and its give-up calls.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.spawner = FakeSpawner()
        self.events: list = []
        self.gaveUp: list = []
        self.logs: list = []
        self.cluster = None
        globalLogPublisher.addObserver(self.logs.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs.append)
        self.addCleanup(self.spawner.closeDescriptors)
        self.addCleanup(self._closeSockets)

    def _closeSockets(self) -> None:
        if self.cluster is not None and self.cluster._table is not None:
            self.cluster._table.closeAll()
            self.cluster._processes.board.close()

    def makeCluster(self, workers: int = 2, start: bool = True, **config) -> ClusterService:
        """
        A cluster of C{workers}; the heartbeat is off unless C{config}
        sets C{workerTimeout}.
        """
        config.setdefault("app", "app.tac")
        config.setdefault("workerTimeout", 0)
        self.cluster = ClusterService(
            ClusterConfig(workers=workers, **config),
            reactor=self.reactor,
            spawner=self.spawner,
            onGiveUp=self.gaveUp.append,
        )
        self.cluster.addObserver(self.events.append)
        if start:
            self.cluster.startService()
        return self.cluster

    def readyCluster(self, workers: int = 2, listens=(), **config) -> ClusterService:
        """
        A started cluster whose workers are all ready.
        """
        cluster = self.makeCluster(workers, **config)
        for worker in self.spawner.running():
            worker.start(listens)
        return cluster

    def worker(self, workerId: int):
        return self.spawner.latest(workerId)

    def eventsOf(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def messages(self, level: LogLevel | None = None) -> list:
        return [
            formatEvent(e)
            for e in self.logs
            if level is None or e.get("log_level") == level
        ]

    def assertLogged(self, text: str, level: LogLevel | None = None) -> str:
        """
        Some log message (at C{level}) contains C{text}; return it.
        """
        for message in self.messages(level):
            if text in message:
                return message
        self.fail(f"nothing logged{'' if level is None else ' at ' + level.name} contains {text!r}")

    def assertNotLogged(self, text: str) -> None:
        for message in self.messages():
            self.assertNotIn(text, message)

    def advance(self, seconds: float, step: float = 0.5) -> None:
        """
        Let C{seconds} pass in steps, delivering what the channels carry
        after each, as a running reactor would.
        """
        while seconds > 1e-9:
            dt = min(step, seconds)
            self.reactor.advance(dt)
            self.spawner.flush()
            seconds -= dt

    def handle(self):
        (handle,) = self.cluster._table.handles()
        return handle

    def connect(self, count: int = 1) -> list:
        """
        Open C{count} client connections to the one handle and let the
        master accept them and hand them out.
        """
        handle = self.handle()
        clients = []
        for _ in range(count):
            client = socket.create_connection((handle.host, handle.port))
            self.addCleanup(client.close)
            clients.append(client)
        for reader in list(self.reactor.readers):
            reader.doRead()
        self.spawner.flush()
        return clients


def readFrom(fd: int, size: int = 100) -> bytes:
    """
    Read what is waiting on C{fd} (a connection a fake worker took).
    """
    return os.read(fd, size)


class PingResponder(amp.AMP):
    """
    Answers L{Ping}.
    """

    @Ping.responder
    def ping(self):
        return {}


class FakesTests(SynchronousTestCase):
    """
    The fakes of L{txcluster.testing} provide the interfaces they stand in
    for, and behave as the real things do where the master can tell.
    """

    def test_processInterface(self) -> None:
        """
        L{FakeProcess} provides L{IProcessTransport}.
        """
        self.assertTrue(verifyClass(IProcessTransport, FakeProcess))
        self.assertTrue(verifyObject(IProcessTransport, FakeProcess(ProcessProtocol(), 7)))

    def test_transportInterface(self) -> None:
        """
        L{FakeUNIXTransport} provides L{IUNIXTransport} and L{ITransport}.
        """
        self.assertTrue(verifyClass(IUNIXTransport, FakeUNIXTransport))
        channel = FakeChannel(amp.AMP(), amp.AMP())
        self.assertTrue(verifyObject(IUNIXTransport, channel.serverTransport))
        self.assertTrue(verifyObject(ITransport, channel.clientTransport))

    def test_reactorInterfaces(self) -> None:
        """
        L{MemoryReactorClock}, the reactor these fakes go with, provides
        what the master uses: time and the readers of L{IReactorFDSet}.
        """
        reactor = MemoryReactorClock()
        self.assertTrue(verifyObject(IReactorTime, reactor))
        self.assertTrue(verifyObject(IReactorFDSet, reactor))

    def test_spawnerSignature(self) -> None:
        """
        L{FakeSpawner} takes the arguments L{spawnWorker} takes from the
        master.
        """
        real = inspect.signature(spawnWorker)
        fake = inspect.signature(FakeSpawner().__call__)
        arguments = ("reactor", "protocol", "channel", 1, 2, "app.tac")
        real.bind(*arguments, env={}, uid=1, gid=2)
        fake.bind(*arguments, env={}, uid=1, gid=2)
        self.assertEqual(list(fake.parameters), list(real.parameters)[: len(fake.parameters)])

    def test_processEnds(self) -> None:
        """
        L{FakeProcess.end} reports L{ProcessDone} for exit code 0,
        L{ProcessTerminated} with the code or the signal otherwise, and the
        process transport loses its pid.
        """
        reasons = []

        class Protocol(ProcessProtocol):
            def processEnded(self, reason):
                reasons.append(reason)

        for kwargs in ({"exitCode": 0}, {"exitCode": 3}, {"exitCode": None, "signal": 9}):
            process = FakeProcess(Protocol(), 7)
            process.end(**kwargs)
            self.assertIsNone(process.pid)
            self.assertRaises(ProcessExitedAlready, process.signalProcess, "KILL")
        self.assertIsInstance(reasons[0].value, ProcessDone)
        self.assertIsInstance(reasons[1].value, ProcessTerminated)
        self.assertEqual((reasons[1].value.exitCode, reasons[1].value.signal), (3, None))
        self.assertEqual((reasons[2].value.exitCode, reasons[2].value.signal), (None, 9))

    def test_signalNames(self) -> None:
        """
        L{FakeProcess.signalProcess} takes numbers and the names Twisted's
        process transport translates, and refuses other names as
        C{os.kill} would.
        """
        process = FakeProcess(ProcessProtocol(), 7)
        process.signalProcess("KILL")
        process.signalProcess(signal.SIGUSR1)
        self.assertRaises(TypeError, process.signalProcess, "USR1")
        self.assertEqual(process.signalNumbers(), [signal.SIGKILL, signal.SIGUSR1])

    def test_descriptorPassing(self) -> None:
        """
        A descriptor sent through a L{FakeChannel} arrives as another
        descriptor for the same file, and only once the channel is flushed.
        """

        class Hand(amp.Command):
            arguments = [(b"fd", amp.Descriptor())]
            response = []

        got = []

        class Receiver(amp.AMP):
            @Hand.responder
            def hand(self, fd):
                got.append(fd)
                return {}

        sender = amp.AMP()
        channel = FakeChannel(sender, Receiver()).connect()
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        d = sender.callRemote(Hand, fd=w)
        self.assertEqual(got, [])
        self.assertEqual(channel.pending(0), 2)
        channel.flush()
        self.successResultOf(d)
        (theirs,) = got
        self.addCleanup(os.close, theirs)
        self.assertNotEqual(theirs, w)
        os.write(theirs, b"x")
        self.assertEqual(os.read(r, 1), b"x")

    def test_pausedDelivery(self) -> None:
        """
        Nothing is delivered to a side whose delivery is paused, until it
        resumes.
        """
        sender = amp.AMP()
        channel = FakeChannel(sender, PingResponder()).connect()
        channel.pauseDelivery(1)
        d = sender.callRemote(Ping)
        channel.flush()
        self.assertNoResult(d)
        channel.resumeDelivery(1)
        self.successResultOf(d)

    def test_protocolErrorLosesTheConnection(self) -> None:
        """
        An exception from C{dataReceived} is logged and loses the
        connection with it as the reason, as a reactor would.
        """
        lost = []

        class Broken(amp.AMP):
            def dataReceived(self, data):
                raise ValueError("broken")

            def connectionLost(self, reason):
                lost.append(reason)
                amp.AMP.connectionLost(self, reason)

        sender = amp.AMP()
        channel = FakeChannel(sender, Broken()).connect()
        d = sender.callRemote(Ping)
        channel.flush()
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertTrue(channel.lost)
        self.assertTrue(lost[0].check(ValueError))
        self.failureResultOf(d)

    def test_loseConnection(self) -> None:
        """
        C{loseConnection} closes the channel once what was written before it
        is delivered; both ends see L{ConnectionDone}.
        """
        server, client = amp.AMP(), amp.AMP()
        channel = FakeChannel(server, client).connect()
        d = client.callRemote(Ping)
        channel.serverTransport.loseConnection()
        channel.flush()
        self.assertTrue(channel.lost)
        self.failureResultOf(d, ConnectionDone)


class SpawnTests(ClusterTestsMixin, SynchronousTestCase):
    """
    Starting the cluster and the workers' way to ready.
    """

    def test_spawnsWorkers(self) -> None:
        """
        C{startService} spawns C{workers} workers with ids 1..N, each told
        the worker count, the application and the graceful timeout, and
        reports a L{WorkerForked} for each with its pid.
        """
        self.makeCluster(3, gracefulTimeout=7.5, env={"A": "b"})
        self.assertEqual([w.workerId for w in self.spawner.workers], [1, 2, 3])
        self.assertEqual({w.workerCount for w in self.spawner.workers}, {3})
        self.assertEqual({w.appPath for w in self.spawner.workers}, {"app.tac"})
        env = self.spawner.workers[0].env
        self.assertEqual(env["A"], "b")
        self.assertEqual(float(env[_commands.ENV_GRACEFUL_TIMEOUT]), 7.5)
        self.assertEqual(
            self.events,
            [WorkerForked(w.workerId, w.pid) for w in self.spawner.workers],
        )
        self.assertLogged("worker 2 (pid 1001) forked")

    def test_defaultEnvironment(self) -> None:
        """
        Without C{env}, workers get the master's environment.
        """
        self.makeCluster(1)
        env = self.spawner.workers[0].env
        self.assertEqual(env.get("PATH"), os.environ.get("PATH"))

    def test_onlineAndReady(self) -> None:
        """
        L{Online} makes a worker online and L{Ready} ready; each is an
        event with the worker's id and pid, and a log line.
        """
        cluster = self.makeCluster(1)
        worker = self.worker(1)
        self.assertEqual(cluster.statistics().workers[0].state, "starting")
        self.successResultOf(worker.online())
        self.assertEqual(self.events[-1], WorkerOnline(1, worker.pid))
        self.assertEqual(cluster.statistics().workers[0].state, "online")
        self.successResultOf(worker.ready())
        self.assertEqual(self.events[-1], WorkerReady(1, worker.pid))
        self.assertEqual(cluster.statistics().workers[0].state, "ready")
        self.assertLogged(f"worker 1 (pid {worker.pid}) online", LogLevel.info)
        self.assertLogged(f"worker 1 (pid {worker.pid}) ready in 0.00 s, listening on nothing")

    def test_readyObserverSeesAReadyCluster(self) -> None:
        """
        When observers hear L{WorkerReady}, the cluster already counts the
        worker as ready: a reload asked for from the observer replaces it.
        """
        cluster = self.makeCluster(1)
        reloads = []

        def observer(event):
            if isinstance(event, WorkerReady) and not reloads:
                reloads.append(cluster.reload())

        cluster.addObserver(observer)
        self.worker(1).start()
        self.assertEqual(len(self.spawner.workers), 2)
        self.assertNoResult(reloads[0])

    def test_listening(self) -> None:
        """
        A worker that listens gets a L{WorkerListening} with the real
        address the master bound, and its listens are in the statistics.
        """
        cluster = self.makeCluster(1)
        worker = self.worker(1)
        worker.online()
        answer = worker.listen(*LOCAL)
        self.assertEqual(answer["scheduling"], "rr")
        self.assertIsNone(answer["fd"])
        self.assertEqual(answer["host"], "127.0.0.1")
        self.assertNotEqual(answer["port"], 0)
        address = f"tcp:127.0.0.1:{answer['port']}"
        self.assertEqual(
            self.events[-1],
            WorkerListening(1, worker.pid, address, "127.0.0.1", answer["port"]),
        )
        self.assertEqual(cluster.statistics().workers[0].listens, (address,))
        self.assertLogged(f"worker 1 (pid {worker.pid}) listening on {address}")

    def test_workersShareAHandle(self) -> None:
        """
        Every worker asking for the same key gets the same listen id and
        address.
        """
        self.readyCluster(3, listens=[LOCAL])
        ports = {e.port for e in self.eventsOf(WorkerListening)}
        self.assertEqual(len(ports), 1)
        self.assertEqual(self.handle().members, set(self.cluster._processes.processes))

    def test_sharedScheduling(self) -> None:
        """
        With shared scheduling the answer carries the listening socket
        itself (the worker's own copy).
        """
        self.makeCluster(1, scheduling="shared")
        worker = self.worker(1)
        answer = self.successResultOf(worker.queryServer(*LOCAL))
        self.assertEqual(answer["scheduling"], "shared")
        listener = socket.socket(fileno=os.dup(answer["fd"]))
        self.addCleanup(listener.close)
        self.assertEqual(listener.getsockname(), ("127.0.0.1", answer["port"]))
        self.assertNotEqual(answer["fd"], self.handle().sock.fileno())

    def test_bindError(self) -> None:
        """
        A bind error reaches the worker as L{BindFailed} naming the error,
        and is logged with the address.
        """
        blocker = socket.socket()
        self.addCleanup(blocker.close)
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        self.makeCluster(1)
        worker = self.worker(1)
        failure = self.failureResultOf(worker.queryServer("tcp4", "127.0.0.1", port), BindFailed)
        self.assertTrue(str(failure.value).startswith(f"{errno.EADDRINUSE} "))
        self.assertLogged(f"worker 1 (pid {worker.pid}) cannot listen on tcp:127.0.0.1:{port}")
        self.assertFalse(worker.process.signals)

    def test_invalidListen(self) -> None:
        """
        An invalid listen is refused with L{ListenRefused} and logged; the
        worker is not killed for it.
        """
        self.makeCluster(1)
        worker = self.worker(1)
        self.failureResultOf(worker.queryServer("tcp4", "127.0.0.1", 70000), ListenRefused)
        self.failureResultOf(worker.queryServer("sctp", "127.0.0.1", 80), ListenRefused)
        self.assertLogged("asked for an invalid listen: port 70000 is out of range", LogLevel.warn)
        self.assertEqual(worker.process.signals, [])

    def test_unknownListen(self) -> None:
        """
        L{Listening} or L{Close} for a listen id that is not the worker's
        fails with L{UnknownListen}.
        """
        self.readyCluster(2)
        self.worker(1).listen(*LOCAL)
        listenId = self.handle().listenId
        self.failureResultOf(self.worker(2).listening(listenId), UnknownListen)
        self.failureResultOf(self.worker(2).close(listenId), UnknownListen)
        self.failureResultOf(self.worker(1).listening(listenId + 1), UnknownListen)

    def test_closeLastListen(self) -> None:
        """
        L{Close} from the last worker on a handle closes the master's socket.
        """
        self.readyCluster(1, listens=[LOCAL])
        handle = self.handle()
        self.successResultOf(self.worker(1).close(handle.listenId))
        self.assertIsNone(handle.sock)
        self.assertEqual(self.cluster._table.handles(), [])
        self.assertLogged("stopped listening on tcp:127.0.0.1:")


class RespawnTests(ClusterTestsMixin, SynchronousTestCase):
    """
    A worker that dies is replaced under its id, with backoff for quick
    deaths and a give-up rule.
    """

    def test_stableWorkerRespawnsAtOnce(self) -> None:
        """
        A worker that had been up for C{stableAfter} and dies is respawned
        at once with the same id, and the death is an event and an error
        log line.
        """
        cluster = self.readyCluster(2, stableAfter=10)
        self.advance(10)
        old = self.worker(1)
        old.exit(1)
        self.assertEqual(
            self.eventsOf(WorkerExited), [WorkerExited(1, old.pid, 1, None, False)]
        )
        self.assertLogged(f"worker 1 (pid {old.pid}) died (exit code 1)", LogLevel.error)
        new = self.worker(1)
        self.assertIsNot(new, old)
        self.assertNotEqual(new.pid, old.pid)
        self.assertEqual(self.eventsOf(WorkerForked)[-1], WorkerForked(1, new.pid))
        stats = {w.workerId: w for w in cluster.statistics().workers}
        self.assertEqual((stats[1].pid, stats[1].restarts, stats[1].state), (new.pid, 1, "starting"))
        self.assertEqual(stats[2].restarts, 0)

    def test_killedBySignal(self) -> None:
        """
        A worker killed by a signal is reported with the signal.
        """
        self.readyCluster(1)
        worker = self.worker(1)
        worker.kill(signal.SIGKILL)
        self.assertEqual(
            self.eventsOf(WorkerExited), [WorkerExited(1, worker.pid, None, signal.SIGKILL, False)]
        )
        self.assertLogged(f"worker 1 (pid {worker.pid}) died (killed by SIGKILL)")

    def test_processEndsBeforeChannel(self) -> None:
        """
        The process may end before its channel closes; the worker is
        respawned once, and no kill timer is left behind.
        """
        self.readyCluster(1, stableAfter=0, startTimeout=0)
        old = self.worker(1)
        old.exit(1, channelFirst=False)
        self.assertEqual(len(self.spawner.workers), 2)
        self.assertEqual(old.process.signals, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_backoffDoubles(self) -> None:
        """
        Quick deaths back off: the delay starts at C{minRestartDelay},
        doubles per quick death up to C{maxRestartDelay} (each stretched by
        at most 10% of jitter); meanwhile the worker id shows as waiting.
        """
        cluster = self.makeCluster(1, minRestartDelay=1.0, maxRestartDelay=4.0, maxRestarts=100)
        for expected in (1.0, 2.0, 4.0, 4.0):
            spawned = len(self.spawner.workers)
            self.worker(1).exit(1)
            self.assertEqual(len(self.spawner.workers), spawned)
            self.assertEqual(
                [(w.workerId, w.state) for w in cluster.statistics().workers], [(1, "waiting")]
            )
            self.reactor.advance(expected * 0.999)
            self.assertEqual(len(self.spawner.workers), spawned)
            self.reactor.advance(expected * 0.102)
            self.assertEqual(len(self.spawner.workers), spawned + 1)
        self.assertEqual([w.workerId for w in self.spawner.workers], [1] * 5)
        self.assertLogged("worker 1 failed 3 times in a row soon after starting: backing off for 4", LogLevel.warn)

    def test_backoffResetsAfterStableRun(self) -> None:
        """
        A worker that stayed up C{stableAfter} seconds resets the backoff:
        its death respawns at once and the next quick death waits
        C{minRestartDelay} again.
        """
        self.makeCluster(1, minRestartDelay=1.0, maxRestartDelay=30.0, stableAfter=5.0, maxRestarts=100)
        for _ in range(3):
            self.worker(1).exit(1)
            self.reactor.advance(10)
        self.assertEqual(len(self.spawner.workers), 4)
        self.worker(1).start()
        self.reactor.advance(5)
        self.worker(1).exit(1)
        self.assertEqual(len(self.spawner.workers), 5)
        self.worker(1).exit(1)
        self.reactor.advance(0.999)
        self.assertEqual(len(self.spawner.workers), 5)
        self.reactor.advance(0.102)
        self.assertEqual(len(self.spawner.workers), 6)

    def test_notReadyIsQuick(self) -> None:
        """
        A worker that never became ready dies quickly however long it ran.
        """
        self.makeCluster(1, minRestartDelay=1.0, stableAfter=5.0)
        self.reactor.advance(20)
        self.worker(1).exit(1)
        self.assertEqual(len(self.spawner.workers), 1)
        self.reactor.advance(1.2)
        self.assertEqual(len(self.spawner.workers), 2)

    def test_spawnFailureRetries(self) -> None:
        """
        A respawn whose spawn raises is logged and retried after
        C{maxRestartDelay}.
        """
        self.readyCluster(1, stableAfter=0, maxRestartDelay=3.0)
        self.spawner.spawnError = OSError(errno.EMFILE, "Too many open files")
        self.worker(1).exit(1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(len(self.spawner.workers), 1)
        self.reactor.advance(3.0)
        self.assertEqual(len(self.spawner.workers), 2)
        self.assertEqual(self.worker(1).workerId, 1)

    def test_giveUp(self) -> None:
        """
        More than C{maxRestarts} failures within C{restartWindow}: the
        master logs a critical line naming the worker, how it failed and
        its last error output, stops the other workers gracefully, and
        calls C{onGiveUp} with a non-zero code once they are gone.
        """
        cluster = self.readyCluster(2, maxRestarts=2, restartWindow=60, minRestartDelay=1, maxRestartDelay=1)
        for _ in range(2):
            self.worker(1).exit(3)
            self.reactor.advance(2)
        self.assertEqual(cluster.statistics().failures, 2)
        last = self.worker(1)
        last.process.output(2, b"Traceback (most recent call last):\n  File \"app.tac\"\nValueError: boom\n")
        last.exit(3)
        message = self.assertLogged("giving up", LogLevel.critical)
        self.assertIn("more than 2 worker failures within 60", message)
        self.assertIn(f"worker 1 (pid {last.pid}), which died with exit code 3", message)
        self.assertIn("ValueError: boom", message)
        self.assertIn("Traceback (most recent call last):", message)
        self.assertEqual(self.gaveUp, [])
        other = self.worker(2)
        self.spawner.flush()
        self.assertTrue(other.disconnectRequested)
        self.assertEqual(self.eventsOf(WorkerDisconnected), [WorkerDisconnected(2, other.pid, "stop")])
        other.exit(0)
        self.assertEqual(self.gaveUp, [1])
        self.assertEqual(cluster.exitCode, 1)
        self.reactor.advance(100)
        self.assertEqual(len(self.spawner.running()), 0)
        self.assertEqual(len(self.spawner.workers), 4)

    def test_giveUpWithoutStderr(self) -> None:
        """
        The give-up report says so when the worker wrote nothing on stderr.
        """
        self.makeCluster(1, maxRestarts=0)
        self.worker(1).exit(2)
        self.assertLogged(f"(worker 1 (pid {self.worker(1).pid}) wrote nothing on stderr)", LogLevel.critical)
        self.assertEqual(self.gaveUp, [1])

    def test_failuresOutsideTheWindow(self) -> None:
        """
        Failures further apart than C{restartWindow} never add up to a
        give-up.
        """
        self.makeCluster(1, maxRestarts=1, restartWindow=10, minRestartDelay=1, maxRestartDelay=1)
        for _ in range(5):
            self.worker(1).exit(1)
            self.reactor.advance(11)
        self.assertEqual(self.gaveUp, [])
        self.assertEqual(len(self.spawner.running()), 1)
        self.assertNotLogged("giving up")


class StartTimeoutTests(ClusterTestsMixin, SynchronousTestCase):
    """
    A worker must be ready within C{startTimeout}.
    """

    def test_killedWhenNotReady(self) -> None:
        """
        A worker not ready within C{startTimeout} is killed, logged, counts
        as a failure and is respawned.
        """
        cluster = self.makeCluster(1, startTimeout=5.0, minRestartDelay=1)
        worker = self.worker(1)
        worker.online()
        self.reactor.advance(4.9)
        self.assertEqual(worker.process.signals, [])
        self.reactor.advance(0.1)
        self.assertEqual(worker.process.signalNumbers(), [signal.SIGKILL])
        self.assertLogged(f"worker 1 (pid {worker.pid}) was not ready within 5 s: killing it", LogLevel.error)
        worker.kill()
        self.assertEqual(cluster.statistics().failures, 1)
        self.reactor.advance(1.2)
        self.assertEqual(len(self.spawner.workers), 2)
        self.assertEqual(self.worker(1).workerId, 1)

    def test_timeoutInTheGiveUpReport(self) -> None:
        """
        The give-up report says the worker was not ready in time.
        """
        self.makeCluster(1, startTimeout=5.0, maxRestarts=0)
        self.reactor.advance(5)
        self.worker(1).kill()
        self.assertLogged("which was not ready within 5 s", LogLevel.critical)

    def test_readyInTime(self) -> None:
        """
        A worker ready within C{startTimeout} is never killed for it.
        """
        self.makeCluster(1, startTimeout=5.0)
        self.worker(1).start()
        self.reactor.advance(50)
        self.assertEqual(self.worker(1).process.signals, [])

    def test_disabled(self) -> None:
        """
        C{startTimeout=0} waits for ever.
        """
        self.makeCluster(1, startTimeout=0)
        self.reactor.advance(1000)
        self.assertEqual(self.worker(1).process.signals, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class HeartbeatTests(ClusterTestsMixin, SynchronousTestCase):
    """
    Ready workers are pinged; one that does not answer within
    C{workerTimeout} has its stack dumped and is killed.
    """

    def test_answeringWorkersLive(self) -> None:
        """
        A ready worker that answers its pings is left alone.
        """
        self.readyCluster(1, workerTimeout=3)
        self.advance(30)
        worker = self.worker(1)
        self.assertGreaterEqual(len(worker.commands(Ping)), 9)
        self.assertEqual(worker.process.signals, [])

    def test_startingWorkersAreNotPinged(self) -> None:
        """
        A worker that is not ready yet is not pinged.
        """
        self.makeCluster(1, workerTimeout=3, startTimeout=0)
        self.worker(1).online()
        self.advance(30)
        self.assertEqual(self.worker(1).commands(Ping), [])

    def test_blockedWorkerIsDumpedThenKilled(self) -> None:
        """
        A ready worker that does not answer a ping within C{workerTimeout}
        gets C{SIGUSR1} (its stack dump), C{SIGKILL} after a short grace,
        and is respawned under its id.
        """
        cluster = self.readyCluster(2, workerTimeout=3, stableAfter=0)
        worker = self.worker(1)
        worker.block()
        self.advance(3.5)
        self.assertEqual(worker.process.signals, [])
        self.advance(0.5)
        self.assertEqual(worker.process.signalNumbers(), [signal.SIGUSR1])
        self.assertLogged(
            f"worker 1 (pid {worker.pid}) has not answered a heartbeat for 3 s", LogLevel.error
        )
        self.advance(STACK_DUMP_GRACE)
        self.assertEqual(worker.process.signalNumbers(), [signal.SIGUSR1, signal.SIGKILL])
        worker.kill()
        self.assertEqual(self.worker(1).workerId, 1)
        self.assertIsNot(self.worker(1), worker)
        self.assertEqual(self.worker(2).process.signals, [])
        self.assertEqual(cluster.statistics().failures, 1)

    def test_hungWorkerLeavesRotation(self) -> None:
        """
        Once a worker is found hung, new connections go to the others.
        """
        self.readyCluster(2, listens=[LOCAL], workerTimeout=3)
        self.worker(1).block()
        self.advance(4)
        self.assertEqual(self.worker(1).process.signalNumbers(), [signal.SIGUSR1])
        self.connect(2)
        self.assertEqual(len(self.worker(2).connections), 2)
        self.worker(1).unblock()
        self.assertEqual(self.worker(1).commands(NewConn), [])

    def test_disabled(self) -> None:
        """
        C{workerTimeout=0} sends no pings and schedules nothing.
        """
        self.readyCluster(1, workerTimeout=0)
        self.worker(1).block()
        self.advance(100, step=10)
        self.assertEqual(self.worker(1).commands(Ping), [])
        self.assertEqual(self.worker(1).process.signals, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class ReloadTests(ClusterTestsMixin, SynchronousTestCase):
    """
    A rolling reload replaces each worker only once its replacement is
    ready.
    """

    def test_ordering(self) -> None:
        """
        With C{reloadConcurrency=1}: worker 1's replacement is spawned
        first; worker 1 is told to disconnect only once the replacement is
        ready; only then is worker 2's replacement spawned; the reload
        finishes when the old workers have exited.
        """
        self.readyCluster(2)
        old1, old2 = self.worker(1), self.worker(2)
        self.events.clear()
        d = self.cluster.reload()
        new1 = self.worker(1)
        self.assertIsNot(new1, old1)
        self.assertEqual(self.spawner.running(), [old1, old2, new1])
        new1.online()
        self.spawner.flush()
        self.assertFalse(old1.disconnectRequested)
        new1.ready()
        self.assertTrue(old1.disconnectRequested)
        self.assertFalse(old2.disconnectRequested)
        new2 = self.worker(2)
        self.assertIsNot(new2, old2)
        new2.start()
        self.assertTrue(old2.disconnectRequested)
        self.assertNoResult(d)
        old1.exit(0)
        old2.exit(0)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(
            [e for e in self.events if not isinstance(e, (WorkerOnline, WorkerExited))],
            [
                ReloadStarted(2),
                WorkerForked(1, new1.pid),
                WorkerReady(1, new1.pid),
                WorkerDisconnected(1, old1.pid, "replaced"),
                WorkerForked(2, new2.pid),
                WorkerReady(2, new2.pid),
                WorkerDisconnected(2, old2.pid, "replaced"),
                ReloadFinished("succeeded"),
            ],
        )
        self.assertEqual(
            self.eventsOf(WorkerExited),
            [WorkerExited(1, old1.pid, 0, None, True), WorkerExited(2, old2.pid, 0, None, True)],
        )
        self.assertEqual(len(self.spawner.workers), 4)
        self.assertLogged("reload complete: 2 workers replaced")

    def test_oldServesUntilReplacementReady(self) -> None:
        """
        Connections keep going to the old worker while its replacement
        starts, and only to the replacement once it is ready.
        """
        self.readyCluster(1, listens=[LOCAL])
        old = self.worker(1)
        self.cluster.reload()
        new = self.worker(1)
        new.online()
        self.connect(2)
        self.assertEqual(len(old.connections), 2)
        new.listen(*LOCAL)
        new.ready()
        self.connect(2)
        self.assertEqual((len(old.connections), len(new.connections)), (2, 2))

    def test_concurrency(self) -> None:
        """
        With C{reloadConcurrency=2} both replacements start at once.
        """
        self.readyCluster(2, reloadConcurrency=2)
        self.cluster.reload()
        self.assertEqual([w.workerId for w in self.spawner.running()], [1, 2, 1, 2])

    def test_replacementDies(self) -> None:
        """
        A replacement that dies before it is ready aborts the reload with
        L{ReloadFailed}; the old worker keeps serving and the workers after
        it are not replaced.
        """
        cluster = self.readyCluster(2)
        old1, old2 = self.worker(1), self.worker(2)
        d = cluster.reload()
        new1 = self.worker(1)
        new1.online()
        new1.exit(1)
        failure = self.failureResultOf(d, ReloadFailed)
        self.assertIn(f"replacement worker 1 (pid {new1.pid}) died with exit code 1", str(failure.value))
        self.assertFalse(old1.disconnectRequested)
        self.assertEqual(self.spawner.running(), [old1, old2])
        # The cluster lost nothing: it does not count towards giving up.
        self.assertEqual(cluster.statistics().failures, 0)
        self.assertLogged("a replacement, died with exit code 1; worker 1 (pid")
        self.reactor.advance(100)
        self.assertEqual(self.spawner.running(), [old1, old2])
        self.assertEqual(cluster.statistics().workers[0].pid, old1.pid)
        self.assertLogged("reload aborted", LogLevel.error)
        # A new reload can start.
        cluster.reload()
        self.assertEqual(len(self.spawner.running()), 3)

    def test_replacementTimesOut(self) -> None:
        """
        A replacement not ready within C{startTimeout} is killed and the
        reload fails.
        """
        cluster = self.readyCluster(1, startTimeout=5.0)
        old = self.worker(1)
        d = cluster.reload()
        new = self.worker(1)
        new.online()
        self.reactor.advance(5)
        self.assertEqual(new.process.signalNumbers(), [signal.SIGKILL])
        self.assertNoResult(d)
        new.kill()
        failure = self.failureResultOf(d, ReloadFailed)
        self.assertIn("was not ready within 5 s", str(failure.value))
        self.assertEqual(self.spawner.running(), [old])
        self.assertFalse(old.disconnectRequested)

    def test_oldDiesDuringReload(self) -> None:
        """
        If the old worker dies while its replacement starts, the
        replacement simply carries on.
        """
        cluster = self.readyCluster(1)
        old = self.worker(1)
        d = cluster.reload()
        new = self.worker(1)
        old.exit(1)
        self.assertEqual(self.spawner.running(), [new])
        new.start()
        self.successResultOf(d)
        self.assertEqual(len(self.spawner.workers), 2)

    def test_reloadWhileReloading(self) -> None:
        """
        A reload asked for while one runs joins it, and replaces every
        worker started before it was asked for: the replacement that was
        booting then is replaced once it is ready.
        """
        cluster = self.readyCluster(1)
        first = cluster.reload()
        self.assertEqual(len(self.spawner.workers), 2)
        second = cluster.reload()
        self.assertLogged("reload requested while one is running")
        self.worker(1).start()
        self.spawner.workers[0].exit(0)
        self.assertEqual(len(self.spawner.workers), 3)
        self.assertNoResult(first)
        self.worker(1).start()
        self.spawner.workers[1].exit(0)
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(self.spawner.running(), [self.spawner.workers[2]])

    def test_startingWorkersAreReplacedOnceReady(self) -> None:
        """
        A worker still starting when a reload is asked for may have loaded
        the application before it changed: the reload waits for it to be
        ready, then replaces it like the others.
        """
        cluster = self.makeCluster(1)
        starting = self.worker(1)
        d = cluster.reload()
        self.assertEqual(len(self.spawner.workers), 1)
        self.assertNoResult(d)
        starting.start()
        self.assertEqual(len(self.spawner.workers), 2)
        fresh = self.worker(1)
        fresh.start()
        self.assertTrue(starting.disconnectRequested)
        self.assertNoResult(d)
        starting.exit(0)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.spawner.running(), [fresh])

    def test_respawningWorkerIsFreshAnyway(self) -> None:
        """
        A worker id waiting to be respawned has nothing to replace: what it
        spawns next loads the application afresh.
        """
        cluster = self.readyCluster(2, minRestartDelay=5, maxRestartDelay=5, stableAfter=100)
        self.worker(2).exit(1)
        d = cluster.reload()
        replacement = self.worker(1)
        replacement.start()
        self.spawner.workers[0].exit(0)
        self.assertIsNone(self.successResultOf(d))

    def test_replacementCannotBeSpawned(self) -> None:
        """
        A replacement whose spawn fails aborts the reload with
        L{ReloadFailed}; the old worker keeps serving.
        """
        cluster = self.readyCluster(1)
        self.spawner.spawnError = OSError(errno.EAGAIN, "Resource temporarily unavailable")
        failure = self.failureResultOf(cluster.reload(), ReloadFailed)
        self.assertIn("could not be spawned: [Errno 11] Resource temporarily unavailable", str(failure.value))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(self.spawner.running(), [self.worker(1)])
        self.assertFalse(self.worker(1).disconnectRequested)

    def test_secondReloadWhileTheOldOnesDrain(self) -> None:
        """
        A reload asked for while the first one waits for its old workers to
        exit replaces the new ones too: they were started before it.
        """
        cluster = self.readyCluster(1)
        first = cluster.reload()
        self.worker(1).start()
        old, new = self.spawner.workers
        self.assertTrue(old.disconnectRequested)
        second = cluster.reload()
        old.exit(0)
        self.assertEqual(len(self.spawner.workers), 3)
        self.assertNoResult(second)
        self.worker(1).start()
        new.exit(0)
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(self.spawner.running(), [self.spawner.workers[2]])

    def test_failedReloadFailsEveryCaller(self) -> None:
        """
        Every caller of a reload that fails hears of the failure, the one
        that joined it too.
        """
        cluster = self.readyCluster(1)
        first, second = cluster.reload(), cluster.reload()
        self.worker(1).exit(1)
        self.failureResultOf(first, ReloadFailed)
        self.failureResultOf(second, ReloadFailed)

    def test_stopDuringAReload(self) -> None:
        """
        A stop while a reload runs fails the reload with L{ClusterStopped};
        that is no reload error to log.
        """
        cluster = self.readyCluster(1)
        d = cluster.reload()
        cluster.stopService()
        self.failureResultOf(d, ClusterStopped)
        self.assertNotLogged("reload aborted")

    def test_reloadWhileStopping(self) -> None:
        """
        A reload asked for while the cluster stops fails with
        L{ClusterStopped}.
        """
        cluster = self.readyCluster(1)
        cluster.stopService()
        self.failureResultOf(cluster.reload(), ClusterStopped)


class ScaleTests(ClusterTestsMixin, SynchronousTestCase):
    """
    C{scale(n)} starts or drains workers.
    """

    def test_scaleUp(self) -> None:
        """
        Scaling up starts workers with the next ids, tells every worker the
        new count, and fires once the new ones are ready.
        """
        cluster = self.readyCluster(2)
        d = cluster.scale(4)
        self.spawner.flush()
        self.assertEqual([w.workerId for w in self.spawner.running()], [1, 2, 3, 4])
        self.assertEqual({w.workerCount for w in self.spawner.running()}, {4})
        self.assertEqual(cluster.workerCount(), 4)
        self.worker(3).start()
        self.assertNoResult(d)
        self.worker(4).start()
        self.assertIsNone(self.successResultOf(d))
        self.assertLogged("scaling up from 2 to 4 workers: starting [3, 4]")

    def test_scaleUpWaitsThroughRespawn(self) -> None:
        """
        A new worker that dies before it is ready is respawned, and the
        scale Deferred waits for the respawned one.
        """
        cluster = self.readyCluster(1, stableAfter=0, minRestartDelay=1)
        d = cluster.scale(2)
        self.worker(2).exit(1)
        self.reactor.advance(1.2)
        self.assertNoResult(d)
        self.worker(2).start()
        self.successResultOf(d)

    def test_scaleDown(self) -> None:
        """
        Scaling down drains the highest ids, fires once they have exited,
        and does not respawn them.
        """
        cluster = self.readyCluster(3)
        w2, w3 = self.worker(2), self.worker(3)
        d = cluster.scale(1)
        self.spawner.flush()
        self.assertTrue(w2.disconnectRequested and w3.disconnectRequested)
        self.assertFalse(self.worker(1).disconnectRequested)
        self.assertEqual(self.worker(1).workerCount, 1)
        self.assertEqual(
            self.eventsOf(WorkerDisconnected),
            [WorkerDisconnected(2, w2.pid, "scale"), WorkerDisconnected(3, w3.pid, "scale")],
        )
        self.assertEqual(cluster.workerCount(), 1)
        w2.exit(0)
        self.assertNoResult(d)
        w3.exit(0)
        self.assertIsNone(self.successResultOf(d))
        self.reactor.advance(100)
        self.assertEqual(self.spawner.running(), [self.worker(1)])
        self.assertEqual([w.workerId for w in cluster.statistics().workers], [1])
        self.assertLogged("worker 3 retired")

    def test_neverBelowOne(self) -> None:
        """
        A cluster cannot scale to fewer than one worker.
        """
        cluster = self.readyCluster(2)
        self.failureResultOf(cluster.scale(0), ValueError)
        self.assertEqual(cluster.workerCount(), 2)
        self.assertFalse(any(w.disconnectRequested for w in self.spawner.workers))

    def test_scaleDownWaitingWorker(self) -> None:
        """
        A worker id waiting to be respawned is dropped at once.
        """
        cluster = self.readyCluster(2, minRestartDelay=5)
        self.worker(2).exit(1)
        self.successResultOf(cluster.scale(1))
        self.reactor.advance(100)
        self.assertEqual(len(self.spawner.workers), 2)
        self.assertEqual(cluster.workerCount(), 1)

    def test_scaleUpSpawnFails(self) -> None:
        """
        A new worker whose spawn fails is retried after
        C{maxRestartDelay}, and the scale Deferred waits for it.
        """
        cluster = self.readyCluster(1, maxRestartDelay=3)
        self.spawner.spawnError = OSError(errno.EAGAIN, "Resource temporarily unavailable")
        d = cluster.scale(2)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual([(w.workerId, w.state) for w in cluster.statistics().workers], [(1, "ready"), (2, "waiting")])
        self.assertNoResult(d)
        self.reactor.advance(3)
        self.worker(2).start()
        self.successResultOf(d)

    def test_scaleDownStartingWorker(self) -> None:
        """
        A worker drained while it starts is not killed for missing its
        start timeout, and nothing is left scheduled once it exits.
        """
        cluster = self.makeCluster(2, startTimeout=5.0)
        self.worker(1).start()
        starting = self.worker(2)
        starting.online()
        d = cluster.scale(1)
        starting.exit(0)
        self.successResultOf(d)
        self.reactor.advance(10)
        self.assertEqual(starting.process.signals, [])
        self.assertNotLogged("was not ready within")
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_scaleDownDuringReload(self) -> None:
        """
        Scaling away a worker whose replacement is starting drains both,
        and the reload still finishes.
        """
        cluster = self.readyCluster(2, reloadConcurrency=2)
        old1, old2 = self.worker(1), self.worker(2)
        reloaded = cluster.reload()
        new1, new2 = self.worker(1), self.worker(2)
        scaled = cluster.scale(1)
        self.spawner.flush()
        self.assertTrue(old2.disconnectRequested and new2.disconnectRequested)
        new1.start()
        for worker in (old1, old2, new2):
            worker.exit(0)
        self.successResultOf(scaled)
        self.successResultOf(reloaded)
        self.assertEqual(self.spawner.running(), [new1])
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class RecycleTests(ClusterTestsMixin, SynchronousTestCase):
    """
    A worker that took C{maxRequests} connections (plus jitter) is replaced
    the way a reload replaces it.
    """

    def test_recycle(self) -> None:
        """
        After C{maxRequests} connections a replacement starts; the old
        worker keeps serving until the replacement is ready, then drains.
        """
        self.readyCluster(1, listens=[LOCAL], maxRequests=2)
        old = self.worker(1)
        self.connect()
        self.assertEqual(len(self.spawner.workers), 1)
        self.connect()
        self.assertEqual(len(self.spawner.workers), 2)
        self.assertLogged(f"worker 1 (pid {old.pid}) was sent its 2 connections (--max-requests): recycling it")
        new = self.worker(1)
        self.connect()
        self.assertEqual(len(old.connections), 3)
        self.assertFalse(old.disconnectRequested)
        new.start([LOCAL])
        self.assertTrue(old.disconnectRequested)
        self.assertEqual(self.eventsOf(WorkerDisconnected), [WorkerDisconnected(1, old.pid, "replaced")])
        self.connect()
        self.assertEqual(len(new.connections), 1)
        self.assertEqual(len(self.spawner.workers), 2)
        old.exit(0)
        self.assertEqual(self.spawner.running(), [new])

    def test_spawnFails(self) -> None:
        """
        A replacement that cannot be spawned leaves the worker serving: the
        connection that reached the limit was taken, the failure is logged
        once, and the next connection tries again.
        """
        self.readyCluster(1, listens=[LOCAL], maxRequests=1)
        worker = self.worker(1)
        self.spawner.spawnError = OSError(errno.EAGAIN, "Resource temporarily unavailable")
        self.connect()
        self.assertEqual(len(worker.connections), 1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertLogged("recycling worker 1 failed", LogLevel.error)
        self.assertNotLogged("failed a handoff")
        self.connect()
        self.assertEqual(len(worker.connections), 2)
        self.assertEqual(len(self.spawner.workers), 2)

    def test_jitter(self) -> None:
        """
        Each worker's limit is C{maxRequests} plus a random
        0..C{maxRequestsJitter}.
        """
        asked = []

        def randint(low, high):
            asked.append((low, high))
            return high

        self.patch(_processes, "requestLimit", lambda m, j: requestLimit(m, j, randint=randint))
        self.readyCluster(1, listens=[LOCAL], maxRequests=2, maxRequestsJitter=3)
        self.assertEqual(asked, [(0, 3)])
        self.connect(4)
        self.assertEqual(len(self.spawner.workers), 1)
        self.connect()
        self.assertEqual(len(self.spawner.workers), 2)

    def test_disabled(self) -> None:
        """
        C{maxRequests=0} never recycles.
        """
        self.readyCluster(1, listens=[LOCAL], maxRequests=0)
        self.connect(5)
        self.assertEqual(len(self.spawner.workers), 1)
        self.assertEqual(self.cluster.statistics().workers[0].handed, 5)


class LimitTests(ClusterTestsMixin, SynchronousTestCase):
    """
    C{--max-requests} is a per-worker cap the dispatchers hold: a worker
    that was sent its connections takes no more while another worker in
    rotation can, and only one worker at a time goes over its limit when
    none can.
    """

    def limits(self, *limits) -> None:
        """
        Give worker processes these limits, in spawn order (then none).
        """
        given = list(limits)
        self.patch(_processes, "requestLimit", lambda maxRequests, jitter: given.pop(0) if given else 0)

    def taken(self) -> dict:
        return {w.pid: len(w.connections) for w in self.spawner.workers}

    def test_noMoreThanItsLimitWhileAnotherCanTake(self) -> None:
        """
        Once worker 1 was sent its 2 connections, every new one goes to
        worker 2 while worker 1's replacement starts; the replacement, once
        ready, takes its share.
        """
        self.limits(2, 100)
        self.readyCluster(2, listens=[LOCAL], maxRequests=1)
        old = self.worker(1)
        self.connect(10)
        self.assertEqual(len(old.connections), 2)
        self.assertEqual(len(self.worker(2).connections), 8)
        new = self.worker(1)
        self.assertIsNot(new, old)
        new.start([LOCAL])
        self.assertTrue(old.disconnectRequested)
        self.connect(4)
        self.assertEqual(len(old.connections), 2)
        self.assertEqual(len(new.connections), 2)

    def test_onlyOneGoesOver(self) -> None:
        """
        When every worker in rotation has used its allowance, one of them
        (the same one) takes what comes until a replacement is ready: the
        port is served, and only that worker goes over its limit.
        """
        self.limits(2, 2)
        self.readyCluster(2, listens=[LOCAL], maxRequests=1)
        first, second = self.worker(1), self.worker(2)
        self.connect(4)
        self.assertEqual((len(first.connections), len(second.connections)), (2, 2))
        self.connect(5)
        over = sorted([len(first.connections), len(second.connections)])
        self.assertEqual(over, [2, 7])
        self.assertEqual(len(self.spawner.workers), 4)
        self.assertEqual(self.cluster.statistics().dropped, 0)

    def test_freshReplacementIsNeverHeldBack(self) -> None:
        """
        The replacement of a recycled worker has an allowance of its own:
        it takes connections as soon as it listens, even while the worker
        it replaces is over its limit.
        """
        self.limits(1)
        self.readyCluster(1, listens=[LOCAL], maxRequests=1)
        old = self.worker(1)
        self.connect(3)
        self.assertEqual(len(old.connections), 3)
        new = self.worker(1)
        new.start([LOCAL])
        self.connect(3)
        self.assertEqual((len(old.connections), len(new.connections)), (3, 3))

    def test_failedRecycleIsTriedAgain(self) -> None:
        """
        A replacement that fails leaves the worker serving, over its limit,
        and sent nothing while another worker can take connections: the
        recycling is tried again after a backoff, not left to a connection
        that may never come.
        """
        self.limits(2, 100)
        self.readyCluster(2, listens=[LOCAL], maxRequests=1, minRestartDelay=1, maxRestartDelay=1)
        old = self.worker(1)
        self.connect(4)
        self.assertEqual(len(old.connections), 2)
        replacement = self.worker(1)
        self.assertIsNot(replacement, old)
        replacement.exit(1)
        self.assertLogged("recycling worker 1 failed: replacement worker 1", LogLevel.error)
        self.assertLogged("trying again in 1", LogLevel.error)
        self.connect(5)
        self.assertEqual(len(old.connections), 2)
        self.assertEqual(len(self.spawner.workers), 3)
        self.reactor.advance(1.2)
        self.assertEqual(len(self.spawner.workers), 4)
        retry = self.worker(1)
        retry.start([LOCAL])
        self.assertTrue(old.disconnectRequested)

    def test_leastBusy(self) -> None:
        """
        The cap holds under least-busy scheduling too.
        """
        self.limits(2, 100)
        self.readyCluster(2, listens=[LOCAL], maxRequests=1, scheduling="least-busy")
        old = self.worker(1)
        self.connect(10)
        self.assertEqual(len(old.connections), 2)
        self.assertEqual(len(self.worker(2).connections), 8)

    def test_sharedSchedulingRefused(self) -> None:
        """
        Under shared scheduling the workers accept on their own, so the
        master cannot count their connections: the option is refused,
        naming it and the mode.
        """
        e = self.assertRaises(ValueError, ClusterConfig, app="app.tac", maxRequests=10, scheduling="shared")
        self.assertIn("--max-requests needs --scheduling rr or least-busy", str(e))
        e = self.assertRaises(ValueError, ClusterConfig, app="app.tac", maxRequests=10, listens=("udp:5353",))
        self.assertIn("--listen udp:5353: --max-requests counts connections", str(e))

    def test_datagramsRefused(self) -> None:
        """
        A UDP socket is shared, so the cap could not hold for it: under
        --max-requests a UDP listen is refused with a message naming the
        option.
        """
        self.readyCluster(1, maxRequests=10)
        answer = self.worker(1).queryServer("udp4", "127.0.0.1", 0)
        failure = self.failureResultOf(answer, ListenRefused)
        self.assertIn("--max-requests counts connections", failure.getErrorMessage())
        self.assertLogged("may not listen on udp:127.0.0.1:0: --max-requests", LogLevel.warn)


class LeaveOnItsOwnTests(ClusterTestsMixin, SynchronousTestCase):
    """
    A worker that leaves on its own (it was sent SIGTERM, its application
    called C{disconnect()} or stopped the reactor) or that a stop signal
    ended is replaced, and that is not a failure; a crash still is.
    """

    def test_announcedLeaveIsReplacedAtOnce(self) -> None:
        """
        A worker that says it is leaving goes out of rotation and is
        replaced under its id at once; its exit is not counted, even with
        C{maxRestarts=0}.
        """
        cluster = self.readyCluster(2, listens=[LOCAL], maxRestarts=0, stableAfter=0)
        old = self.worker(1)
        old.callRemote(Leaving, why="SIGTERM")
        self.assertLogged(f"worker 1 (pid {old.pid}) is leaving on its own (SIGTERM): replacing it", LogLevel.info)
        self.assertEqual(self.eventsOf(WorkerDisconnected), [WorkerDisconnected(1, old.pid, "SIGTERM")])
        new = self.worker(1)
        self.assertIsNot(new, old)
        self.connect(2)
        self.assertEqual(old.connections, [])
        old.exit(0)
        self.assertLogged(
            f"worker 1 (pid {old.pid}) exited (exit code 0) after leaving on its own (SIGTERM); "
            "not counted as a failure"
        )
        self.assertEqual(cluster.statistics().failures, 0)
        self.assertEqual(self.gaveUp, [])
        self.assertEqual(self.eventsOf(WorkerExited)[-1], WorkerExited(1, old.pid, 0, None, True))

    def test_stopSignalIsNotAFailure(self) -> None:
        """
        A worker killed by SIGTERM (before its handler is installed, say) is
        respawned and not counted; one killed by SIGKILL is counted.
        """
        cluster = self.readyCluster(2, maxRestarts=1, stableAfter=0)
        self.worker(1).kill(signal.SIGTERM)
        self.assertLogged("exited (killed by SIGTERM): it was sent SIGTERM; not counted as a failure")
        self.worker(1).kill(signal.SIGTERM)
        self.assertEqual(cluster.statistics().failures, 0)
        self.worker(2).kill(signal.SIGKILL)
        self.assertLogged("died (killed by SIGKILL)", LogLevel.error)
        self.assertEqual(cluster.statistics().failures, 1)
        self.assertEqual(self.gaveUp, [])

    def test_stoppedWorkerIsReplacedAtOnce(self) -> None:
        """
        A worker stopped soon after it started (an operator's SIGTERM) is
        not a crash: it is replaced at once, without a backoff.
        """
        self.readyCluster(1, stableAfter=10, minRestartDelay=5)
        old = self.worker(1)
        old.kill(signal.SIGTERM)
        self.assertIsNot(self.worker(1), old)
        self.assertNotLogged("backing off")

    def test_quickStopsInARowBackOff(self) -> None:
        """
        A worker that keeps stopping soon after it starts (an application
        that stops its reactor, or leaves, right after it is ready) backs
        off from the second time in a row, so that it does not loop; none
        of it counts as a failure.
        """
        cluster = self.readyCluster(1, stableAfter=10, minRestartDelay=5, maxRestarts=0, startTimeout=0)
        spawned = []
        for attempt in range(3):
            worker = self.worker(1)
            if attempt:
                worker.start()
            worker.callRemote(Leaving, why="the application stopped the reactor")
            worker.exit(0)
            spawned.append(len(self.spawner.workers))
            self.reactor.advance(6)
        self.assertEqual(spawned, [2, 2, 3])
        self.assertLogged("worker 1 ended 2 times in a row soon after starting: backing off for 5", LogLevel.warn)
        self.assertEqual((cluster.statistics().failures, self.gaveUp), (0, []))

    def test_leavingReplacementFailsTheReload(self) -> None:
        """
        A replacement that leaves on its own before it was ready fails the
        reload, and the old worker serves on.
        """
        cluster = self.readyCluster(1)
        old = self.worker(1)
        d = cluster.reload()
        new = self.worker(1)
        new.online()
        new.callRemote(Leaving, why="disconnect()")
        failure = self.failureResultOf(d, ReloadFailed)
        self.assertIn("left before it was ready (disconnect())", failure.getErrorMessage())
        self.assertFalse(old.disconnectRequested)


class StopDuringStartTests(ClusterTestsMixin, SynchronousTestCase):
    """
    A stop at any moment of start-up is quiet: a booting worker's listen is
    answered "leaving" (not a warning, not a bind error), and its exit is a
    normal one.
    """

    def test_listenWhileStopping(self) -> None:
        """
        A worker that was asked to leave while it started gets LEAVING for
        its listen, which the master does not log as a problem.
        """
        cluster = self.makeCluster(1)
        worker = self.worker(1)
        worker.online()
        d = cluster.stopService()
        answer = worker.queryServer()
        self.failureResultOf(answer, WorkerLeaving)
        self.assertEqual(self.messages(LogLevel.warn), [])
        self.spawner.flush()
        self.assertTrue(worker.disconnectRequested)
        worker.exit(0)
        self.successResultOf(d)
        self.assertLogged(f"worker 1 (pid {worker.pid}) exited (exit code 0)", LogLevel.info)
        self.assertEqual(len(self.spawner.workers), 1)
        self.assertEqual(cluster.exitCode, 0)

    def test_newListenWhileStoppingIsNotBound(self) -> None:
        """
        While the master stops it binds nothing new: a listen on an address
        no worker asked for before is answered LEAVING.
        """
        cluster = self.readyCluster(1, listens=[LOCAL])
        self.worker(1).holding.add(NewConn)
        self.connect(1)
        cluster.stopService()
        self.assertFalse(self.worker(1).disconnectRequested)
        answer = self.worker(1).queryServer("tcp4", "127.0.0.1", 0, index=1)
        self.failureResultOf(answer, WorkerLeaving)
        self.assertEqual(len(self.cluster._table.handles()), 1)

    def test_nothingRespawnsDuringAStop(self) -> None:
        """
        A worker that dies while the master waits for the last accepted
        connections to be handed out is not respawned.
        """
        cluster = self.readyCluster(2, listens=[LOCAL], stableAfter=0)
        self.worker(1).holding.add(NewConn)
        self.connect(1)
        d = cluster.stopService()
        self.worker(2).exit(1)
        self.assertEqual(len(self.spawner.workers), 2)
        self.assertNoResult(d)


class ObserverTests(ClusterTestsMixin, SynchronousTestCase):
    def test_reloadFromAReadyEvent(self) -> None:
        """
        An observer may reload (or scale) from the event that says a worker
        is ready: the slot's input has returned by then.
        """
        cluster = self.makeCluster(1)
        reloads = []

        def observer(event):
            if isinstance(event, WorkerReady) and not reloads:
                reloads.append(cluster.reload())

        cluster.addObserver(observer)
        first = self.worker(1)
        first.start()
        self.assertEqual(len(self.spawner.workers), 2)
        self.worker(1).start()
        first.exit(0)
        self.successResultOf(reloads[0])


class StopTests(ClusterTestsMixin, SynchronousTestCase):
    """
    C{stopService} drains every worker, killing those that outstay the
    graceful timeout.
    """

    def test_gracefulStop(self) -> None:
        """
        Every worker is told to disconnect with the graceful timeout; the
        Deferred fires once all have exited; nothing is respawned and
        nothing stays scheduled.
        """
        cluster = self.readyCluster(2, gracefulTimeout=5, workerTimeout=3)
        d = cluster.stopService()
        self.spawner.flush()
        for worker in self.spawner.workers:
            (disconnect,) = worker.commands(Disconnect)
            self.assertEqual(disconnect.arguments, {"timeout": 5.0})
        self.assertEqual({e.reason for e in self.eventsOf(WorkerDisconnected)}, {"stop"})
        self.worker(1).exit(0)
        self.assertNoResult(d)
        self.worker(2).exit(0)
        self.assertIsNone(self.successResultOf(d))
        self.assertLogged("master stopped: all workers are gone")
        self.assertEqual(len(self.spawner.workers), 2)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.gaveUp, [])

    def test_queueNobodyCanTake(self) -> None:
        """
        Connections queued for a listen no worker holds any more (its
        worker died, and nothing respawns once the stop begins) do not
        hold the stop for the graceful timeout: they are closed, said so.
        """
        cluster = self.readyCluster(1, listens=[LOCAL], gracefulTimeout=30, stableAfter=0)
        handle = self.handle()
        self.worker(1).exit(1)
        client = socket.create_connection((handle.host, handle.port))
        self.addCleanup(client.close)
        for reader in list(self.reactor.readers):
            reader.doRead()
        self.assertEqual(cluster.statistics().pending, 1)
        d = cluster.stopService()
        self.spawner.flush()
        for worker in self.spawner.running():
            # The respawned worker, still booting: told to leave.
            worker.exit(0)
        self.assertIsNone(self.successResultOf(d))
        self.assertLogged("closed 1 accepted connections on")
        self.assertNotLogged("connections still waiting for a worker after the graceful timeout")

    def test_killAfterGracefulTimeout(self) -> None:
        """
        A worker still running after the graceful timeout is killed.
        """
        cluster = self.readyCluster(2, gracefulTimeout=5)
        d = cluster.stopService()
        self.worker(1).exit(0)
        self.reactor.advance(4.9)
        self.assertEqual(self.worker(2).process.signals, [])
        self.reactor.advance(0.1)
        self.assertEqual(self.worker(2).process.signalNumbers(), [signal.SIGKILL])
        self.assertEqual(self.worker(1).process.signals, [])
        self.assertLogged("still running 5 s after it was asked to stop: killing it", LogLevel.warn)
        self.assertNoResult(d)
        self.worker(2).kill()
        self.successResultOf(d)

    def test_handoffsFinishFirst(self) -> None:
        """
        The workers are told to disconnect only once every connection the
        master accepted has been taken.
        """
        cluster = self.readyCluster(1, listens=[LOCAL])
        worker = self.worker(1)
        worker.holding.add(NewConn)
        self.connect()
        cluster.stopService()
        self.spawner.flush()
        self.assertFalse(worker.disconnectRequested)
        worker.unanswered(NewConn)[0].takeConnections()
        self.spawner.flush()
        self.assertTrue(worker.disconnectRequested)

    def test_handoffsTimeOut(self) -> None:
        """
        Handoffs still unanswered after the graceful timeout are given up
        on: the workers are told to disconnect anyway.
        """
        cluster = self.readyCluster(1, listens=[LOCAL], gracefulTimeout=5)
        worker = self.worker(1)
        worker.holding.add(NewConn)
        self.connect()
        d = cluster.stopService()
        self.reactor.advance(5)
        self.spawner.flush()
        self.assertTrue(worker.disconnectRequested)
        self.assertLogged("connections still waiting for a worker after the graceful timeout", LogLevel.warn)
        worker.exit(0)
        self.successResultOf(d)

    def test_noRespawnAfterStop(self) -> None:
        """
        A worker backing off when the cluster stops is not respawned, and a
        worker dying during the stop is neither respawned nor a failure.
        """
        cluster = self.readyCluster(3, minRestartDelay=5)
        self.worker(3).exit(1)
        d = cluster.stopService()
        self.worker(1).exit(1)
        self.worker(2).exit(0)
        self.successResultOf(d)
        self.assertEqual(cluster.statistics().failures, 1)
        self.reactor.advance(100)
        self.assertEqual(len(self.spawner.workers), 3)
        self.assertEqual(self.gaveUp, [])

    def test_startingWorkerStopsGracefully(self) -> None:
        """
        A worker still starting when the cluster stops has the graceful
        timeout to leave; its start timeout no longer applies.
        """
        cluster = self.makeCluster(1, startTimeout=5, gracefulTimeout=30)
        worker = self.worker(1)
        worker.online()
        d = cluster.stopService()
        self.reactor.advance(10)
        self.assertEqual(worker.process.signals, [])
        self.assertNotLogged("was not ready within")
        self.reactor.advance(20)
        self.assertEqual(worker.process.signalNumbers(), [signal.SIGKILL])
        worker.kill()
        self.successResultOf(d)

    def test_stopAfterChannelLost(self) -> None:
        """
        A worker whose channel closed is still killed after the channel
        grace when the cluster stops meanwhile.
        """
        cluster = self.readyCluster(1, gracefulTimeout=30)
        worker = self.worker(1)
        worker.channel.sever()
        d = cluster.stopService()
        self.reactor.advance(CHANNEL_LOST_GRACE)
        self.assertEqual(worker.process.signalNumbers(), [signal.SIGKILL])
        worker.kill()
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_noKillTimerOutlivesTheWorker(self) -> None:
        """
        Once a worker has exited, none of the timers set to kill it (channel
        lost, then graceful stop) is left scheduled.
        """
        cluster = self.readyCluster(1)
        worker = self.worker(1)
        worker.channel.sever()
        d = cluster.stopService()
        worker.process.end(0)
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stopDuringReplacement(self) -> None:
        """
        Stopping while a replacement starts drains the old worker and the
        replacement; once both are gone nothing is left scheduled.
        """
        cluster = self.readyCluster(1, listens=[LOCAL], maxRequests=1)
        self.connect()
        old, new = self.spawner.workers
        d = cluster.stopService()
        self.spawner.flush()
        self.assertTrue(old.disconnectRequested and new.disconnectRequested)
        old.exit(0)
        new.exit(0)
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stopTwice(self) -> None:
        """
        A second C{stopService} waits for the same stop.
        """
        cluster = self.readyCluster(1)
        first = cluster.stopService()
        second = cluster.stopService()
        self.worker(1).exit(0)
        self.successResultOf(first)
        self.successResultOf(second)

    def test_scaleWhileStopping(self) -> None:
        """
        C{scale} while stopping fails with L{ClusterStopped}.
        """
        cluster = self.readyCluster(1)
        cluster.stopService()
        self.failureResultOf(cluster.scale(3), ClusterStopped)

    def test_stopFailsScaleUp(self) -> None:
        """
        A scale-up still waiting when the cluster stops fails with
        L{ClusterStopped}.
        """
        cluster = self.readyCluster(1)
        d = cluster.scale(2)
        cluster.stopService()
        self.failureResultOf(d, ClusterStopped)


class MessageTests(ClusterTestsMixin, SynchronousTestCase):
    """
    User messages both ways.
    """

    def test_sendMessage(self) -> None:
        """
        C{sendMessage} delivers a JSON value to one worker and fires once it
        is answered.
        """
        cluster = self.readyCluster(2)
        d = cluster.sendMessage(2, {"cmd": "hello", "n": [1, 2]})
        self.assertNoResult(d)
        self.spawner.flush()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.worker(2).messages, [{"cmd": "hello", "n": [1, 2]}])
        self.assertEqual(self.worker(1).messages, [])

    def test_sendMessageToNobody(self) -> None:
        """
        C{sendMessage} to an id that does not run fails with L{KeyError}.
        """
        cluster = self.readyCluster(1)
        self.failureResultOf(cluster.sendMessage(2, "x"), KeyError)

    def test_sendUnserialisable(self) -> None:
        """
        A message that is not JSON-serialisable fails.
        """
        cluster = self.readyCluster(1)
        self.failureResultOf(cluster.sendMessage(1, object()), TypeError)

    def test_broadcast(self) -> None:
        """
        C{broadcast} reaches every worker that is not leaving.
        """
        cluster = self.readyCluster(3)
        cluster.scale(2)
        d = cluster.broadcast("all")
        self.spawner.flush()
        self.successResultOf(d)
        self.assertEqual([w.messages for w in self.spawner.workers], [["all"], ["all"], []])

    def test_fromWorker(self) -> None:
        """
        A worker's message is a L{WorkerMessage} event with its id and pid.
        """
        self.readyCluster(2)
        worker = self.worker(2)
        self.successResultOf(worker.sendToMaster({"load": 0.5}))
        self.assertEqual(self.events[-1], WorkerMessage(2, worker.pid, {"load": 0.5}))

    def test_observerFailure(self) -> None:
        """
        An observer that raises is logged and does not stop the others.
        """
        cluster = self.makeCluster(1, start=False)
        cluster.addObserver(lambda event: 1 / 0)
        seen = []
        cluster.addObserver(seen.append)
        cluster.startService()
        self.assertEqual(len(seen), 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class StatisticsTests(ClusterTestsMixin, SynchronousTestCase):
    """
    C{statistics()} is a snapshot of the workers and the listeners.
    """

    def test_snapshot(self) -> None:
        """
        Each worker's id, pid, state, uptime, restarts, connections handed
        and listens; each listener; the queue; the failures in the window.
        """
        cluster = self.readyCluster(2, listens=[LOCAL], stableAfter=0)
        self.reactor.advance(5)
        self.worker(2).exit(1)
        self.reactor.advance(2)
        self.connect(2)
        stats = cluster.statistics()
        w1, w2 = stats.workers
        address = self.handle().describe()
        self.assertEqual(
            (w1.workerId, w1.pid, w1.state, w1.uptime, w1.restarts, w1.listens),
            (1, self.worker(1).pid, "ready", 7.0, 0, (address,)),
        )
        self.assertEqual(w1.handed, 2)
        self.assertEqual(
            (w2.workerId, w2.pid, w2.state, w2.uptime, w2.restarts, w2.handed, w2.listens),
            (2, self.worker(2).pid, "starting", 2.0, 1, 0, ()),
        )
        (listener,) = stats.listeners
        self.assertEqual((listener.address, listener.workers, listener.accepted), (address, 1, 2))
        self.assertEqual((stats.pending, stats.dropped, stats.failures), (0, 0, 1))

    def test_frozen(self) -> None:
        """
        The snapshot does not change with the cluster.
        """
        cluster = self.makeCluster(1)
        before = cluster.statistics()
        self.worker(1).start()
        self.assertEqual(before.workers[0].state, "starting")
        self.assertEqual(cluster.statistics().workers[0].state, "ready")


class ConnectionTests(ClusterTestsMixin, SynchronousTestCase):
    """
    The master hands accepted connections to workers, and loses none when a
    worker does not take them.
    """

    def test_roundRobin(self) -> None:
        """
        Connections go to the ready workers in turn, each as a descriptor of
        the client's connection.
        """
        self.readyCluster(2, listens=[LOCAL])
        clients = []
        for _ in range(4):
            clients += self.connect()
        self.assertEqual([len(self.worker(i).connections) for i in (1, 2)], [2, 2])
        fds = self.worker(1).connections + self.worker(2).connections
        for n, client in enumerate(clients):
            client.sendall(b"%d" % n)
        received = sorted(readFrom(fd) for fd in fds)
        self.assertEqual(received, [b"0", b"1", b"2", b"3"])

    def test_workerDiesWithHandoffUnanswered(self) -> None:
        """
        A connection handed to a worker that dies before answering goes to
        another worker.
        """
        self.readyCluster(2, listens=[LOCAL])
        first = self.worker(1)
        first.holding.add(NewConn)
        (client,) = self.connect()
        self.assertEqual(len(first.unanswered(NewConn)), 1)
        first.exit(1)
        self.spawner.flush()
        (fd,) = self.worker(2).connections
        client.sendall(b"still here")
        self.assertEqual(readFrom(fd), b"still here")
        self.assertEqual(self.cluster.statistics().dropped, 0)

    def test_errorAnswer(self) -> None:
        """
        A worker that answers a handoff with an error may have adopted the
        connections: the master counts them taken rather than risk serving
        them twice, and replaces the worker, which never does that.
        """
        self.readyCluster(2, listens=[LOCAL])
        worker = self.worker(1)
        worker.holding.add(NewConn)
        self.connect()
        (newConn,) = worker.unanswered(NewConn)
        newConn.fail(amp.RemoteAmpError(b"ADOPTION_FAILED", "adoption failed"))
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertLogged(
            f"worker 1 (pid {worker.pid}) misbehaved: it answered a handoff of 1 connections on "
            f"{self.handle().describe()} with an error",
            LogLevel.error,
        )
        self.assertEqual(worker.process.signalNumbers(), [signal.SIGKILL])
        self.assertEqual(self.worker(2).commands(NewConn), [])
        self.assertEqual(self.cluster.statistics().workers[0].handed, 0)

    def test_leastBusy(self) -> None:
        """
        With least-busy scheduling a connection goes to the worker that
        reported the fewest open connections.
        """
        self.readyCluster(2, listens=[LOCAL], scheduling="least-busy")
        self.worker(1).loadReport(10)
        self.worker(2).loadReport(3)
        self.connect()
        self.assertEqual([len(self.worker(i).connections) for i in (1, 2)], [0, 1])

    def test_leastBusyLoadFromAnswers(self) -> None:
        """
        A NewConn answer carries the worker's load: least-busy dispatch
        uses it without waiting for a LoadReport.
        """
        self.readyCluster(2, listens=[LOCAL], scheduling="least-busy")
        first = self.worker(1)
        first.holding.add(NewConn)
        self.connect()
        (newConn,) = first.unanswered(NewConn)
        newConn.takeConnections(connections=20)
        first.holding.discard(NewConn)
        self.connect()
        self.connect()
        self.assertEqual([len(self.worker(i).connections) for i in (1, 2)], [1, 2])

    def test_secondListenOnTheSameAddress(self) -> None:
        """
        A worker's second listen on an address (index 1) is a second socket,
        shared with the other workers' second listens.
        """
        self.readyCluster(2, listens=[LOCAL, LOCAL + (1,)])
        ports = sorted({e.port for e in self.eventsOf(WorkerListening)})
        self.assertEqual(len(ports), 2)
        self.assertEqual(len(self.cluster._table.handles()), 2)

    def test_refusedGoesElsewhere(self) -> None:
        """
        A connection a worker refuses goes to another worker.
        """
        self.readyCluster(2, listens=[LOCAL])
        self.worker(1).takingConnections = False
        self.connect()
        self.assertEqual(len(self.worker(1).commands(NewConn)), 1)
        self.assertEqual(len(self.worker(2).connections), 1)

    def test_queuedForReplacement(self) -> None:
        """
        Connections accepted while the only worker is being respawned wait
        for the replacement.
        """
        self.readyCluster(1, listens=[LOCAL], stableAfter=0)
        self.worker(1).exit(1)
        (client,) = self.connect()
        self.assertEqual(self.cluster.statistics().pending, 1)
        self.worker(1).start([LOCAL])
        (fd,) = self.worker(1).connections
        client.sendall(b"waited")
        self.assertEqual(readFrom(fd), b"waited")

    def test_orphanedListenClosed(self) -> None:
        """
        A socket whose only worker died stays open for its replacement;
        once every worker is ready and none listens on it, the master
        closes it (and the connections waiting on it).
        """
        self.readyCluster(1, listens=[LOCAL], stableAfter=0)
        handle = self.handle()
        self.worker(1).exit(1)
        self.assertIsNotNone(handle.sock)
        self.connect()
        self.worker(1).start()
        self.assertIsNone(handle.sock)
        self.assertEqual(self.cluster._table.handles(), [])
        self.assertEqual(self.cluster.statistics().dropped, 1)
        self.assertLogged(f"closed {handle.describe()}: no worker listens on it")

    def test_orphanWaitsForEveryWorker(self) -> None:
        """
        A socket left without workers stays open while some worker is
        still starting: it may listen there again.
        """
        self.readyCluster(2, listens=[LOCAL], stableAfter=0)
        handle = self.handle()
        self.worker(1).exit(1)
        self.worker(2).exit(1)
        (client,) = self.connect()
        self.worker(1).start()
        self.assertIsNotNone(handle.sock)
        self.worker(2).start([LOCAL])
        (fd,) = self.worker(2).connections
        client.sendall(b"kept")
        self.assertEqual(readFrom(fd), b"kept")

    def test_drainingWorkerGetsNothing(self) -> None:
        """
        A worker told to disconnect gets no new connections, even if a
        L{Listening} of its arrives afterwards.
        """
        cluster = self.readyCluster(2, listens=[LOCAL])
        leaving = self.worker(2)
        cluster.scale(1)
        self.successResultOf(leaving.listening(self.handle().listenId))
        self.connect(3)
        self.assertEqual(len(leaving.commands(NewConn)), 0)
        self.assertEqual(len(self.worker(1).connections), 3)


class MisbehaviourTests(ClusterTestsMixin, SynchronousTestCase):
    """
    A worker that breaks the protocol is logged and killed; the master
    carries on.
    """

    def test_sendsDescriptor(self) -> None:
        """
        A worker that sends the master a descriptor is logged and killed;
        the master does not keep the descriptor.
        """
        cluster = self.readyCluster(2, stableAfter=0)
        worker = self.worker(1)
        r, w = os.pipe()
        self.addCleanup(os.close, w)
        worker.sendFileDescriptor(r)
        os.close(r)
        self.assertRaises(BrokenPipeError, os.write, w, b"x")
        self.assertLogged(
            f"worker 1 (pid {worker.pid}) misbehaved: it sent a file descriptor; replacing it",
            LogLevel.error,
        )
        self.assertEqual(worker.process.signalNumbers(), [signal.SIGKILL])
        worker.kill()
        self.assertEqual(len(self.spawner.running()), 2)
        self.assertEqual(cluster.statistics().failures, 1)

    def test_messageNotJSON(self) -> None:
        """
        A user message that is not JSON gets its worker logged and killed,
        and no event.
        """
        self.readyCluster(1)
        worker = self.worker(1)
        worker.callRemote(ToMaster, message="{nope")
        self.assertLogged("misbehaved: it sent a message that is not JSON", LogLevel.error)
        self.assertEqual(worker.process.signalNumbers(), [signal.SIGKILL])
        self.assertEqual(self.eventsOf(WorkerMessage), [])

    def test_takesMoreThanSent(self) -> None:
        """
        A worker that claims more connections than it was sent is logged
        and killed.
        """
        self.readyCluster(1, listens=[LOCAL])
        worker = self.worker(1)
        worker.holding.add(NewConn)
        self.connect()
        (newConn,) = worker.unanswered(NewConn)
        newConn.answer(accepted=5)
        self.assertLogged("misbehaved: it said it took 5 of 1 connections", LogLevel.error)
        self.assertEqual(worker.process.signalNumbers(), [signal.SIGKILL])

    def test_malformedBox(self) -> None:
        """
        A box the master cannot parse is misbehaviour: it is logged (not as
        an unhandled error) and the worker is killed at once.
        """
        self.readyCluster(2)
        worker = self.worker(1)
        worker.send(b"\x00\x05hello\x00\x03abc\x00\x00")
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertLogged(
            f"worker 1 (pid {worker.pid}) misbehaved: it sent a box that is neither a command nor an answer",
            LogLevel.error,
        )
        self.assertEqual(worker.process.signalNumbers(), [signal.SIGKILL])
        self.assertTrue(worker.channel.lost)
        worker.kill()
        self.assertEqual(
            [c for c in self.reactor.getDelayedCalls() if c.func == self.cluster._processes.kill], []
        )

    def test_malformedBoxLosesNoConnection(self) -> None:
        """
        Connections handed to a misbehaving worker that it had not answered
        for when it was killed go to another worker.
        """
        self.readyCluster(2, listens=[LOCAL])
        worker = self.worker(1)
        worker.holding.add(NewConn)
        (client,) = self.connect()
        worker.send(b"\x00\x05hello\x00\x03abc\x00\x00")
        self.flushLoggedErrors(amp.NoEmptyBoxes)
        self.assertEqual(worker.process.signalNumbers(), [signal.SIGKILL])
        worker.kill()
        self.spawner.flush()
        (fd,) = self.worker(2).connections
        client.sendall(b"safe")
        self.assertEqual(readFrom(fd), b"safe")

    def test_channelClosedEarly(self) -> None:
        """
        A worker whose channel closes while its process runs is killed
        after a grace period.
        """
        self.readyCluster(1)
        worker = self.worker(1)
        worker.channel.sever()
        self.assertLogged("channel closed", LogLevel.warn)
        self.reactor.advance(CHANNEL_LOST_GRACE)
        self.assertEqual(worker.process.signalNumbers(), [signal.SIGKILL])


class QueryCheckTests(SynchronousTestCase):
    def test_numericInterfacesOnly(self) -> None:
        """
        The master binds numeric interfaces only: a name would make it
        resolve (and block its reactor); workers resolve names first.
        """
        from txcluster._listens import checkQuery as _checkQuery

        self.assertIsNone(_checkQuery("tcp4", "127.0.0.1", 80, 0, 50, 0o666))
        self.assertIsNone(_checkQuery("tcp6", "::1", 80, 0, 50, 0o666))
        self.assertIsNone(_checkQuery("tcp4", "", 80, 0, 50, 0o666))
        problem = _checkQuery("tcp4", "localhost", 80, 0, 50, 0o666)
        self.assertIn("'localhost' is not a numeric address", problem)
