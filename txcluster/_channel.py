# -*- test-case-name: tests.test_hostile,tests.test_master -*-
"""
L{MasterChannel}: the master's end of one worker's AMP channel.

It answers the worker's commands through L{WorkerRequests}, the narrow
interface of what a worker may ask of the master (the master hands one to
each channel; this module imports nothing of the master), and is the first
line of defence against a worker that misbehaves: whatever a worker sends,
the master must survive it.

A worker misbehaves when it sends what no txcluster worker sends: bytes
that are not AMP, a key longer than 255 bytes, a box larger than
L{MAX_BOX_SIZE}, a box that is neither a command nor an answer, an unknown
command, a command whose arguments do not parse, an answer to a request the
master never made (or one that does not parse), a file descriptor, a second
L{Online}, commands faster than L{COMMAND_RATE} allows, or more than
L{REFUSAL_LIMIT} refused requests within L{REFUSAL_WINDOW} seconds.  The
channel then reports it to the master (which logs it with the worker's id
and pid, kills the worker and lets the supervisor replace it) and drops
the channel: nothing more the worker sends is read.  See the "A
misbehaving worker" section of C{docs/protocol.md}.
"""

from __future__ import annotations

import os
from types import MethodType
from typing import Callable, Optional, Protocol

from twisted.internet import defer
from twisted.internet.error import ConnectionClosed, ConnectionLost
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from txcluster._commands import (
    AgentBroadcast,
    AgentSend,
    AskAgent,
    Close,
    NEWCONN_ANSWER_KEYS,
    DescriptorList,
    FinalMetrics,
    Leaving,
    ListenRefused,
    Listening,
    LoadReport,
    NewConn,
    Online,
    QueryServer,
    Ready,
    ToMaster,
    UnknownListen,
    closeUnclaimedDescriptors,
    readBox,
)
from txcluster._policy import CommandBudget, FailureWindow
from txcluster._twistedcompat import (
    MAX_KEY_LENGTH,
    BatchingUNIXServer,
    connectionLostQuietly,
    makeConnectionQuietly,
    outstandingRequests,
    parserIdle,
    readingValue,
    responderFor,
)

_DESCRIPTORS = DescriptorList()

# How an answer to NewConn starts: see MasterChannel._handoffAnswers.
_ANSWER_KEY = NEWCONN_ANSWER_KEYS[0]

_log = Logger(namespace="txcluster.master")

#: Commands per second a worker may send, sustained.  A worker sends a
#: handful of commands per listen, at most 100 L{LoadReport}s a second, and
#: the application's L{ToMaster} messages; the master parses some 25,000
#: commands a second in all, so a worker at this rate would already take
#: 40 % of it.
COMMAND_RATE = 10_000.0

#: Commands a worker may send at once on top of L{COMMAND_RATE}: in any
#: interval of I{t} seconds a worker may send C{COMMAND_BURST + COMMAND_RATE
#: * t} commands.  A worker sending twice the rate is caught after 3 s, one
#: sending as fast as the master reads after about 2 s.
COMMAND_BURST = 30_000

#: Refused requests (L{ListenRefused}, L{UnknownListen}) a worker may make
#: within L{REFUSAL_WINDOW} seconds; one more is misbehaviour.
REFUSAL_LIMIT = 20

#: See L{REFUSAL_LIMIT}.
REFUSAL_WINDOW = 60.0

#: The largest box a worker may send, in bytes of keys and values with their
#: length prefixes: room for a few full 65535-byte values.  It bounds the
#: memory an unfinished box holds.
MAX_BOX_SIZE = 256 * 1024

#: Errors a responder may answer with that are the worker's doing, not the
#: master's: they count towards L{REFUSAL_LIMIT}.
_REFUSALS = (ListenRefused, UnknownListen)

#: The commands a worker may send (not, say, AMP's own C{StartTLS}).
_WORKER_COMMANDS = frozenset(
    c.commandName
    for c in (
        Online, QueryServer, Listening, Close, Ready, Leaving, LoadReport, ToMaster, FinalMetrics, AskAgent,
        AgentBroadcast, AgentSend,
    )
)


