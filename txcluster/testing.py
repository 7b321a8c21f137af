# -*- test-case-name: tests.test_master -*-
"""
Fakes for testing a L{txcluster.ClusterService} without processes, sockets
or time: a spawner that records its workers instead of starting them, the
fake processes it returns, and an in-memory AMP channel (with file
descriptor passing) through which a test plays the worker's side.

Use them with L{twisted.internet.testing.MemoryReactorClock}, which provides
everything the master asks of its reactor (C{callLater}, C{seconds},
C{addReader} and C{removeReader}); nothing here asks for the global
reactor::

    from twisted.internet.testing import MemoryReactorClock
    from txcluster import ClusterConfig, ClusterService
    from txcluster.testing import FakeSpawner

    reactor = MemoryReactorClock()
    spawner = FakeSpawner()
    cluster = ClusterService(
        ClusterConfig(app="app.tac", workers=2),
        reactor=reactor,
        spawner=spawner,
        onGiveUp=lambda code: None,
    )
    cluster.startService()
    for worker in spawner.running():
        worker.start()          # Online, then Ready
    ...
    worker.exit(1)              # the channel closes, the process ends
    reactor.advance(1.0)        # the master respawns it

Nothing moves on a L{FakeChannel} until it is flushed: the helpers of
L{FakeWorker} that send something flush at once, and
L{FakeSpawner.flush} delivers whatever the master sent on its own (a
heartbeat from C{reactor.advance}, say).

Where the master can tell, a L{FakeWorker} behaves as the real worker
(L{txcluster._worker.Worker}); C{tests/test_contract.py} holds the two to
one contract.  A listen is its own from the L{Listening} it sends to the
L{Close} it sends (C{FakeWorker.listens}); a L{NewConn} for any other is
refused, and every L{NewConn} answer says how many connections it held
before.  It leaves when the master says L{Disconnect} (on its reactor's
next turn, once it answered), when its application does
(L{FakeWorker.disconnect}) and when its channel is lost: it closes every
listen and refuses every connection from then on
(C{FakeWorker.disconnecting}).  Its process does not end by itself:
L{FakeWorker.exit} or L{FakeWorker.kill} it.
"""

from __future__ import annotations

import json
import os
import signal as signalModule
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.address import UNIXAddress
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
)
from twisted.internet.interfaces import IProcessTransport, IUNIXTransport
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from txcluster._commands import (
    LOAD_REPORT_INTERVAL,
    AgentBroadcast,
    AgentFailed,
    AgentRequest,
    AgentSend,
    AgentWorkers,
    AskAgent,
    Close,
    CollectMetrics,
    Disconnect,
    Leaving,
    Listening,
    LoadReport,
    NewConn,
    Online,
    Ping,
    QueryServer,
    Ready,
    ToMaster,
    ToWorker,
    WorkerCount,
)
from txcluster._twistedcompat import makeConnectionQuietly
from txcluster._worker import MasterUnavailable, encodeMessage

__all__ = [
    "FakeChannel",
    "FakeProcess",
    "FakeSpawner",
    "FakeUNIXTransport",
    "FakeWorker",
    "ReceivedCommand",
]

_log = Logger(namespace="txcluster.testing")

# The names Twisted's Process.signalProcess translates; anything else must
# be a number, as os.kill wants.
_SIGNAL_NAMES = ("HUP", "STOP", "INT", "KILL", "TERM")


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


@implementer(IUNIXTransport)
class FakeUNIXTransport:
    """
    One end of a L{FakeChannel}: what a protocol writes, and the file
    descriptors it sends, wait in the channel until it is flushed.

    @ivar disconnecting: L{True} once C{loseConnection} was called.
    @ivar connected: L{True} until the connection is lost.
    """

    def __init__(self, channel: "FakeChannel", side: int, host, peer) -> None:
        self._channel = channel
        self._side = side
        self._host = host
        self._peer = peer
        self.disconnecting = False
        self.connected = True

    def write(self, data: bytes) -> None:
        """
        Queue C{data} for the other end.
        """
        if self.connected and not self.disconnecting and data:
            self._channel._queue(self._side, ("data", bytes(data)))

    def writeSequence(self, seq) -> None:
        """
        Queue the concatenation of C{seq} for the other end.
        """
        self.write(b"".join(seq))

    def sendFileDescriptor(self, descriptor: int) -> None:
        """
        Queue C{descriptor}: the other end receives a duplicate of it, made
        when the channel delivers it (as C{sendmsg} would when the transport
        writes), before the bytes written after this call.
        """
        if self.connected and not self.disconnecting:
            self._channel._queue(self._side, ("fd", descriptor))

    def loseConnection(self) -> None:
        """
        Close the connection once what was written is delivered.
        """
        if self.connected and not self.disconnecting:
            self.disconnecting = True
            self._channel._queue(self._side, ("close", None))

    def abortConnection(self) -> None:
        """
        Close the connection at once, dropping what was not delivered.
        """
        self._channel.sever(ConnectionLost("aborted"), ConnectionLost("aborted"))

    def getHost(self) -> UNIXAddress:
        return self._host

    def getPeer(self) -> UNIXAddress:
        return self._peer


