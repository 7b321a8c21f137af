"""
One contract, two workers: the tests of L{ContractTestsMixin} run against
the L{txcluster.testing.FakeWorker} the master's unit tests use, and against
the real worker (L{txcluster._worker.Worker} and its
L{txcluster._workerchannel.WorkerChannel}), each connected to the real
master (a L{ClusterService} on a L{MemoryReactorClock}, its real
L{txcluster._channel.MasterChannel}s).  What the master observes (events,
statistics, log lines, signals) and what the worker-side API reports must
be the same for both: where they differ, the fake is wrong.

Each implementation is driven through a L{WorkerDriver}:
L{FakeWorkerDriver} plays a L{FakeWorker} (through L{FakeSpawner} and its
in-memory L{FakeChannel}); L{RealWorkerDriver} is a worker process without
the process: a real L{Worker} on a L{WorkerReactor} of its own, whose
channel is a real socketpair to the master, made by L{RealWorkerSpawner}.

Nothing runs by itself: L{ContractTestsMixin.pump} is the event loop of
every process at once, a C{select()} with no timeout over the master's
and the workers' descriptors (L{runOnce}), turn after turn until nothing
moves.  The sockets are local (a socketpair, 127.0.0.1), so what one end
writes is readable at the other as soon as the write returns, and what a
test waits for it waits for by readiness, never by time.  The one place a
worker blocks is a synchronous listen (C{WorkerChannel.callSync} waits in
C{select()} for the master's answer); the master is another process then,
which runs meanwhile: a real worker's channel transport
(L{_ChannelTransport}) lets the master run whenever the worker writes.
"""

from __future__ import annotations

import inspect
import os
import select
import signal
import socket
from typing import Any, Callable, Optional, Protocol as TypingProtocol

from twisted.internet import defer, tcp, unix
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IHalfCloseableDescriptor,
    IReactorFDSet,
    IReactorSocket,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, Logger, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from txcluster import (
    ClusterConfig,
    ClusterService,
    WorkerDisconnected,
    WorkerExited,
    WorkerForked,
    WorkerListening,
    WorkerMessage,
    WorkerOnline,
    WorkerReady,
)
from txcluster import _worker
from txcluster._commands import (
    CollectMetrics,
    ENV_GRACEFUL_TIMEOUT,
    LOAD_REPORT_INTERVAL,
    Disconnect,
    MessageTooLarge,
    Ping,
    UnknownListen,
    closeUnclaimedDescriptors,
)
from txcluster._process import adoptChannel, spawnWorker
from txcluster._channel import ANSWER_DELAY
from txcluster._twistedcompat import BatchingUNIXServer
from txcluster._worker import MasterUnavailable, Worker
from txcluster.testing import FakeProcess, FakeSpawner, FakeWorker

LOCAL = ("tcp4", "127.0.0.1", 0)

#: How long a test waits for the kernel to make a local socket ready: only
#: reached when something is broken.
READY_TIMEOUT = 5.0

_log = Logger()


def openDescriptors() -> dict:
    """
    This process's open file descriptors, with what each is.
    """
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return found


def waitReadable(fds: list, timeout: float = READY_TIMEOUT) -> None:
    """
    Wait until every descriptor (or object with C{fileno()}) in C{fds} is
    readable.

    @raise AssertionError: one was not, within C{timeout}.
    """
    for fd in fds:
        readable, _, _ = select.select([fd], [], [], timeout)
        if not readable:
            raise AssertionError(f"{fd!r} did not become readable within {timeout} s")


# An event loop over MemoryReactors -----------------------------------------


def runOnce(reactor: MemoryReactorClock) -> bool:
    """
    One turn of a C{select()} reactor over what C{reactor} (a
    L{MemoryReactorClock}) was given to watch: write what its writers can
    write, read what its readers can read, without waiting, then run its
    delayed calls that are due (the time does not move).  A descriptor whose
    C{doRead} or C{doWrite} reports the connection lost is disconnected as
    Twisted's reactors do.

    @return: whether anything happened.
    """
    watched = set(reactor.getReaders()) | set(reactor.getWriters())
    for selectable in list(watched):
        if selectable.fileno() == -1:
            reactor.removeReader(selectable)
            reactor.removeWriter(selectable)
            watched.discard(selectable)
    readable: list = []
    writable: list = []
    if watched:
        readable, writable, _ = select.select(
            [s for s in watched if s in reactor.readers],
            [s for s in watched if s in reactor.writers],
            [],
            0,
        )
    for selectable in writable:
        if selectable in reactor.writers:
            _doReadOrWrite(reactor, selectable, "doWrite")
    for selectable in readable:
        if selectable in reactor.readers:
            _doReadOrWrite(reactor, selectable, "doRead")
    due = [call for call in reactor.getDelayedCalls() if call.getTime() <= reactor.seconds()]
    if due:
        reactor.advance(0)
    return bool(readable or writable or due)


def _doReadOrWrite(reactor, selectable, method: str) -> None:
    # What Twisted's select reactor does with a ready descriptor.
    try:
        why = getattr(selectable, method)()
    except BaseException as e:
        _log.failure("{method} of {selectable} raised", method=method, selectable=selectable)
        why = e
    if not why:
        return
    reactor.removeReader(selectable)
    if method == "doRead" and isinstance(why, ConnectionDone) and IHalfCloseableDescriptor.providedBy(selectable):
        selectable.readConnectionLost(Failure(ConnectionDone()))
        return
    reactor.removeWriter(selectable)
    selectable.connectionLost(Failure(why))


# The real worker, without its process --------------------------------------