class WorkerRequests(Protocol):
    """
    What one worker may ask of the master, and what its channel tells the
    master about it: one provider per worker process.
    """

    def describe(self) -> str:
        """
        The worker, for a log line: C{"worker 3 (pid 1234)"}.
        """

    def online(self, pid: int) -> None:
        """
        L{Online}.
        """

    def queryServer(self, kind: str, address: str, port: int, index: int, backlog: int, mode: int) -> dict:
        """
        L{QueryServer}: the answer, or raise one of its declared errors.
        """

    def listening(self, listenId: int) -> None:
        """
        L{Listening}; may raise L{UnknownListen}.
        """

    def close(self, listenId: int) -> None:
        """
        L{Close}; may raise L{UnknownListen}.
        """

    def ready(self) -> None:
        """
        L{Ready}.
        """

    def leaving(self, why: str) -> None:
        """
        L{Leaving}.
        """

    def reportLoad(self, connections: int) -> None:
        """
        L{LoadReport}, or the load in a L{NewConn} answer.
        """

    def message(self, text: str) -> None:
        """
        L{ToMaster}'s JSON text.
        """

    def finalMetrics(self, text: str) -> None:
        """
        L{FinalMetrics}'s text.
        """

    def askAgent(self, message: str) -> defer.Deferred:
        """
        L{AskAgent}: a Deferred firing with the agent's answer (JSON text),
        or failing with one of its declared errors.
        """

    def agentBroadcast(self, message: str) -> None:
        """
        L{AgentBroadcast}, from the agent.
        """

    def agentSend(self, workerId: int, message: str) -> defer.Deferred:
        """
        L{AgentSend}, from the agent.
        """

    def misbehaved(self, what: str) -> None:
        """
        The worker did C{what} (C{"sent ..."}): log it and replace it.
        """

    def channelLost(self, reason: Failure) -> None:
        """
        The channel is gone.
        """


class ChannelDropped(ConnectionLost):
    """
    The master closed a worker's channel on purpose (see
    L{MasterChannel.drop}).
    """

    def __str__(self) -> str:
        return f"the master dropped it: {self.args[0]}"


def _shorten(text: str, limit: int = 80) -> str:
    """
    C{text} cut to C{limit} characters for a log line: a worker chooses it.
    """
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _parseProblem(error: BaseException) -> str:
    """
    What is wrong with arguments AMP could not parse, in a few words.
    """
    if isinstance(error, KeyError) and error.args:
        name = error.args[0]
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        return f"missing {_shorten(str(name), 40)}"
    return _shorten(f"{type(error).__name__}: {error}")