class FakeChannel:
    """
    An in-memory stream connection between two protocols whose transports
    provide L{IUNIXTransport}, so that L{amp.Descriptor} arguments work.

    Written bytes and sent descriptors wait, in order, until L{flush}
    delivers them.  A descriptor is delivered as a fresh C{os.dup()} of the
    sender's descriptor (the receiver owns it and must close it); the
    sender keeps its own.

    An exception raised by a protocol's C{dataReceived} is handled as a
    reactor would: it is logged and the connection is lost with it as the
    reason.

    @ivar server: the protocol on side 0 (the master's end of a worker's
        channel).
    @ivar client: the protocol on side 1 (the worker's end).
    @ivar lost: L{True} once both ends were told the connection is gone.
    """

    def __init__(self, server, client) -> None:
        self.server = server
        self.client = client
        self.serverTransport = FakeUNIXTransport(self, 0, UNIXAddress(None), UNIXAddress(None))
        self.clientTransport = FakeUNIXTransport(self, 1, UNIXAddress(None), UNIXAddress(None))
        self._queues: tuple[list, list] = ([], [])
        self._paused = [False, False]
        self._flushing = False
        self.lost = False

    def connect(self) -> "FakeChannel":
        """
        Connect both protocols to their transports.

        @return: this channel.
        """
        self.server.makeConnection(self.serverTransport)
        self.client.makeConnection(self.clientTransport)
        return self

    def pauseDelivery(self, side: int) -> None:
        """
        Deliver nothing more to C{side} (0: server, 1: client) until
        L{resumeDelivery}: as if its reactor were blocked.
        """
        self._paused[side] = True

    def resumeDelivery(self, side: int) -> None:
        """
        Deliver to C{side} again, and flush.
        """
        self._paused[side] = False
        self.flush()

    def pending(self, side: int) -> int:
        """
        How many writes, descriptors and closes C{side} queued that were not
        delivered yet.
        """
        return len(self._queues[side])

    def takeData(self, side: int) -> bytes:
        """
        Remove the bytes C{side} wrote that were not delivered yet and return
        them, for a test that plays the other end by hand (raw bytes in
        through the protocol's C{dataReceived}, what it answered read from
        here).  Queued descriptors and a queued close stay.
        """
        queue = self._queues[side]
        data = b"".join(value for kind, value in queue if kind == "data")
        queue[:] = [item for item in queue if item[0] != "data"]
        return data

    def flush(self) -> bool:
        """
        Deliver everything that can be delivered, including what the
        protocols write while receiving, until nothing moves.

        @return: whether anything was delivered.
        """
        if self._flushing:
            return False
        self._flushing = True
        moved = False
        try:
            progress = True
            while progress and not self.lost:
                progress = False
                for side in (0, 1):
                    target = 1 - side
                    queue = self._queues[side]
                    if queue and not self._paused[target] and not self.lost:
                        item = queue.pop(0)
                        progress = moved = True
                        self._deliver(side, target, item)
        finally:
            self._flushing = False
        return moved

    def sever(self, serverReason=None, clientReason=None) -> None:
        """
        Lose the connection at once: undelivered data and descriptors are
        dropped, and both protocols get C{connectionLost}.

        @param serverReason: the exception the server's C{connectionLost}
            gets (default L{ConnectionDone}).
        @param clientReason: likewise for the client.
        """
        if self.lost:
            return
        self.lost = True
        for queue in self._queues:
            queue.clear()
        for transport, protocol, reason in (
            (self.serverTransport, self.server, serverReason),
            (self.clientTransport, self.client, clientReason),
        ):
            transport.connected = False
            protocol.connectionLost(Failure(reason if reason is not None else ConnectionDone()))

    def _queue(self, side: int, item: tuple) -> None:
        if not self.lost:
            self._queues[side].append(item)

    def _deliver(self, side: int, target: int, item: tuple) -> None:
        kind, value = item
        protocol = self.client if target == 1 else self.server
        if kind == "close":
            self.sever()
            return
        try:
            if kind == "fd":
                protocol.fileDescriptorReceived(os.dup(value))
            else:
                protocol.dataReceived(value)
        except BaseException as e:
            _log.failure("Unhandled Error Processing Data")
            reason = Failure(e)
            if target == 0:
                self.sever(reason, ConnectionLost("the peer dropped the connection"))
            else:
                self.sever(ConnectionLost("the peer dropped the connection"), reason)


