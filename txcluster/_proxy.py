# -*- test-case-name: tests.test_proxy -*-
"""
The client behind a load balancer: its PROXY protocol header, who may send
one, and which worker its connections belong to.

  - L{parseHeader} reads a PROXY header (version 1 or 2) from the first
    bytes of a connection, with Twisted's own parsers, as far as those
    bytes go.
  - L{AllowList} says which peers may send a header (the balancers).
  - L{ProxyHeaderFactory} wraps a worker's application factory: the
    application is connected only once the header has been read, and sees
    the client's address as its peer.
  - L{RejectionLog} counts and logs, at a bounded rate, the connections
    closed for a missing, bad or untrusted header.
  - L{rank} orders the worker ids for a client (rendezvous hashing), for
    the sticky dispatch of L{txcluster._scheduler}.
"""

from __future__ import annotations

import ipaddress
from hashlib import blake2b
from typing import Callable, Iterable, Optional

from attrs import frozen, mutable
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, providedBy

from txcluster._twistedcompat import (
    PROXY_V1_PREFIX,
    PROXY_V2_SIGNATURE,
    InvalidProxyHeader,
    parseProxyV1,
    parseProxyV2,
)

#: The longest a version 1 header may be, CRLF included (the spec's limit).
V1_MAX_SIZE = 107

#: The most bytes of addresses and TLVs a version 2 header may carry here.
#: HAProxy's own TLVs (ALPN, authority, unique id, TLS details) fit with
#: room to spare; a longer header is refused as L{OVERSIZED}.
MAX_V2_PAYLOAD = 2048

#: The longest a version 2 header may be: its 16 fixed bytes and
#: L{MAX_V2_PAYLOAD}.
MAX_V2_SIZE = 16 + MAX_V2_PAYLOAD

#: Seconds a connection has to send its whole header.  A balancer sends it
#: with the first packet; only a stalled or hostile peer needs longer.
DEFAULT_HEADER_TIMEOUT = 5.0

#: Who may send a header by default: this host.
DEFAULT_ALLOW = ("127.0.0.0/8", "::1/128")

# What parseHeader says.
INCOMPLETE = "incomplete"
COMPLETE = "complete"
INVALID = "invalid"

# Why a connection is closed.
NOT_PROXY = "not a PROXY header"
MALFORMED = "malformed"
OVERSIZED = "oversized"
UNTRUSTED = "untrusted"
TIMEOUT = "timeout"

#: Every reason a L{ProxyHeaderProtocol} closes a connection for.
REJECTIONS = (UNTRUSTED, TIMEOUT, NOT_PROXY, MALFORMED, OVERSIZED)


# Rendezvous hashing ------------------------------------------------------------


def rank(key: bytes, workerIds: Iterable[int]) -> list[int]:
    """
    The worker ids, best first, for the client whose key is C{key}
    (L{clientKey}): highest random weight, so that removing an id moves
    only the clients that ranked it first, and adding one moves only the
    clients that now rank it first (about 1/N of them).  The weights are
    BLAKE2b digests: the same in every process and every Python run.

    Ranking a subset of the ids gives the same order restricted to it.
    Repeated ids count once.
    """
    return sorted(set(workerIds), key=lambda workerId: _weight(key, workerId), reverse=True)


def preferred(key: bytes, workerIds: Iterable[int]) -> int:
    """
    C{rank(key, workerIds)[0]}, without ordering the others.

    @raise ValueError: C{workerIds} is empty.
    """
    return max(workerIds, key=lambda workerId: _weight(key, workerId))


def _weight(key: bytes, workerId: int) -> tuple:
    # The decimal id and a NUL before the key: no two (id, key) pairs hash
    # the same bytes.  The id breaks (improbable) ties.
    digest = blake2b(b"%d\x00" % workerId + key, digest_size=8, person=b"txcluster-hrw").digest()
    return digest, workerId