class _ChannelTransport(BatchingUNIXServer):
    """
    A real worker's end of its channel: the worker's own transport class,
    except that whenever the worker writes, the master (another process)
    runs until it has nothing more to do.  A synchronous listen waits in
    C{select()} for the master's answer: the master must have answered by
    then.  The reactor that adopts it keeps it as its C{channel}.
    """

    @classmethod
    def _fromConnectedSocket(cls, fileDescriptor, factory, reactor):
        transport = super()._fromConnectedSocket(fileDescriptor, factory, reactor)
        reactor.channel = transport
        return transport

    def write(self, data):
        BatchingUNIXServer.write(self, data)
        self.reactor.masterRuns()

    def doWrite(self):
        result = BatchingUNIXServer.doWrite(self)
        self.reactor.masterRuns()
        return result


class WorkerReactor(MemoryReactorClock):
    """
    The reactor of one worker process, run by the test (L{runOnce}): the
    fake time and the recorded descriptor sets of L{MemoryReactorClock},
    with real adoption of sockets (a worker's channel, the connections the
    master hands it, a shared listening socket).  It is running (the
    worker's application started) until the worker stops it.

    @ivar channel: the transport of the worker's channel (the first UNIX
        stream socket adopted).
    @ivar connections: the transports of the other connections adopted.
    @ivar ports: the listening ports adopted.
    """

    def __init__(self, masterRuns: Callable[[], object]) -> None:
        MemoryReactorClock.__init__(self)
        self.running = True
        self.masterRuns = masterRuns
        self.channel: Optional[_ChannelTransport] = None
        self.connections: list = []
        self.ports: list = []

    # What a real reactor's adoptStreamConnection and adoptStreamPort do
    # (PosixReactorBase's), with a transport class of our own for the
    # channel.

    def adoptStreamConnection(self, fileDescriptor, addressFamily, factory):
        if addressFamily == socket.AF_UNIX:
            transport = unix.Server._fromConnectedSocket(fileDescriptor, factory, self)
        else:
            transport = tcp.Server._fromConnectedSocket(fileDescriptor, addressFamily, factory, self)
        if transport is not None:
            self.connections.append(transport)
        return transport

    def adoptStreamPort(self, fileDescriptor, addressFamily, factory):
        port = tcp.Port._fromListeningDescriptor(self, fileDescriptor, addressFamily, factory)
        port.startListening()
        self.ports.append(port)
        return port

    def closeEverything(self) -> None:
        """
        The process is gone: every socket it held is closed, at once and
        without a word to its protocols.
        """
        self.running = False
        watched = self.removeAll() or []
        protocol = getattr(self.channel, "protocol", None)
        if protocol is not None:
            closeUnclaimedDescriptors(protocol)
        # (What a port accepted is watched, not adopted.)
        for selectable in [self.channel, *self.connections, *self.ports, *watched]:
            sock = getattr(selectable, "socket", None)
            if sock is not None:
                sock.close()


class _Connection(Protocol):
    """
    A connection the real worker's application was given: it keeps what it
    reads.
    """

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class RealWorkerSpawner:
    """
    A spawner for L{ClusterService} that starts no process but a real
    L{Worker}, on a L{WorkerReactor} of its own, whose channel is one end of
    a socketpair; the master's end is adopted as L{spawnWorker} adopts it.
    The process is a L{FakeProcess}.  A worker boots when its driver says
    so (L{RealWorkerDriver.boot}), as a process would run
    C{txcluster._workermain}.

    @ivar drivers: a L{RealWorkerDriver} per spawn, in spawn order.
    """

    def __init__(self, masterRuns: Callable[[], object], firstPid: int = 1000) -> None:
        self._masterRuns = masterRuns
        self.nextPid = firstPid
        self.drivers: list[RealWorkerDriver] = []

    def __call__(
        self,
        reactor,
        processProtocol,
        channel,
        workerId: int,
        workerCount: int,
        appPath: str,
        env: Optional[dict] = None,
        executable: Optional[str] = None,
        uid: Optional[int] = None,
        gid: Optional[int] = None,
        board: Optional[int] = None,
    ) -> FakeProcess:
        pid = self.nextPid
        self.nextPid += 1
        masterEnd, workerEnd = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            masterEnd.setblocking(False)
            workerEnd.setblocking(False)
            process = FakeProcess(processProtocol, pid)
            processProtocol.makeConnection(process)
            masterTransport = adoptChannel(reactor, masterEnd.fileno(), channel)
        except BaseException:
            workerEnd.close()
            raise
        finally:
            masterEnd.close()
        gracefulTimeout = float((env or {}).get(ENV_GRACEFUL_TIMEOUT, "30"))
        worker = Worker(
            WorkerReactor(self._masterRuns), workerId, workerCount, os.getpid(), gracefulTimeout
        )
        worker.channelTransport = _ChannelTransport
        # The process's pid, as the master knows it.
        worker.pid = pid
        self.drivers.append(RealWorkerDriver(worker, process, masterTransport, workerEnd.detach()))
        return process

    def closeEverything(self) -> None:
        """
        Close every socket of every worker, and the master's end of every
        channel (the master loses the channels as if the workers had died).
        """
        for driver in self.drivers:
            driver.closeEverything()


# The drivers ------------------------------------------------------------------