@implementer(IProcessTransport)
class FakeProcess:
    """
    A process that never ran, as L{FakeSpawner} returns it.

    @ivar pid: its pid, L{None} once it ended (as a real process transport).
    @ivar signals: every signal sent to it, as given to C{signalProcess}.
    @ivar ended: L{True} once it ended.
    @ivar stdinClosed: whether C{closeStdin} was called.
    """

    def __init__(self, processProtocol, pid: int) -> None:
        self.processProtocol = processProtocol
        self.pid: Optional[int] = pid
        self.signals: list = []
        self.ended = False
        self.stdinClosed = False
        self.closedChildFDs: list = []
        self.written: list = []

    def signalProcess(self, signalID) -> None:
        """
        Record C{signalID}, as Twisted's process transport would send it:
        a number, or one of the names C{HUP STOP INT KILL TERM}.

        @raise ProcessExitedAlready: the process has ended.
        @raise TypeError: any other name (C{os.kill} wants a number).
        """
        if isinstance(signalID, str) and signalID not in _SIGNAL_NAMES:
            raise TypeError(f"signalProcess only knows {_SIGNAL_NAMES} by name, not {signalID!r}")
        if self.pid is None:
            raise ProcessExitedAlready()
        self.signals.append(signalID)

    def signalNumbers(self) -> list:
        """
        The signals sent, as numbers.
        """
        return [
            getattr(signalModule, f"SIG{s}") if isinstance(s, str) else s for s in self.signals
        ]

    def end(self, exitCode: Optional[int] = 0, signal: Optional[int] = None) -> None:
        """
        The process ends: exit code C{exitCode}, or killed by C{signal}.
        Its protocol's C{processEnded} gets L{ProcessDone} for exit code 0,
        L{ProcessTerminated} otherwise.
        """
        if self.ended:
            raise ProcessExitedAlready()
        self.ended = True
        self.pid = None
        if signal is not None:
            reason = ProcessTerminated(exitCode=None, signal=int(signal), status=int(signal))
        elif exitCode == 0:
            reason = ProcessDone(0)
        elif exitCode is None:
            raise ValueError("a process ends with an exit code or a signal")
        else:
            reason = ProcessTerminated(exitCode=exitCode, status=exitCode << 8)
        self.processProtocol.processEnded(Failure(reason))

    def output(self, childFD: int, data: bytes) -> None:
        """
        The process writes C{data} on C{childFD} (1: stdout, 2: stderr).
        """
        self.processProtocol.childDataReceived(childFD, data)

    # IProcessTransport

    def closeStdin(self) -> None:
        self.stdinClosed = True

    def closeStdout(self) -> None:
        self.closedChildFDs.append(1)

    def closeStderr(self) -> None:
        self.closedChildFDs.append(2)

    def closeChildFD(self, descriptor: int) -> None:
        self.closedChildFDs.append(descriptor)

    def writeToChild(self, childFD: int, data: bytes) -> None:
        self.written.append((childFD, data))

    def write(self, data: bytes) -> None:
        self.written.append((0, data))

    def writeSequence(self, seq) -> None:
        self.write(b"".join(seq))

    def loseConnection(self) -> None:
        self.closeStdin()

    def getPeer(self):
        return None

    def getHost(self):
        return None