def clientKey(address: Optional[IAddress]) -> bytes:
    """
    The key L{rank} orders workers by for a client at C{address}: its IP
    address, packed (an IPv4-mapped IPv6 address as the IPv4 address, so
    that a client is one client on either family); the port does not
    count.  C{b""} for anything else (a UNIX peer, no address): all such
    clients are one.
    """
    ip = _ipOf(address)
    return b"" if ip is None else ip.packed


def _ipOf(address: Optional[IAddress]):
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return None
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


# The header --------------------------------------------------------------------


@frozen
class Header:
    """
    What the first bytes of a connection say, as far as they go.

    @ivar state: L{INCOMPLETE} (maybe a header: more bytes are needed),
        L{COMPLETE} or L{INVALID}.
    @ivar length: how many of the bytes the complete header was; what
        follows is the application's.
    @ivar source: the client's address, from a complete header; L{None}
        when the header does not give one (v1 C{UNKNOWN}, v2 C{LOCAL} or
        C{UNSPEC}: a balancer's health check), and the connection's own
        addresses stand.
    @ivar destination: the address the client connected to, likewise.
    @ivar version: 1 or 2, for a complete header.
    @ivar reason: why it is invalid: L{NOT_PROXY}, L{MALFORMED} or
        L{OVERSIZED}.
    """

    state: str
    length: int = 0
    source: Optional[IAddress] = None
    destination: Optional[IAddress] = None
    version: Optional[int] = None
    reason: Optional[str] = None


_INCOMPLETE = Header(INCOMPLETE)


def parseHeader(data: bytes, maxSize: int = MAX_V2_SIZE) -> Header:
    """
    Read the PROXY header at the start of C{data}, everything a connection
    has received so far: call again with more bytes while it is
    L{INCOMPLETE}.

    Addresses are checked (an IPv4 address for C{TCP4}, ports in range)
    and written the usual way (C{2001:db8::1}, where Twisted's v2 parser
    writes C{2001:db8:0:0:0:0:0:1}).

    @param maxSize: the longest a version 2 header may be, in bytes; a
        longer one is L{OVERSIZED} as soon as its length field says so.
        A version 1 header is at most L{V1_MAX_SIZE} bytes, always.
    """
    if data.startswith(PROXY_V2_SIGNATURE):
        return _parseV2(data, maxSize)
    if data.startswith(PROXY_V1_PREFIX):
        return _parseV1(data)
    if PROXY_V2_SIGNATURE.startswith(data) or PROXY_V1_PREFIX.startswith(data):
        return _INCOMPLETE
    return Header(INVALID, reason=NOT_PROXY)


def _parseV1(data: bytes) -> Header:
    newline = data.find(b"\n", 0, V1_MAX_SIZE)
    if newline < 0:
        return Header(INVALID, reason=OVERSIZED) if len(data) >= V1_MAX_SIZE else _INCOMPLETE
    if data[newline - 1 : newline] != b"\r":
        return Header(INVALID, reason=MALFORMED)
    try:
        addresses = parseProxyV1(data[: newline - 1])
    except InvalidProxyHeader:
        return Header(INVALID, reason=MALFORMED)
    return _complete(addresses, newline + 1, 1)


def _parseV2(data: bytes, maxSize: int) -> Header:
    if len(data) > 12 and data[12] >> 4 != 2:
        return Header(INVALID, reason=MALFORMED)
    if len(data) < 16:
        return _INCOMPLETE
    size = 16 + int.from_bytes(data[14:16], "big")
    if size > maxSize:
        return Header(INVALID, reason=OVERSIZED)
    if len(data) < size:
        return _INCOMPLETE
    try:
        addresses = parseProxyV2(data[:size])
    except InvalidProxyHeader:
        return Header(INVALID, reason=MALFORMED)
    return _complete(addresses, size, 2)


