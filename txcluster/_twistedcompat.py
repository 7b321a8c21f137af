# -*- test-case-name: tests.test_twistedcompat -*-
"""
Every use txcluster makes of a Twisted (or AMP) private, in one place.

Each name below reaches into something Twisted does not promise to keep:
an attribute with a leading underscore, a base class's method called past
an override, or a class built for one purpose used for another.  Each is
pinned by a test in C{tests/test_twistedcompat.py} that fails with a message
naming what changed in Twisted, so that an upgrade that breaks one of them
is found here and not in production.

What is used, and why:

  - L{pendingBytes}: a C{FileDescriptor}'s unsent bytes (C{dataBuffer},
    C{offset}, C{_tempDataLen}); a worker's synchronous listen drives its
    transport by hand and must know whether there is something to write.
  - L{BatchingUNIXServer}: Twisted's UNIX stream transport, whose
    C{writeSomeData} sends the queued descriptors (C{_sendmsgQueue}) in one
    C{sendmsg} instead of one each (C{_writeSomeDataBase}), and whose
    C{write} sends at once when nothing is buffered (C{dataBuffer},
    C{_maybePauseProducer}).
  - L{adoptUNIXTransport}: C{Server._fromConnectedSocket}, to adopt a
    socket with a transport class of our own (the reactor's
    C{adoptStreamConnection} always uses Twisted's).
  - L{SharedUNIXPort}: C{unix.Port} over an inherited listening socket
    (C{_fromListeningDescriptor}, C{_preexistingSocket}) that neither
    chmods the path it does not own (C{_bindPath}), listens again (which
    would reset the owner's backlog), shuts down (C{_shouldShutdown}) nor
    unlinks the path; its C{startListening} is C{unix.Port}'s without
    those (C{tcp._reservedFD}, C{numberAccepts}, C{_getLogPrefix}).
  - L{unclaimedDescriptors}, L{outstandingRequests}, L{responderFor},
    L{MAX_KEY_LENGTH}, L{readingValue}, L{parserIdle}: AMP's
    received-descriptor store, its table of unanswered requests, its command
    dispatch table, its key length limit and its parser state, which the
    master's channel uses to refuse what a hostile worker sends and to
    parse the answers to NewConn on a fast path.
  - L{makeConnectionQuietly}, L{connectionLostQuietly}: AMP's
    C{makeConnection}/C{connectionLost} without the info-level line AMP
    logs for every connection (and with the attributes that line needs).
  - L{bindingOf}: the fields of a C{makeBinding()} argument to
    C{listenTCP} (C{interfaces._Binding}).
  - L{markTLS}: the C{_type} a port's C{repr} and C{getHost} logging use.
  - L{childReader}: the reader of one of a child process's pipes
    (C{Process.pipes}, not in C{IProcessTransport}), to pause it.
  - L{parseProxyV1}, L{parseProxyV2}, L{InvalidProxyHeader},
    L{PROXY_V1_PREFIX}, L{PROXY_V2_SIGNATURE}: the PROXY protocol header
    parsers of C{twisted.protocols.haproxy} (C{_v1parser.V1Parser},
    C{_v2parser.V2Parser}, C{_exceptions}), used on a complete header,
    without Twisted's wrapper (which refuses a header that arrives in
    pieces).
  - L{channelOfGenericHTTP}: the C{HTTPChannel} behind the protocol
    C{twisted.web.server.Site} builds (C{_GenericHTTPChannelProtocol},
    its C{_channel}), to end keep-alive when a worker leaves.
"""

from __future__ import annotations

import os
import socket
import struct
from errno import ENOBUFS, EWOULDBLOCK
from typing import Optional

from twisted.internet import error, main, tcp, unix
try:
    from twisted.internet.interfaces import _Binding
except ImportError:  # Twisted before makeBinding() (26.10)
    _Binding = None
from twisted.internet.protocol import Factory
from twisted.protocols import amp
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.python import log

#: The most file descriptors one C{sendmsg} may carry on Linux (SCM_MAX_FD).
MAX_FDS_PER_MESSAGE = 253

#: AMP's limit on the length of a key, in bytes.
MAX_KEY_LENGTH: int = amp.BinaryBoxProtocol._MAX_KEY_LENGTH


# FileDescriptor ---------------------------------------------------------------


def pendingBytes(transport) -> int:
    """
    How many bytes C{transport} (a C{FileDescriptor}) has been given and not
    yet written: its C{dataBuffer} from C{offset}, plus the writes waiting
    in C{_tempDataBuffer}.  There is no public accessor.
    """
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


# UNIX transports ------------------------------------------------------------


