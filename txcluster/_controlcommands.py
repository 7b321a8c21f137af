# -*- test-case-name: tests.test_control -*-
"""
The control protocol: every AMP command the C{txcluster} command (or any
other control client) speaks with a master over its control socket, on
one screen.

Client to master: L{Status}, L{Reload}, L{Scale}, L{Recycle}, L{Stop},
L{Stacks}, L{Watch}.  Master to client: L{Event} (after L{Watch}).

Answers that can be long (the status, stacks, summaries) are L{LongText}.
See C{docs/protocol.md} for the prose version.
"""

from twisted.protocols import amp

#: The socket's file name when C{--control} is not given.
SOCKET_NAME = "txcluster.sock"


class LongText(amp.Argument):
    """
    Unicode text of any length: its UTF-8 bytes in pieces of at most
    L{PIECE} bytes, under the argument's name, then C{name.1},
    C{name.2}, ... (one AMP value holds at most 65535 bytes).
    """

    PIECE = 60_000

    def toBox(self, name, strings, objects, proto):
        data = objects[name.decode("ascii")].encode("utf-8")
        pieces = [data[i : i + self.PIECE] for i in range(0, len(data), self.PIECE)] or [b""]
        strings[name] = pieces[0]
        for number, piece in enumerate(pieces[1:], 1):
            strings[b"%s.%d" % (name, number)] = piece

    def fromBox(self, name, strings, objects, proto):
        pieces = [strings[name]]
        number = 1
        while b"%s.%d" % (name, number) in strings:
            pieces.append(strings[b"%s.%d" % (name, number)])
            number += 1
        objects[name.decode("ascii")] = b"".join(pieces).decode("utf-8")


class NotRunning(Exception):
    """
    The cluster is not running (it is stopping, or has not started).
    """


class OperationFailed(Exception):
    """
    The operation was tried and failed; the description says why (a
    reload aborted by a failed replacement names the worker and how it
    failed).
    """


class NoSuchWorker(Exception):
    """
    No running worker has that id.
    """


class BadRequest(Exception):
    """
    The request is not one the master can carry out (a count below 1).
    """


_ERRORS = {
    NotRunning: b"NOT_RUNNING",
    OperationFailed: b"FAILED",
    NoSuchWorker: b"NO_SUCH_WORKER",
    BadRequest: b"BAD_REQUEST",
}


class Status(amp.Command):
    """
    The cluster now: C{status} is a JSON object, the master's header fields
    and C{workers}, a list with one object per worker process (see
    C{docs/operations.md} for every field).
    """

    arguments = []
    response = [(b"status", LongText())]


class Reload(amp.Command):
    """
    Replace every worker, as C{SIGHUP} does; answered once the reload is
    over.  C{summary} says which pid replaced which.  With C{agent}, the
    agent (C{--agent}) is restarted first.
    """

    arguments = [(b"agent", amp.Boolean(optional=True))]
    response = [(b"summary", LongText())]
    errors = _ERRORS


class Scale(amp.Command):
    """
    Run C{count} workers; answered once the new ones are ready or the
    removed ones have exited.
    """

    arguments = [(b"count", amp.Integer())]
    response = [(b"summary", LongText())]
    errors = _ERRORS


class Recycle(amp.Command):
    """
    Replace worker C{workerId} through the ready-gated path (its
    replacement is ready before it stops taking connections); answered
    once the old process has exited.
    """

    arguments = [(b"workerId", amp.Integer())]
    response = [(b"summary", LongText())]
    errors = _ERRORS


class Stop(amp.Command):
    """
    Stop the master gracefully, as C{SIGTERM} does; answered once every
    worker is gone, just before the master exits.
    """

    arguments = []
    response = [(b"summary", LongText())]
    errors = _ERRORS


class Stacks(amp.Command):
    """
    The current Python stacks of every thread of worker C{workerId}'s
    process, written by C{faulthandler} (so a worker whose reactor is
    blocked answers too), without stopping it.
    """

    arguments = [(b"workerId", amp.Integer())]
    response = [(b"pid", amp.Integer()), (b"stacks", LongText())]
    errors = _ERRORS


class Watch(amp.Command):
    """
    Send this client an L{Event} for every lifecycle event from now on.
    """

    arguments = []
    response = []


class Event(amp.Command):
    """
    Master to client, after L{Watch}: one lifecycle event, a JSON object
    with at least C{event} (C{fork}, C{online}, C{listening}, C{ready},
    C{disconnect}, C{exit}, C{message}, C{recycle}, C{reload-start},
    C{reload-end}, C{stopping}) and C{time}.
    """

    arguments = [(b"event", amp.Unicode())]
    requiresAnswer = False


#: The commands a control client may send.
CLIENT_COMMANDS = (Status, Reload, Scale, Recycle, Stop, Stacks, Watch)
