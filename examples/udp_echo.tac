"""
A UDP echo server on every core: the master binds one UDP socket and every
worker reads from it (UDP is always shared, as in Node).

    twistd -n txcluster --app examples/udp_echo.tac --workers 2
    echo hi | nc -u -w1 127.0.0.1 9999

Each datagram comes back prefixed with the worker that answered it.  The port
comes from $PORT when it is set (default 9999).
"""

import os

from twisted.application import internet, service
from twisted.internet import protocol

from txcluster import currentWorker


class Echo(protocol.DatagramProtocol):
    def datagramReceived(self, data, address):
        worker = currentWorker()
        who = worker.id if worker is not None else 0
        self.transport.write(b"worker %d: %s" % (who, data), address)


application = service.Application("udp-echo")
internet.UDPServer(int(os.environ.get("PORT", "9999")), Echo()).setServiceParent(application)