class BatchingUNIXServer(unix.Server):
    """
    A UNIX stream transport that sends every queued file descriptor with the
    pending bytes in one C{sendmsg} (up to L{MAX_FDS_PER_MESSAGE} per call),
    where Twisted's sends one descriptor per call with one byte each.  The
    receiver is an ordinary Twisted UNIX transport: it gets the descriptors
    before the bytes of the box that names them, in order.

    It also writes at once: when nothing is queued, C{write} sends the bytes
    (and the descriptors queued before them) in the call, and only what the
    socket does not take waits for the reactor's writable event.  Twisted's
    waits for the next reactor turn, and turns the writer on and off (two
    C{epoll_ctl}) for every box.  A failed send is left to the reactor's
    write, which finds the same error and loses the connection as usual.
    """

    def sendFileDescriptor(self, fileno) -> None:
        # Queued for the write that follows (a descriptor needs bytes to
        # travel with): write() sends both at once.
        self._sendmsgQueue.append(fileno)
        self._maybePauseProducer()

    def write(self, data) -> None:
        if data and self.connected and not self.disconnecting and not pendingBytes(self):
            sent = self.writeSomeData(data)
            if isinstance(sent, int):
                if sent == len(data):
                    return
                data = data[sent:]
        unix.Server.write(self, data)
        if self._sendmsgQueue:
            self.startWriting()

    def writeSomeData(self, data):
        queue = self._sendmsgQueue
        if not queue:
            return unix.Server._writeSomeDataBase.writeSomeData(self, data)
        if len(queue) > len(data):
            return error.FileDescriptorOverrun()
        sent = 0
        while queue:
            batch = queue[:MAX_FDS_PER_MESSAGE]
            # Every batch needs a byte to travel with; the last takes the rest.
            last = len(batch) == len(queue)
            chunk = data[sent:] if last else data[sent : sent + 1]
            try:
                sent += self.socket.sendmsg(
                    [chunk], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _packFds(batch))]
                )
            except OSError as e:
                if e.errno in (EWOULDBLOCK, ENOBUFS):
                    return sent
                return main.CONNECTION_LOST
            del queue[: len(batch)]
        return sent


def _packFds(fds: list) -> bytes:
    return struct.pack(f"{len(fds)}i", *fds)


class _OneProtocolFactory(Factory):
    def __init__(self, protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr):
        return self._protocol


def adoptUNIXTransport(reactor, fd: int, protocol, transportClass=BatchingUNIXServer):
    """
    Connect C{protocol} to the connected UNIX stream socket C{fd} with a
    transport of class C{transportClass}: what
    C{reactor.adoptStreamConnection(fd, AF_UNIX, factory)} does with
    Twisted's own class.  C{fd} is C{dup()}ed; the caller closes its copy.

    @return: the transport.
    """
    return transportClass._fromConnectedSocket(fd, _OneProtocolFactory(protocol), reactor)


class SharedUNIXPort(unix.Port):
    """
    The UNIX port C{adoptStreamPort} would make, without what only the
    socket's owner may do: the master owns the path, so a worker neither
    resets its permissions when it starts listening nor removes the file
    when it stops, and does not C{shutdown()} the listening socket (Twisted
    spares adopted TCP ports that, not UNIX ones) — each would cut off the
    master and every other worker.
    """

    _shouldShutdown = False

    @property
    def path(self):
        """
        The socket's path (Twisted 26.10 keeps it as C{_bindPath}, earlier
        ones as C{port}).
        """
        bound = getattr(self, "_bindPath", None)
        return bound if bound is not None else self.port

    @classmethod
    def adopt(cls, reactor, fd: int, factory) -> "SharedUNIXPort":
        """
        A port over the listening socket C{fd} (C{dup()}ed), listening.
        """
        port = cls._fromListeningDescriptor(reactor, fd, factory)
        port.startListening()
        return port

    def startListening(self) -> None:
        # unix.Port.startListening, for a socket that already listens on a
        # path this process does not own: no chmod() (EPERM for a worker
        # running as another user than the master, who made the file) and
        # no listen() (which would replace the master's backlog with this
        # port's default of 50).
        skt, self._preexistingSocket = self._preexistingSocket, None
        if skt is None:
            raise error.CannotListenError(None, self.path, "only an adopted socket can be shared")
        tcp._reservedFD.reserve()
        log.msg(f"{self._getLogPrefix(self.factory)} starting on {os.fsdecode(self.path)!r}")
        self.factory.doStart()
        self.connected = True
        self.socket = skt
        self.fileno = skt.fileno
        self.numberAccepts = 100
        self.startReading()

    def connectionLost(self, reason) -> None:
        # unix.Port.connectionLost would unlink the master's socket file.
        tcp.Port.connectionLost(self, reason)


# AMP ---------------------------------------------------------------------------


def unclaimedDescriptors(proto: amp.BinaryBoxProtocol) -> dict:
    """
    The descriptors C{proto} received that no box has claimed yet (AMP's
    C{_descriptors}: ordinal to descriptor).
    """
    return proto._descriptors


def outstandingRequests(proto: amp.AMP) -> Optional[dict]:
    """
    The requests C{proto} sent and that were not answered (AMP's
    C{_outstandingRequests}: tag to Deferred), or L{None} once the
    connection is gone.
    """
    return proto._outstandingRequests


