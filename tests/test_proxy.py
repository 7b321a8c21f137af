"""
Tests for L{txcluster._proxy}: reading PROXY protocol headers, who may send
them, the worker-side wrapper that hides them from the application, the
rate-limited log of rejections, and the rendezvous ranking of workers for a
client.  In memory: C{StringTransport}, C{task.Clock}, never real time.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from txcluster._proxy import (
    COMPLETE,
    DEFAULT_ALLOW,
    INCOMPLETE,
    INVALID,
    MALFORMED,
    MAX_V2_PAYLOAD,
    MAX_V2_SIZE,
    NOT_PROXY,
    OVERSIZED,
    REJECTIONS,
    TIMEOUT,
    UNTRUSTED,
    V1_MAX_SIZE,
    AllowList,
    Header,
    ProxyHeaderFactory,
    ProxyHeaderProtocol,
    RejectionLog,
    clientKey,
    describeAddress,
    parseHeader,
    preferred,
    rank,
)

_settings = settings(max_examples=80, derandomize=True, deadline=None, database=None)

#: The version 2 signature, as the spec writes it.
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


# Headers -------------------------------------------------------------------------


def v2(command: int = 1, familyProtocol: int = 0x11, body: bytes = b"") -> bytes:
    """
    A version 2 header: C{command} 0 is LOCAL, 1 PROXY; C{familyProtocol}
    0x11 is TCP over IPv4, 0x21 over IPv6, 0x00 UNSPEC, 0x31 UNIX stream.
    """
    return SIGNATURE + bytes([0x20 | command, familyProtocol]) + struct.pack("!H", len(body)) + body


def tcp4(source: str, destination: str, sourcePort: int, destinationPort: int, tlvs: bytes = b"") -> bytes:
    """
    A version 2 PROXY header for a TCP connection over IPv4.
    """
    addresses = socket.inet_pton(socket.AF_INET, source) + socket.inet_pton(socket.AF_INET, destination)
    return v2(1, 0x11, addresses + struct.pack("!HH", sourcePort, destinationPort) + tlvs)


def tcp6(source: str, destination: str, sourcePort: int, destinationPort: int, tlvs: bytes = b"") -> bytes:
    """
    A version 2 PROXY header for a TCP connection over IPv6.
    """
    addresses = socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(socket.AF_INET6, destination)
    return v2(1, 0x21, addresses + struct.pack("!HH", sourcePort, destinationPort) + tlvs)


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


#: TLVs HAProxy sends: ALPN, authority, unique id, and SSL with a version.
TLVS = tlv(0x01, b"h2") + tlv(0x02, b"example.com") + tlv(0x05, b"id-1") + tlv(0x20, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3"))

V1_TCP4 = b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 443\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::10 2001:db8::1 56324 443\r\n"
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V2_TCP4 = tcp4("192.0.2.10", "198.51.100.1", 56324, 443)
V2_TCP6 = tcp6("2001:db8::10", "2001:db8::1", 56324, 443)
V2_LOCAL = v2(command=0, familyProtocol=0x00)
V2_UNSPEC = v2(command=1, familyProtocol=0x00)

SOURCE4 = IPv4Address("TCP", "192.0.2.10", 56324)
DESTINATION4 = IPv4Address("TCP", "198.51.100.1", 443)
SOURCE6 = IPv6Address("TCP", "2001:db8::10", 56324)
DESTINATION6 = IPv6Address("TCP", "2001:db8::1", 443)

#: Every valid header of the tests, and the addresses it gives.
VALID = [
    (V1_TCP4, SOURCE4, DESTINATION4),
    (V1_TCP6, SOURCE6, DESTINATION6),
    (V1_UNKNOWN, None, None),
    (V2_TCP4, SOURCE4, DESTINATION4),
    (V2_TCP6, SOURCE6, DESTINATION6),
    (V2_LOCAL, None, None),
    (V2_UNSPEC, None, None),
    (tcp4("192.0.2.10", "198.51.100.1", 56324, 443, TLVS), SOURCE4, DESTINATION4),
]


class ParseV1Tests(SynchronousTestCase):
    """
    L{parseHeader} on version 1 headers.
    """

    def test_tcp4(self) -> None:
        """
        A TCP4 header gives the client's and the destination's IPv4
        addresses, and its length.
        """
        self.assertEqual(parseHeader(V1_TCP4), Header(COMPLETE, len(V1_TCP4), SOURCE4, DESTINATION4, 1))

    def test_tcp6(self) -> None:
        """
        A TCP6 header gives IPv6 addresses, written the usual way.
        """
        header = parseHeader(b"PROXY TCP6 2001:DB8:0:0:0:0:0:10 2001:db8::1 56324 443\r\n")
        self.assertEqual((header.state, header.source, header.destination), (COMPLETE, SOURCE6, DESTINATION6))

    def test_unknown(self) -> None:
        """
        C{UNKNOWN}, bare as HAProxy sends it or with addresses after it,
        gives no addresses.
        """
        self.assertEqual(parseHeader(V1_UNKNOWN), Header(COMPLETE, len(V1_UNKNOWN), None, None, 1))
        line = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
        self.assertEqual(parseHeader(line), Header(COMPLETE, len(line), None, None, 1))

    def test_followedByData(self) -> None:
        """
        Bytes after the header are not part of it: its length says where
        they start.
        """
        header = parseHeader(V1_TCP4 + b"GET / HTTP/1.1\r\n")
        self.assertEqual((header.state, header.length), (COMPLETE, len(V1_TCP4)))

    def test_longest(self) -> None:
        """
        A header of L{V1_MAX_SIZE} (107) bytes, CRLF included, is read; one
        byte more is oversized, whether or not its CRLF has come.
        """
        self.assertEqual(V1_MAX_SIZE, 107)
        longest = b"PROXY UNKNOWN " + b"x" * (107 - 16) + b"\r\n"
        self.assertEqual(len(longest), 107)
        self.assertEqual(parseHeader(longest).state, COMPLETE)
        tooLong = b"PROXY UNKNOWN " + b"x" * (108 - 16) + b"\r\n"
        self.assertEqual(parseHeader(tooLong), Header(INVALID, reason=OVERSIZED))
        self.assertEqual(parseHeader(tooLong[:107]), Header(INVALID, reason=OVERSIZED))
        self.assertEqual(parseHeader(tooLong[:106]).state, INCOMPLETE)

    def test_malformed(self) -> None:
        """
        A line that starts as a header but is not one is malformed: an
        unknown protocol, missing fields, a port that is not a number or
        out of range, an address that is not of its family or not ASCII,
        a line ended by a bare LF.
        """
        for line in [
            b"PROXY UDP4 192.0.2.10 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.10 198.51.100.1 1\r\n",
            b"PROXY TCP4\r\n",
            b"PROXY \r\n",
            b"PROXY TCP4 192.0.2.10 198.51.100.1 http 443\r\n",
            b"PROXY TCP4 192.0.2.10 198.51.100.1 1 65536\r\n",
            b"PROXY TCP4 192.0.2.10 198.51.100.1 -1 443\r\n",
            b"PROXY TCP4 2001:db8::10 198.51.100.1 1 2\r\n",
            b"PROXY TCP6 192.0.2.10 2001:db8::1 1 2\r\n",
            b"PROXY TCP4 example.com 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.\xff 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.10 198.51.100.1 1 2\n",
        ]:
            self.assertEqual(parseHeader(line), Header(INVALID, reason=MALFORMED), line)


class ParseV2Tests(SynchronousTestCase):
    """
    L{parseHeader} on version 2 headers.
    """

    def test_tcp4(self) -> None:
        """
        A PROXY command over TCP/IPv4 gives the IPv4 addresses.
        """
        self.assertEqual(parseHeader(V2_TCP4), Header(COMPLETE, 28, SOURCE4, DESTINATION4, 2))

    def test_tcp6(self) -> None:
        """
        A PROXY command over TCP/IPv6 gives IPv6 addresses written the
        usual way (Twisted writes C{2001:db8:0:0:0:0:0:10}).
        """
        self.assertEqual(parseHeader(V2_TCP6), Header(COMPLETE, 52, SOURCE6, DESTINATION6, 2))

    def test_localAndUnspec(self) -> None:
        """
        A LOCAL command (a balancer's own health check) and an UNSPEC family
        give no addresses, even with address bytes after them.
        """
        self.assertEqual(parseHeader(V2_LOCAL), Header(COMPLETE, 16, None, None, 2))
        self.assertEqual(parseHeader(V2_UNSPEC), Header(COMPLETE, 16, None, None, 2))
        local = v2(command=0, familyProtocol=0x11, body=V2_TCP4[16:])
        self.assertEqual(parseHeader(local), Header(COMPLETE, 28, None, None, 2))

    def test_tlvs(self) -> None:
        """
        TLVs after the addresses are part of the header (its length counts
        them) and do not change the addresses.
        """
        header = tcp4("192.0.2.10", "198.51.100.1", 56324, 443, TLVS)
        self.assertEqual(parseHeader(header + b"\x16\x03\x01"), Header(COMPLETE, len(header), SOURCE4, DESTINATION4, 2))

    def test_unix(self) -> None:
        """
        A UNIX stream family gives UNIX addresses.
        """
        body = b"/run/client".ljust(108, b"\0") + b"/run/server".ljust(108, b"\0")
        header = parseHeader(v2(1, 0x31, body))
        self.assertEqual(
            (header.state, header.source, header.destination),
            (COMPLETE, UNIXAddress(b"/run/client"), UNIXAddress(b"/run/server")),
        )

    def test_malformed(self) -> None:
        """
        A version other than 2, a command other than LOCAL and PROXY, an
        unknown family or protocol, or fewer address bytes than the family
        needs: malformed.  A wrong version is found from the 13th byte on.
        """
        for header in [
            SIGNATURE + b"\x11\x11\x00\x0c" + V2_TCP4[16:],
            SIGNATURE + b"\x22\x11\x00\x0c" + V2_TCP4[16:],
            v2(1, 0x41, V2_TCP4[16:]),
            v2(1, 0x13, V2_TCP4[16:]),
            v2(1, 0x11, V2_TCP4[16:27]),
            v2(1, 0x21, V2_TCP4[16:]),
        ]:
            self.assertEqual(parseHeader(header), Header(INVALID, reason=MALFORMED), header)
        self.assertEqual(parseHeader(SIGNATURE + b"\x11"), Header(INVALID, reason=MALFORMED))

    def test_oversized(self) -> None:
        """
        A header longer than C{maxSize} (by default 16 + L{MAX_V2_PAYLOAD}
        bytes) is oversized as soon as its length field has come; one of
        exactly C{maxSize} is read.
        """
        self.assertEqual(MAX_V2_SIZE, 16 + MAX_V2_PAYLOAD)
        longest = tcp4("192.0.2.10", "198.51.100.1", 1, 2, tlv(0xE0, b"x" * (MAX_V2_PAYLOAD - 12 - 3)))
        self.assertEqual(len(longest), MAX_V2_SIZE)
        self.assertEqual(parseHeader(longest).state, COMPLETE)
        tooLong = tcp4("192.0.2.10", "198.51.100.1", 1, 2, tlv(0xE0, b"x" * (MAX_V2_PAYLOAD - 12 - 2)))
        self.assertEqual(parseHeader(tooLong[:16]), Header(INVALID, reason=OVERSIZED))
        self.assertEqual(parseHeader(V2_TCP4, maxSize=27), Header(INVALID, reason=OVERSIZED))
        self.assertEqual(parseHeader(V2_TCP4, maxSize=28).state, COMPLETE)


class ParseAnyTests(SynchronousTestCase):
    """
    L{parseHeader} on whatever a connection may start with.
    """

    def test_nothingYet(self) -> None:
        """
        No bytes: maybe a header.
        """
        self.assertIs(parseHeader(b"").state, INCOMPLETE)

    def test_notAHeader(self) -> None:
        """
        Bytes that no header starts with are not a PROXY header, as soon as
        they differ from both signatures.
        """
        for data in [b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00", b"P\x00", b"PROXY", b"PROXYTCP4", b"\r\n\r\n\x01"]:
            expected = INCOMPLETE if data == b"PROXY" else INVALID
            self.assertEqual(parseHeader(data).state, expected, data)
        self.assertEqual(parseHeader(b"GET"), Header(INVALID, reason=NOT_PROXY))
        self.assertEqual(parseHeader(b"proxy TCP4"), Header(INVALID, reason=NOT_PROXY))

    def test_truncatedAtEveryByte(self) -> None:
        """
        Every prefix of a valid header is incomplete; the whole header, alone
        or followed by anything, is complete with the same addresses.
        """
        for header, source, destination in VALID:
            for end in range(len(header)):
                self.assertEqual(parseHeader(header[:end]), Header(INCOMPLETE), (header, end))
            for data in (header, header + b"\r\n\r\nmore"):
                parsed = parseHeader(data)
                self.assertEqual(
                    (parsed.state, parsed.length, parsed.source, parsed.destination),
                    (COMPLETE, len(header), source, destination),
                )

    @_settings
    @given(
        source=st.ip_addresses(v=4),
        destination=st.ip_addresses(v=4),
        ports=st.tuples(st.integers(0, 65535), st.integers(0, 65535)),
        version=st.sampled_from([1, 2]),
        after=st.binary(max_size=40),
    )
    def test_anyTCP4Header(self, source, destination, ports, version, after) -> None:
        """
        Any TCP4 header, in either version, followed by any bytes, gives its
        addresses and its own length.
        """
        if version == 1:
            header = b"PROXY TCP4 %s %s %d %d\r\n" % (str(source).encode(), str(destination).encode(), *ports)
        else:
            header = tcp4(str(source), str(destination), *ports)
        parsed = parseHeader(header + after)
        self.assertEqual(
            parsed,
            Header(
                COMPLETE,
                len(header),
                IPv4Address("TCP", str(source), ports[0]),
                IPv4Address("TCP", str(destination), ports[1]),
                version,
            ),
        )

    @_settings
    @given(source=st.ip_addresses(v=6), destination=st.ip_addresses(v=6), version=st.sampled_from([1, 2]))
    def test_anyTCP6Header(self, source, destination, version) -> None:
        """
        Any TCP6 header gives its addresses, written as C{ipaddress} writes
        them.
        """
        if version == 1:
            header = b"PROXY TCP6 %s %s 1 2\r\n" % (source.exploded.encode(), destination.compressed.encode())
        else:
            header = tcp6(str(source), str(destination), 1, 2)
        parsed = parseHeader(header)
        self.assertEqual((parsed.source.host, parsed.destination.host), (str(source), str(destination)))

    @_settings
    @given(data=st.binary(max_size=64))
    def test_anyBytes(self, data) -> None:
        """
        Whatever the bytes, L{parseHeader} answers (it raises nothing), and
        a complete header is never longer than what it was given.
        """
        parsed = parseHeader(data)
        self.assertIn(parsed.state, (INCOMPLETE, COMPLETE, INVALID))
        self.assertLessEqual(parsed.length, len(data))
        parseHeader(SIGNATURE + data)
        parseHeader(b"PROXY " + data)


# Who may send one ------------------------------------------------------------------


class AllowListTests(SynchronousTestCase):
    """
    L{AllowList}: the peers that may send a header.
    """

    def test_addressesAndNetworks(self) -> None:
        """
        An entry is a network or a single address, of either family.
        """
        allow = AllowList.fromStrings(["127.0.0.0/8", "::1/128", "10.0.0.5", "2001:db8::/32"])
        for host, allowed in [
            ("127.0.0.1", True),
            ("127.255.0.9", True),
            ("10.0.0.5", True),
            ("10.0.0.6", False),
            ("192.0.2.1", False),
            ("::1", True),
            ("::2", False),
            ("2001:db8:1::5", True),
        ]:
            kind = IPv6Address if ":" in host else IPv4Address
            self.assertEqual(allow.allows(kind("TCP", host, 4711)), allowed, host)

    def test_ipv4Mapped(self) -> None:
        """
        An IPv4-mapped IPv6 peer (a dual-stack socket's) is its IPv4
        address; a mapped entry is an IPv4 one.
        """
        allow = AllowList.fromStrings(["10.0.0.5"])
        self.assertTrue(allow.allows(IPv6Address("TCP", "::ffff:10.0.0.5", 1)))
        self.assertFalse(allow.allows(IPv6Address("TCP", "::ffff:10.0.0.6", 1)))
        mapped = AllowList.fromStrings(["::ffff:10.0.0.0/104"])
        self.assertEqual(mapped, AllowList.fromStrings(["10.0.0.0/8"]))
        self.assertTrue(mapped.allows(IPv4Address("TCP", "10.9.9.9", 1)))

    def test_unixAlwaysAllowed(self) -> None:
        """
        A UNIX peer is local: it may send a header even when no address is
        allowed.
        """
        self.assertTrue(AllowList.fromStrings([]).allows(UNIXAddress(b"/run/app.sock")))
        self.assertTrue(AllowList().allows(UNIXAddress(None)))

    def test_otherAddresses(self) -> None:
        """
        An address that is not an IP address may not send a header.
        """
        allow = AllowList.fromStrings(["0.0.0.0/0", "::/0"])
        self.assertFalse(allow.allows(IPv4Address("TCP", "localhost", 1)))
        self.assertFalse(allow.allows(None))
        self.assertFalse(allow.allows(object()))

    def test_hostBitsAndSpaces(self) -> None:
        """
        Host bits of a network are ignored and spaces around an entry too.
        """
        self.assertEqual(AllowList.fromStrings([" 10.1.2.3/8 "]), AllowList.fromStrings(["10.0.0.0/8"]))

    def test_badEntry(self) -> None:
        """
        An entry that is not an address or a network is refused with a
        message that names it.
        """
        for entry in ["10.0.0.256", "10.0.0.0/33", "example.com", "", "::1/129", 5, b"\x7f\x00\x00\x01"]:
            error = self.assertRaises(ValueError, AllowList.fromStrings, ["127.0.0.1", entry])
            self.assertIn(repr(entry), str(error))

    def test_default(self) -> None:
        """
        By default only this host may send headers.
        """
        allow = AllowList.fromStrings(DEFAULT_ALLOW)
        self.assertTrue(allow.allows(IPv4Address("TCP", "127.0.0.2", 1)))
        self.assertTrue(allow.allows(IPv6Address("TCP", "::1", 1)))
        self.assertFalse(allow.allows(IPv4Address("TCP", "192.0.2.1", 1)))


# Rendezvous ranking ----------------------------------------------------------------


def keys(count: int) -> list:
    """
    C{count} client keys: IPv4 addresses from 10.0.0.0 on, packed.
    """
    return [ipaddress.IPv4Address(0x0A000000 + n).packed for n in range(count)]


class RankTests(SynchronousTestCase):
    """
    L{rank}, L{preferred} and L{clientKey}.
    """

    def test_pinned(self) -> None:
        """
        The ranking is the same in every process and every Python run: it
        does not depend on C{hash()} or its seed.  (If this changes, every
        sticky client moves once on upgrade: say so in the release notes.)
        """
        self.assertEqual(rank(b"\x0a\x00\x00\x05", range(6)), [0, 5, 4, 3, 1, 2])
        self.assertEqual(rank(b"", [1, 2, 3]), rank(b"", [3, 2, 1]))

    @_settings
    @given(key=st.binary(max_size=16), ids=st.lists(st.integers(0, 64), min_size=1, max_size=12))
    def test_orderAndSubsets(self, key, ids) -> None:
        """
        The ranking is of the distinct ids, does not depend on the order
        they are given in, and ranking a subset gives the same order
        restricted to it; L{preferred} is its first.
        """
        ranking = rank(key, ids)
        self.assertEqual(sorted(ranking), sorted(set(ids)))
        self.assertEqual(rank(key, reversed(ids)), ranking)
        self.assertEqual(rank(key, iter(ids)), ranking)
        dropped = ids[0]
        self.assertEqual(rank(key, [i for i in ids if i != dropped]), [i for i in ranking if i != dropped])
        self.assertEqual(preferred(key, ids), ranking[0])

    @settings(max_examples=30, derandomize=True, deadline=None, database=None)
    @given(ids=st.sets(st.integers(0, 1000), min_size=1, max_size=9), added=st.integers(1001, 2000))
    def test_addingMovesOneInNPlusOne(self, ids, added) -> None:
        """
        Adding an id to N moves only clients to it, about 1/(N+1) of them;
        removing it moves them, and only them, back.
        """
        clients = keys(2000)
        before = [preferred(k, ids) for k in clients]
        after = [preferred(k, ids | {added}) for k in clients]
        moved = [b != a for b, a in zip(before, after)]
        self.assertTrue(all(a == added for a, m in zip(after, moved) if m))
        self.assertLess(abs(sum(moved) / len(clients) - 1 / (len(ids) + 1)), 0.05)

    def test_fourToFive(self) -> None:
        """
        From four workers to five, a fifth of a thousand clients move (all
        to the new worker); from five to four, those who ranked the
        removed worker first, and they spread over the others.
        """
        clients = keys(1000)
        four = [preferred(k, range(4)) for k in clients]
        five = [preferred(k, range(5)) for k in clients]
        moved = sum(a != b for a, b in zip(four, five))
        self.assertLess(abs(moved / 1000 - 0.2), 0.04)
        withoutTwo = [preferred(k, [0, 1, 3, 4]) for k in clients]
        movers = [(b, a) for b, a in zip(five, withoutTwo) if b != a]
        self.assertEqual({b for b, _ in movers}, {2})
        self.assertEqual(len(movers), five.count(2))
        self.assertEqual({a for _, a in movers}, {0, 1, 3, 4})

    def test_balanced(self) -> None:
        """
        Clients spread about evenly.
        """
        counts = [0] * 8
        for k in keys(8000):
            counts[preferred(k, range(8))] += 1
        self.assertLess(max(counts) - min(counts), 200)

    def test_preferredOfNone(self) -> None:
        """
        There is no preferred id among none.
        """
        self.assertRaises(ValueError, preferred, b"k", [])
        self.assertEqual(rank(b"k", []), [])

    def test_clientKey(self) -> None:
        """
        A client's key is its packed IP address, whatever the port; an
        IPv4-mapped IPv6 address is its IPv4 address; anything else is
        C{b""}.
        """
        self.assertEqual(clientKey(IPv4Address("TCP", "10.0.0.5", 1)), b"\x0a\x00\x00\x05")
        self.assertEqual(clientKey(IPv4Address("TCP", "10.0.0.5", 2)), b"\x0a\x00\x00\x05")
        self.assertEqual(clientKey(IPv6Address("TCP", "::ffff:10.0.0.5", 1)), b"\x0a\x00\x00\x05")
        self.assertEqual(clientKey(IPv6Address("TCP", "2001:db8::1", 1)), socket.inet_pton(socket.AF_INET6, "2001:db8::1"))
        self.assertEqual(clientKey(UNIXAddress(b"/run/x")), b"")
        self.assertEqual(clientKey(None), b"")


# The worker's wrapper -----------------------------------------------------------------


class App(Protocol):
    """
    An application protocol that records what it sees.
    """

    def __init__(self, log: list) -> None:
        self.log = log

    def connectionMade(self) -> None:
        self.log.append(("made", self.transport.getPeer(), self.transport.getHost()))

    def dataReceived(self, data: bytes) -> None:
        self.log.append(("data", data))

    def connectionLost(self, reason) -> None:
        self.log.append(("lost", reason.type))


class AppFactory(Factory):
    """
    Builds L{App}s, recording the address each was built for.
    """

    def __init__(self, refuse: bool = False) -> None:
        self.log: list = []
        self.refuse = refuse

    def buildProtocol(self, addr):
        self.log.append(("built", addr))
        if self.refuse:
            return None
        return App(self.log)


BALANCER = IPv4Address("TCP", "127.0.0.1", 40000)
HOST = IPv4Address("TCP", "127.0.0.1", 8080)


class WrapperTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.rejections: list = []
        self.app = AppFactory()
        self.factory = self.proxyFactory(self.app)

    def proxyFactory(self, app, **kwargs) -> ProxyHeaderFactory:
        return ProxyHeaderFactory(
            app,
            AllowList.fromStrings(DEFAULT_ALLOW),
            5.0,
            self.clock,
            lambda reason, peer: self.rejections.append((reason, peer)),
            **kwargs,
        )

    def connect(self, peer=BALANCER, factory=None) -> tuple:
        """
        A wrapper connected to a C{StringTransport} from C{peer}.
        """
        factory = factory or self.factory
        protocol = factory.buildProtocol(peer)
        transport = StringTransport(hostAddress=HOST, peerAddress=peer)
        protocol.makeConnection(transport)
        return protocol, transport


class ProxyHeaderProtocolTests(WrapperTestCase):
    """
    L{ProxyHeaderProtocol}: the application sees the client, never the
    header.
    """

    def test_appSeesTheClient(self) -> None:
        """
        The application's protocol is built for the client's address and
        connected once the header is complete: its C{connectionMade}
        already sees the client as the peer and the header's destination as
        the host.
        """
        protocol, transport = self.connect()
        self.assertEqual(self.app.log, [])
        protocol.dataReceived(V2_TCP4)
        self.assertEqual(self.app.log, [("built", SOURCE4), ("made", SOURCE4, DESTINATION4)])
        self.assertEqual((protocol.getPeer(), protocol.getHost()), (SOURCE4, DESTINATION4))
        self.assertEqual(self.rejections, [])

    def test_dataAfterTheHeader(self) -> None:
        """
        Bytes after the header in the same chunk, and the chunks after it,
        go to the application, in order, without the header.
        """
        protocol, _ = self.connect()
        protocol.dataReceived(V1_TCP6 + b"GET / ")
        protocol.dataReceived(b"HTTP/1.1\r\n")
        self.assertEqual(self.app.log[1:], [("made", SOURCE6, DESTINATION6), ("data", b"GET / "), ("data", b"HTTP/1.1\r\n")])

    def test_byteByByte(self) -> None:
        """
        A header that arrives one byte at a time (Twisted's own wrapper
        closes a connection whose first chunk is shorter than 16 bytes) is
        read; the application sees nothing until it is whole.
        """
        for header, source, destination in VALID:
            self.app.log.clear()
            protocol, transport = self.connect()
            for i in range(len(header)):
                self.assertEqual(self.app.log, [])
                protocol.dataReceived(header[i : i + 1])
            protocol.dataReceived(b"x")
            self.assertEqual(
                self.app.log[1:],
                [("made", source or BALANCER, destination or HOST), ("data", b"x")],
            )
            self.assertFalse(transport.disconnecting)

    @_settings
    @given(
        which=st.integers(0, len(VALID) - 1),
        cuts=st.lists(st.integers(0, 200), max_size=6),
        after=st.binary(min_size=1, max_size=30),
    )
    def test_anySplit(self, which, cuts, after) -> None:
        """
        However a header and the bytes after it are split into chunks, the
        application sees the client and exactly the bytes after the
        header.
        """
        self.app.log.clear()
        header, source, _ = VALID[which]
        data = header + after
        points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
        protocol, _ = self.connect()
        for start, end in zip(points, points[1:]):
            protocol.dataReceived(data[start:end])
        self.assertEqual(self.app.log[1][:2], ("made", source or BALANCER))
        self.assertEqual(b"".join(e[1] for e in self.app.log if e[0] == "data"), after)

    def test_unknownAndLocalKeepTheConnection(self) -> None:
        """
        A header without addresses (v1 UNKNOWN, v2 LOCAL) leaves the
        connection's own addresses.
        """
        for header in (V1_UNKNOWN, V2_LOCAL):
            self.app.log.clear()
            protocol, _ = self.connect()
            protocol.dataReceived(header)
            self.assertEqual(self.app.log, [("built", BALANCER), ("made", BALANCER, HOST)])
            self.assertEqual((protocol.getPeer(), protocol.getHost()), (BALANCER, HOST))

    def test_appWrites(self) -> None:
        """
        What the application writes goes to the connection.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(V1_TCP4)
        protocol.wrappedProtocol.transport.write(b"hello")
        self.assertEqual(transport.value(), b"hello")

    def test_connectionLost(self) -> None:
        """
        When a connection the application has ends, the application is told
        once, and the factory forgets the connection.
        """
        protocol, _ = self.connect()
        protocol.dataReceived(V1_TCP4)
        self.assertEqual(list(self.factory.protocols), [protocol])
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.app.log[-1], ("lost", ConnectionDone))
        self.assertEqual(self.factory.protocols, {})

    def test_appRefuses(self) -> None:
        """
        An application factory that builds no protocol for the client
        refuses it: the connection is closed, and that is not a rejection
        of the header.
        """
        factory = self.proxyFactory(AppFactory(refuse=True))
        protocol, transport = self.connect(factory=factory)
        protocol.dataReceived(V1_TCP4 + b"data")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.rejections, [])
        protocol.connectionLost(Failure(ConnectionDone()))

    def test_appClosesAtOnce(self) -> None:
        """
        An application that closes the connection in C{connectionMade} is
        not given the bytes after the header.
        """

        class Closer(App):
            def connectionMade(self) -> None:
                self.transport.loseConnection()

        app = AppFactory()
        app.buildProtocol = lambda addr: Closer(app.log)
        protocol, transport = self.connect(factory=self.proxyFactory(app))
        protocol.dataReceived(V1_TCP4 + b"data")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(app.log, [])

    def test_logPrefix(self) -> None:
        """
        A connection's log prefix names the application's factory.
        """
        protocol, _ = self.connect()
        self.assertEqual(protocol.logPrefix(), "AppFactory (PROXY)")
        self.assertEqual(self.factory.logPrefix(), "AppFactory (PROXY)")