class ReceivedCommand:
    """
    A command the master sent to a L{FakeWorker}.

    @ivar command: the L{amp.Command} class.
    @ivar arguments: its parsed arguments (for L{NewConn}, C{fds} are the
        worker's copies of the descriptors).
    @ivar answered: whether it was answered.
    """

    def __init__(self, worker: "FakeWorker", command, arguments: dict) -> None:
        self._worker = worker
        self.command = command
        self.arguments = arguments
        self.answered = False
        self._deferred: Optional[defer.Deferred] = None

    def answer(self, **response) -> None:
        """
        Answer with C{response}.  For L{NewConn} use L{takeConnections}.
        """
        if self.answered:
            raise RuntimeError(f"{self.command.__name__} was answered already")
        self.answered = True
        if self._deferred is not None:
            self._deferred.callback(response)
            self._worker.flush()
        if self.command is Disconnect:
            self._worker._callLater(0, self._worker._leave)

    def fail(self, exception: Exception) -> None:
        """
        Answer with an error.  As with any AMP responder, an exception the
        command does not declare (nor an L{amp.RemoteAmpError}) is logged
        by AMP and answered as an unknown error, after which AMP closes the
        channel.
        """
        if self.answered:
            raise RuntimeError(f"{self.command.__name__} was answered already")
        self.answered = True
        if self._deferred is not None:
            self._deferred.errback(exception)
            self._worker.flush()

    def takeConnections(self, count: Optional[int] = None, connections: Optional[int] = None) -> None:
        """
        Answer a L{NewConn}: the worker takes the first C{count} descriptors
        (all by default; they join L{FakeWorker.connections}) and refuses
        (closes) the rest.  C{connections}, when given, is the load the
        answer reports (open connections before these).
        """
        fds = self.arguments["fds"]
        count = len(fds) if count is None else count
        self._worker._takeConnections(fds, count)
        if connections is None:
            self.answer(accepted=count)
        else:
            self.answer(accepted=count, connections=connections)

    def __repr__(self) -> str:
        return f"<ReceivedCommand {self.command.__name__} {self.arguments!r}>"


class _WorkerPeer(amp.AMP):
    """
    The worker's end of a fake channel: records what the master sends and
    answers as its L{FakeWorker} says.
    """

    def __init__(self, worker: "FakeWorker") -> None:
        super().__init__()
        self._worker = worker

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self._worker._owned.add(descriptor)
        super().fileDescriptorReceived(descriptor)

    def makeConnection(self, transport) -> None:
        makeConnectionQuietly(self, transport)

    def connectionLost(self, reason) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self._worker._channelLost(reason)

    @NewConn.responder
    def newConn(self, listenId: int, fds: list):
        return self._worker._received(NewConn, {"listenId": listenId, "fds": fds})

    @Disconnect.responder
    def disconnect(self, timeout: float):
        return self._worker._received(Disconnect, {"timeout": timeout})

    @Ping.responder
    def ping(self):
        return self._worker._received(Ping, {})

    @ToWorker.responder
    def toWorker(self, message: str):
        return self._worker._received(ToWorker, {"message": message})

    @WorkerCount.responder
    def workerCount(self, count: int):
        return self._worker._received(WorkerCount, {"count": count})

    @CollectMetrics.responder
    def collectMetrics(self):
        return self._worker._received(CollectMetrics, {})

    @AgentRequest.responder
    def agentRequest(self, workerId: int, message: str):
        return self._worker._received(AgentRequest, {"workerId": workerId, "message": message})

    @AgentWorkers.responder
    def agentWorkers(self, workerIds: list):
        return self._worker._received(AgentWorkers, {"workerIds": workerIds})