def responderFor(proto: amp.AMP, name: bytes):
    """
    C{(command class, responder function)} declared on C{proto}'s class for
    the command called C{name}, or L{None} (AMP's C{_commandDispatch}).
    """
    return proto._commandDispatch.get(name)


def parserIdle(proto: amp.BinaryBoxProtocol) -> bool:
    """
    Whether C{proto}'s parser holds nothing: no bytes of an unfinished
    string (C{IntNStringReceiver._unprocessed}), no unfinished box
    (C{_currentBox}), no protocol switched to (C{innerProtocol}), and it is
    not paused.  Bytes that arrive then start a new box.
    """
    return (
        not proto._unprocessed
        and proto._currentBox is None
        and proto.innerProtocol is None
        and not getattr(proto, "paused", False)
    )


def readingValue(proto: amp.BinaryBoxProtocol) -> bool:
    """
    Whether C{proto}'s parser expects a value next (its C{state} is
    C{"value"}): an empty string then is an empty value, not the end of a
    box.
    """
    return proto.state == "value"


def makeConnectionQuietly(proto: amp.AMP, transport) -> None:
    """
    C{proto.makeConnection(transport)} without the info-level line AMP logs
    for every connection (a worker's channel is not news).
    """
    proto._transportPeer = transport.getPeer()
    proto._transportHost = transport.getHost()
    amp.BinaryBoxProtocol.makeConnection(proto, transport)


def connectionLostQuietly(proto: amp.AMP, reason) -> None:
    """
    C{proto.connectionLost(reason)} without AMP's info-level line.
    """
    amp.BinaryBoxProtocol.connectionLost(proto, reason)
    proto.transport = None


# The reactor -----------------------------------------------------------------


def bindingOf(port) -> Optional[tuple]:
    """
    C{(interface, port, reusePort)} when C{port}, given to C{listenTCP}, is a
    C{makeBinding()} binding; L{None} for a plain port number.
    """
    if _Binding is not None and isinstance(port, _Binding):
        return port._address, port._port, port._reusePort
    return None


def markTLS(port) -> None:
    """
    Make C{port} (a TCP port carrying TLS) say so where Twisted's own
    C{listenSSL} ports do.
    """
    port._type = "TLS"


def childReader(transport, childFD: int):
    """
    The C{IReadDescriptor} reading C{transport}'s child's C{childFD} (a
    C{twisted.internet.process.Process}'s C{pipes}), or L{None} if there
    is none (another kind of transport, or that pipe is closed).
    """
    reader = getattr(transport, "pipes", {}).get(childFD)
    if reader is None or not hasattr(reader, "stopReading"):
        return None
    return reader


# PROXY protocol ------------------------------------------------------------------

#: What a version 1 PROXY header starts with.
PROXY_V1_PREFIX: bytes = V1Parser.PROXYSTR + b" "

#: The twelve bytes a version 2 PROXY header starts with.
PROXY_V2_SIGNATURE: bytes = V2Parser.PREFIX


def parseProxyV1(line: bytes) -> tuple:
    """
    The C{(source, destination)} addresses of a version 1 PROXY header
    C{line} (without its CRLF), by C{V1Parser.parse}: two L{None} for
    C{UNKNOWN}.

    Twisted refuses the C{"PROXY UNKNOWN"} that HAProxy sends (it expects
    a space after C{UNKNOWN}), and lets a C{ValueError} through for a port
    that is not a number or an address that is not ASCII: both are
    smoothed over here.

    @raise InvalidProxyHeader: C{line} is not a valid header.
    """
    if line == PROXY_V1_PREFIX + V1Parser.UNKNOWN_PROTO:
        line += b" "
    try:
        info = V1Parser.parse(line)
    except ValueError as e:
        raise InvalidProxyHeader(str(e)) from e
    return info.source, info.destination


def parseProxyV2(header: bytes) -> tuple:
    """
    The C{(source, destination)} addresses of a complete version 2 PROXY
    header (signature, the four fixed bytes, and as many bytes as its
    length field says), by C{V2Parser.parse}: two L{None} for C{LOCAL} and
    C{UNSPEC}.  TLVs after the addresses are ignored.

    @raise InvalidProxyHeader: C{header} is not a valid header.
    """
    try:
        info = V2Parser.parse(header)
    except (ValueError, KeyError, struct.error) as e:
        raise InvalidProxyHeader(str(e)) from e
    return info.source, info.destination


# twisted.web ------------------------------------------------------------------


def channelOfGenericHTTP(protocol):
    """
    The channel behind C{protocol} when it is the protocol C{Site} builds
    (C{http._GenericHTTPChannelProtocol}, which switches between HTTP/1
    and HTTP/2 by ALPN): its C{_channel}; otherwise C{protocol} itself.
    twisted.web is not imported for it.
    """
    import sys

    http = sys.modules.get("twisted.web.http")
    generic = getattr(http, "_GenericHTTPChannelProtocol", None)
    if generic is not None and isinstance(protocol, generic):
        return protocol._channel
    return protocol
