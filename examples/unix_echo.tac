"""
An echo server on a UNIX socket, served by every worker: the master binds
the path once and hands the connections out.

    twistd -n txcluster --app examples/unix_echo.tac --workers 2
    echo hi | nc -U -q1 /tmp/txcluster-echo.sock

The path comes from $SOCKET when it is set.  The master removes the socket
file when the cluster stops, and replaces a stale one left by a crash.
"""

import os

from twisted.application import service, strports
from twisted.internet import protocol

from txcluster import currentWorker


class Echo(protocol.Protocol):
    def connectionMade(self):
        worker = currentWorker()
        self.transport.write(b"worker %d says hi\n" % (worker.id if worker is not None else 0))

    def dataReceived(self, data):
        self.transport.write(data)


application = service.Application("unix-echo")
path = os.environ.get("SOCKET", "/tmp/txcluster-echo.sock")
strports.service(f"unix:{path}", protocol.Factory.forProtocol(Echo)).setServiceParent(application)
