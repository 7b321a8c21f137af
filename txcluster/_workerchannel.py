# -*- test-case-name: tests.test_worker -*-
"""
The worker's end of the AMP channel to its master.

A listen is a synchronous round trip: the worker writes L{QueryServer} and
reads the channel until the answer arrives (commands that arrive meanwhile
are held and run afterwards, in order), so C{listenTCP} keeps Twisted's
contract: it returns a port whose C{getHost()} is the real address, or
raises L{CannotListenError}.
"""

from __future__ import annotations

import json
import os
import select
import time
from collections import deque
from typing import Any, Protocol

from twisted.internet.error import ConnectionLost
from twisted.protocols import amp
from twisted.python.failure import Failure

from txcluster._commands import (
    AgentFailed,
    AgentRequest,
    AgentWorkers,
    NEWCONN_ANSWER_KEYS,
    NEWCONN_KEYS,
    DescriptorList,
    Disconnect,
    NewConn,
    Ping,
    CollectMetrics,
    ToWorker,
    WorkerCount,
    closeUnclaimedDescriptors,
    readBox,
    writeBox,
)
from txcluster._twistedcompat import connectionLostQuietly, makeConnectionQuietly, parserIdle, pendingBytes

_FDS = DescriptorList()

#: How long a listen waits for the master's answer before giving up.
QUERY_TIMEOUT = 30.0


class MasterUnavailable(Exception):
    """
    The channel to the master is closed, or the master did not answer in time.
    """


class ChannelOwner(Protocol):
    """
    What the channel needs of the worker it belongs to (a
    L{txcluster.Worker}).
    """

    reactor: Any
    count: int
    leaveRequested: bool
    openConnections: int
    #: The L{txcluster._agentapi.Agent} in the agent process, else L{None}.
    agent: Any

    def disconnect(self, timeout: Any = None, why: Any = None) -> Any:
        """
        Leave the cluster.
        """

    def _adopt(self, listenId: int, fds: list) -> int:
        """
        Take the connections C{fds} for C{listenId}; return how many.
        """

    def _deliver(self, message: Any) -> None:
        """
        Hand a message from the master to the observers.
        """

    def _masterGone(self, reason: Any) -> None:
        """
        The channel closed.
        """


