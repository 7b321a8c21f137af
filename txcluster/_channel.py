# -*- test-case-name: tests.test_master -*-
"""
L{MasterChannel}: the master's end of one worker's AMP channel.

It answers the worker's commands on behalf of the L{ClusterService}
(which it calls back through a small set of private methods) and is the
first line of defence against a worker that misbehaves: whatever a worker
sends, the master must survive it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

from twisted.internet import error
from twisted.internet.error import ConnectionLost
from twisted.protocols import amp
from twisted.python.failure import Failure

from txcluster._commands import (
    Close,
    Listening,
    LoadReport,
    Online,
    QueryServer,
    Ready,
    ToMaster,
)

if TYPE_CHECKING:
    from txcluster._master import ClusterService, _Process


class MasterChannel(amp.AMP):
    """
    The master's end of one worker's channel: answers the worker's commands
    on behalf of the L{ClusterService}.
    """

    def __init__(self, cluster: "ClusterService") -> None:
        super().__init__()
        self._cluster = cluster
        self.process: Optional["_Process"] = None

    def fileDescriptorReceived(self, descriptor: int) -> None:
        # Workers never send descriptors to the master.
        os.close(descriptor)
        self._cluster._misbehaved(self.process, "sent a file descriptor")

    @Online.responder
    def online(self, pid: int) -> dict:
        self._cluster._online(self.process, pid)
        return {}

    @QueryServer.responder
    def queryServer(self, kind, address, port, index, backlog, mode) -> dict:
        return self._cluster._queryServer(self.process, kind, address, port, index, backlog, mode)

    @Listening.responder
    def listening(self, listenId: int) -> dict:
        self._cluster._listening(self.process, listenId)
        return {}

    @Close.responder
    def close(self, listenId: int) -> dict:
        self._cluster._close(self.process, listenId)
        return {}

    @Ready.responder
    def ready(self) -> dict:
        self._cluster._ready(self.process)
        return {}

    @LoadReport.responder
    def loadReport(self, connections: int) -> dict:
        self._cluster._table.reportLoad(self.process, connections)
        return {}

    @ToMaster.responder
    def toMaster(self, message: str) -> dict:
        self._cluster._message(self.process, message)
        return {}

    def makeConnection(self, transport) -> None:
        # AMP logs every connection at info level; a channel is not news.
        self._transportPeer = transport.getPeer()
        self._transportHost = transport.getHost()
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason) -> None:
        for fd in self._descriptors.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._descriptors.clear()
        outstanding = reason
        if not reason.check(error.ConnectionClosed):
            # The reactor dropped the channel because what the worker sent
            # broke the parser.  For the commands it had not answered this
            # is the channel closing: the handle table gives their
            # connections to other workers instead of counting them taken.
            outstanding = Failure(ConnectionLost(f"the channel broke: {reason.getErrorMessage()}"))
        amp.BinaryBoxProtocol.connectionLost(self, outstanding)
        self.transport = None
        self._cluster._channelLost(self.process, reason)