def _complete(addresses: tuple, length: int, version: int) -> Header:
    try:
        source, destination = (_checked(a) for a in addresses)
    except ValueError:
        return Header(INVALID, reason=MALFORMED)
    return Header(COMPLETE, length, source, destination, version)


def _checked(address: Optional[IAddress]) -> Optional[IAddress]:
    """
    C{address} with its host in the usual form.

    @raise ValueError: its host is not an address of its family, or its
        port is out of range (Twisted's parsers check neither).
    """
    if isinstance(address, IPv4Address):
        host = ipaddress.IPv4Address(address.host)
    elif isinstance(address, IPv6Address):
        host = ipaddress.IPv6Address(address.host)
    else:
        return address
    if not 0 <= address.port <= 65535:
        raise ValueError(f"port {address.port} out of range")
    return type(address)(address.type, str(host), address.port)


# Who may send one --------------------------------------------------------------


@frozen
class AllowList:
    """
    The peers that may send a PROXY header: the balancers.

    @ivar networks: the networks they are in (IPv4-mapped IPv6 networks
        written as IPv4 ones).
    """

    networks: tuple = ()

    @classmethod
    def fromStrings(cls, entries: Iterable[str]) -> "AllowList":
        """
        An allow list of C{entries}, each an address (C{"10.0.0.5"},
        C{"::1"}) or a network (C{"10.0.0.0/8"}; host bits are ignored,
        as in C{"10.1.2.3/8"}).

        @raise ValueError: an entry is neither; the message names it.
        """
        return cls(tuple(_network(entry) for entry in entries))

    def allows(self, address: IAddress) -> bool:
        """
        Whether a peer at C{address} may send a header.  A UNIX peer is
        local, and always may; an IPv4-mapped IPv6 peer
        (C{::ffff:10.0.0.5}) is its IPv4 address; any other kind of
        address may not.
        """
        if isinstance(address, UNIXAddress):
            return True
        ip = _ipOf(address)
        return ip is not None and any(ip in network for network in self.networks)


def _network(entry: str):
    if not isinstance(entry, str):
        raise ValueError(f"{entry!r} is not an address or network to accept PROXY headers from")
    try:
        network = ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError as e:
        raise ValueError(
            f"{entry!r} is not an address or network to accept PROXY headers from: {e}"
        ) from None
    mapped = network.network_address.ipv4_mapped if network.version == 6 else None
    if mapped is not None and network.prefixlen >= 96:
        network = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


# The worker's side ---------------------------------------------------------------


@mutable
class _Awaiting:
    """
    The header is being read: what came so far, and the timeout.
    """

    buffered: bytes
    timer: IDelayedCall


@frozen
class _Passing:
    """
    The header was read; the application has the connection.
    """

    header: Header


@frozen
class _Refused:
    """
    The connection was closed before the application saw it.
    """

    reason: str