class WorkerDriver(TypingProtocol):
    """
    One worker, as a contract test drives it and reads what its API reports.

    @ivar workerId: the worker id it was spawned with.
    @ivar pid: its pid.
    @ivar process: its L{FakeProcess} (the signals the master sent it).
    """

    workerId: int
    pid: int
    process: FakeProcess

    def boot(self, listens=()) -> list:
        """
        Start as a worker's application does: online, listen on each
        C{(kind, address, port)} of C{listens} in turn, then ready.

        @return: the address C{(host, port)} of each listen, as the worker
            sees it.
        """

    def listen(self, listen: tuple) -> tuple:
        """
        The application listens on C{(kind, address, port)}.

        @return: the address C{(host, port)}, as the worker sees it.
        """

    def stopListening(self, listenId: int) -> None:
        """
        The application stops listening on the master's C{listenId}.
        """

    def leave(self) -> None:
        """
        The application leaves the cluster on its own (C{disconnect()}).
        """

    def sendToMaster(self, message: Any) -> defer.Deferred:
        """
        The application sends C{message} to the master.
        """

    def receivedMessages(self) -> list:
        """
        The messages from the master the worker received, decoded.
        """

    def connectionsTaken(self) -> int:
        """
        How many connections the worker holds.
        """

    def readConnections(self) -> list:
        """
        What the clients of the worker's open connections wrote, once it
        arrived: one C{bytes} per connection, sorted.
        """

    def closeConnections(self) -> None:
        """
        The application closes every connection it holds.
        """

    def workerCount(self) -> int:
        """
        How many workers the worker believes the cluster runs.
        """

    def leaveRequested(self) -> bool:
        """
        Whether the master asked the worker to leave.
        """

    def disconnecting(self) -> bool:
        """
        Whether the worker is leaving (it stopped listening).
        """

    def masterGone(self) -> bool:
        """
        Whether the worker saw its channel to the master close.
        """

    def block(self) -> None:
        """
        The worker's reactor blocks: it reads nothing from the master.
        """

    def exit(self, exitCode: int = 0) -> None:
        """
        The process exits: its channel closes, then it ends.
        """


class FakeWorkerDriver:
    """
    A L{WorkerDriver} for a L{FakeWorker}.
    """

    def __init__(self, worker: FakeWorker) -> None:
        self.worker = worker
        self.workerId = worker.workerId
        self.pid = worker.pid
        self.process = worker.process

    def boot(self, listens=()) -> list:
        return [(answer["host"], answer["port"]) for answer in self.worker.start(listens)]

    def listen(self, listen: tuple) -> tuple:
        answer = self.worker.listen(*listen)
        return (answer["host"], answer["port"])

    def stopListening(self, listenId: int) -> None:
        self.worker.close(listenId)

    def leave(self) -> None:
        self.worker.disconnect()

    def sendToMaster(self, message: Any) -> defer.Deferred:
        return self.worker.sendToMaster(message)

    def receivedMessages(self) -> list:
        return list(self.worker.messages)

    def connectionsTaken(self) -> int:
        return len(self.worker.connections)

    def readConnections(self) -> list:
        waitReadable(self.worker.connections)
        return sorted(os.read(fd, 65536) for fd in self.worker.connections)

    def closeConnections(self) -> None:
        self.worker.closeConnections()

    def workerCount(self) -> int:
        return self.worker.workerCount

    def leaveRequested(self) -> bool:
        return self.worker.disconnectRequested

    def disconnecting(self) -> bool:
        return self.worker.disconnecting

    def masterGone(self) -> bool:
        return self.worker.channelLostReason is not None

    def block(self) -> None:
        self.worker.block()

    def exit(self, exitCode: int = 0) -> None:
        self.worker.exit(exitCode)


class RealWorkerDriver:
    """
    A L{WorkerDriver} for a real L{Worker}: the process L{RealWorkerSpawner}
    did not start.

    @ivar worker: the L{Worker}.
    @ivar reactor: its L{WorkerReactor}.
    @ivar masterTransport: the master's end of its channel.
    @ivar running: whether the process runs (its reactor is run by the
        test's event loop): from L{boot} until L{exit}, unless L{block}ed.
    """

    def __init__(self, worker: Worker, process: FakeProcess, masterTransport, channelFd: int) -> None:
        self.worker = worker
        self.reactor: WorkerReactor = worker.reactor
        self.workerId = worker.id
        self.pid = worker.pid
        self.process = process
        self.masterTransport = masterTransport
        self.running = False
        self._channelFd: Optional[int] = channelFd
        self._messages: list = []
        self._connections: list[_Connection] = []
        self._ports: dict[int, Any] = {}
        worker.addMessageObserver(self._messages.append)

    def _buildConnection(self) -> _Connection:
        connection = _Connection()
        self._connections.append(connection)
        return connection

    def boot(self, listens=()) -> list:
        fd, self._channelFd = self._channelFd, None
        self.running = True
        self.worker.connect(fd)
        addresses = [self.listen(listen) for listen in listens]
        self.worker.ready()
        return addresses

    def listen(self, listen: tuple) -> tuple:
        kind, address, port = listen
        factory = Factory.forProtocol(self._buildConnection)
        listeningPort = self.worker.listenStream(kind, address, port, factory)
        self._ports[listeningPort.listenId] = listeningPort
        host = listeningPort.getHost()
        return (host.host, host.port)

    def stopListening(self, listenId: int) -> None:
        self._ports.pop(listenId).stopListening()

    def leave(self) -> None:
        self.worker.disconnect()

    def sendToMaster(self, message: Any) -> defer.Deferred:
        return self.worker.sendToMaster(message)

    def receivedMessages(self) -> list:
        return list(self._messages)

    def connectionsTaken(self) -> int:
        return self.worker.openConnections

    def _open(self) -> list:
        return [c for c in self._connections if c.transport.connected]

    def readConnections(self) -> list:
        # Once the data is in the kernel, the worker's reactor reads it.
        connections = self._open()
        waitReadable([c.transport for c in connections])
        runOnce(self.reactor)
        return sorted(c.received for c in connections)

    def closeConnections(self) -> None:
        for connection in self._open():
            connection.transport.loseConnection()

    def workerCount(self) -> int:
        return self.worker.count

    def leaveRequested(self) -> bool:
        return self.worker.leaveRequested

    def disconnecting(self) -> bool:
        return self.worker.disconnecting

    def masterGone(self) -> bool:
        return self.worker.channel is None

    def block(self) -> None:
        self.running = False

    def exit(self, exitCode: int = 0) -> None:
        self.running = False
        self.reactor.closeEverything()
        # The master reads the end of the channel before it hears of the
        # process's end, as with FakeWorker.exit.
        self.reactor.masterRuns()
        self.process.end(exitCode=exitCode)

    def closeEverything(self) -> None:
        """
        For a test's cleanup: close the worker's sockets, and the master's
        end of the channel (the master loses it as if the worker had died).
        """
        self.running = False
        self.reactor.closeEverything()
        if self._channelFd is not None:
            os.close(self._channelFd)
            self._channelFd = None
        if self.masterTransport.connected:
            self.masterTransport.connectionLost(Failure(ConnectionDone("the test is over")))