class _FakeMessages:
    """
    L{FakeWorker}'s messages to the master and the agent, as the real
    worker (and agent) sends them.
    """

    def sendToMaster(self, message: Any) -> defer.Deferred:
        """
        Send C{message} as JSON in L{ToMaster}, as the real worker's
        C{sendToMaster}: the Deferred fires with L{None}, or fails with
        L{MasterUnavailable} once the channel is closed.

        @raise txcluster._commands.MessageTooLarge: it is over 65535 bytes
            of JSON.
        @raise TypeError: it is not JSON-serialisable.
        """
        text = encodeMessage(message)
        if self.channel.lost:
            return defer.fail(MasterUnavailable("the channel to the master is closed"))
        return self.callRemote(ToMaster, message=text).addCallback(lambda _: None)

    def askAgent(self, message: Any) -> defer.Deferred:
        """
        As the real worker's C{askAgent}: L{AskAgent}; the Deferred fires
        with the agent's decoded answer.
        """
        text = encodeMessage(message)
        if self.channel.lost:
            return defer.fail(MasterUnavailable("the channel to the master is closed"))
        return self.callRemote(AskAgent, message=text).addCallback(lambda answer: json.loads(answer["answer"]))

    def agentBroadcast(self, message: Any) -> defer.Deferred:
        """
        As the real agent's C{broadcast}: L{AgentBroadcast}.
        """
        return self.callRemote(AgentBroadcast, message=encodeMessage(message)).addCallback(lambda _: None)

    def agentSend(self, workerId: int, message: Any) -> defer.Deferred:
        """
        As the real agent's C{sendToWorker}: L{AgentSend}.
        """
        return self.callRemote(AgentSend, workerId=workerId, message=encodeMessage(message)).addCallback(lambda _: None)