class ProxyHeaderProtocol(ProtocolWrapper):
    """
    Reads the PROXY header, then passes the connection to the application
    as if the client had connected directly: the application's protocol is
    built (by the wrapped factory, given the client's address) and
    connected only once the header is complete, so that its
    C{connectionMade} already sees the client as C{getPeer()}; the bytes
    after the header are its first data.

    A connection from a peer the factory does not allow, or whose header
    is not one, is malformed, too long or too slow, is closed without the
    application ever seeing it, and reported to the factory's
    C{rejected}.  One that the peer closes before its header is complete
    is not reported (a balancer's TCP health check does that).
    """

    factory: "ProxyHeaderFactory"

    def __init__(self, factory: "ProxyHeaderFactory") -> None:
        ProtocolWrapper.__init__(self, factory, None)
        self._state = None

    def logPrefix(self) -> str:
        return self.factory.logPrefix()

    def makeConnection(self, transport) -> None:
        directlyProvides(self, providedBy(transport))
        self.factory.registerProtocol(self)
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        if not self.factory.allow.allows(self.transport.getPeer()):
            self._reject(UNTRUSTED)
            return
        timer = self.factory.clock.callLater(self.factory.timeout, self._reject, TIMEOUT)
        self._state = _Awaiting(b"", timer)

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if isinstance(state, _Passing):
            self.wrappedProtocol.dataReceived(data)
        elif isinstance(state, _Awaiting):
            state.buffered += data
            header = parseHeader(state.buffered, self.factory.maxSize)
            if header.state == COMPLETE:
                state.timer.cancel()
                self._pass(header, state.buffered[header.length :])
            elif header.state == INVALID:
                self._reject(header.reason)

    def getPeer(self) -> IAddress:
        state = self._state
        if isinstance(state, _Passing) and state.header.source is not None:
            return state.header.source
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        state = self._state
        if isinstance(state, _Passing) and state.header.destination is not None:
            return state.header.destination
        return self.transport.getHost()

    def connectionLost(self, reason) -> None:
        state, self._state = self._state, _Refused("closed")
        if isinstance(state, _Awaiting) and state.timer.active():
            state.timer.cancel()
        self.factory.unregisterProtocol(self)
        if isinstance(state, _Passing) and self.wrappedProtocol is not None:
            self.wrappedProtocol.connectionLost(reason)
        self.wrappedProtocol = None

    def _pass(self, header: Header, rest: bytes) -> None:
        self._state = _Passing(header)
        try:
            protocol = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        except Exception:
            Logger(namespace="txcluster.worker").failure("the application's buildProtocol failed")
            protocol = None
        if protocol is None:
            # The application refused the client, as a listening port's
            # factory may.
            self._state = _Refused("refused by the application")
            self.transport.loseConnection()
            return
        self.wrappedProtocol = protocol
        protocol.makeConnection(self)
        if rest and not (self.disconnecting or getattr(self.transport, "disconnecting", False)):
            protocol.dataReceived(rest)

    def _reject(self, reason: str) -> None:
        state, self._state = self._state, _Refused(reason)
        if isinstance(state, _Awaiting) and state.timer.active():
            state.timer.cancel()
        self.transport.loseConnection()
        self.factory.rejected(reason, self.transport.getPeer())


class ProxyHeaderFactory(WrappingFactory):
    """
    Wraps an application's factory so that its connections start with a
    PROXY header (see L{ProxyHeaderProtocol}).  Put it outermost: around a
    C{TLSMemoryBIOFactory}, since the balancer sends the header before the
    TLS bytes.

    @ivar allow: the peers that may send a header.
    @ivar timeout: seconds a connection has to send its whole header.
    @ivar clock: the time, for the timeout.
    @ivar rejected: called with the reason (one of L{REJECTIONS}) and the
        peer's own address for each connection closed for its header, after
        it is closed (a L{RejectionLog} is one).
    @ivar maxSize: the longest a version 2 header may be.
    """

    protocol = ProxyHeaderProtocol

    def __init__(
        self,
        wrappedFactory,
        allow: AllowList,
        timeout: float,
        clock: IReactorTime,
        rejected: Callable[[str, IAddress], None],
        maxSize: int = MAX_V2_SIZE,
    ) -> None:
        WrappingFactory.__init__(self, wrappedFactory)
        self.allow = allow
        self.timeout = timeout
        self.clock = clock
        self.rejected = rejected
        self.maxSize = maxSize

    def buildProtocol(self, addr: IAddress) -> ProxyHeaderProtocol:
        # The application's protocol is built once the header says who the
        # client is: see ProxyHeaderProtocol._pass.
        return self.protocol(self)

    def logPrefix(self) -> str:
        wrapped = self.wrappedFactory
        prefix = wrapped.logPrefix() if hasattr(wrapped, "logPrefix") else type(wrapped).__name__
        return f"{prefix} (PROXY)"


# Rejections ----------------------------------------------------------------------

