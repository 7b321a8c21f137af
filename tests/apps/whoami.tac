"""
A test application that says who it is.

Stream listens come from $WHOAMI_LISTEN (strports descriptions separated by
spaces): each connection gets "worker <id> <pid>\n", then, with
$WHOAMI_CLOSE=1, is closed (otherwise its input is echoed).  $WHOAMI_UDP
(a port, optionally "interface:port") adds a UDP socket answering each
datagram with the same line.  $WHOAMI_TCP_SYNC (port) listens with a plain
reactor.listenTCP in startService, the synchronous path; $WHOAMI_EXCLUSIVE
(port) listens with an exclusive factory, bound in the worker itself.

It obeys messages from the master (JSON objects with "cmd"):
freeze (block the reactor for "seconds"), listen ("endpoint": listen and
answer {"listened": port} or {"error": ...}), ports (answer
{"ports": [...]}), stop-listening (close every listen).
"""

import json
import os
import time

from twisted.application import internet, service
from twisted.internet import endpoints, protocol, reactor

from txcluster import currentWorker

worker = currentWorker()
WORKER_ID = worker.id if worker is not None else 0
LINE = f"worker {WORKER_ID} {os.getpid()}\n".encode()


class Who(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(LINE)
        if os.environ.get("WHOAMI_CLOSE") == "1":
            self.transport.loseConnection()

    def dataReceived(self, data):
        self.transport.write(data)


class WhoFactory(protocol.Factory):
    protocol = Who


class WhoUDP(protocol.DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(LINE, addr)


class Listens(service.Service):
    def __init__(self):
        self.ports = []

    def privilegedStartService(self):
        service.Service.privilegedStartService(self)
        sync = os.environ.get("WHOAMI_TCP_SYNC")
        if sync:
            self.ports.append(reactor.listenTCP(int(sync), WhoFactory(), interface="127.0.0.1"))
        alone = os.environ.get("WHOAMI_EXCLUSIVE")
        if alone:
            from txcluster import exclusive

            self.ports.append(reactor.listenTCP(int(alone), exclusive(WhoFactory()), interface="127.0.0.1"))

    def startService(self):
        service.Service.startService(self)
        for description in os.environ.get("WHOAMI_LISTEN", "").split():
            endpoints.serverFromString(reactor, description).listen(WhoFactory()).addCallbacks(
                self.ports.append, self._failed, errbackArgs=(description,)
            )
        udp = os.environ.get("WHOAMI_UDP")
        if udp:
            interface, _, port = udp.rpartition(":")
            self.ports.append(reactor.listenUDP(int(port), WhoUDP(), interface=interface or "127.0.0.1"))
        if worker is not None:
            worker.addMessageObserver(self.command)

    def _failed(self, failure, description):
        if worker is not None:
            worker.sendToMaster({"error": str(failure.value), "endpoint": description})

    def stopService(self):
        service.Service.stopService(self)
        return self.stopListening()

    def stopListening(self):
        from twisted.internet import defer

        ports, self.ports = self.ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])

    def command(self, message):
        cmd = message.get("cmd")
        if cmd == "freeze":
            time.sleep(message["seconds"])
        elif cmd == "listen":
            d = endpoints.serverFromString(reactor, message["endpoint"]).listen(WhoFactory())

            def listened(port):
                self.ports.append(port)
                worker.sendToMaster({"listened": port.getHost().port})

            def failed(f):
                worker.sendToMaster({"error": str(f.value), "errno": getattr(f.value.socketError, "errno", None)})

            d.addCallbacks(listened, failed)
        elif cmd == "ports":
            worker.sendToMaster({"ports": [_describe(p.getHost()) for p in self.ports]})
        elif cmd == "stop-listening":
            self.stopListening().addCallback(lambda _: worker.sendToMaster({"stopped": True}))


def _describe(host):
    return [type(host).__name__, getattr(host, "host", getattr(host, "name", None)), getattr(host, "port", None)]


application = service.Application("whoami")
Listens().setServiceParent(application)