class RejectionTests(WrapperTestCase):
    """
    L{ProxyHeaderProtocol} closes what it cannot pass on, without the
    application ever knowing.
    """

    def assertRejected(self, protocol, transport, reason: str, peer=BALANCER) -> None:
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.rejections, [(reason, peer)])
        protocol.dataReceived(V1_TCP4 + b"more")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.app.log, [])
        self.assertEqual(self.rejections, [(reason, peer)])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.factory.protocols, {})
        self.assertEqual(transport.value(), b"")

    def test_untrusted(self) -> None:
        """
        A peer that is not allowed to send a header is closed at once.
        """
        stranger = IPv4Address("TCP", "192.0.2.99", 5555)
        protocol, transport = self.connect(peer=stranger)
        self.assertRejected(protocol, transport, UNTRUSTED, stranger)

    def test_unixPeerTrusted(self) -> None:
        """
        A peer over a UNIX socket may send a header.
        """
        protocol, transport = self.connect(peer=UNIXAddress(None))
        protocol.dataReceived(V1_TCP4)
        self.assertEqual(self.app.log[1], ("made", SOURCE4, DESTINATION4))

    def test_invalid(self) -> None:
        """
        A connection that does not start with a header, or whose header is
        malformed or too long, is closed for that reason.
        """
        for data, reason in [
            (b"GET / HTTP/1.1\r\n", NOT_PROXY),
            (b"\x16\x03\x01\x00\xa5", NOT_PROXY),
            (b"PROXY TCP4 nonsense\r\n", MALFORMED),
            (SIGNATURE + b"\x21\x11\xff\xff", OVERSIZED),
            (b"PROXY UNKNOWN " + b"x" * 200, OVERSIZED),
        ]:
            self.rejections.clear()
            protocol, transport = self.connect()
            protocol.dataReceived(data)
            self.assertRejected(protocol, transport, reason)

    def test_invalidInPieces(self) -> None:
        """
        A bad header is found out as soon as its bytes show it, even when
        they come one by one.
        """
        protocol, transport = self.connect()
        for byte in b"PROXY TCP4 1.2.3.4 5.6.7.8 1 x\r":
            protocol.dataReceived(bytes([byte]))
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"\n")
        self.assertRejected(protocol, transport, MALFORMED)

    def test_maxSize(self) -> None:
        """
        The factory's C{maxSize} bounds a version 2 header.
        """
        self.factory = self.proxyFactory(self.app, maxSize=20)
        protocol, transport = self.connect()
        protocol.dataReceived(V2_TCP4[:16])
        self.assertRejected(protocol, transport, OVERSIZED)

    def test_timeout(self) -> None:
        """
        A connection whose header is not complete within the timeout is
        closed, however much of it came.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(V1_TCP4[:10])
        self.clock.advance(4.9)
        protocol.dataReceived(V1_TCP4[10:20])
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertRejected(protocol, transport, TIMEOUT)

    def test_silentTimeout(self) -> None:
        """
        A connection that sends nothing is closed after the timeout.
        """
        protocol, transport = self.connect()
        self.clock.advance(5)
        self.assertRejected(protocol, transport, TIMEOUT)

    def test_timerCancelled(self) -> None:
        """
        The timeout is cancelled once the header is complete, and when the
        peer closes first; a peer that closes before its header is
        complete (a TCP health check) is not a rejection.
        """
        protocol, _ = self.connect()
        protocol.dataReceived(V1_TCP4)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        protocol, _ = self.connect()
        protocol.dataReceived(V1_TCP4[:5])
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.rejections, [])
        self.assertEqual(self.app.log[-1], ("made", SOURCE4, DESTINATION4))

    def test_closedBeforeRejected(self) -> None:
        """
        The connection is closed before C{rejected} is called: a failing
        callback does not keep it open.
        """

        def rejected(reason, peer):
            raise RuntimeError("broken metrics")

        factory = ProxyHeaderFactory(self.app, AllowList(), 5.0, self.clock, rejected)
        protocol = factory.buildProtocol(BALANCER)
        transport = StringTransport(peerAddress=BALANCER)
        self.assertRaises(RuntimeError, protocol.makeConnection, transport)
        self.assertTrue(transport.disconnecting)


class TLSTests(SynchronousTestCase):
    """
    The wrapper outside TLS: the PROXY header comes first, in the clear,
    then the TLS bytes.
    """

    def setUp(self) -> None:
        try:
            from twisted.internet import ssl
            from twisted.protocols.tls import TLSMemoryBIOFactory
        except ImportError:
            raise SkipTest("no TLS support (pyOpenSSL)")
        from tests._tls import clientOptions, writeCertificate

        keyPath, certPath = writeCertificate(self.mktemp())
        with open(keyPath, "rb") as k, open(certPath, "rb") as c:
            serverOptions = ssl.PrivateCertificate.loadPEM(k.read() + c.read()).options()
        self.app = AppFactory()
        self.clock = Clock()
        self.rejections: list = []
        self.factory = ProxyHeaderFactory(
            TLSMemoryBIOFactory(serverOptions, False, self.app, clock=self.clock),
            AllowList.fromStrings(DEFAULT_ALLOW),
            5.0,
            self.clock,
            lambda *a: self.rejections.append(a),
        )
        self.clientLog: list = []
        clientApp = Factory.forProtocol(lambda: App(self.clientLog))
        clientTLS = TLSMemoryBIOFactory(clientOptions(certPath), True, clientApp, clock=self.clock)
        self.client = clientTLS.buildProtocol(None)

    def test_appBehindTLSSeesTheClient(self) -> None:
        """
        The application inside TLS sees the header's source as its peer,
        and what the client sends through TLS arrives decrypted.
        """
        server = self.factory.buildProtocol(BALANCER)
        serverTransport = StringTransport(hostAddress=HOST, peerAddress=BALANCER)
        server.makeConnection(serverTransport)
        clientTransport = StringTransport()
        self.client.makeConnection(clientTransport)
        # The header and the ClientHello in one chunk.
        first = V2_TCP4 + clientTransport.value()
        clientTransport.clear()
        server.dataReceived(first)
        # Written before the handshake: TLS sends it once it is done.
        self.client.wrappedProtocol.transport.write(b"ping")
        for _ in range(10):
            # TLS gathers small writes until the next turn of the reactor.
            self.clock.advance(0)
            toServer, toClient = clientTransport.value(), serverTransport.value()
            clientTransport.clear()
            serverTransport.clear()
            if not toServer and not toClient:
                break
            if toServer:
                server.dataReceived(toServer)
            if toClient:
                self.client.dataReceived(toClient)
        self.assertEqual(self.app.log[:2], [("built", SOURCE4), ("made", SOURCE4, DESTINATION4)])
        self.assertIn(("data", b"ping"), self.app.log)
        tlsApp = server.wrappedProtocol.wrappedProtocol
        self.assertEqual(tlsApp.transport.getPeer(), SOURCE4)
        self.assertEqual(self.rejections, [])


# Rejections -----------------------------------------------------------------------


class RejectionLogTests(SynchronousTestCase):
    """
    L{RejectionLog}: counts for the metrics, log lines at a bounded rate.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list = []
        self.rejections = RejectionLog(self.clock, 10.0, Logger(namespace="test", observer=self.events.append))

    def lines(self) -> list:
        return [(e["reason"], e["peer"], e["unlogged"]) for e in self.events]

    def test_counts(self) -> None:
        """
        Every rejection counts, logged or not; every reason is there, at
        zero when none happened.
        """
        self.assertEqual(self.rejections.counts(), dict.fromkeys(REJECTIONS, 0))
        for _ in range(3):
            self.rejections(TIMEOUT, BALANCER)
        self.rejections(UNTRUSTED, BALANCER)
        counts = self.rejections.counts()
        self.assertEqual((counts[TIMEOUT], counts[UNTRUSTED], counts[MALFORMED]), (3, 1, 0))
        counts[TIMEOUT] = 99
        self.assertEqual(self.rejections.counts()[TIMEOUT], 3)

    def test_boundedRate(self) -> None:
        """
        One line per reason per interval; the next line says how many were
        not logged since the last one.
        """
        stranger = IPv4Address("TCP", "192.0.2.99", 5555)
        self.rejections(UNTRUSTED, stranger)
        for _ in range(5):
            self.clock.advance(1)
            self.rejections(UNTRUSTED, stranger)
        self.rejections(MALFORMED, BALANCER)
        self.assertEqual(self.lines(), [(UNTRUSTED, "192.0.2.99:5555", 0), (MALFORMED, "127.0.0.1:40000", 0)])
        self.clock.advance(5)
        self.rejections(UNTRUSTED, stranger)
        self.assertEqual(self.lines()[-1], (UNTRUSTED, "192.0.2.99:5555", 5))
        self.rejections(UNTRUSTED, stranger)
        self.assertEqual(len(self.events), 3)

    def test_line(self) -> None:
        """
        A line is a warning naming the peer and saying why, in words.
        """
        from twisted.logger import LogLevel, formatEvent

        self.rejections(UNTRUSTED, IPv6Address("TCP", "2001:db8::5", 80))
        [event] = self.events
        self.assertEqual(event["log_level"], LogLevel.warn)
        text = formatEvent(event)
        self.assertIn("[2001:db8::5]:80", text)
        self.assertIn("may not send a PROXY header", text)
        self.clock.advance(1)
        self.rejections(UNTRUSTED, IPv6Address("TCP", "2001:db8::5", 80))
        self.clock.advance(10)
        self.rejections(UNTRUSTED, IPv6Address("TCP", "2001:db8::5", 80))
        self.assertIn("(1 more since the last such line)", formatEvent(self.events[-1]))

    def test_asRejected(self) -> None:
        """
        A L{RejectionLog} is what a L{ProxyHeaderFactory} calls.
        """
        factory = ProxyHeaderFactory(AppFactory(), AllowList(), 5.0, self.clock, self.rejections)
        factory.buildProtocol(BALANCER).makeConnection(StringTransport(peerAddress=BALANCER))
        self.assertEqual(self.rejections.counts()[UNTRUSTED], 1)

    def test_describeAddress(self) -> None:
        """
        Addresses are written as people write them.
        """
        self.assertEqual(describeAddress(IPv4Address("TCP", "10.0.0.5", 1)), "10.0.0.5:1")
        self.assertEqual(describeAddress(IPv6Address("TCP", "::1", 2)), "[::1]:2")
        self.assertEqual(describeAddress(UNIXAddress(b"/run/a.sock")), "/run/a.sock")
        self.assertEqual(describeAddress(UNIXAddress(None)), "a UNIX socket")
