# -*- test-case-name: tests.test_commands -*-
"""
The master/worker protocol: every AMP command txcluster speaks, on one screen.

Both processes import this module; it holds declarations (and the one
rule both ends share about unclaimed descriptors).  Internal
commands and user messages are different commands, so a user message can
never be mistaken for an internal one.

Worker to master: L{Online}, L{QueryServer}, L{Listening}, L{Close},
L{Ready}, L{Leaving}, L{LoadReport}, L{ToMaster}, L{FinalMetrics},
L{AskAgent}.

Master to worker: L{NewConn}, L{Disconnect}, L{Ping}, L{ToWorker},
L{WorkerCount}, L{CollectMetrics}.

The agent (C{--agent}) speaks the worker's protocol, plus: to the master
L{AgentBroadcast} and L{AgentSend}; from the master L{AgentRequest} and
L{AgentWorkers}.

See C{docs/protocol.md} for the prose version.
"""

import json
import os
import struct
import zlib
from typing import Optional

from twisted.protocols import amp

from txcluster._twistedcompat import unclaimedDescriptors

#: The file descriptor number of the AMP channel in a worker.
CHANNEL_FD = 3

#: The file descriptor number of the structured log pipe in a worker.
LOG_FD = 4

#: The file descriptor number of the pipe a worker writes its stacks to
#: (C{faulthandler}, on C{SIGUSR1}).
STACKS_FD = 5

#: The file descriptor number of the load board in a worker (C{shared}
#: scheduling: L{txcluster._loadboard}).
BOARD_FD = 6

#: The shortest time between two L{LoadReport}s from one worker.
LOAD_REPORT_INTERVAL = 0.01

# Environment variables a worker is started with.
ENV_WORKER_ID = "TXCLUSTER_WORKER_ID"
ENV_WORKER_COUNT = "TXCLUSTER_WORKERS"
ENV_CHANNEL_FD = "TXCLUSTER_CHANNEL_FD"
ENV_LOG_FD = "TXCLUSTER_LOG_FD"
ENV_STACKS_FD = "TXCLUSTER_STACKS_FD"
ENV_REACTOR = "TXCLUSTER_REACTOR"
ENV_MASTER_PID = "TXCLUSTER_MASTER_PID"
ENV_GRACEFUL_TIMEOUT = "TXCLUSTER_GRACEFUL_TIMEOUT"
#: C{agent} in the agent process (C{--agent}); unset in workers.
ENV_ROLE = "TXCLUSTER_ROLE"
#: Under C{shared} scheduling: the worker's slot on the load board (fd
#: L{BOARD_FD}); unset otherwise.
ENV_LOAD_SLOT = "TXCLUSTER_LOAD_SLOT"
#: Under C{--proxy-protocol}: JSON C{{"allow": [...], "timeout": seconds}}.
ENV_PROXY = "TXCLUSTER_PROXY"

#: The worker id the agent goes by (workers count from 1).
AGENT_ID = 0


def describeWorkerId(workerId: int) -> str:
    """
    A worker id for a log line: C{"worker 3"}, or C{"the agent"}.
    """
    return "the agent" if workerId == AGENT_ID else f"worker {workerId}"


# The hot path's boxes, read and written directly --------------------------


def wireKeys(*keys: bytes) -> tuple:
    """
    C{keys} as they go on the wire, each after its 16-bit length, for
    L{readBox} and L{writeBox}.  AMP writes a box's keys sorted: give them
    in that order.
    """
    return tuple(struct.pack("!H", len(key)) + key for key in keys)


def readBox(data: bytes, offset: int, keys: tuple) -> Optional[tuple]:
    """
    Parse the AMP box at C{data[offset:]} if its keys are exactly C{keys}
    (from L{wireKeys}), in that order, and it is complete.

    @return: C{(values, end)}: the values in the order of C{keys}, and the
        offset after the box; or L{None} (another box, or an incomplete
        one: the general parser takes it).
    """
    end = len(data)
    at = offset
    values = []
    for key in keys:
        if not data.startswith(key, at):
            return None
        at += len(key)
        if at + 2 > end:
            return None
        length = (data[at] << 8) | data[at + 1]
        at += 2
        if at + length > end:
            return None
        values.append(data[at : at + length])
        at += length
    if data[at : at + 2] != b"\x00\x00":
        return None
    return values, at + 2


