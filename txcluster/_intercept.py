# -*- test-case-name: tests.test_intercept -*-
"""
Listen interception in a worker (Node's C{listenInCluster}).

L{interceptListens} replaces C{listenTCP}, C{listenSSL}, C{listenUNIX} and
C{listenUDP} on the worker's reactor, so that everything built on them
(C{TCPServer}, C{strports}, C{serverFromString} endpoints, ...) asks the
master instead of binding.  This is the one module that changes global
reactor state, and only in a worker.

A listen made with a factory (or UDP protocol) passed through L{exclusive},
or a C{makeBinding(..., reusePort=True)} binding, binds in the worker itself.
"""

from __future__ import annotations

from txcluster._sockets import tcpKind, udpKind
from txcluster._twistedcompat import bindingOf, markTLS

_EXCLUSIVE = "_txclusterExclusive"


def exclusive(factory):
    """
    Mark a protocol factory (or a UDP protocol) so that listening with it
    binds inside the worker instead of sharing the master's socket (Node's
    C{listen({exclusive: true})}).  Outside a cluster this changes nothing.

    @return: C{factory}, so that it can wrap an argument in place::

        reactor.listenTCP(9000, exclusive(AdminFactory()))
    """
    setattr(factory, _EXCLUSIVE, True)
    return factory


def isExclusive(factory) -> bool:
    return bool(getattr(factory, _EXCLUSIVE, False))


def interceptListens(reactor, worker) -> None:
    """
    Route C{reactor}'s listens through C{worker}.
    """
    originalTCP = reactor.listenTCP
    originalUNIX = reactor.listenUNIX
    originalUDP = reactor.listenUDP

    def listenTCP(port, factory, backlog=50, interface=""):
        binding = bindingOf(port)
        if binding is not None:
            address, number, reusePort = binding
            if reusePort or isExclusive(factory):
                return originalTCP(port, factory, backlog, interface)
            interface, port = address or interface, number
        if isExclusive(factory):
            return originalTCP(port, factory, backlog, interface)
        return worker.listenStream(tcpKind(interface), interface, port, factory, backlog)

    def listenSSL(port, factory, contextFactory, backlog=50, interface=""):
        from twisted.protocols.tls import TLSMemoryBIOFactory

        tlsFactory = TLSMemoryBIOFactory(contextFactory, False, factory)
        if isExclusive(factory):
            exclusive(tlsFactory)
        listeningPort = listenTCP(port, tlsFactory, backlog, interface)
        markTLS(listeningPort)
        return listeningPort

    def listenUNIX(address, factory, backlog=50, mode=0o666, wantPID=0):
        if isExclusive(factory):
            return originalUNIX(address, factory, backlog, mode, wantPID)
        if isinstance(address, bytes):
            address = address.decode("utf-8", "surrogateescape")
        return worker.listenStream("unix", address, 0, factory, backlog, mode)

    def listenUDP(port, protocol, interface="", maxPacketSize=8192):
        if isExclusive(protocol):
            return originalUDP(port, protocol, interface, maxPacketSize)
        return worker.listenDatagram(udpKind(interface), interface, port, protocol, maxPacketSize)

    reactor.listenTCP = listenTCP
    reactor.listenSSL = listenSSL
    reactor.listenUNIX = listenUNIX
    reactor.listenUDP = listenUDP