# The contract -------------------------------------------------------------------


class ContractTestsMixin:
    """
    What a worker does, as the master sees it and as the worker's API
    reports it.  A subclass provides the workers: L{setUpWorkers} (which
    makes C{self.spawner}), L{drivers}, L{runWorkers} and
    L{advanceWorkers}.
    """

    def setUp(self) -> None:
        before = openDescriptors()
        # Registered first, so that it runs after every other cleanup.
        self.addCleanup(self._assertNoDescriptorLeft, before)
        self.reactor = MemoryReactorClock()
        self.events: list = []
        self.logs: list = []
        self.cluster: Optional[ClusterService] = None
        globalLogPublisher.addObserver(self.logs.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs.append)
        self.setUpWorkers()
        self.addCleanup(self._closeSockets)

    def _assertNoDescriptorLeft(self, before: dict) -> None:
        after = openDescriptors()
        left = {fd: what for fd, what in after.items() if before.get(fd) != what}
        self.assertEqual(left, {}, "descriptors the test left open")

    def _closeSockets(self) -> None:
        if self.cluster is not None and self.cluster._table is not None:
            self.cluster._table.closeAll()

    # What a subclass provides

    def setUpWorkers(self) -> None:
        """
        Make C{self.spawner} and arrange for the cleanup of the workers.
        """
        raise NotImplementedError()

    def drivers(self) -> list:
        """
        A L{WorkerDriver} for each worker that was spawned, in spawn order.
        """
        raise NotImplementedError()

    def runWorkers(self) -> bool:
        """
        Let every running worker do what it can, once.

        @return: whether anything happened.
        """
        raise NotImplementedError()

    def advanceWorkers(self, seconds: float) -> None:
        """
        Let C{seconds} pass on the clocks of the running workers.
        """
        raise NotImplementedError()

    # The event loop

    def runMaster(self) -> bool:
        """
        Let the master do all it can (the workers do nothing meanwhile).

        @return: whether anything happened.
        """
        moved = False
        for _ in range(1000):
            if not runOnce(self.reactor):
                return moved
            moved = True
        self.fail("the master never stops doing something")

    def pump(self) -> None:
        """
        Let the master and every running worker do all they can, until
        nothing moves.
        """
        for _ in range(1000):
            moved = self.runMaster()
            if not (self.runWorkers() or moved or self.imminentMasterTimer()):
                return
        self.fail("the cluster never stops doing something")

    def imminentMasterTimer(self) -> bool:
        """
        Let the master's clock reach its next timer if that is due within
        L{ANSWER_DELAY} (a real master's answer reader, say, that reads
        the workers' answers when no connection comes to wake it).

        @return: whether one was.
        """
        now = self.reactor.seconds()
        due = [call.getTime() for call in self.reactor.getDelayedCalls() if call.getTime() - now <= ANSWER_DELAY + 1e-9]
        if not due:
            return False
        self.reactor.advance(max(0.0, min(due) - now))
        return True

    def advance(self, seconds: float, step: float = 0.25) -> None:
        """
        Let C{seconds} pass for every process, in steps, the cluster doing
        all it can after each.
        """
        while seconds > 1e-9:
            dt = min(step, seconds)
            self.reactor.advance(dt)
            self.advanceWorkers(dt)
            self.pump()
            seconds -= dt

    # The cluster

    def makeCluster(self, workers: int = 2, **config) -> ClusterService:
        """
        A started cluster of C{workers}, the heartbeat off unless C{config}
        sets C{workerTimeout}.
        """
        config.setdefault("app", "app.tac")
        config.setdefault("workerTimeout", 0)
        self.cluster = ClusterService(
            ClusterConfig(workers=workers, **config),
            reactor=self.reactor,
            spawner=self.spawner,
            onGiveUp=lambda code: None,
        )
        self.cluster.addObserver(self.events.append)
        self.cluster.startService()
        return self.cluster

    def readyCluster(self, workers: int = 2, listens=(), **config) -> ClusterService:
        """
        A started cluster whose workers all booted with C{listens}.
        """
        cluster = self.makeCluster(workers, **config)
        for driver in self.drivers():
            driver.boot(listens)
            self.pump()
        return cluster

    def driver(self, workerId: int):
        """
        The driver of the last worker spawned with C{workerId}.
        """
        for driver in reversed(self.drivers()):
            if driver.workerId == workerId:
                return driver
        raise KeyError(workerId)

    def process(self, workerId: int):
        """
        The master's record of the process of worker C{workerId}.
        """
        (process,) = [p for p in self.cluster._processes.processes if p.pid == self.driver(workerId).pid]
        return process

    def handle(self):
        (handle,) = self.cluster._table.handles()
        return handle

    def worker(self, workerId: int):
        """
        The L{WorkerStatistics} of the last worker spawned with C{workerId}.
        """
        return self.statisticsOf(self.driver(workerId))

    def statisticsOf(self, driver):
        """
        The L{WorkerStatistics} of C{driver}'s worker.
        """
        (worker,) = [w for w in self.cluster.statistics().workers if w.pid == driver.pid]
        return worker

    def members(self) -> dict:
        """
        The one handle's dispatch statistics of each worker, by worker id.
        """
        (listener,) = self.cluster.statistics().listeners
        return {m.worker.workerId: m for m in listener.dispatch.members}

    def eventsOf(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def assertLogged(self, text: str, level: Optional[LogLevel] = None) -> str:
        """
        Some log message (at C{level}) contains C{text}; return it.
        """
        for event in self.logs:
            if level is None or event.get("log_level") == level:
                message = formatEvent(event)
                if text in message:
                    return message
        self.fail(f"nothing logged contains {text!r}")

    def connect(self, count: int = 1, deliver: bool = True) -> list:
        """
        Open C{count} client connections to the one handle and let the
        master accept them and hand them out; with C{deliver}, let the
        workers take them too.
        """
        handle = self.handle()
        clients = []
        for _ in range(count):
            client = socket.create_connection((handle.host, handle.port))
            self.addCleanup(client.close)
            clients.append(client)
        waitReadable([handle.sock])
        if deliver:
            self.pump()
        else:
            self.runMaster()
        return clients

    # Booting --------------------------------------------------------------

    def test_boot(self) -> None:
        """
        A worker that boots with a listen is online, listening on the
        address the master bound (which its listen reports too), then
        ready; the statistics show it ready with its listen.
        """
        cluster = self.makeCluster(1)
        (driver,) = self.drivers()
        self.assertEqual(self.events, [WorkerForked(1, driver.pid)])
        (address,) = driver.boot([LOCAL])
        self.pump()
        handle = self.handle()
        self.assertEqual(address, ("127.0.0.1", handle.port))
        self.assertNotEqual(handle.port, 0)
        description = f"tcp:127.0.0.1:{handle.port}"
        self.assertEqual(
            self.events,
            [
                WorkerForked(1, driver.pid),
                WorkerOnline(1, driver.pid),
                WorkerListening(1, driver.pid, description, "127.0.0.1", handle.port),
                WorkerReady(1, driver.pid),
            ],
        )
        worker = self.worker(1)
        self.assertEqual((worker.pid, worker.state, worker.listens), (driver.pid, "ready", (description,)))
        (listener,) = cluster.statistics().listeners
        self.assertEqual((listener.address, listener.workers, listener.accepted), (description, 1, 0))
        self.assertLogged(f"worker 1 (pid {driver.pid}) ready in 0.00 s, listening on {description}")

    def test_bootWithoutListens(self) -> None:
        """
        A worker that listens on nothing is ready, listening on nothing.
        """
        self.makeCluster(1)
        (driver,) = self.drivers()
        self.assertEqual(driver.boot(), [])
        self.pump()
        self.assertEqual((self.worker(1).state, self.worker(1).listens), ("ready", ()))
        self.assertEqual(self.eventsOf(WorkerListening), [])
        self.assertLogged(f"worker 1 (pid {driver.pid}) ready in 0.00 s, listening on nothing")

    def test_workersShareAHandle(self) -> None:
        """
        Every worker listening on the same address shares one socket of the
        master's: one address, one handle, every worker a member.
        """
        cluster = self.readyCluster(3, [LOCAL])
        self.assertEqual(len({e.port for e in self.eventsOf(WorkerListening)}), 1)
        (listener,) = cluster.statistics().listeners
        self.assertEqual(listener.workers, 3)

    def test_twoListensOnOneAddress(self) -> None:
        """
        An application that listens twice on the same address (port 0) gets
        two sockets; every worker's second listen shares the second one.
        """
        cluster = self.makeCluster(2)
        addresses = []
        for driver in self.drivers():
            addresses.append(driver.boot([LOCAL, LOCAL]))
            self.pump()
        self.assertEqual(addresses[0], addresses[1])
        self.assertEqual(len(set(addresses[0])), 2)
        listeners = cluster.statistics().listeners
        self.assertEqual(
            sorted((listener.address, listener.workers) for listener in listeners),
            sorted((f"tcp:{host}:{port}", 2) for host, port in addresses[0]),
        )
        self.assertEqual(len(self.worker(1).listens), 2)
        self.assertEqual(self.worker(1).listens, self.worker(2).listens)

    # Connections ------------------------------------------------------------

    def test_connectionHandedToTheWorker(self) -> None:
        """
        A connection the master accepted is the worker's: it took it (the
        master counts it handed, and accepted on the handle, nothing in
        flight or waiting), and what the client writes is read by the
        worker.
        """
        cluster = self.readyCluster(1, [LOCAL])
        driver = self.driver(1)
        (client,) = self.connect()
        self.assertEqual(driver.connectionsTaken(), 1)
        client.sendall(b"hello")
        self.assertEqual(driver.readConnections(), [b"hello"])
        stats = cluster.statistics()
        self.assertEqual(stats.workers[0].handed, 1)
        (listener,) = stats.listeners
        self.assertEqual(listener.accepted, 1)
        member = self.members()[1]
        self.assertEqual((member.handed, member.inFlight, member.taking), (1, 0, True))
        self.assertEqual((stats.pending, stats.dropped), (0, 0))

    def test_roundRobin(self) -> None:
        """
        Connections go to the workers in turn; each worker reads what its
        clients wrote.
        """
        cluster = self.readyCluster(2, [LOCAL])
        clients = []
        for _ in range(4):
            clients += self.connect()
        first, second = self.driver(1), self.driver(2)
        self.assertEqual((first.connectionsTaken(), second.connectionsTaken()), (2, 2))
        for n, client in enumerate(clients):
            client.sendall(b"%d" % n)
        self.assertEqual(first.readConnections(), [b"0", b"2"])
        self.assertEqual(second.readConnections(), [b"1", b"3"])
        self.assertEqual([w.handed for w in cluster.statistics().workers], [2, 2])

    def test_refusedHandoffGoesToAnotherWorker(self) -> None:
        """
        A connection handed to a worker that stopped listening before it
        read the handoff is refused, and the master gives it to another
        worker; the worker that stopped is no longer a member of the handle.
        """
        cluster = self.readyCluster(2, [LOCAL])
        first, second = self.driver(1), self.driver(2)
        listenId = self.handle().listenId
        (client,) = self.connect(deliver=False)
        self.assertEqual(self.members()[1].inFlight, 1)
        first.stopListening(listenId)
        self.pump()
        self.assertEqual((first.connectionsTaken(), second.connectionsTaken()), (0, 1))
        client.sendall(b"moved")
        self.assertEqual(second.readConnections(), [b"moved"])
        self.assertEqual([w.handed for w in cluster.statistics().workers], [0, 1])
        self.assertEqual(self.worker(1).listens, ())
        self.assertEqual(list(self.members()), [2])
        self.assertEqual(cluster.statistics().dropped, 0)

    def test_stopListening(self) -> None:
        """
        A worker that stops listening tells the master, which closes the
        socket once no worker listens on it.
        """
        self.readyCluster(1, [LOCAL])
        handle = self.handle()
        self.driver(1).stopListening(handle.listenId)
        self.pump()
        self.assertEqual(self.worker(1).listens, ())
        self.assertIsNone(handle.sock)
        self.assertEqual(self.cluster._table.handles(), [])
        self.assertLogged(f"worker 1 (pid {self.driver(1).pid}) stopped listening on {handle.describe()}")

    def test_closedListenFreesItsIndex(self) -> None:
        """
        A listen the worker closed frees its place: its next listen on the
        same address is the first again, sharing the socket the other
        workers' first listen is on.
        """
        cluster = self.makeCluster(2)
        first, second = self.drivers()
        first.boot([LOCAL, LOCAL])
        addresses = second.boot([LOCAL, LOCAL])
        self.pump()
        (listenId,) = [h.listenId for h in cluster._table.handles() if (h.host, h.port) == addresses[0]]
        first.stopListening(listenId)
        self.pump()
        self.assertEqual(len(self.worker(1).listens), 1)
        self.assertEqual(first.listen(LOCAL), addresses[0])
        self.pump()
        self.assertEqual(self.worker(1).listens, self.worker(2).listens)
        self.assertEqual([listener.workers for listener in cluster.statistics().listeners], [2, 2])

    def test_workerDiesWithAHandoffUnread(self) -> None:
        """
        A connection handed to a worker that dies before it read the handoff
        goes to another worker.
        """
        cluster = self.readyCluster(2, [LOCAL])
        first, second = self.driver(1), self.driver(2)
        first.block()
        (client,) = self.connect()
        self.assertEqual(self.members()[1].inFlight, 1)
        first.exit(1)
        self.pump()
        self.assertEqual(second.connectionsTaken(), 1)
        client.sendall(b"still here")
        self.assertEqual(second.readConnections(), [b"still here"])
        self.assertEqual(cluster.statistics().dropped, 0)

    def test_leastBusyLoad(self) -> None:
        """
        Under least-busy scheduling the master's estimate of a worker's load
        follows the connections it holds: each handoff's answer says how many
        it had, and when it closes some it reports its load within
        C{LOAD_REPORT_INTERVAL}.
        """
        self.readyCluster(1, [LOCAL], scheduling="least-busy")
        driver = self.driver(1)
        self.connect(2)
        self.assertEqual(driver.connectionsTaken(), 2)
        self.assertEqual(self.members()[1].estimate, 2)
        driver.closeConnections()
        self.pump()
        self.assertEqual(driver.connectionsTaken(), 0)
        # Before any report: the next handoff's answer has the load.
        self.connect()
        self.assertEqual(self.members()[1].estimate, 1)
        driver.closeConnections()
        self.pump()
        self.assertEqual(self.members()[1].estimate, 1)
        self.advance(LOAD_REPORT_INTERVAL)
        self.assertEqual(self.members()[1].estimate, 0)

    def test_roundRobinLoad(self) -> None:
        """
        Under round-robin scheduling a worker does not report the
        connections it closes: only its handoffs' answers carry its load.
        """
        self.readyCluster(1, [LOCAL])
        driver = self.driver(1)
        self.connect(2)
        driver.closeConnections()
        self.pump()
        self.advance(1)
        self.assertEqual(self.members()[1].estimate, 2)
        self.connect()
        self.assertEqual(self.members()[1].estimate, 1)

    # Messages -----------------------------------------------------------------

    def test_sendMessage(self) -> None:
        """
        C{sendMessage} reaches the one worker, decoded; its Deferred fires
        with L{None} once the worker has it.
        """
        cluster = self.readyCluster(2)
        d = cluster.sendMessage(2, {"cmd": "hello", "n": [1, 2]})
        self.pump()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.driver(2).receivedMessages(), [{"cmd": "hello", "n": [1, 2]}])
        self.assertEqual(self.driver(1).receivedMessages(), [])

    def test_broadcast(self) -> None:
        """
        C{broadcast} reaches every worker.
        """
        cluster = self.readyCluster(3)
        d = cluster.broadcast(["all", 3])
        self.pump()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual([driver.receivedMessages() for driver in self.drivers()], [[["all", 3]]] * 3)

    def test_sendToMaster(self) -> None:
        """
        A worker's message reaches the master as a L{WorkerMessage} with the
        worker's id and pid; the worker's Deferred fires with L{None}.
        """
        self.readyCluster(2)
        driver = self.driver(2)
        d = driver.sendToMaster({"load": 0.5})
        self.pump()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.eventsOf(WorkerMessage), [WorkerMessage(2, driver.pid, {"load": 0.5})])

    def test_sendToMasterTooLarge(self) -> None:
        """
        A message over 64 KiB of JSON is refused by the worker with
        L{MessageTooLarge}; the master hears nothing.
        """
        self.readyCluster(1)
        self.assertRaises(MessageTooLarge, self.driver(1).sendToMaster, "x" * 70000)
        self.assertRaises(TypeError, self.driver(1).sendToMaster, object())
        self.pump()
        self.assertEqual(self.eventsOf(WorkerMessage), [])

    # Scaling, pings, leaving ------------------------------------------------------

    def test_scaleUp(self) -> None:
        """
        After C{scale()}, every worker reports the new count; the new worker
        was spawned with it.
        """
        cluster = self.readyCluster(2, [LOCAL])
        d = cluster.scale(3)
        self.pump()
        self.assertEqual([driver.workerCount() for driver in self.drivers()], [3, 3, 3])
        self.assertNoResult(d)
        self.driver(3).boot([LOCAL])
        self.pump()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual([w.state for w in cluster.statistics().workers], ["ready"] * 3)

    def test_scaleDown(self) -> None:
        """
        A worker scaled away is asked to leave: it stops listening (the
        master sees it close its listens) and takes no more connections;
        the others are told the new count; its exit ends the scaling.
        """
        cluster = self.readyCluster(2, [LOCAL])
        staying, leaving = self.driver(1), self.driver(2)
        handle = self.handle()
        d = cluster.scale(1)
        self.pump()
        self.assertTrue(leaving.leaveRequested())
        self.assertTrue(leaving.disconnecting())
        self.assertFalse(staying.leaveRequested())
        self.assertEqual(staying.workerCount(), 1)
        self.assertEqual(self.eventsOf(WorkerDisconnected), [WorkerDisconnected(2, leaving.pid, "scale")])
        self.assertEqual((self.worker(2).state, self.worker(2).listens), ("draining", ()))
        self.assertLogged(f"worker 2 (pid {leaving.pid}) stopped listening on {handle.describe()}")
        self.assertEqual(handle.members, {self.process(1)})
        self.connect(2)
        self.assertEqual((staying.connectionsTaken(), leaving.connectionsTaken()), (2, 0))
        self.assertNoResult(d)
        leaving.exit(0)
        self.pump()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.eventsOf(WorkerExited), [WorkerExited(2, leaving.pid, 0, None, True)])

    def test_stop(self) -> None:
        """
        C{stopService} asks every worker to leave with the graceful timeout;
        each stops listening; the Deferred fires once they have exited.
        """
        cluster = self.readyCluster(2, [LOCAL], gracefulTimeout=7)
        d = cluster.stopService()
        self.pump()
        for driver in self.drivers():
            self.assertTrue(driver.leaveRequested())
            self.assertTrue(driver.disconnecting())
            self.assertEqual(self.worker(driver.workerId).listens, ())
        self.assertEqual({e.reason for e in self.eventsOf(WorkerDisconnected)}, {"stop"})
        self.assertLogged("disconnecting (stop): it has 7 s to finish")
        self.assertNoResult(d)
        for driver in self.drivers():
            driver.exit(0)
        self.pump()
        self.assertIsNone(self.successResultOf(d))

    def test_leaveOnItsOwn(self) -> None:
        """
        A worker whose application leaves tells the master why, and stops
        listening; the master replaces it, not counting its exit as a
        failure.
        """
        cluster = self.readyCluster(2, [LOCAL], stableAfter=0)
        old = self.driver(1)
        old.leave()
        self.pump()
        self.assertTrue(old.disconnecting())
        self.assertFalse(old.leaveRequested())
        self.assertEqual(self.eventsOf(WorkerDisconnected), [WorkerDisconnected(1, old.pid, "disconnect()")])
        self.assertEqual((self.statisticsOf(old).state, self.statisticsOf(old).listens), ("leaving", ()))
        new = self.driver(1)
        self.assertNotEqual(new.pid, old.pid)
        self.assertEqual(self.worker(1).state, "starting")
        self.connect(2)
        self.assertEqual((old.connectionsTaken(), self.driver(2).connectionsTaken()), (0, 2))
        old.exit(0)
        self.pump()
        self.assertEqual(self.eventsOf(WorkerExited), [WorkerExited(1, old.pid, 0, None, True)])
        self.assertEqual(cluster.statistics().failures, 0)

    def test_ping(self) -> None:
        """
        A L{Ping} is answered with how many connections the worker has
        open.
        """
        self.readyCluster(1)
        d = self.process(1).channel.callRemote(Ping)
        self.pump()
        self.assertEqual(self.successResultOf(d), {"connections": 0})

    def test_collectMetrics(self) -> None:
        """
        L{CollectMetrics} is answered with the application's metrics as
        text (the fake's C{metrics}; the real worker's default
        prometheus_client registry, which this test process has).
        """
        self.readyCluster(1)
        d = self.process(1).channel.callRemote(CollectMetrics)
        self.pump()
        self.assertIsInstance(self.successResultOf(d)["metrics"], str)

    def test_heartbeat(self) -> None:
        """
        A worker answers the master's heartbeat: it is left alone; once its
        reactor blocks, it is sent C{SIGUSR1} (for its stack) after the
        timeout, then killed.
        """
        self.readyCluster(1, workerTimeout=3)
        driver = self.driver(1)
        self.advance(10)
        self.assertEqual(driver.process.signals, [])
        driver.block()
        self.advance(4)
        self.assertEqual(driver.process.signalNumbers(), [signal.SIGUSR1])
        self.advance(1)
        self.assertEqual(driver.process.signalNumbers(), [signal.SIGUSR1, signal.SIGKILL])

    def test_masterDropsTheChannel(self) -> None:
        """
        A worker whose channel the master closes sees its master gone and
        leaves; it can no longer send to the master.
        """
        self.readyCluster(1, [LOCAL])
        driver = self.driver(1)
        self.process(1).channel.drop("the test dropped it")
        self.pump()
        self.assertTrue(driver.masterGone())
        self.assertTrue(driver.disconnecting())
        self.failureResultOf(driver.sendToMaster("anyone?"), MasterUnavailable)