def writeBox(keys: tuple, values: tuple) -> bytes:
    """
    The bytes of the AMP box with C{keys} (from L{wireKeys}) and C{values}
    (bytes, at most 65,535 each): what C{AmpBox.serialize} makes of it.
    """
    parts = []
    for key, value in zip(keys, values):
        parts += (key, struct.pack("!H", len(value)), value)
    parts.append(b"\x00\x00")
    return b"".join(parts)


#: The keys of an answer to L{NewConn}, as a worker writes it.
NEWCONN_ANSWER_KEYS = wireKeys(amp.ANSWER, b"accepted", b"connections")

#: The keys of a L{NewConn} the master sends (it always asks for an answer).
NEWCONN_KEYS = wireKeys(amp.ASK, amp.COMMAND, b"fds", b"listenId")


class DescriptorList(amp.Argument):
    """
    Several file descriptors in one argument.

    Each descriptor travels exactly as L{amp.Descriptor} sends one (queued on
    the L{IUNIXTransport<twisted.internet.interfaces.IUNIXTransport>}, named
    in the box by its ordinal); the master's channel transport puts all
    queued descriptors into a single C{sendmsg}.
    """

    _one = amp.Descriptor()

    def toStringProto(self, inObject, proto):
        return b",".join(self._one.toStringProto(fd, proto) for fd in inObject)

    def fromStringProto(self, inString, proto):
        if not inString:
            return []
        return [self._one.fromStringProto(part, proto) for part in inString.split(b",")]


class CompressedText(amp.Argument):
    """
    Text (an application's metrics) zlib-compressed, in at most
    L{PIECES} values of 60,000 bytes: under the argument's name, then
    C{name.1}, C{name.2}.  Decompressed, it is at most L{LIMIT} bytes.
    """

    PIECE = 60_000
    PIECES = 3
    LIMIT = 8 * 1024 * 1024

    def toBox(self, name, strings, objects, proto):
        data = zlib.compress(objects[name.decode("ascii")].encode("utf-8"), 6)
        pieces = [data[i : i + self.PIECE] for i in range(0, len(data), self.PIECE)] or [b""]
        if len(pieces) > self.PIECES:
            raise MessageTooLarge(f"{len(data)} bytes compressed; at most {self.PIECE * self.PIECES}")
        strings[name] = pieces[0]
        for number, piece in enumerate(pieces[1:], 1):
            strings[b"%s.%d" % (name, number)] = piece

    def fromBox(self, name, strings, objects, proto):
        data = strings[name]
        for number in range(1, self.PIECES):
            data += strings.get(b"%s.%d" % (name, number), b"")
        inflate = zlib.decompressobj()
        text = inflate.decompress(data, self.LIMIT)
        if inflate.unconsumed_tail:
            raise ValueError(f"more than {self.LIMIT} bytes once decompressed")
        objects[name.decode("ascii")] = text.decode("utf-8")


def closeUnclaimedDescriptors(proto: amp.AMP) -> None:
    """
    Close the descriptors C{proto} received for boxes it never processed
    (the channel closed mid-box): nothing else ever will.
    """
    descriptors = unclaimedDescriptors(proto)
    for fd in descriptors.values():
        try:
            os.close(fd)
        except OSError:
            pass
    descriptors.clear()


def encodeMessage(message) -> str:
    """
    C{message} as the JSON text of a L{ToMaster} or L{ToWorker}.

    @raise MessageTooLarge: it is over 65535 bytes.
    @raise TypeError: it is not JSON-serialisable.
    """
    text = json.dumps(message)
    size = len(text.encode("utf-8"))
    if size > 0xFFFF:
        raise MessageTooLarge(f"a message is at most 65535 bytes of JSON; this one is {size}")
    return text


class BindFailed(Exception):
    """
    The master could not bind or listen on the requested address.

    The description is C{"<errno> <message>"} so that the worker can rebuild
    the operating system error for the application.
    """


