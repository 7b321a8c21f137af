"""
An Autobahn WebSocket application that closes its connections itself when
it shuts down, the way a chat or push server does.

Each connection is sent one text message, "worker <id> <pid>", once open,
and is echoed after that.  The server protocols are tracked; a
C{before shutdown} trigger closes every open one with close code 1000
("going away" would be 1001: this application says a normal closure) and
returns a Deferred that fires once they have all closed.  It listens on
$WS_LISTEN (a strports description, default tcp:0:interface=127.0.0.1).
"""

import os

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.application import service, strports
from twisted.internet import defer, reactor
from twisted.logger import Logger

from txcluster import currentWorker

worker = currentWorker()
LINE = f"worker {worker.id if worker is not None else 0} {os.getpid()}"
log = Logger(namespace="websocket.tac")


class Tracked(WebSocketServerProtocol):
    def onOpen(self):
        self.factory.opened(self)
        self.sendMessage(LINE.encode(), isBinary=False)

    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary)

    def onClose(self, wasClean, code, reason):
        self.factory.closed(self)


class TrackingFactory(WebSocketServerFactory):
    protocol = Tracked

    def __init__(self, *args, **kwargs):
        WebSocketServerFactory.__init__(self, *args, **kwargs)
        self.open = set()
        self._allClosed = []

    def opened(self, proto):
        self.open.add(proto)

    def closed(self, proto):
        self.open.discard(proto)
        if not self.open:
            waiters, self._allClosed = self._allClosed, []
            for d in waiters:
                d.callback(None)

    def closeAll(self):
        """
        Close every open connection with code 1000; fire once all are gone.
        """
        log.info("{line}: closing {count} websockets", line=LINE, count=len(self.open))
        if not self.open:
            return defer.succeed(None)
        d = defer.Deferred()
        self._allClosed.append(d)
        for proto in list(self.open):
            proto.sendClose(code=1000, reason="server shutting down")
        return d


factory = TrackingFactory()
factory.setProtocolOptions(autoPingInterval=0)
reactor.addSystemEventTrigger("before", "shutdown", factory.closeAll)

application = service.Application("websocket")
strports.service(os.environ.get("WS_LISTEN", "tcp:0:interface=127.0.0.1"), factory).setServiceParent(application)