class MasterChannel(amp.AMP):
    """
    The master's end of one worker's channel: answers the worker's commands
    through its L{WorkerRequests}, and reports a worker that breaks the
    protocol (see the module docstring) to L{WorkerRequests.misbehaved}.

    @ivar requests: what the worker on the other end may ask.
    @ivar dropped: why the master stopped reading this channel, or L{None}.
    """

    def __init__(
        self, requests: WorkerRequests, seconds: Callable[[], float], answers: Optional["AnswerReader"] = None
    ) -> None:
        """
        @param requests: what the worker may ask, and whom to tell what it
            did.
        @param seconds: the clock for the rate limit (the master's reactor's).
        @param answers: what reads the answers to L{NewConn} (L{None}: the
            reactor, as it reads the rest).
        """
        super().__init__()
        self.requests = requests
        self._answers = answers
        self._seconds = seconds
        self.dropped: Optional[str] = None
        self._answersOnly = False
        self._handoffs = 0
        self._budget: Optional[CommandBudget] = None
        self._refusals = FailureWindow(REFUSAL_LIMIT, REFUSAL_WINDOW)
        self._boxSize = 0
        self._answering = False
        self._receiving = False
        self._wasOnline = False
        #: The L{AnswerReader} that reads this channel now, if one does.
        self.answerReader: Optional[AnswerReader] = None

    # Misbehaviour ----------------------------------------------------------

    def drop(self, why: str, answers: bool = False) -> None:
        """
        Take nothing more from the worker and close the channel (once the
        bytes being read are done with): commands it sends from now on are
        ignored, descriptors it sent are closed, and requests it has not
        answered fail with L{ConnectionLost} once the channel is gone (so
        that the connections in them go to another worker).

        @param why: for the log, e.g. C{"the worker misbehaved"}.
        @param answers: keep reading the answers to the master's requests
            still unanswered, until there are none or the channel closes
            (the worker is being killed): a L{NewConn} it answered took
            connections it may have read from, which must not go to another
            worker.  Only while the framing is intact.
        """
        if self.dropped is not None:
            return
        self.dropped = why
        self._answersOnly = answers
        self._closeDescriptors()
        if not self._receiving and not self._awaitingAnswers():
            self._close()

    def _awaitingAnswers(self) -> bool:
        return self._answersOnly and self._handoffs > 0

    def _close(self) -> None:
        self._answersOnly = False
        if self.transport is not None:
            self.transport.loseConnection()

    def _misbehave(self, what: str, framing: bool = True) -> None:
        """
        The worker did C{what} ("sent ..."): have the master log it and
        replace the worker, and drop the channel.

        @param framing: whether the bytes still frame AMP boxes (then the
            answers to what the master asked are still read).
        """
        if self.dropped is not None:
            if not framing:
                self._answersOnly = False
            return
        self.requests.misbehaved(what)
        self.drop("the worker misbehaved", answers=framing)

    def _closeDescriptors(self) -> None:
        closeUnclaimedDescriptors(self)

    # Framing ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.dropped is not None and not self._answersOnly:
            return
        # A drop while these bytes are read closes the channel once they
        # are: what the master answered meanwhile goes out first.
        self._receiving = True
        try:
            if self.dropped is None and data.startswith(_ANSWER_KEY) and parserIdle(self):
                data = self._handoffAnswers(data)
            if data:
                super().dataReceived(data)
        except Exception as e:
            # The checks below should leave nothing for AMP to raise; if
            # something does, it is still the worker's bytes that did it.
            self._misbehave(f"sent data the master cannot parse ({_parseProblem(e)})", framing=False)
        finally:
            self._receiving = False
        if self.dropped is not None and not self._awaitingAnswers():
            self._close()

    def _handoffAnswers(self, data: bytes) -> bytes:
        """
        The hot path of the answers to L{NewConn}: parse the boxes at the
        start of C{data} that are exactly such an answer (C{_answer},
        C{accepted}, C{connections}, in the order AMP writes them) to a
        request the master made, and fire their requests, without the
        general parser's call per key and value.  At the first box that is
        anything else, or is incomplete, stop: the general parser, with
        every check, takes the rest.

        @return: the bytes left for the general parser.
        """
        outstanding = outstandingRequests(self)
        offset = 0
        while outstanding is not None and self.dropped is None:
            parsed = readBox(data, offset, NEWCONN_ANSWER_KEYS)
            if parsed is None:
                break
            (tag, accepted, connections), end = parsed
            question = outstanding.pop(tag, None)
            if question is None:
                break
            offset = end
            question.addErrback(self.unhandledError)
            self._answering = True
            try:
                question.callback(amp.AmpBox({amp.ANSWER: tag, b"accepted": accepted, b"connections": connections}))
            finally:
                self._answering = False
        return data[offset:]

    def stringReceived(self, string: bytes) -> None:
        if self.dropped is not None and not self._answersOnly:
            return
        self._boxSize += 2 + len(string)
        if self._boxSize > MAX_BOX_SIZE:
            self._misbehave(f"sent a box larger than {MAX_BOX_SIZE} bytes", framing=False)
            return
        if not string and not readingValue(self):
            # The empty key ends the box.
            self._boxSize = 0
        super().stringReceived(string)

    def lengthLimitExceeded(self, length: int) -> None:
        # Int16StringReceiver's limit is the current string's: keys are at
        # most 255 bytes (values may use all 16 bits).
        self._misbehave(f"sent a key of {length} bytes (at most {MAX_KEY_LENGTH})", framing=False)

    def fileDescriptorReceived(self, descriptor: int) -> None:
        # Workers never send descriptors to the master.
        os.close(descriptor)
        self._misbehave("sent a file descriptor")

    def ampBoxReceived(self, box) -> None:
        if self.dropped is not None:
            if self._answersOnly and amp.ANSWER in box and box[amp.ANSWER] in (outstandingRequests(self) or ()):
                # An answer to what the master asked before the drop.
                self._answering = True
                try:
                    amp.AMP.ampBoxReceived(self, box)
                finally:
                    self._answering = False
            return
        if amp.ANSWER in box or amp.ERROR in box:
            tag = box[amp.ANSWER] if amp.ANSWER in box else box[amp.ERROR]
            outstanding = outstandingRequests(self)
            if outstanding is None or tag not in outstanding:
                self._misbehave(f"answered a request the master never sent (tag {_shorten(repr(tag), 40)})")
                return
            if amp.ANSWER not in box and not (amp.ERROR_CODE in box and amp.ERROR_DESCRIPTION in box):
                self._misbehave("sent an error answer without a code or description")
                return
            self._answering = True
            try:
                super().ampBoxReceived(box)
            finally:
                self._answering = False
            return
        if amp.COMMAND not in box:
            self._misbehave("sent a box that is neither a command nor an answer")
            return
        now = self._seconds()
        if self._budget is None:
            self._budget = CommandBudget(COMMAND_RATE, COMMAND_BURST, now)
        if not self._budget.spend(now):
            self._misbehave(
                f"sent commands faster than {COMMAND_RATE:.0f} a second "
                f"(after a burst of {COMMAND_BURST})"
            )
            return
        super().ampBoxReceived(box)

    # Commands from the worker ---------------------------------------------

    def locateResponder(self, name: bytes):
        """
        The responder for command C{name}: it parses the arguments (a
        worker whose arguments do not parse misbehaved), calls the master,
        and turns a refusal into the command's declared error.  An unknown
        command is misbehaviour.
        """
        found = responderFor(self, name) if name in _WORKER_COMMANDS else None
        if found is None:
            return lambda box: self._unknownCommand(name)
        command, responder = found
        return lambda box: self._respond(command, MethodType(responder, self), box)

    def _unknownCommand(self, name: bytes) -> defer.Deferred:
        self._misbehave(f"sent an unknown command {_shorten(repr(name), 60)}")
        # No answer: the channel is closing.
        return defer.Deferred()

    def _respond(self, command, responder, box) -> defer.Deferred:
        try:
            arguments = command.parseArguments(box, self)
        except Exception as e:
            self._misbehave(f"sent a malformed {command.__name__} ({_parseProblem(e)})")
            return defer.Deferred()
        d = defer.maybeDeferred(responder, **arguments)
        d.addCallback(command.makeResponse, self)
        d.addErrback(self._failed, command, amp.ASK in box)
        return d

    def _failed(self, failure: Failure, command, answerExpected: bool):
        known = failure.check(*command.allErrors)
        if known is not None:
            if failure.check(*_REFUSALS) and self._refusals.record(self._seconds()):
                self._misbehave(
                    f"made more than {REFUSAL_LIMIT} requests the master refused within "
                    f"{REFUSAL_WINDOW:.0f} s, the last a {command.__name__} "
                    f"({_shorten(failure.getErrorMessage())})"
                )
            if not answerExpected:
                # AMP would log an error nobody asked for as unhandled.
                return None
            return Failure(
                amp.RemoteAmpError(
                    command.allErrors[known],
                    failure.getErrorMessage(),
                    known in command.fatalErrors,
                    local=failure,
                )
            )
        # The master's own fault: say so, and let the worker go as if its
        # channel had broken (it exits when it sees the channel close).
        _log.failure(
            "the master failed to answer {command} from {worker}; closing its channel",
            failure,
            command=command.__name__,
            worker=self.requests.describe(),
        )
        self.drop(f"the master failed to answer its {command.__name__}")
        if not answerExpected:
            return None
        return Failure(amp.RemoteAmpError(amp.UNKNOWN_ERROR_CODE, "Unknown Error", local=failure))

    @Online.responder
    def online(self, pid: int) -> dict:
        if self._wasOnline:
            self._misbehave("said it was online twice")
            return {}
        self._wasOnline = True
        self.requests.online(pid)
        return {}

    @QueryServer.responder
    def queryServer(self, kind, address, port, index, backlog, mode) -> dict:
        return self.requests.queryServer(kind, address, port, index, backlog, mode)

    @Listening.responder
    def listening(self, listenId: int) -> dict:
        self.requests.listening(listenId)
        return {}

    @Close.responder
    def close(self, listenId: int) -> dict:
        self.requests.close(listenId)
        return {}

    @Ready.responder
    def ready(self) -> dict:
        self.requests.ready()
        return {}

    @Leaving.responder
    def leaving(self, why: str) -> dict:
        self.requests.leaving(why)
        return {}

    @LoadReport.responder
    def loadReport(self, connections: int) -> dict:
        self.requests.reportLoad(connections)
        return {}

    @ToMaster.responder
    def toMaster(self, message: str) -> dict:
        self.requests.message(message)
        return {}

    @FinalMetrics.responder
    def finalMetrics(self, metrics: str) -> dict:
        self.requests.finalMetrics(metrics)
        return {}

    @AskAgent.responder
    def askAgent(self, message: str):
        return self.requests.askAgent(message).addCallback(lambda answer: {"answer": answer})

    @AgentBroadcast.responder
    def agentBroadcast(self, message: str) -> dict:
        self.requests.agentBroadcast(message)
        return {}

    @AgentSend.responder
    def agentSend(self, workerId: int, message: str):
        return self.requests.agentSend(workerId, message).addCallback(lambda _: {})

    # Commands to the worker -------------------------------------------------

    def sendConnections(self, listenId: int, fds: list) -> defer.Deferred:
        """
        Send L{NewConn}: the hot path of every handoff, so it goes through
        AMP's low-level C{callRemoteString} (the same box on the wire,
        without the per-argument object machinery).

        @return: a Deferred firing with how many connections the worker
            took; a malformed answer is misbehaviour and fails it with
            L{ConnectionLost} (the connections go to another worker).
        """
        ordinals = _DESCRIPTORS.toStringProto(fds, self)
        d = self.callRemoteString(NewConn.commandName, listenId=b"%d" % listenId, fds=ordinals)
        self._handoffs += 1
        if self._answers is not None:
            self._answers.handedOff(self)
        d.addBoth(self._handoffAnswered)
        return d.addCallback(self._acceptedCount)

    def _handoffAnswered(self, result):
        self._handoffs -= 1
        if self.dropped is not None and not self._awaitingAnswers() and not self._receiving:
            self._close()
        return result

    def _acceptedCount(self, box) -> int:
        try:
            accepted = int(box[b"accepted"])
            connections = box.get(b"connections")
            if connections is not None:
                self.requests.reportLoad(max(0, int(connections)))
            return accepted
        except (KeyError, ValueError) as e:
            self._misbehave(f"sent a malformed answer to NewConn ({_parseProblem(e)})")
            raise ConnectionLost("the worker's answer to NewConn was malformed") from None

    def callRemote(self, commandType, *a, **kw):
        """
        As L{amp.AMP.callRemote}; an answer that does not parse is
        misbehaviour, and the Deferred fails with L{ConnectionLost} as if
        the channel had broken (a L{NewConn}'s connections go to another
        worker).
        """
        d = super().callRemote(commandType, *a, **kw)
        if d is not None:
            d.addErrback(self._checkAnswer, commandType)
        return d

    def _checkAnswer(self, failure: Failure, command) -> Failure:
        if not self._answering or failure.check(amp.RemoteAmpError, ConnectionClosed, *command.allErrors):
            # Not an answer from the worker (the channel closed, say), or an
            # error it answered with: the caller handles it.
            return failure
        self._misbehave(f"sent a malformed answer to {command.__name__} ({_parseProblem(failure.value)})")
        return Failure(ConnectionLost(f"the worker's answer to {command.__name__} was malformed"))

    @property
    def handoffsUnanswered(self) -> int:
        """
        How many L{NewConn}s sent on this channel wait for their answer.
        """
        return self._handoffs

    # Connection ---------------------------------------------------------------

    def makeConnection(self, transport) -> None:
        makeConnectionQuietly(self, transport)

    def connectionLost(self, reason) -> None:
        if self.answerReader is not None:
            self.answerReader.forget(self)
        self._closeDescriptors()
        if self.dropped is not None:
            reason = Failure(ChannelDropped(self.dropped))
        outstanding = reason
        if not reason.check(ConnectionClosed):
            # The reactor dropped the channel because of an error.  For the
            # commands the worker had not answered this is the channel
            # closing: the handle table gives their connections to other
            # workers instead of counting them taken.
            outstanding = Failure(ConnectionLost(f"the channel broke: {reason.getErrorMessage()}"))
        connectionLostQuietly(self, outstanding)
        self.requests.channelLost(reason)