class FakeWorkerContractTests(ContractTestsMixin, SynchronousTestCase):
    """
    The contract, for L{txcluster.testing.FakeWorker}.
    """

    def setUpWorkers(self) -> None:
        self.spawner = FakeSpawner()
        self.addCleanup(self.spawner.closeDescriptors)

    def drivers(self) -> list:
        return [FakeWorkerDriver(worker) for worker in self.spawner.workers]

    def runWorkers(self) -> bool:
        moved = False
        for worker in list(self.spawner.workers):
            if worker.channel.flush():
                moved = True
        return moved

    def advanceWorkers(self, seconds: float) -> None:
        # A FakeWorker's reactor is the master's.
        pass


class RealWorkerContractTests(ContractTestsMixin, SynchronousTestCase):
    """
    The contract, for the real worker: L{Worker} and L{WorkerChannel}.
    """

    def setUpWorkers(self) -> None:
        self.exits: list = []
        # A real worker whose master is gone makes sure its process exits.
        self.patch(_worker, "exitSoon", lambda seconds, code=1: self.exits.append((seconds, code)))
        self.spawner = RealWorkerSpawner(self.runMaster)
        self.addCleanup(self.spawner.closeEverything)

    def drivers(self) -> list:
        return list(self.spawner.drivers)

    def runWorkers(self) -> bool:
        moved = False
        for driver in self.spawner.drivers:
            if driver.running and runOnce(driver.reactor):
                moved = True
        return moved

    def advanceWorkers(self, seconds: float) -> None:
        for driver in self.spawner.drivers:
            if driver.running:
                driver.reactor.advance(seconds)