class ListenRefused(Exception):
    """
    The master refuses to bind this address for a worker (the address is
    outside C{--allow-listen}, or the request is malformed).
    """


class WorkerLeaving(Exception):
    """
    The master will not bind for this worker: it was told to leave (or the
    master is stopping).  The worker's application gets a
    C{CannotListenError}; a worker whose start fails this way exits quietly.
    """


class MetricsUnavailable(Exception):
    """
    The worker has no metrics to give now (they could not be rendered, or
    are too large); the master keeps its last report.
    """


class UnknownListen(Exception):
    """
    The listen id named by the worker is not one of its listens.
    """


class MessageTooLarge(Exception):
    """
    A user message does not fit in one AMP value (64 KiB once JSON-encoded).
    """


class AgentUnavailable(Exception):
    """
    A worker's L{txcluster.Worker.askAgent} got no answer from the agent:
    the cluster runs none (no C{--agent}), or it did not answer (or come
    back from a restart) within C{--agent-timeout}, or it was lost while
    it handled the request (it may or may not have acted on it).
    """


class AgentFailed(Exception):
    """
    The agent's request handler raised (or returned what is not JSON); the
    message says what.
    """


# Worker -> master


class Online(amp.Command):
    """
    The worker process is up and its channel works; it is about to load the
    application.
    """

    arguments = [(b"pid", amp.Integer())]
    response = []


class QueryServer(amp.Command):
    """
    The application called C{listen*} in the worker (Node's C{queryServer}).

    The master binds once per key C{(kind, address, port, index)} and answers
    with the listen id the worker uses from then on.  For C{"rr"} handles the
    master accepts and sends connections with L{NewConn}; for C{"shared"}
    handles (and always for UDP) the answer carries the listening socket,
    which the worker adopts.

    C{kind} is one of C{tcp4}, C{tcp6}, C{unix}, C{udp4}, C{udp6}.  The
    answer's C{kind} is the socket's own, which differs when a dual-stack
    C{[::]} socket (systemd's) serves a C{0.0.0.0} listen: C{tcp6}.
    """

    arguments = [
        (b"kind", amp.Unicode()),
        (b"address", amp.Unicode()),
        (b"port", amp.Integer()),
        (b"index", amp.Integer()),
        (b"backlog", amp.Integer()),
        (b"mode", amp.Integer()),
    ]
    response = [
        (b"listenId", amp.Integer()),
        (b"scheduling", amp.Unicode()),
        (b"host", amp.Unicode()),
        (b"port", amp.Integer()),
        (b"fd", amp.Descriptor(optional=True)),
        (b"kind", amp.Unicode(optional=True)),
    ]
    errors = {
        BindFailed: b"BIND_FAILED",
        ListenRefused: b"LISTEN_REFUSED",
        WorkerLeaving: b"LEAVING",
    }


class Listening(amp.Command):
    """
    The worker's port for C{listenId} is up: from now on it takes connections.
    """

    arguments = [(b"listenId", amp.Integer())]
    response = []
    errors = {UnknownListen: b"UNKNOWN_LISTEN"}


class Close(amp.Command):
    """
    The worker stopped listening on C{listenId}.  Once the answer arrives no
    new L{NewConn} for it is sent; one already in flight is refused.  When the
    last worker closes a handle, the master closes its socket.
    """

    arguments = [(b"listenId", amp.Integer())]
    response = []
    errors = {UnknownListen: b"UNKNOWN_LISTEN"}


class Ready(amp.Command):
    """
    The application has started (C{startService} returned) and every listen
    it made is established.
    """

    arguments = []
    response = []


class Leaving(amp.Command):
    """
    The worker is leaving on its own: it was sent C{SIGTERM}, its
    application called C{disconnect()} or stopped the reactor.  It closes
    its listens and finishes its connections; the master replaces it, and
    does not count its exit as a failure.
    """

    arguments = [(b"why", amp.Unicode())]
    requiresAnswer = False