#: Seconds between two log lines for one reason.
LOG_INTERVAL = 10.0

_WHY = {
    UNTRUSTED: (
        "it may not send a PROXY header (a client bypassing the balancer,"
        " or a balancer missing from the allowed addresses)"
    ),
    TIMEOUT: "no complete PROXY header in time",
    NOT_PROXY: "it did not start with a PROXY header (is the balancer sending one?)",
    MALFORMED: "its PROXY header is malformed",
    OVERSIZED: "its PROXY header is too long",
}


@mutable
class _LastLine:
    at: float
    unlogged: int = 0


class RejectionLog:
    """
    Counts the connections closed for their PROXY header, by reason, and
    logs them: at most one line per reason every C{interval} seconds, the
    next line saying how many were not logged in between.  Call it as a
    L{ProxyHeaderFactory}'s C{rejected}.
    """

    def __init__(
        self, clock: IReactorTime, interval: float = LOG_INTERVAL, log: Optional[Logger] = None
    ) -> None:
        self._clock = clock
        self._interval = interval
        self._log = log if log is not None else Logger(namespace="txcluster.worker")
        self._counts = dict.fromkeys(REJECTIONS, 0)
        self._lines: dict[str, _LastLine] = {}

    def __call__(self, reason: str, peer: IAddress) -> None:
        self._counts[reason] = self._counts.get(reason, 0) + 1
        now = self._clock.seconds()
        last = self._lines.get(reason)
        if last is not None and now - last.at < self._interval:
            last.unlogged += 1
            return
        unlogged = last.unlogged if last is not None else 0
        self._lines[reason] = _LastLine(now)
        more = " ({unlogged} more since the last such line)" if unlogged else ""
        self._log.warn(
            "closed a connection from {peer}: {why}" + more,
            peer=describeAddress(peer),
            reason=reason,
            why=_WHY.get(reason, reason),
            unlogged=unlogged,
        )

    def counts(self) -> dict[str, int]:
        """
        How many connections were closed, by reason: every one of
        L{REJECTIONS}, and any other reason reported.
        """
        return dict(self._counts)


def describeAddress(address: Optional[IAddress]) -> str:
    """
    C{address} as a person writes it: C{10.0.0.5:4711}, C{[::1]:4711}, a
    UNIX socket's path.
    """
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, UNIXAddress):
        name = address.name
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return name or "a UNIX socket"
    return repr(address)


class ProxySettings:
    """
    A worker's C{--proxy-protocol}: what wraps each of its stream
    listens, and the count of what was refused.
    """

    def __init__(self, allow: AllowList, timeout: float, clock: IReactorTime) -> None:
        self.allow = allow
        self.timeout = timeout
        self._clock = clock
        self.rejections = RejectionLog(clock)

    @classmethod
    def fromEnvironment(cls, text: Optional[str], clock: IReactorTime) -> Optional["ProxySettings"]:
        """
        The settings the master gave (C{TXCLUSTER_PROXY}, JSON), or
        L{None} without C{--proxy-protocol}.
        """
        if not text:
            return None
        import json

        settings = json.loads(text)
        return cls(AllowList.fromStrings(settings["allow"]), float(settings["timeout"]), clock)

    def wrap(self, factory) -> "ProxyHeaderFactory":
        return ProxyHeaderFactory(factory, self.allow, self.timeout, self._clock, self.rejections)

    def metricsText(self) -> str:
        """
        The rejection counts in the Prometheus text format, for the
        master's C{/metrics} (with the application's).
        """
        lines = [
            "# HELP txcluster_proxy_rejected_connections_total Connections closed for their PROXY header, by reason.",
            "# TYPE txcluster_proxy_rejected_connections_total counter",
        ]
        for reason, count in sorted(self.rejections.counts().items()):
            lines.append(f'txcluster_proxy_rejected_connections_total{{reason="{reason}"}} {count}')
        return "\n".join(lines) + "\n"