#: How long, at most, the master leaves a worker's answer to a NewConn
#: unread when no connection arrives meanwhile, in seconds.
ANSWER_DELAY = 0.005


class AnswerReader:
    """
    Reads the workers' answers to L{NewConn} when the master is awake
    anyway, instead of being woken for each.

    At a moderate rate nothing batches: the master sleeps, is woken by a
    connection, hands it off and sleeps, and is woken again some 100 µs
    later by the worker's answer.  A wake-up costs more CPU here than
    everything the master does for the connection.  So a channel a
    L{NewConn} went out on leaves the reactor's readers, and its answers
    are read just before the next connections are dispatched (whose
    accept woke the master), and L{ANSWER_DELAY} seconds after the first
    such handoff, at the latest, every channel is read and goes back to
    the reactor's readers.  The worker writes its answer at once, before
    it reads the connection, so the rule that an answer is in the channel
    before the connection is read still holds: a worker that dies leaves
    its answers readable before the end of the channel.  What else a
    worker sends meanwhile (L{Ready}, L{LoadReport}, ...) waits as long,
    at most.  Only a channel over L{BatchingUNIXServer} is read so (the
    unit tests' fake transports are always the reactor's).
    """

    def __init__(self, reactor, delay: float = ANSWER_DELAY) -> None:
        self._reactor = reactor
        self._delay = delay
        self._waiting: dict[MasterChannel, None] = {}
        self._timer = None

    def handedOff(self, channel: MasterChannel) -> None:
        """
        A L{NewConn} went out on C{channel}.
        """
        transport = channel.transport
        if channel.answerReader is not None or not isinstance(transport, BatchingUNIXServer) or not _open(transport):
            return
        transport.stopReading()
        channel.answerReader = self
        self._waiting[channel] = None
        if self._timer is None:
            self._timer = self._reactor.callLater(self._delay, self._due)

    def readAnswers(self) -> None:
        """
        Read every channel that waits for answers (the master is about to
        dispatch connections).
        """
        for channel in list(self._waiting):
            if channel.handoffsUnanswered and not self._read(channel):
                self._handBack(channel)

    def forget(self, channel: MasterChannel) -> None:
        """
        C{channel} is gone.
        """
        channel.answerReader = None
        self._waiting.pop(channel, None)
        if not self._waiting and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _read(self, channel: MasterChannel) -> bool:
        # Read what the worker sent, as the reactor would; False when the
        # channel closed or broke (the reactor must see that).
        transport = channel.transport
        return transport is not None and _open(transport) and transport.doRead() is None

    def _handBack(self, channel: MasterChannel) -> None:
        self._waiting.pop(channel, None)
        if channel.answerReader is self:
            channel.answerReader = None
            if channel.transport is not None and _open(channel.transport):
                channel.transport.startReading()

    def _due(self) -> None:
        # Every channel goes back to the reactor, which wakes the master
        # for what is still to come (a worker slow to answer does not
        # make it poll).
        self._timer = None
        for channel in list(self._waiting):
            self._read(channel)
            self._handBack(channel)


def _open(transport) -> bool:
    return transport.connected and not transport.disconnecting