class FakeWorker(_FakeMessages):
    """
    One worker as L{FakeSpawner} started it: its process, its channel, and
    helpers to play its side of the protocol.

    By default every command from the master is answered at once, as a
    healthy worker would: L{NewConn} connections are taken (see
    C{takingConnections}), L{ToWorker} messages are decoded into
    C{messages}, L{WorkerCount} updates C{workerCount}.  Put a command class
    in C{holding} to answer it yourself through its L{ReceivedCommand};
    call L{block} to stop the worker's "reactor" from reading at all.  It
    listens and leaves as a real worker does (see the module docstring).

    @ivar workerId: the worker id it was spawned with.
    @ivar workerCount: the worker count it was spawned with (or last told).
    @ivar appPath: the application path it was given.
    @ivar env: the environment it was given.
    @ivar uid: the user it was to run as (L{None}: the master's).
    @ivar gid: the group it was to run as (L{None}: the master's).
    @ivar board: the load board's descriptor it was given (L{None}: none).
    @ivar pid: its pid (kept after it ended).
    @ivar process: its L{FakeProcess}.
    @ivar channel: its L{FakeChannel}; the master's protocol is
        C{channel.server}.
    @ivar received: every L{ReceivedCommand}, in order.
    @ivar messages: the decoded L{ToWorker} messages.
    @ivar connections: the descriptors it took (its copies).  They belong
        to the fake: they are closed when the worker ends or by
        L{closeDescriptors}, so do not close them yourself.
    @ivar takingConnections: whether L{NewConn} is answered by taking the
        connections (L{True}) or refusing them.
    @ivar metrics: L{CollectMetrics}'s answer (Prometheus text format).
    @ivar holding: the command classes left for the test to answer.
    @ivar listens: the listen ids it listens on.
    @ivar disconnecting: whether it is leaving.
    """

    def __init__(
        self,
        reactor,
        processProtocol,
        masterProtocol,
        workerId: int,
        workerCount: int,
        appPath: str,
        env: Optional[dict],
        pid: int,
        spawner: Optional["FakeSpawner"] = None,
    ) -> None:
        self.uid: Optional[int] = None
        self.gid: Optional[int] = None
        self._spawner = spawner
        self.reactor = reactor
        self.workerId = workerId
        self.workerCount = workerCount
        self.appPath = appPath
        self.env = env
        self.pid = pid
        self.received: list[ReceivedCommand] = []
        self.messages: list = []
        self.connections: list[int] = []
        self.takingConnections = True
        self.metrics = ""
        #: As the agent: C{(workerId, message) -> answer} for L{AgentRequest}.
        self.agentHandler = None
        #: As the agent: the worker ids the master last said were ready.
        self.agentWorkers: Optional[list] = None
        self.holding: set = set()
        self.channelLostReason: Optional[Failure] = None
        self.listens: set[int] = set()
        self.disconnecting = False
        self._owned: set[int] = set()
        self._indexes: dict[int, tuple] = {}
        self._reportLoad = False
        self._reportScheduled = False
        self._calls: list = []
        self.peer = _WorkerPeer(self)
        self.channel = FakeChannel(masterProtocol, self.peer)
        self.process = FakeProcess(processProtocol, pid)

    def __repr__(self) -> str:
        return f"<FakeWorker {self.workerId} pid {self.pid}>"

    # What the master sent

    def commands(self, command) -> list[ReceivedCommand]:
        """
        The L{ReceivedCommand}s of class C{command}, in order.
        """
        return [r for r in self.received if r.command is command]

    def unanswered(self, command=None) -> list[ReceivedCommand]:
        """
        The commands (of class C{command}, or all) not answered yet.
        """
        return [
            r for r in self.received if not r.answered and (command is None or r.command is command)
        ]

    @property
    def disconnectRequested(self) -> bool:
        """
        Whether the master sent L{Disconnect}.
        """
        return bool(self.commands(Disconnect))

    @property
    def running(self) -> bool:
        """
        Whether the process has not ended.
        """
        return not self.process.ended

    # Playing the worker

    def callRemote(self, command, **arguments) -> Optional[defer.Deferred]:
        """
        Send C{command} to the master and flush.

        @return: the Deferred of its answer (L{None} for a command that
            requires no answer).
        """
        # A listen is the worker's from the Listening it sends (unless the
        # master says it is not) to the Close it sends.
        if command is Listening:
            self.listens.add(arguments["listenId"])
        elif command is Close:
            self.listens.discard(arguments["listenId"])
            self._indexes.pop(arguments["listenId"], None)
        sent = self.peer.callRemote(command, **arguments)
        if sent is None:
            self.flush()
            return None
        # AMP drops the connection when an error answer arrives at a
        # Deferred with no errback yet; the caller only gets this one after
        # the flush, so relay the answer to a Deferred of its own.
        answer = defer.Deferred()

        def relay(result):
            if isinstance(result, Failure):
                if command is Listening:
                    self.listens.discard(arguments["listenId"])
                answer.errback(result)
            else:
                answer.callback(result)

        sent.addBoth(relay)
        self.flush()
        return answer

    def online(self) -> defer.Deferred:
        """
        Send L{Online}.
        """
        return self.callRemote(Online, pid=self.pid)

    def queryServer(
        self,
        kind: str = "tcp4",
        address: str = "127.0.0.1",
        port: int = 0,
        index: int = 0,
        backlog: int = 50,
        mode: int = 0o666,
    ) -> defer.Deferred:
        """
        Send L{QueryServer}.  A listening descriptor in the answer (shared
        scheduling) is the worker's; it is closed when the worker ends.
        """
        return self.callRemote(
            QueryServer, kind=kind, address=address, port=port, index=index, backlog=backlog, mode=mode
        )

    def listening(self, listenId: int) -> defer.Deferred:
        """
        Send L{Listening}.
        """
        return self.callRemote(Listening, listenId=listenId)

    def ready(self) -> defer.Deferred:
        """
        Send L{Ready}.
        """
        return self.callRemote(Ready)

    def close(self, listenId: int) -> defer.Deferred:
        """
        Send L{Close}.
        """
        return self.callRemote(Close, listenId=listenId)

    def loadReport(self, connections: int) -> None:
        """
        Send L{LoadReport}.
        """
        self.callRemote(LoadReport, connections=connections)

    def listen(
        self,
        kind: str = "tcp4",
        address: str = "127.0.0.1",
        port: int = 0,
        index: Optional[int] = None,
        backlog: int = 50,
        mode: int = 0o666,
    ) -> dict:
        """
        Listen as the worker's application would: L{QueryServer}, then
        L{Listening}.  The index is by default, as a real worker's, the
        lowest its other listens on C{(kind, address, port)} do not use.

        @return: the master's answer to L{QueryServer}.
        @raise Exception: the master's error, if it refused.
        """
        base = (kind, address, port)
        if index is None:
            used = {i for b, i in self._indexes.values() if b == base}
            index = min(set(range(len(used) + 1)) - used)
        answers: list = []
        self.queryServer(kind, address, port, index, backlog, mode).addBoth(answers.append)
        if not answers:
            raise RuntimeError("the master did not answer QueryServer")
        if isinstance(answers[0], Failure):
            answers[0].raiseException()
        answer = answers[0]
        self._indexes[answer["listenId"]] = (base, index)
        if answer["scheduling"] == "least-busy":
            self._reportLoad = True
        self.listening(answer["listenId"])
        return answer

    def start(self, listens: tuple = ()) -> list[dict]:
        """
        Boot as a worker would: L{Online}, a L{listen} for each tuple of
        its arguments (C{(kind, address, port)}, optionally followed by
        C{index}, C{backlog} and C{mode}) in C{listens}, then L{Ready}.
        Listening twice on one address is two listens (indexes 0 and 1).

        @return: the L{QueryServer} answers.
        """
        self.online()
        answers = [self.listen(*listen) for listen in listens]
        self.ready()
        return answers

    def send(self, data: bytes) -> None:
        """
        Write raw C{data} on the channel (a malformed box, say) and flush.
        """
        self.channel.clientTransport.write(data)
        self.flush()

    def sendFileDescriptor(self, fd: int) -> None:
        """
        Send C{fd} to the master (which it must never do) and flush.  The
        master receives a duplicate; C{fd} stays the caller's.
        """
        self.channel.clientTransport.sendFileDescriptor(fd)
        self.flush()

    def block(self) -> None:
        """
        Stop reading the channel: nothing the master sends is received or
        answered until L{unblock}, as in a worker whose reactor is blocked.
        """
        self.channel.pauseDelivery(1)

    def unblock(self) -> None:
        """
        Read the channel again.
        """
        self.channel.resumeDelivery(1)

    def disconnect(self, why: Optional[str] = None) -> None:
        """
        Leave as the application's C{disconnect()} makes a real worker
        leave: say L{Leaving} (C{why}, by default C{"disconnect()"}; nothing
        if the master asked it to leave), then close every listen.
        """
        if self.disconnecting:
            return
        if why is None and not self.disconnectRequested:
            why = "disconnect()"
        if why is not None and not self.channel.lost:
            self.callRemote(Leaving, why=why)
        self._leave()

    def closeConnections(self, count: Optional[int] = None) -> None:
        """
        The application closes the first C{count} of C{connections} (all by
        default).  Listening on a least-busy handle, the worker then reports
        its load as a real worker does: one L{LoadReport},
        C{LOAD_REPORT_INTERVAL} later on its reactor.
        """
        closing = self.connections[: len(self.connections) if count is None else count]
        for fd in closing:
            _close(fd)
            self._owned.discard(fd)
        del self.connections[: len(closing)]
        if closing and self._reportLoad and not self._reportScheduled:
            self._reportScheduled = True
            self._callLater(LOAD_REPORT_INTERVAL, self._sendLoad)

    def flush(self) -> None:
        """
        Deliver what waits on the channel, both ways, and on the channels of
        the other workers of the same L{FakeSpawner} (what the master says
        to one worker often makes it speak to another).
        """
        if self._spawner is not None:
            self._spawner.flush()
        else:
            self.channel.flush()

    def exit(self, exitCode: int = 0, channelFirst: bool = True) -> None:
        """
        The process exits with C{exitCode}: its channel closes, every
        descriptor it held is closed, and the master's process protocol
        gets C{processEnded}.

        @param channelFirst: the master sees the channel close before the
            process ends (L{True}), or after.
        """
        self._die(lambda: self.process.end(exitCode=exitCode), channelFirst)

    def kill(self, signal: int = signalModule.SIGKILL, channelFirst: bool = True) -> None:
        """
        The process is killed by C{signal} (a number); see L{exit}.
        """
        self._die(lambda: self.process.end(exitCode=None, signal=signal), channelFirst)

    def closeDescriptors(self) -> None:
        """
        Close every descriptor the worker received and still holds.
        """
        for fd in list(self._owned):
            _close(fd)
        self._owned.clear()
        self.connections.clear()

    # Internals

    def _die(self, end: Callable[[], None], channelFirst: bool) -> None:
        # What its reactor was to do dies with the process.
        for call in self._calls:
            if call.active():
                call.cancel()
        self.closeDescriptors()
        if channelFirst:
            self.channel.sever(ConnectionDone("the worker exited"), ConnectionLost("exited"))
            end()
        else:
            end()
            self.channel.sever(ConnectionDone("the worker exited"), ConnectionLost("exited"))

    def _channelLost(self, reason: Failure) -> None:
        self.channelLostReason = reason
        # A worker whose master is gone leaves; its listens went with it.
        self.disconnecting = True
        self.listens.clear()
        self._indexes.clear()

    def _callLater(self, delay: float, f: Callable[[], None]) -> None:
        self._calls = [call for call in self._calls if call.active()]
        self._calls.append(self.reactor.callLater(delay, f))

    def _leave(self) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        for listenId in sorted(self.listens):
            self.close(listenId)

    def _sendLoad(self) -> None:
        self._reportScheduled = False
        if not self.channel.lost:
            self.loadReport(len(self.connections))

    def _received(self, command, arguments: dict):
        received = ReceivedCommand(self, command, arguments)
        self.received.append(received)
        if command is WorkerCount:
            self.workerCount = arguments["count"]
        if command is ToWorker:
            self.messages.append(json.loads(arguments["message"]))
        if command in self.holding:
            received._deferred = defer.Deferred()
            return received._deferred
        received.answered = True
        if command is Disconnect:
            # As a real worker: answered at once, acted on at the next turn.
            self._callLater(0, self._leave)
        if command is CollectMetrics:
            return {"metrics": self.metrics}
        if command is AgentWorkers:
            self.agentWorkers = list(arguments["workerIds"])
        if command is AgentRequest:
            if self.agentHandler is None:
                raise AgentFailed("the fake agent has no handler")
            answer = self.agentHandler(arguments["workerId"], json.loads(arguments["message"]))
            return {"answer": json.dumps(answer)}
        if command is Ping:
            return {"connections": len(self.connections)}
        if command is NewConn:
            fds = arguments["fds"]
            before = len(self.connections)
            taking = self.takingConnections and not self.disconnecting and arguments["listenId"] in self.listens
            count = len(fds) if taking else 0
            self._takeConnections(fds, count)
            return {"accepted": count, "connections": before}
        return {}

    def _takeConnections(self, fds: list, count: int) -> None:
        self.connections.extend(fds[:count])
        for fd in fds[count:]:
            _close(fd)
            self._owned.discard(fd)