class WorkerChannel(amp.AMP):
    """
    The worker's end of the AMP channel.

    Boxes are dispatched only after AMP's parser has returned, never from
    inside it, so that application code run by a command (a message
    observer, a protocol adopted by L{NewConn}) may make a synchronous
    listen, which reads the channel itself.  While such a call waits,
    commands are held and run afterwards in arrival order; answers go
    through at once.
    """

    def __init__(self, worker: ChannelOwner) -> None:
        super().__init__()
        self._worker = worker
        self._parsing = False
        self._inbox: deque = deque()
        self._holdDepth = 0
        self._held: deque = deque()
        self._replayScheduled = False
        self._flushSoon = False

    # Synchronous calls (listen) ------------------------------------------

    def callSync(self, command, timeout: float = QUERY_TIMEOUT, **kw) -> Any:
        """
        Call C{command} and block until its answer arrives; commands from the
        master that arrive meanwhile are held and run afterwards in order.
        A descriptor in an answer that arrives after the call gave up is
        closed.

        @raise MasterUnavailable: the channel closed or C{timeout} passed.
        @raise Exception: the error the master answered with.
        """
        transport = self.transport
        if transport is None:
            raise MasterUnavailable("the channel to the master is closed")
        results: list = []
        waiting = [True]

        def arrived(result):
            if waiting[0]:
                results.append(result)
            elif not isinstance(result, Failure):
                closeAnswerDescriptors(command, result)
            return None

        self.callRemote(command, **kw).addBoth(arrived)
        deadline = time.monotonic() + timeout
        fd = transport.fileno()
        self._holdDepth += 1
        try:
            while not results:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MasterUnavailable(
                        f"the master did not answer {command.__name__} within {timeout:g} s"
                    )
                wantWrite = pendingBytes(transport) > 0
                readable, writable, _ = select.select(
                    [fd], [fd] if wantWrite else [], [], remaining
                )
                if (writable and _isLost(transport.doWrite())) or (readable and _isLost(transport.doRead())):
                    self._broken(transport)
                    raise MasterUnavailable("the channel to the master closed")
        finally:
            waiting[0] = False
            self._holdDepth -= 1
            self._scheduleReplay()
        result = results[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def _broken(self, transport) -> None:
        # What the reactor does with a descriptor whose read or write found
        # the connection gone; it did not see this one, the call drove it.
        reactor = self._worker.reactor
        reactor.removeReader(transport)
        reactor.removeWriter(transport)
        transport.connectionLost(Failure(ConnectionLost("the channel to the master closed")))

    def dataReceived(self, data: bytes) -> None:
        self._parsing = True
        try:
            if data.startswith(NEWCONN_KEYS[0]) and parserIdle(self):
                data = self._newConnBoxes(data)
            if data:
                super().dataReceived(data)
        finally:
            self._parsing = False
        self._dispatch()
        if self._flushSoon:
            self._flush()

    def _newConnBoxes(self, data: bytes) -> bytes:
        # The hot path's parser: the NewConn boxes at the start of data are
        # queued as AMP's parser would queue them (their descriptors have
        # arrived already, before the bytes); the rest is AMP's to parse.
        offset = 0
        while True:
            parsed = readBox(data, offset, NEWCONN_KEYS)
            if parsed is None or parsed[0][1] != NewConn.commandName:
                return data[offset:]
            (ask, command, fds, listenId), offset = parsed
            self._inbox.append(
                amp.AmpBox({amp.ASK: ask, amp.COMMAND: command, b"fds": fds, b"listenId": listenId})
            )

    def ampBoxReceived(self, box) -> None:
        # Called by the parser: only queue.
        self._inbox.append(box)
        if not self._parsing:
            self._dispatch()

    def _dispatch(self) -> None:
        while self._inbox:
            box = self._inbox.popleft()
            if amp.COMMAND in box and (self._holdDepth or self._held):
                if box[amp.COMMAND] == Disconnect.commandName:
                    # Known now, acted on once the call returns: a start-up
                    # that fails because of it is not a failure.
                    self._worker.leaveRequested = True
                self._held.append(box)
                self._scheduleReplay()
            elif box.get(amp.COMMAND) == NewConn.commandName:
                self._newConnBox(box)
            else:
                amp.AMP.ampBoxReceived(self, box)

    def _newConnBox(self, box) -> None:
        # The hot path: NewConn's arguments parsed and its answer sent
        # directly, without the responder's Deferred and locator machinery.
        # Anything unexpected takes the general path, which answers errors.
        try:
            listenId = int(box[b"listenId"])
            fds = _FDS.fromStringProto(box[b"fds"], self)
        except Exception:
            amp.AMP.ampBoxReceived(self, box)
            return
        before = self._worker.openConnections
        accepted = self._worker._adopt(listenId, fds)
        self._flushSoon = True
        ask = box.get(amp.ASK)
        if ask is not None and self.transport is not None:
            self.transport.write(writeBox(NEWCONN_ANSWER_KEYS, (ask, b"%d" % accepted, b"%d" % before)))

    def _scheduleReplay(self) -> None:
        if self._held and not self._holdDepth and not self._replayScheduled:
            self._replayScheduled = True
            self._worker.reactor.callLater(0, self._replay)

    def _replay(self) -> None:
        self._replayScheduled = False
        while self._held and not self._holdDepth:
            amp.AMP.ampBoxReceived(self, self._held.popleft())
        self._flush()
        self._scheduleReplay()

    def flush(self) -> None:
        """
        Write what waits to be sent, now, as far as the socket takes it.
        """
        self._flushSoon = False
        if self.transport is not None and pendingBytes(self.transport):
            self.transport.doWrite()

    def _flush(self) -> None:
        # A connection the worker adopted must not be read before the
        # master knows it was taken: if the worker died in between, the
        # master would give a half-read connection to another worker.
        self.flush()

    # Responders -----------------------------------------------------------

    @NewConn.responder
    def newConn(self, listenId: int, fds: list) -> dict:
        self._flushSoon = True
        before = self._worker.openConnections
        return {"accepted": self._worker._adopt(listenId, fds), "connections": before}

    @Disconnect.responder
    def disconnect(self, timeout: float) -> dict:
        self._worker.leaveRequested = True
        self._worker.reactor.callLater(0, self._worker.disconnect, timeout)
        return {}

    @CollectMetrics.responder
    def collectMetrics(self) -> dict:
        return {"metrics": self._worker.metricsText()}

    @Ping.responder
    def ping(self) -> dict:
        return {"connections": self._worker.openConnections}

    @ToWorker.responder
    def toWorker(self, message: str) -> dict:
        self._worker._deliver(json.loads(message))
        return {}

    @WorkerCount.responder
    def workerCount(self, count: int) -> dict:
        self._worker.count = count
        return {}

    @AgentRequest.responder
    def agentRequest(self, workerId: int, message: str):
        agent = self._worker.agent
        if agent is None:
            raise AgentFailed("this process is not the agent")
        return agent._request(workerId, message).addCallback(lambda answer: {"answer": answer})

    @AgentWorkers.responder
    def agentWorkers(self, workerIds: list) -> dict:
        if self._worker.agent is not None:
            self._worker.agent._workersChanged(workerIds)
        return {}

    def makeConnection(self, transport) -> None:
        makeConnectionQuietly(self, transport)

    def connectionLost(self, reason) -> None:
        closeUnclaimedDescriptors(self)
        connectionLostQuietly(self, reason)
        self._worker._masterGone(reason)


def closeAnswerDescriptors(command, answer: dict) -> None:
    """
    Close the descriptors in C{answer}, an answer to C{command} nobody
    will take.
    """
    for name, argument in command.response:
        if isinstance(argument, amp.Descriptor):
            fd = answer.get(name.decode("ascii"))
            if isinstance(fd, int):
                try:
                    os.close(fd)
                except OSError:
                    pass


def _isLost(result) -> bool:
    return result is not None and result != 0