class FakeWorkerTests(SynchronousTestCase):
    """
    What the contract cannot show of a L{FakeWorker}: the parts of its
    behaviour a test controls.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.spawner = FakeSpawner()
        self.addCleanup(self.spawner.closeDescriptors)
        self.cluster = ClusterService(
            ClusterConfig(app="app.tac", workers=1, workerTimeout=0),
            reactor=self.reactor,
            spawner=self.spawner,
            onGiveUp=lambda code: None,
        )
        self.cluster.startService()
        self.addCleanup(lambda: self.cluster._table.closeAll())
        (self.worker,) = self.spawner.workers
        self.worker.start([LOCAL])

    def test_heldDisconnect(self) -> None:
        """
        A L{Disconnect} the test holds makes the worker leave once the test
        answers it, on the reactor's next turn.
        """
        self.worker.holding.add(Disconnect)
        self.cluster.stopService()
        self.spawner.flush()
        (disconnect,) = self.worker.unanswered(Disconnect)
        self.reactor.advance(0)
        self.assertFalse(self.worker.disconnecting)
        disconnect.answer()
        self.assertFalse(self.worker.disconnecting)
        self.reactor.advance(0)
        self.assertTrue(self.worker.disconnecting)
        self.assertEqual(self.worker.listens, set())

    def test_exitCancelsWhatItScheduled(self) -> None:
        """
        What the worker was to do on its reactor's next turn dies with its
        process.
        """
        self.cluster.stopService()
        mastersOwn = set(self.reactor.getDelayedCalls())
        self.spawner.flush()
        (leaving,) = set(self.reactor.getDelayedCalls()) - mastersOwn
        self.worker.exit(0)
        self.assertFalse(leaving.active())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_refusedListeningIsNotAListen(self) -> None:
        """
        A L{Listening} the master refuses (not the worker's listen) does
        not make it one of the worker's listens.
        """
        (listenId,) = self.worker.listens
        self.failureResultOf(self.worker.listening(listenId + 1), UnknownListen)
        self.assertEqual(self.worker.listens, {listenId})


class HarnessTests(SynchronousTestCase):
    """
    The pieces the contract tests are made of.
    """

    def test_workerReactorInterfaces(self) -> None:
        """
        L{WorkerReactor} provides what a worker uses of its reactor.
        """
        reactor = WorkerReactor(lambda: None)
        self.assertTrue(verifyObject(IReactorSocket, reactor))
        self.assertTrue(verifyObject(IReactorFDSet, reactor))
        self.assertTrue(verifyObject(IReactorTime, reactor))

    def test_spawnerSignature(self) -> None:
        """
        L{RealWorkerSpawner} takes the arguments L{spawnWorker} takes.
        """
        real = inspect.signature(spawnWorker)
        ours = inspect.signature(RealWorkerSpawner(lambda: None).__call__)
        self.assertEqual(list(ours.parameters), list(real.parameters))

    def test_runOnceDisconnects(self) -> None:
        """
        L{runOnce} reads what is readable, and disconnects a connection
        whose peer closed, as a reactor does.
        """
        reactor = MemoryReactorClock()
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        lost = []

        class Recorder(Protocol):
            received = b""

            def dataReceived(self, data):
                self.received += data

            def connectionLost(self, reason):
                lost.append(reason)

        protocol = Recorder()
        transport = unix.Server._fromConnectedSocket(ours.fileno(), Factory.forProtocol(lambda: protocol), reactor)
        ours.close()
        self.addCleanup(transport.socket.close)
        self.assertFalse(runOnce(reactor))
        theirs.sendall(b"data")
        self.assertTrue(runOnce(reactor))
        self.assertEqual(protocol.received, b"data")
        theirs.close()
        self.assertTrue(runOnce(reactor))
        self.assertEqual(len(lost), 1)
        lost[0].trap(ConnectionDone)
        self.assertEqual(reactor.getReaders(), [])
