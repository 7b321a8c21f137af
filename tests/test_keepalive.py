"""
Tests for L{txcluster._keepalive}: a leaving worker's HTTP/1.1 connections
are made to close (saying so), with twisted.web's own channel over an
in-memory transport and a fake clock.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import policies
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource, server

from txcluster._keepalive import IDLE_GRACE, endAllKeepAlive, httpChannel

GET = b"GET /%s HTTP/1.1\r\nHost: a\r\n\r\n"


class Held(resource.Resource):
    """
    C{/slow} is answered only when the test says; anything else at once.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list = []

    def render_GET(self, request):
        if request.path == b"/slow":
            self.waiting.append(request)
            return server.NOT_DONE_YET
        return b"fast"


class KeepAliveTests(SynchronousTestCase):
    def connect(self):
        self.clock = Clock()
        self.resource = Held()
        site = server.Site(self.resource)
        site.callLater = self.clock.callLater
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        channel = httpChannel(protocol)
        # Every timer on the fake clock, the first (connectionMade's) too.
        channel.callLater = self.clock.callLater
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.addCleanup(protocol.connectionLost, Failure(ConnectionDone()))
        return protocol, transport, channel

    def test_persistentUntilTheWorkerLeaves(self) -> None:
        """
        Before: HTTP/1.1 responses keep the connection open.
        """
        protocol, transport, channel = self.connect()
        protocol.dataReceived(GET % b"a")
        self.assertNotIn(b"onnection: close", transport.value())
        self.assertFalse(transport.disconnecting)

    def test_idleConnectionCloses(self) -> None:
        """
        An idle keep-alive connection closes after the grace.
        """
        protocol, transport, channel = self.connect()
        protocol.dataReceived(GET % b"a")
        self.assertEqual(endAllKeepAlive([protocol]), 1)
        self.clock.advance(IDLE_GRACE - 0.1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)

    def test_requestOnItsWay(self) -> None:
        """
        A request that arrives within the grace is answered, saying
        C{Connection: close}, and the connection closes after it.
        """
        protocol, transport, channel = self.connect()
        endAllKeepAlive([protocol])
        self.clock.advance(0.5)
        protocol.dataReceived(GET % b"a")
        response = transport.value()
        self.assertIn(b"fast", response)
        self.assertIn(b"onnection: close", response)
        self.assertTrue(transport.disconnecting)

    def test_responseInProgress(self) -> None:
        """
        A response not started yet says C{Connection: close}; the
        connection closes once it is written.
        """
        protocol, transport, channel = self.connect()
        protocol.dataReceived(GET % b"slow")
        (request,) = self.resource.waiting
        endAllKeepAlive([protocol])
        self.assertFalse(transport.disconnecting)
        request.write(b"late")
        request.finish()
        self.assertIn(b"onnection: close", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_throughWrappers(self) -> None:
        """
        The channel is found through protocol wrappers (TLS, PROXY) and
        from a transport; other protocols are left alone.
        """
        protocol, transport, channel = self.connect()
        wrapper = policies.ProtocolWrapper(policies.WrappingFactory(None), protocol)
        self.assertIs(httpChannel(wrapper), channel)
        holder = StringTransport()
        holder.protocol = wrapper
        self.assertIs(httpChannel(holder), channel)
        self.assertIsNone(httpChannel(policies.ProtocolWrapper(policies.WrappingFactory(None), object())))
        self.assertEqual(endAllKeepAlive([object(), holder]), 1)