class LoadReport(amp.Command):
    """
    The number of connections the worker has open, sent when it changed and
    no L{NewConn} answer said so, at most every C{LOAD_REPORT_INTERVAL}
    seconds.  Used by C{least-busy} dispatch.
    """

    arguments = [(b"connections", amp.Integer())]
    requiresAnswer = False


class ToMaster(amp.Command):
    """
    A user message from the worker: JSON text.
    """

    arguments = [(b"message", amp.Unicode())]
    response = []


class FinalMetrics(amp.Command):
    """
    The application's metrics (as L{CollectMetrics} answers), sent once by
    a leaving worker when its connections are gone, just before it exits:
    the master keeps them, so that the worker id's counters go on from
    there in its replacement.
    """

    arguments = [(b"metrics", CompressedText())]
    response = []


class AskAgent(amp.Command):
    """
    A worker's request to the agent: JSON text; the answer is the agent's
    reply, JSON text.  The master forwards it as an L{AgentRequest}, or
    holds it while the agent restarts.
    """

    arguments = [(b"message", amp.Unicode())]
    response = [(b"answer", amp.Unicode())]
    errors = {AgentUnavailable: b"AGENT_UNAVAILABLE", AgentFailed: b"AGENT_FAILED", MessageTooLarge: b"TOO_LARGE"}


# Agent -> master


class AgentBroadcast(amp.Command):
    """
    The agent's message (JSON text) for every worker, delivered as a
    L{ToWorker} to each.
    """

    arguments = [(b"message", amp.Unicode())]
    response = []


class AgentSend(amp.Command):
    """
    The agent's message (JSON text) for worker C{workerId}, delivered as a
    L{ToWorker}.
    """

    arguments = [(b"workerId", amp.Integer()), (b"message", amp.Unicode())]
    response = []
    errors = {AgentUnavailable: b"NO_SUCH_WORKER"}


# Master -> worker


class NewConn(amp.Command):
    """
    Accepted connections for C{listenId}.  The worker adopts them in order
    and answers how many it took: C{fds[:accepted]} are the worker's now (the
    master closes its copies); the rest are refused and go to another worker.
    C{connections} is how many connections the worker had open before these
    (the load C{least-busy} dispatch uses, fresh with every answer).
    """

    arguments = [(b"listenId", amp.Integer()), (b"fds", DescriptorList())]
    response = [(b"accepted", amp.Integer()), (b"connections", amp.Integer(optional=True))]


class Disconnect(amp.Command):
    """
    Stop listening, let open connections finish (for up to C{timeout}
    seconds), stop the application and exit.  Answered at once.
    """

    arguments = [(b"timeout", amp.Float())]
    response = []


class Ping(amp.Command):
    """
    Heartbeat.  Answered by the worker's reactor, so a worker whose reactor
    is blocked does not answer; the answer says how many connections it
    has open.
    """

    arguments = []
    response = [(b"connections", amp.Integer(optional=True))]


class ToWorker(amp.Command):
    """
    A user message from the master: JSON text.
    """

    arguments = [(b"message", amp.Unicode())]
    response = []


class CollectMetrics(amp.Command):
    """
    The application's metrics: C{prometheus_client}'s default registry in
    the text format (empty when the application does not use
    C{prometheus_client}).
    """

    arguments = []
    response = [(b"metrics", CompressedText())]
    errors = {MetricsUnavailable: b"METRICS_UNAVAILABLE"}


class WorkerCount(amp.Command):
    """
    The number of workers the master now runs (after scaling).
    """

    arguments = [(b"count", amp.Integer())]
    requiresAnswer = False


# Master -> agent


class AgentRequest(amp.Command):
    """
    Worker C{workerId}'s L{AskAgent}, for the agent's request handler.
    """

    arguments = [(b"workerId", amp.Integer()), (b"message", amp.Unicode())]
    response = [(b"answer", amp.Unicode())]
    errors = {AgentFailed: b"AGENT_FAILED"}


class AgentWorkers(amp.Command):
    """
    The worker ids that are ready now, sent to the agent when it is ready
    and whenever they change.
    """

    arguments = [(b"workerIds", amp.ListOf(amp.Integer()))]
    requiresAnswer = False
