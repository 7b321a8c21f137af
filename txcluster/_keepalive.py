# -*- test-case-name: tests.test_keepalive -*-
"""
Ending keep-alive when a worker leaves: an HTTP/1.1 connection would keep a
leaving worker (and the code it loaded) serving its client for as long as
the client likes, until the graceful timeout cuts it mid-request.  So a
leaving worker makes each of its HTTP connections non-persistent: the
response in progress says C{Connection: close}, so does every later one,
and an idle connection closes after a short grace (a request already on its
way is served first).  The client's next connection reaches the master, and
so a worker that takes connections.

Only C{twisted.web}'s HTTP/1.x channel is known here; any other protocol
finishes as it likes, within the graceful timeout.
"""

from __future__ import annotations

import sys
from typing import Optional

from twisted.logger import Logger

from txcluster._twistedcompat import channelOfGenericHTTP

_log = Logger(namespace="txcluster.worker")

#: Seconds an idle keep-alive connection of a leaving worker stays open,
#: for a request already on its way.
IDLE_GRACE = 1.0


def httpChannel(connection) -> Optional[object]:
    """
    The C{twisted.web.http.HTTPChannel} behind C{connection} (a tracked
    transport or protocol), through protocol wrappers (TLS, PROXY
    headers); L{None} when it is not HTTP/1.x.
    """
    http = sys.modules.get("twisted.web.http")
    if http is None:
        return None
    protocol = getattr(connection, "protocol", connection)
    for _ in range(8):
        channel = channelOfGenericHTTP(protocol)
        if isinstance(channel, http.HTTPChannel):
            return channel
        wrapped = getattr(protocol, "wrappedProtocol", None)
        if wrapped is None:
            return None
        protocol = wrapped
    return None


def _closing(request, version) -> bool:
    request.responseHeaders.setRawHeaders(b"connection", [b"close"])
    return False


def endKeepAlive(channel, grace: float = IDLE_GRACE) -> None:
    """
    Make C{channel} close once its current response is written (saying
    so in it, if it has not started), answer any later request with
    C{Connection: close}, and close within C{grace} seconds if it is idle.
    """
    channel.checkPersistence = _closing
    if channel.requests:
        channel.persistent = False
        for request in channel.requests:
            if not request.startedWriting:
                request.responseHeaders.setRawHeaders(b"connection", [b"close"])
    else:
        # An idle connection: its idle timeout, shortened (a request that
        # arrives meanwhile suspends it, and is answered with close).
        channel.setTimeout(grace)


def endAllKeepAlive(connections, grace: float = IDLE_GRACE) -> int:
    """
    L{endKeepAlive} for every HTTP connection among C{connections}.

    @return: how many were HTTP.
    """
    count = 0
    for connection in connections:
        channel = httpChannel(connection)
        if channel is None:
            continue
        try:
            endKeepAlive(channel, grace)
        except Exception:
            _log.failure("could not end keep-alive on {channel!r}", channel=channel)
        count += 1
    return count
