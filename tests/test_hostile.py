"""
A hostile worker cannot hurt the master: deterministic tests with the fakes
of L{txcluster.testing} (no process, no time but the fake reactor's) for
each way a worker can break the protocol, and property tests that feed
random bytes, boxes and argument values into the master's end of a
channel.

Whatever a worker sends, the master must not raise, must not keep a
descriptor, must keep serving through the other workers, and must either
answer or log the worker (with its id and pid) and replace it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from typing import Optional

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from txcluster import ClusterConfig, ClusterService, WorkerExited, WorkerListening, WorkerMessage
from txcluster import _channel
from txcluster._channel import (
    COMMAND_BURST,
    COMMAND_RATE,
    MAX_BOX_SIZE,
    REFUSAL_LIMIT,
    REFUSAL_WINDOW,
    CommandBudget,
)
from txcluster._commands import (
    Close,
    ListenRefused,
    Listening,
    LoadReport,
    NewConn,
    Online,
    Ping,
    QueryServer,
    Ready,
    ToMaster,
    UnknownListen,
)
from txcluster._master import CHANNEL_LOST_GRACE
from txcluster.testing import FakeChannel, FakeSpawner

from tests.test_master import LOCAL, ClusterTestsMixin, readFrom


class Bogus(amp.Command):
    """
    A command no master knows.
    """

    arguments = [(b"payload", amp.Unicode())]
    response = []


def rawBox(**fields) -> bytes:
    """
    One AMP box, serialized, with whatever keys and values: text is encoded
    as UTF-8, integers written in decimal.
    """
    box = amp.AmpBox()
    for key, value in fields.items():
        if isinstance(value, int):
            value = str(value).encode()
        elif isinstance(value, str):
            value = value.encode("utf-8")
        box[key.encode()] = value
    return box.serialize()


def openDescriptors() -> int:
    """
    How many file descriptors this process has open.
    """
    return len(os.listdir("/proc/self/fd"))


class HostileTestsMixin(ClusterTestsMixin):
    """
    Assertions about a worker that misbehaved.
    """

    def hostileCluster(self, **config):
        """
        Two ready workers sharing one listen; a dead worker is respawned at
        once.
        """
        config.setdefault("stableAfter", 0)
        return self.readyCluster(2, listens=[LOCAL], **config)

    def assertNoUnhandledError(self) -> None:
        """
        Nothing was logged as a failure (an "Unhandled Error" from the fake
        channel, AMP's "while receiving response to command", ...).
        """
        self.assertEqual([formatEvent(e) for e in self.logs if "log_failure" in e], [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def assertMisbehaved(self, worker, what: str) -> str:
        """
        C{worker} was logged at error level as misbehaving with C{what},
        killed with SIGKILL, and its channel was dropped; nothing was logged
        as an unhandled error.
        """
        line = self.assertLogged(
            f"worker {worker.workerId} (pid {worker.pid}) misbehaved: it {what}", LogLevel.error
        )
        self.assertTrue(line.endswith("; replacing it"), line)
        self.assertEqual(worker.process.signalNumbers(), [signal.SIGKILL])
        self.assertTrue(worker.channel.lost)
        self.assertLogged(
            f"worker {worker.workerId} (pid {worker.pid}): channel closed "
            "(the master dropped it: the worker misbehaved)",
            LogLevel.warn,
        )
        self.assertNoUnhandledError()
        return line

    def assertReplaced(self, worker) -> None:
        """
        Once C{worker} dies (of the SIGKILL), the master respawns its id and
        counts a failure.
        """
        failures = self.cluster.statistics().failures
        worker.kill()
        self.advance(1.0)
        replacement = self.spawner.latest(worker.workerId)
        self.assertNotEqual(replacement.pid, worker.pid)
        self.assertTrue(replacement.running)
        self.assertEqual(self.cluster.statistics().failures, failures + 1)
        (exited,) = [e for e in self.eventsOf(WorkerExited) if e.pid == worker.pid]
        self.assertFalse(exited.expected)

    def assertOthersServe(self, workerId: int = 2) -> None:
        """
        A new client connection goes to worker C{workerId}, and its bytes
        arrive there.
        """
        other = self.worker(workerId)
        before = len(other.connections)
        (client,) = self.connect()
        self.assertEqual(len(other.connections), before + 1)
        client.sendall(b"still serving")
        self.assertEqual(readFrom(other.connections[-1]), b"still serving")


class FramingTests(HostileTestsMixin, SynchronousTestCase):
    """
    Bytes that are not AMP, or not a box the protocol allows.
    """

    def test_garbage(self) -> None:
        """
        Bytes that are not AMP (here an HTTP request, whose first two bytes
        read as a key length of 18245) get the worker logged, killed and
        replaced; the master drops its channel without an unhandled error
        and the other worker keeps serving.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.send(b"GET / HTTP/1.1\r\nHost: master\r\n\r\n")
        self.assertMisbehaved(worker, "sent a key of 18245 bytes (at most 255)")
        self.assertOthersServe()
        self.assertReplaced(worker)
        self.assertOthersServe()

    def test_keyTooLong(self) -> None:
        """
        A key of 256 bytes is misbehaviour.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.send(b"\x01\x00" + b"k" * 256 + b"\x00\x01v\x00\x00")
        self.assertMisbehaved(worker, "sent a key of 256 bytes (at most 255)")

    def test_emptyBox(self) -> None:
        """
        An empty box (two NUL bytes) is neither a command nor an answer.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.send(b"\x00\x00")
        self.assertMisbehaved(worker, "sent a box that is neither a command nor an answer")
        self.assertReplaced(worker)

    def test_boxWithoutCommand(self) -> None:
        """
        A well-formed box with neither C{_command}, C{_answer} nor C{_error}
        is misbehaviour.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.send(rawBox(port=80, kind="tcp4"))
        self.assertMisbehaved(worker, "sent a box that is neither a command nor an answer")

    def test_oversizedBox(self) -> None:
        """
        A box larger than L{MAX_BOX_SIZE} is misbehaviour as soon as it
        grows past the limit, before it is complete: an unfinished box
        cannot make the master hold more than that.
        """
        self.hostileCluster()
        worker = self.worker(1)
        value = b"x" * 0xFFFF
        chunks = [b"\x00\x01" + bytes([65 + i]) + b"\xff\xff" + value for i in range(5)]
        self.assertGreater(sum(map(len, chunks)), MAX_BOX_SIZE)
        worker.send(b"".join(chunks))
        self.assertMisbehaved(worker, f"sent a box larger than {MAX_BOX_SIZE} bytes")

    def test_largestLegitimateBox(self) -> None:
        """
        A L{ToMaster} whose message is the largest an AMP value can hold
        (65535 bytes) is delivered.
        """
        self.hostileCluster()
        worker = self.worker(1)
        message = '"' + "x" * (0xFFFF - 2) + '"'
        answer = worker.callRemote(ToMaster, message=message)
        self.assertEqual(self.successResultOf(answer), {})
        (event,) = self.eventsOf(WorkerMessage)
        self.assertEqual(len(event.message), 0xFFFF - 2)
        self.assertEqual(worker.process.signals, [])

    def test_truncatedBoxThenExit(self) -> None:
        """
        A box cut short by the channel closing (a worker that died in the
        middle of a write) is not misbehaviour: the worker is killed after
        the channel grace if it is still running, and replaced.
        """
        self.hostileCluster()
        worker = self.worker(1)
        whole = rawBox(_command="Ready", _ask="1")
        worker.send(whole[:-5])
        self.assertEqual(worker.process.signals, [])
        worker.channel.clientTransport.loseConnection()
        worker.flush()
        self.assertLogged(f"worker 1 (pid {worker.pid}): channel closed", LogLevel.warn)
        self.assertNotLogged("misbehaved")
        self.reactor.advance(CHANNEL_LOST_GRACE)
        self.assertEqual(worker.process.signalNumbers(), [signal.SIGKILL])
        self.assertNoUnhandledError()
        self.assertOthersServe()
        self.assertReplaced(worker)

    def test_truncatedBoxThenMore(self) -> None:
        """
        A box cut short inside a value and followed by another box is read
        as one box whose next key length is absurd: misbehaviour.
        """
        self.hostileCluster()
        worker = self.worker(1)
        # "_command" announces a 10-byte value; "Ready" is 5: the value
        # swallows the start of the next box, and the rest is misread.
        truncated = b"\x00\x08_command\x00\x0aReady"
        worker.send(truncated + rawBox(_command="Ready", _ask="2"))
        self.assertMisbehaved(worker, "sent a key of")

    def test_nothingReadAfterMisbehaviour(self) -> None:
        """
        Once a worker misbehaved, nothing more it sent is read, even what
        came in the same write.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.send(b"\x00\x00" + rawBox(_command="ToMaster", _ask="5", message='"late"'))
        self.assertMisbehaved(worker, "sent a box that is neither")
        self.assertEqual(self.eventsOf(WorkerMessage), [])


class CommandTests(HostileTestsMixin, SynchronousTestCase):
    """
    Boxes that are well formed but not commands the master accepts as
    sent.
    """

    def test_answersAfterMisbehaviourStillCount(self) -> None:
        """
        A worker that misbehaved while the framing is intact still has its
        answers to the handoffs it was sent read, until none is left: a
        connection it took (and may have read from) is not given to another
        worker; one it refused is.
        """
        self.hostileCluster()
        worker = self.worker(1)
        other = self.worker(2)
        worker.holding.add(NewConn)
        self.connect(1)
        self.connect(1)
        self.connect(1)
        first, second = worker.unanswered(NewConn)
        self.assertEqual(len(other.connections), 1)
        bogus = worker.callRemote(Bogus, payload="x")
        self.assertLogged(f"worker 1 (pid {worker.pid}) misbehaved: it sent an unknown command")
        self.assertFalse(worker.channel.lost)
        first.takeConnections()
        self.assertFalse(worker.channel.lost)
        self.assertEqual(len(other.connections), 1)
        second.takeConnections(0)
        self.assertTrue(worker.channel.lost)
        self.assertEqual(len(other.connections), 2)
        self.assertEqual(self.cluster.statistics().dropped, 0)
        self.failureResultOf(bogus)

    def test_commandsAfterMisbehaviourAreNotTaken(self) -> None:
        """
        While the master waits for those answers, a command the worker sends
        is ignored.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.holding.add(NewConn)
        self.connect(1)
        bogus = worker.callRemote(Bogus, payload="x")
        message = worker.sendToMaster("ignored")
        self.assertEqual(self.eventsOf(WorkerMessage), [])
        self.assertNoResult(message)
        worker.kill()
        self.failureResultOf(bogus)
        self.failureResultOf(message)

    def test_unknownCommand(self) -> None:
        """
        A command the master does not know (AMP would answer C{UNHANDLED}
        and carry on) gets the worker logged and replaced.
        """
        self.hostileCluster()
        worker = self.worker(1)
        answer = worker.callRemote(Bogus, payload="hello")
        self.assertMisbehaved(worker, "sent an unknown command b'Bogus'")
        self.failureResultOf(answer)
        self.assertOthersServe()
        self.assertReplaced(worker)

    def test_startTLS(self) -> None:
        """
        AMP's own C{StartTLS}, which a plain L{amp.AMP} would answer, is an
        unknown command on a channel.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.send(rawBox(_command="StartTLS", _ask="1"))
        self.assertMisbehaved(worker, "sent an unknown command b'StartTLS'")

    def test_unknownCommandWithoutAsk(self) -> None:
        """
        An unknown command that asks for no answer is misbehaviour too.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.send(rawBox(_command="Whatever", x=1))
        self.assertMisbehaved(worker, "sent an unknown command b'Whatever'")

    def test_wrongArgumentType(self) -> None:
        """
        A L{QueryServer} whose C{port} is not an integer is misbehaviour;
        nothing is bound.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.send(
            rawBox(
                _command="QueryServer", _ask="1", kind="tcp4", address="127.0.0.1",
                port="eighty", index=0, backlog=50, mode=0o666,
            )
        )
        self.assertMisbehaved(
            worker, "sent a malformed QueryServer (ValueError: invalid literal for int() with base 10: b'eighty')"
        )
        self.assertEqual(len(self.cluster._table.handles()), 1)

    def test_missingArgument(self) -> None:
        """
        A L{ToMaster} without its C{message} is misbehaviour.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.send(rawBox(_command="ToMaster", _ask="1"))
        self.assertMisbehaved(worker, "sent a malformed ToMaster (missing message)")
        self.assertEqual(self.eventsOf(WorkerMessage), [])

    def test_invalidText(self) -> None:
        """
        A text argument that is not UTF-8 is misbehaviour.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.send(rawBox(_command="ToMaster", _ask="1", message=b'"\xff\xfe"'))
        self.assertMisbehaved(worker, "sent a malformed ToMaster (UnicodeDecodeError")

    def test_hugeInteger(self) -> None:
        """
        An integer of 5000 digits (more than Python parses) in a command
        that asks for no answer is misbehaviour, not an unhandled error.
        """
        self.hostileCluster(scheduling="least-busy")
        worker = self.worker(1)
        worker.send(rawBox(_command="LoadReport", connections="9" * 5000))
        self.assertMisbehaved(worker, "sent a malformed LoadReport (ValueError")

    def test_absurdLoadReport(self) -> None:
        """
        A L{LoadReport} of a negative or gigantic number is taken as it is
        (the scheduler clamps it): the worker is not killed, and the other
        worker still gets connections.
        """
        self.hostileCluster(scheduling="least-busy")
        worker = self.worker(1)
        worker.loadReport(-(10**30))
        worker.loadReport(10**30)
        self.assertEqual(worker.process.signals, [])
        self.assertOthersServe()

    def test_onlineTwice(self) -> None:
        """
        A worker says L{Online} once; a second time is misbehaviour.
        """
        self.hostileCluster()
        worker = self.worker(1)
        answer = worker.online()
        self.assertMisbehaved(worker, "said it was online twice")
        # The channel closes after the answer to what was read.
        self.assertEqual(self.successResultOf(answer), {})

    def test_invalidMessage(self) -> None:
        """
        A L{ToMaster} that is not JSON gets the worker logged and killed,
        and its channel dropped: what it sends next is not read.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.send(
            rawBox(_command="ToMaster", message="{nope") + rawBox(_command="ToMaster", message='"after"')
        )
        self.assertMisbehaved(worker, "sent a message that is not JSON")
        self.assertEqual(self.eventsOf(WorkerMessage), [])
        self.assertReplaced(worker)

    def test_masterFaultIsTheMasters(self) -> None:
        """
        When the master itself fails to answer a command (a bug), the log
        says it is the master's fault, with the traceback, and the worker is
        let go as if its channel had broken (killed after the channel
        grace), not called misbehaving.
        """
        self.hostileCluster()
        worker = self.worker(1)

        def broken(process):
            raise RuntimeError("a bug in the master")

        self.patch(self.cluster._processes, "ready", broken)
        answer = worker.ready()
        self.failureResultOf(answer)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertLogged(
            f"the master failed to answer Ready from worker 1 (pid {worker.pid}); closing its channel"
        )
        self.assertNotLogged("misbehaved")
        self.assertTrue(worker.channel.lost)
        self.assertEqual(worker.process.signals, [])
        self.reactor.advance(CHANNEL_LOST_GRACE)
        self.assertEqual(worker.process.signalNumbers(), [signal.SIGKILL])


class AnswerTests(HostileTestsMixin, SynchronousTestCase):
    """
    Answers the master did not ask for, or cannot read.
    """

    def test_answerNeverAsked(self) -> None:
        """
        An answer to a request the master never sent (AMP would raise
        C{KeyError} out of C{dataReceived}) is misbehaviour.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.send(rawBox(_answer="ff", accepted=1))
        self.assertMisbehaved(worker, "answered a request the master never sent (tag b'ff')")
        self.assertReplaced(worker)

    def test_errorNeverAsked(self) -> None:
        """
        An error answer to a request the master never sent is misbehaviour.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.send(rawBox(_error="7", _error_code="X", _error_description="no"))
        self.assertMisbehaved(worker, "answered a request the master never sent (tag b'7')")

    def test_errorWithoutCode(self) -> None:
        """
        An error answer without C{_error_code} (which AMP would look up
        with a C{KeyError}) is misbehaviour.
        """
        self.hostileCluster(workerTimeout=3)
        worker = self.worker(1)
        worker.holding.add(Ping)
        self.advance(1.0)
        (tag,) = worker.channel.server._outstandingRequests
        worker.send(rawBox(_error=tag))
        self.assertMisbehaved(worker, "sent an error answer without a code or description")

    def test_answeredTwice(self) -> None:
        """
        A second answer to the same L{NewConn} is misbehaviour; the first
        one stands (the connection was the worker's).
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.holding.add(NewConn)
        self.connect()
        (tag,) = worker.channel.server._outstandingRequests
        (newConn,) = worker.unanswered(NewConn)
        newConn.takeConnections()
        self.assertEqual(worker.process.signals, [])
        worker.send(rawBox(_answer=tag, accepted=1))
        self.assertMisbehaved(worker, f"answered a request the master never sent (tag {tag!r})")

    def test_malformedAnswer(self) -> None:
        """
        A L{NewConn} answer whose C{accepted} is not an integer is
        misbehaviour; the connection goes to the other worker, and the
        master keeps no copy of it.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.holding.add(NewConn)
        baseline = openDescriptors()
        (client,) = self.connect()
        (tag,) = worker.channel.server._outstandingRequests
        worker.send(rawBox(_answer=tag, accepted="all of them"))
        self.assertMisbehaved(worker, "sent a malformed answer to NewConn (ValueError")
        other = self.worker(2)
        (fd,) = other.connections
        client.sendall(b"moved")
        self.assertEqual(readFrom(fd), b"moved")
        worker.kill()
        # The client socket, and the other worker's copy of the connection.
        self.assertEqual(openDescriptors(), baseline + 2)

    def test_answerMissingAccepted(self) -> None:
        """
        A L{NewConn} answer without C{accepted} is misbehaviour.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.holding.add(NewConn)
        self.connect()
        (tag,) = worker.channel.server._outstandingRequests
        worker.send(rawBox(_answer=tag))
        self.assertMisbehaved(worker, "sent a malformed answer to NewConn (missing accepted)")

    def test_fastPathAnswerNeverAsked(self) -> None:
        """
        An answer shaped exactly like a real one to L{NewConn} (the shape
        the master parses on its fast path) for a request the master never
        sent is misbehaviour, as any other.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.send(rawBox(_answer="ff", accepted=1, connections=0))
        self.assertMisbehaved(worker, "answered a request the master never sent (tag b'ff')")

    def test_fastPathMalformedAnswer(self) -> None:
        """
        So is such an answer whose C{accepted} is not an integer; the
        connection goes to the other worker.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.holding.add(NewConn)
        (client,) = self.connect()
        (tag,) = worker.channel.server._outstandingRequests
        worker.send(rawBox(_answer=tag, accepted="all", connections=0))
        self.assertMisbehaved(worker, "sent a malformed answer to NewConn (ValueError")
        (fd,) = self.worker(2).connections
        client.sendall(b"moved")
        self.assertEqual(readFrom(fd), b"moved")

    def test_answersInPieces(self) -> None:
        """
        Answers to several L{NewConn}s that arrive together, or a byte at a
        time, or cut anywhere, are all read, in order, by the fast path or
        the general parser, whichever sees them.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.holding.add(NewConn)
        outstanding = worker.channel.server._outstandingRequests
        for cut in (None, 1, 5, 17, 40):
            for _ in range(4):
                if len(outstanding) == 2:
                    break
                self.connect()
            tags = sorted(outstanding)
            self.assertEqual(len(tags), 2, cut)
            data = b"".join(rawBox(_answer=tag, accepted=1, connections=4) for tag in tags)
            pieces = [data] if cut is None else [data[i : i + cut] for i in range(0, len(data), cut)]
            for piece in pieces:
                worker.send(piece)
            self.assertEqual(outstanding, {}, cut)
        self.assertEqual(worker.process.signals, [])
        self.assertEqual(self.cluster.statistics().workers[0].handed, 10)
        self.assertNoUnhandledError()

    def assertTookTooMany(self, accepted: int) -> None:
        """
        A L{NewConn} answered with C{accepted} for one connection is
        misbehaviour; the master closes its copy (it was handed over), and
        the other worker keeps serving.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.holding.add(NewConn)
        baseline = openDescriptors()
        self.connect()
        (newConn,) = worker.unanswered(NewConn)
        newConn.answer(accepted=accepted)
        self.assertMisbehaved(worker, f"said it took {accepted} of 1 connections")
        # The client socket and the worker's copy; not the master's.
        self.assertEqual(openDescriptors(), baseline + 2)
        self.assertOthersServe()
        self.assertReplaced(worker)

    def test_acceptedTooMany(self) -> None:
        """
        A L{NewConn} answer claiming more connections than were sent is
        misbehaviour.
        """
        self.assertTookTooMany(5)

    def test_acceptedNegative(self) -> None:
        """
        A L{NewConn} answer claiming a negative number of connections is
        misbehaviour.
        """
        self.assertTookTooMany(-1)


class DescriptorTests(HostileTestsMixin, SynchronousTestCase):
    """
    Workers never send file descriptors to the master.
    """

    def test_descriptorSent(self) -> None:
        """
        A descriptor sent to the master is closed at once and the worker is
        logged, killed and replaced.
        """
        self.hostileCluster()
        worker = self.worker(1)
        r, w = os.pipe()
        self.addCleanup(os.close, w)
        baseline = openDescriptors()
        worker.channel.clientTransport.sendFileDescriptor(r)
        worker.channel.clientTransport.write(rawBox(_command="Ready", _ask="9"))
        worker.flush()
        os.close(r)
        self.assertRaises(BrokenPipeError, os.write, w, b"x")
        self.assertEqual(openDescriptors(), baseline - 1)
        self.assertMisbehaved(worker, "sent a file descriptor")
        self.assertOthersServe()
        self.assertReplaced(worker)

    def test_manyDescriptors(self) -> None:
        """
        Every descriptor of a batch is closed, also those that arrive after
        the channel was dropped; the misbehaviour is logged once.
        """
        self.hostileCluster()
        worker = self.worker(1)
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        baseline = openDescriptors()
        for _ in range(10):
            worker.channel.server.fileDescriptorReceived(os.dup(r))
        self.assertEqual(openDescriptors(), baseline)
        self.assertEqual(len([m for m in self.messages(LogLevel.error) if "misbehaved" in m]), 1)
        worker.flush()
        self.assertMisbehaved(worker, "sent a file descriptor")

    def test_descriptorNamedNotSent(self) -> None:
        """
        A box that names a descriptor ordinal the worker never sent claims
        nothing: no command of a worker carries a descriptor, so the extra
        key is ignored, as AMP ignores unknown keys, and the command is
        answered (a repeated Listening changes nothing and is not logged
        again).
        """
        self.hostileCluster()
        worker = self.worker(1)
        listened = len(self.eventsOf(WorkerListening))
        worker.send(rawBox(_command="Listening", listenId=self.handle().listenId, fd=0))
        self.assertEqual(len(self.eventsOf(WorkerListening)), listened)
        self.assertEqual(worker.process.signals, [])
        self.assertEqual(worker.channel.server._descriptors, {})
        self.assertFalse(worker.channel.lost)
        self.assertNoUnhandledError()

    def test_descriptorsClosedWithTheChannel(self) -> None:
        """
        Descriptors AMP holds for a box still to come are closed when the
        channel closes.
        """
        self.hostileCluster()
        worker = self.worker(1)
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        baseline = openDescriptors()
        # As if the descriptor had arrived for a box not yet processed.
        worker.channel.server._descriptors[0] = os.dup(r)
        worker.channel.sever()
        self.assertEqual(openDescriptors(), baseline)


class ListenTests(HostileTestsMixin, SynchronousTestCase):
    """
    Absurd L{QueryServer}s are refused with L{ListenRefused} and logged;
    many refused requests are misbehaviour.
    """

    absurd = [
        (dict(kind="carrier-pigeon"), "unknown kind 'carrier-pigeon'"),
        (dict(kind="x" * 60000), "unknown kind 'xxxx"),
        (dict(port=70000), "port 70000 is out of range"),
        (dict(port=-1), "port -1 is out of range"),
        (dict(index=10**100), "index 1000000000000"),
        (dict(backlog=-5), "backlog -5 is out of range"),
        (dict(mode=0o17777), "mode 17777 is out of range"),
        (dict(address="127.0.0.1\0"), "bad interface address '127.0.0.1\\x00'"),
        (dict(address="\N{SNOWMAN}.example"), "bad interface address"),
        (dict(address="10.0.0.1\n"), "bad interface address"),
        (dict(address="x" * 2000), "address is too long (2000 characters)"),
        (dict(kind="unix", address="/tmp/" + "s" * 200), "bad UNIX socket path"),
        (dict(kind="unix", address="/tmp/a\0b"), "bad UNIX socket path"),
        (dict(kind="unix", address="relative.sock"), "bad UNIX socket path 'relative.sock'"),
        (dict(kind="unix", address=""), "bad UNIX socket path ''"),
    ]

    def query(self, worker, **overrides):
        arguments = dict(kind="tcp4", address="127.0.0.1", port=0, index=0, backlog=50, mode=0o666)
        arguments.update(overrides)
        return worker.callRemote(QueryServer, **arguments)

    def test_absurdListensRefused(self) -> None:
        """
        Each absurd listen is refused with L{ListenRefused} and logged as an
        invalid listen, with the worker's id and pid and what is wrong (text
        the worker chose is cut short); nothing is bound and the worker
        keeps running.
        """
        self.hostileCluster()
        worker = self.worker(1)
        for overrides, problem in self.absurd:
            self.logs.clear()
            failure = self.failureResultOf(self.query(worker, **overrides), ListenRefused)
            self.assertIn(problem, failure.getErrorMessage())
            line = self.assertLogged(
                f"worker 1 (pid {worker.pid}) asked for an invalid listen: {problem}", LogLevel.warn
            )
            self.assertLess(len(line), 300)
        self.assertEqual(len(self.cluster._table.handles()), 1)
        self.assertEqual(worker.process.signals, [])
        self.assertNoUnhandledError()
        self.connect(2)
        self.assertEqual([len(self.worker(w).connections) for w in (1, 2)], [1, 1])

    def test_manyRefusalsAreMisbehaviour(self) -> None:
        """
        L{REFUSAL_LIMIT} refused requests within L{REFUSAL_WINDOW} seconds
        are answered; one more is misbehaviour.
        """
        self.hostileCluster()
        worker = self.worker(1)
        for _ in range(REFUSAL_LIMIT):
            self.failureResultOf(self.query(worker, port=-1), ListenRefused)
            self.reactor.advance(1)
        self.assertEqual(worker.process.signals, [])
        self.failureResultOf(self.query(worker, port=-1))
        self.assertMisbehaved(
            worker,
            f"made more than {REFUSAL_LIMIT} requests the master refused within 60 s, "
            "the last a QueryServer (port -1 is out of range)",
        )
        self.assertReplaced(worker)

    def test_refusalsSpreadOut(self) -> None:
        """
        Refusals older than L{REFUSAL_WINDOW} seconds no longer count: a
        worker that retries a refused listen every few seconds is not
        killed.
        """
        self.hostileCluster()
        worker = self.worker(1)
        for _ in range(REFUSAL_LIMIT * 3):
            self.failureResultOf(self.query(worker, port=-1), ListenRefused)
            self.reactor.advance(REFUSAL_WINDOW / REFUSAL_LIMIT + 0.01)
        self.assertEqual(worker.process.signals, [])

    def test_refusalWithoutAsk(self) -> None:
        """
        A refused command that asked for no answer is refused silently (AMP
        would log the error as unhandled and close the channel), and still
        counts.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.send(rawBox(_command="Close", listenId=999) * REFUSAL_LIMIT)
        self.assertEqual(worker.process.signals, [])
        self.assertFalse(worker.channel.lost)
        self.assertNoUnhandledError()
        worker.send(rawBox(_command="Close", listenId=999))
        self.assertMisbehaved(worker, f"made more than {REFUSAL_LIMIT} requests the master refused")

    def test_unknownListensCount(self) -> None:
        """
        L{Close} and L{Listening} of listens that are not the worker's are
        refused with L{UnknownListen}, and count as refused requests.
        """
        self.hostileCluster()
        worker = self.worker(1)
        for i in range(REFUSAL_LIMIT):
            command = Close if i % 2 else Listening
            self.failureResultOf(worker.callRemote(command, listenId=1000 + i), UnknownListen)
        self.assertEqual(worker.process.signals, [])
        self.failureResultOf(worker.callRemote(Close, listenId=-1))
        self.assertMisbehaved(worker, f"made more than {REFUSAL_LIMIT} requests the master refused")


class FloodTests(HostileTestsMixin, SynchronousTestCase):
    """
    A worker sending commands faster than the documented rate limit.
    """

    def setUp(self) -> None:
        super().setUp()
        # The mechanism with small numbers; the real ones are checked on
        # CommandBudget below.
        self.patch(_channel, "COMMAND_RATE", 100.0)
        self.patch(_channel, "COMMAND_BURST", 300)

    def hostileCluster(self, **config):
        """
        As L{HostileTestsMixin.hostileCluster}, then enough time for the
        workers' budgets to be full again after their start.
        """
        cluster = super().hostileCluster(**config)
        self.reactor.advance(10)
        return cluster

    def messagesAt(self, worker, count: int) -> None:
        worker.send(b"".join(rawBox(_command="ToMaster", message="1") for _ in range(count)))

    def test_burstThenRate(self) -> None:
        """
        A worker may send the burst at once, then the rate for as long as it
        likes.
        """
        self.hostileCluster()
        worker = self.worker(1)
        self.messagesAt(worker, 300)
        for _ in range(50):
            self.reactor.advance(0.1)
            self.messagesAt(worker, 10)
        self.assertEqual(worker.process.signals, [])
        self.assertEqual(len(self.eventsOf(WorkerMessage)), 800)

    def test_flood(self) -> None:
        """
        A worker sending twice the rate is logged and replaced once the
        burst is spent, and the other worker keeps serving; what it sent
        past the limit is not processed.
        """
        self.hostileCluster()
        worker = self.worker(1)
        for step in range(100):
            self.reactor.advance(0.1)
            self.messagesAt(worker, 20)
            if worker.process.signals:
                break
        # 300 + 100 a second, against 200 a second: after 3 s.
        self.assertEqual(step, 29)
        self.assertMisbehaved(worker, "sent commands faster than 100 a second (after a burst of 300)")
        self.assertLess(len(self.eventsOf(WorkerMessage)), 20 * 30)
        self.assertOthersServe()
        self.assertReplaced(worker)

    def test_floodOfAnyCommand(self) -> None:
        """
        The limit counts every command, also those that ask for no answer.
        """
        self.hostileCluster(scheduling="least-busy")
        worker = self.worker(1)
        worker.send(b"".join(rawBox(_command="LoadReport", connections=1) for _ in range(301)))
        self.assertMisbehaved(worker, "sent commands faster than 100 a second")

    def test_answersAreNotCounted(self) -> None:
        """
        Answers to the master's own requests do not count against the
        limit.
        """
        self.hostileCluster(workerTimeout=0.3)
        worker = self.worker(1)
        self.messagesAt(worker, 300)
        self.advance(3.0, step=0.1)
        self.assertGreater(len(worker.commands(Ping)), 5)
        self.assertEqual(worker.process.signals, [])


class CommandBudgetTests(SynchronousTestCase):
    """
    L{CommandBudget} with the documented numbers.
    """

    def test_documentedNumbers(self) -> None:
        """
        The limit is 10,000 commands a second after a burst of 30,000.
        """
        self.assertEqual((COMMAND_RATE, COMMAND_BURST), (10_000.0, 30_000))

    def test_burst(self) -> None:
        """
        L{COMMAND_BURST} commands at one instant pass; one more does not.
        """
        budget = CommandBudget(COMMAND_RATE, COMMAND_BURST, 100.0)
        self.assertTrue(all(budget.spend(100.0) for _ in range(COMMAND_BURST)))
        self.assertFalse(budget.spend(100.0))

    def test_sustainedRate(self) -> None:
        """
        A minute at L{COMMAND_RATE}, after a full burst, passes.
        """
        budget = CommandBudget(COMMAND_RATE, COMMAND_BURST, 0.0)
        self.assertTrue(all(budget.spend(0.0) for _ in range(COMMAND_BURST)))
        perTick = int(COMMAND_RATE / 100)
        for tick in range(1, 6001):
            now = tick / 100
            self.assertTrue(all(budget.spend(now) for _ in range(perTick)), now)

    def test_twiceTheRate(self) -> None:
        """
        Twice L{COMMAND_RATE} is caught after C{COMMAND_BURST / COMMAND_RATE}
        seconds.
        """
        budget = CommandBudget(COMMAND_RATE, COMMAND_BURST, 0.0)
        perTick = int(2 * COMMAND_RATE / 100)
        for tick in range(1, 1000):
            if not all(budget.spend(tick / 100) for _ in range(perTick)):
                break
        self.assertAlmostEqual(tick / 100, COMMAND_BURST / COMMAND_RATE, delta=0.02)

    def test_clockGoingBack(self) -> None:
        """
        A clock that goes back does not grant commands.
        """
        budget = CommandBudget(10.0, 1, 50.0)
        self.assertTrue(budget.spend(50.0))
        self.assertFalse(budget.spend(10.0))
        self.assertFalse(budget.spend(50.05))
        self.assertTrue(budget.spend(50.1))


class ChannelClosedTests(HostileTestsMixin, SynchronousTestCase):
    """
    A worker that closes its channel but keeps running.
    """

    def test_closedButRunning(self) -> None:
        """
        The worker is killed after L{CHANNEL_LOST_GRACE} seconds, not
        before; it is replaced, and that counts as a failure.
        """
        self.hostileCluster()
        worker = self.worker(1)
        worker.channel.clientTransport.loseConnection()
        worker.flush()
        self.assertLogged(f"worker 1 (pid {worker.pid}): channel closed", LogLevel.warn)
        self.reactor.advance(CHANNEL_LOST_GRACE - 0.1)
        self.assertEqual(worker.process.signals, [])
        self.assertOthersServe()
        self.reactor.advance(0.1)
        self.assertEqual(worker.process.signalNumbers(), [signal.SIGKILL])
        self.assertReplaced(worker)

    def test_misbehaviourCountsForGiveUp(self) -> None:
        """
        Misbehaving workers count as failures: more than C{maxRestarts} of
        them within the window and the master gives up.
        """
        self.hostileCluster(maxRestarts=1)
        for workerId in (1, 2):
            worker = self.worker(workerId)
            worker.send(b"\x00\x00")
            worker.kill()
        # The master stops what is left, then gives up.
        for worker in self.spawner.running():
            worker.exit(0)
        self.assertEqual(self.gaveUp, [1])
        self.assertLogged("giving up: more than 1 worker failures", LogLevel.critical)
        self.assertLogged("which misbehaved: it sent a box that is neither")


class TakeDataTests(SynchronousTestCase):
    """
    L{FakeChannel.takeData}, with which the property tests below read what
    the master answered.
    """

    def test_takeData(self) -> None:
        """
        The undelivered bytes of one side are returned and no longer
        delivered; its queued descriptors and close stay, in order.
        """
        server, client = amp.AMP(), amp.AMP()
        received = []
        client.dataReceived = received.append
        client.fileDescriptorReceived = lambda fd: (received.append(fd), os.close(fd))
        channel = FakeChannel(server, client).connect()
        channel.serverTransport.write(b"one")
        channel.serverTransport.sendFileDescriptor(0)
        channel.serverTransport.write(b"two")
        channel.serverTransport.loseConnection()
        self.assertEqual(channel.takeData(0), b"onetwo")
        self.assertEqual(channel.takeData(0), b"")
        self.assertEqual(channel.pending(0), 2)
        channel.flush()
        self.assertEqual(len(received), 1)
        self.assertIsInstance(received[0], int)
        self.assertTrue(channel.lost)


# Property tests ---------------------------------------------------------------


class Arena:
    """
    One cluster of two fake workers sharing one listen, built and torn down
    for each hypothesis example; worker 1 is the hostile one, played by hand
    through its channel's master end.
    """

    def __init__(self, scheduling: str = "rr") -> None:
        self.logs: list = []
        globalLogPublisher.addObserver(self.logs.append)
        self.reactor = MemoryReactorClock()
        self.spawner = FakeSpawner()
        self.cluster = ClusterService(
            ClusterConfig(app="app.tac", workers=2, workerTimeout=0, stableAfter=0, scheduling=scheduling),
            reactor=self.reactor,
            spawner=self.spawner,
            onGiveUp=lambda code: None,
        )
        self.cluster.startService()
        for worker in self.spawner.running():
            worker.start([LOCAL])
        (self.handle,) = self.cluster._table.handles()
        self.hostile = self.spawner.latest(1)
        self.master = self.hostile.channel.server
        self.pipe = os.pipe()
        self._written = b""

    def feed(self, data: bytes, descriptors: int = 0) -> None:
        """
        Deliver C{descriptors} descriptors (new duplicates) and then C{data}
        to the master as if worker 1 sent them; an exception would escape.
        """
        for _ in range(descriptors):
            self.master.fileDescriptorReceived(os.dup(self.pipe[0]))
        self.master.dataReceived(data)

    def answers(self) -> dict:
        """
        The tags the master answered (with an answer or an error), taken
        from what it wrote to worker 1.
        """
        self._collect()
        boxes = amp.parseString(self._written)
        return {box.get(amp.ANSWER, box.get(amp.ERROR)) for box in boxes}

    def _collect(self) -> None:
        # What the master wrote to worker 1 must not reach the fake worker,
        # which would not know the tags of the questions asked by hand.
        self._written += self.hostile.channel.takeData(0)

    @property
    def killed(self) -> bool:
        return signal.SIGKILL in self.hostile.process.signalNumbers()

    def failures(self) -> list:
        return [formatEvent(e) for e in self.logs if "log_failure" in e]

    def othersServe(self) -> bool:
        """
        A client connection goes to worker 2.
        """
        self._collect()
        other = self.spawner.latest(2)
        before = len(other.connections)
        with socket.create_connection((self.handle.host, self.handle.port)):
            for reader in list(self.reactor.readers):
                reader.doRead()
            self.spawner.flush()
        # The hostile worker may still be in rotation (the box was fine).
        return len(other.connections) + len(self.hostile.connections) > before

    def close(self) -> None:
        self.hostile.channel.sever()
        self.cluster._table.closeAll()
        self.spawner.closeDescriptors()
        for fd in self.pipe:
            os.close(fd)
        globalLogPublisher.removeObserver(self.logs.append)


@contextlib.contextmanager
def arena(testCase, scheduling: str = "rr"):
    """
    An L{Arena}; on leaving, it is torn down and the test fails if the
    process has more descriptors open than before, or if anything was
    logged as a failure.
    """
    before = openDescriptors()
    place = Arena(scheduling)
    try:
        yield place
        testCase.assertEqual(place.failures(), [])
    finally:
        place.close()
    testCase.assertEqual(openDescriptors(), before)


propertySettings = settings(
    derandomize=True,
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_commandNames = st.sampled_from(
    [b"Online", b"QueryServer", b"Listening", b"Close", b"Ready", b"LoadReport", b"ToMaster", b"Bogus", b""]
)
_integers = st.one_of(
    st.integers(-3, 3),
    st.integers(-(2**70), 2**70),
    st.sampled_from([1, 65535, 65536, 0o7777, 10**100]),
).map(lambda n: str(n).encode())
_values = st.one_of(
    _integers,
    st.binary(max_size=40),
    st.text(max_size=20).map(lambda t: t.encode("utf-8")),
    st.sampled_from([b"", b"tcp4", b"unix", b"udp6", b"127.0.0.1", b"\x00", b"\xff", b"9" * 5000]),
)
_keys = st.one_of(
    st.sampled_from(
        [
            b"_command", b"_ask", b"_answer", b"_error", b"_error_code", b"_error_description",
            b"pid", b"kind", b"address", b"port", b"index", b"backlog", b"mode",
            b"listenId", b"connections", b"message", b"fd",
        ]
    ),
    st.binary(min_size=1, max_size=12),
)


# Argument values of the right type for each worker command, and wrong ones.
_addresses = st.one_of(
    st.sampled_from(["127.0.0.1", "", "::1", "0.0.0.0", "a\0b", "x" * 2000, "\N{SNOWMAN}", "relative"]),
    st.text(alphabet=st.characters(min_codepoint=0x80), min_size=1, max_size=10),
    st.text(alphabet=st.characters(max_codepoint=0x1F), min_size=1, max_size=10),
    st.text(alphabet="abc", min_size=1, max_size=20).map(lambda t: "\0txcluster-test-" + t),
    st.just("/nonexistent-txcluster-dir/socket"),
)
_goodArguments = {
    Online: {"pid": st.integers(-(2**64), 2**64)},
    QueryServer: {
        "kind": st.sampled_from(["tcp4", "tcp6", "unix", "udp4", "udp6", "sctp", ""]),
        "address": _addresses,
        "port": st.one_of(st.just(0), st.integers(-(2**40), 2**40)),
        "index": st.integers(-5, 2000),
        "backlog": st.integers(-(2**33), 2**33),
        "mode": st.integers(-5, 0o20000),
    },
    Listening: {"listenId": st.integers(-(2**64), 2**64)},
    Close: {"listenId": st.integers(-(2**64), 2**64)},
    Ready: {},
    LoadReport: {"connections": st.integers(-(2**64), 2**64)},
    ToMaster: {"message": st.one_of(st.text(max_size=50), st.just('{"ok": [1, 2]}'))},
}


def _isJSON(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@st.composite
def commands(draw):
    """
    A worker command with arguments of the right types (random values) or,
    sometimes, one argument replaced by random bytes or left out.

    @return: C{(command, serialized box, its tag, acceptable)}: the tag
        is L{None} for a box that asks for no answer (as a L{LoadReport}
        does); acceptable, whether the arguments parse (and a message is
        JSON), as a healthy worker's do.
    """
    command = draw(st.sampled_from(sorted(_goodArguments, key=lambda c: c.__name__)))
    arguments = {name: draw(strategy) for name, strategy in _goodArguments[command].items()}
    tag = draw(st.sampled_from([b"1", b"1", b"1", None]))
    box = amp.AmpBox(_command=command.commandName)
    if tag is not None:
        box[amp.ASK] = tag
    for name, value in arguments.items():
        box[name.encode()] = value.encode("utf-8") if isinstance(value, str) else str(value).encode()
    if arguments and draw(st.integers(0, 3)) == 0:
        name = draw(st.sampled_from(sorted(arguments))).encode()
        if draw(st.booleans()):
            del box[name]
        else:
            box[name] = draw(st.binary(max_size=20))
    try:
        parsed = command.parseArguments(amp.AmpBox(box), None)
    except Exception:
        acceptable = False
    else:
        acceptable = command is not ToMaster or _isJSON(parsed["message"])
    return command, box.serialize(), tag, acceptable


@st.composite
def boxes(draw) -> tuple[bytes, Optional[bytes]]:
    """
    A box with random keys and values, most of them with a command name
    and an C{_ask} tag, or (half of the time) a worker command as
    L{commands} makes them; returns it serialized, and the tag of its
    question.
    """
    if draw(st.booleans()):
        command, data, tag, acceptable = draw(commands())
        return data, tag
    box = amp.AmpBox(draw(st.dictionaries(_keys, _values, max_size=8)))
    if draw(st.booleans()):
        box[b"_command"] = draw(_commandNames)
    if draw(st.booleans()):
        box[b"_ask"] = draw(st.sampled_from([b"1", b"2", b"ff"]))
    return box.serialize(), box.get(b"_ask") if b"_command" in box and b"_answer" not in box and b"_error" not in box else None


class PropertyTests(SynchronousTestCase):
    """
    Random input into the master's end of a worker's channel (one fresh
    cluster per example).  Whatever arrives: nothing escapes
    C{dataReceived}, nothing is logged as a failure, no descriptor stays
    open, and every question the worker asked is answered unless the
    worker was killed.
    """

    @propertySettings
    @given(data=st.binary(max_size=300), prefix=st.sampled_from([b"", rawBox(_command="Ready", _ask="1")]),
           descriptors=st.integers(0, 2))
    def test_randomBytes(self, data: bytes, prefix: bytes, descriptors: int) -> None:
        """
        Random bytes (after a valid box, sometimes), with or without
        descriptors: the master never raises and keeps no descriptor; a
        worker that sent descriptors is killed.
        """
        with arena(self) as place:
            place.feed(prefix + data, descriptors)
            if descriptors:
                self.assertTrue(place.killed)
            if prefix and not descriptors:
                self.assertIn(b"1", place.answers())
            self.assertEqual(place.killed, place.master.dropped is not None)

    @propertySettings
    @given(st.lists(boxes(), min_size=1, max_size=4))
    def test_randomBoxes(self, sent: list) -> None:
        """
        Random boxes: the master never raises, and each command's question
        is answered unless the worker was killed.
        """
        with arena(self) as place:
            place.feed(b"".join(data for data, tag in sent))
            answered = place.answers()
            if not place.killed:
                self.assertIsNone(place.master.dropped)
                for data, tag in sent:
                    if tag is not None:
                        self.assertIn(tag, answered)

    @propertySettings
    @given(commands(), st.sampled_from(["rr", "least-busy"]))
    def test_randomArguments(self, command, scheduling: str) -> None:
        """
        Each worker command with random argument values: well-typed ones are
        answered if they ask for an answer (a refusal is an answer), and
        otherwise silently, without killing the worker, except
        a second L{Online}; ill-typed or missing ones (or a message that is
        not JSON) get the worker killed.
        The other worker keeps getting connections either way.
        """
        command, data, tag, acceptable = command
        with arena(self, scheduling) as place:
            place.feed(data)
            if acceptable and command is not Online:
                self.assertFalse(place.killed)
                self.assertEqual(place.answers(), set() if tag is None else {tag})
            else:
                self.assertTrue(place.killed)
            self.assertTrue(place.othersServe())