class FakeSpawner:
    """
    A spawner for L{txcluster.ClusterService} that starts no process: each
    call makes a L{FakeWorker} (its L{FakeProcess} is returned as the
    process transport, its L{FakeChannel} is connected to the master's
    channel protocol) and records it.

    @ivar workers: every L{FakeWorker}, in spawn order.
    @ivar nextPid: the pid the next worker gets.
    @ivar spawnError: when set, the next spawn raises it (and clears it).
    """

    def __init__(self, firstPid: int = 1000) -> None:
        self.workers: list[FakeWorker] = []
        self.nextPid = firstPid
        self.spawnError: Optional[BaseException] = None

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
        """
        Spawn a fake worker; the signature is that of
        L{txcluster._process.spawnWorker}.  C{uid} and C{gid} are recorded
        on the worker (L{FakeWorker.uid}, L{FakeWorker.gid}), and so is
        C{board} (L{FakeWorker.board}).

        @return: the new worker's L{FakeProcess}.
        """
        if self.spawnError is not None:
            error, self.spawnError = self.spawnError, None
            raise error
        pid = self.nextPid
        self.nextPid += 1
        worker = FakeWorker(
            reactor, processProtocol, channel, workerId, workerCount, appPath, env, pid, self
        )
        worker.uid, worker.gid = uid, gid
        worker.board = board
        self.workers.append(worker)
        processProtocol.makeConnection(worker.process)
        worker.channel.connect()
        return worker.process

    def running(self) -> list[FakeWorker]:
        """
        The workers whose process has not ended, in spawn order.
        """
        return [w for w in self.workers if w.running]

    def latest(self, workerId: int) -> FakeWorker:
        """
        The last worker spawned with C{workerId}.

        @raise KeyError: none was.
        """
        for worker in reversed(self.workers):
            if worker.workerId == workerId:
                return worker
        raise KeyError(workerId)

    def byPid(self, pid: int) -> FakeWorker:
        """
        The worker with C{pid}.

        @raise KeyError: none has it.
        """
        for worker in self.workers:
            if worker.pid == pid:
                return worker
        raise KeyError(pid)

    def flush(self) -> None:
        """
        Deliver what waits on every channel.
        """
        moved = True
        while moved:
            moved = False
            for worker in list(self.workers):
                if worker.channel.flush():
                    moved = True

    def closeDescriptors(self) -> None:
        """
        Close every descriptor any worker still holds (for a test's
        cleanup).
        """
        for worker in self.workers:
            worker.closeDescriptors()
