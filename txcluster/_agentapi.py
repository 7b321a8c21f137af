# -*- test-case-name: tests.test_agent -*-
"""
In the agent process (C{--agent}): L{currentAgent} and the L{Agent} it
returns, the agent's side of the messenger.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger

from txcluster._commands import AgentBroadcast, AgentFailed, AgentSend, encodeMessage
from txcluster._workerchannel import MasterUnavailable

_log = Logger(namespace="txcluster.agent")

_current: Optional["Agent"] = None


def currentAgent() -> Optional["Agent"]:
    """
    This process's L{Agent} in the agent process of a cluster (C{--agent});
    L{None} anywhere else (in a worker, in the master, under plain
    C{twistd}).
    """
    return _current


def setCurrentAgent(agent: Optional["Agent"]) -> None:
    global _current
    _current = agent


class Agent:
    """
    The agent's side of the messenger: it answers the workers' requests
    (L{txcluster.Worker.askAgent}) and sends them messages, which reach
    their message observers (L{txcluster.Worker.addMessageObserver}).

    @param worker: the process's L{txcluster.Worker}: its channel to the
        master.
    """

    def __init__(self, worker) -> None:
        self._worker = worker
        self._handler: Optional[Callable[[int, Any], Any]] = None
        self._workers: tuple = ()
        #: Requests being answered: a leaving agent answers them first.
        self.outstanding = 0

    def setRequestHandler(self, handler: Optional[Callable[[int, Any], Any]]) -> None:
        """
        Answer every worker's request with C{handler(workerId, message)}: a
        JSON-serialisable value, or a Deferred firing with one.  What it
        raises fails the request with L{txcluster.AgentFailed}.
        """
        self._handler = handler

    def broadcast(self, message: Any) -> defer.Deferred:
        """
        Send the JSON-serialisable C{message} to every worker that is not
        leaving.
        """
        return self._call(AgentBroadcast, message=encodeMessage(message))

    def sendToWorker(self, workerId: int, message: Any) -> defer.Deferred:
        """
        Send the JSON-serialisable C{message} to worker C{workerId}; fails
        with L{txcluster.AgentUnavailable} when no such worker runs.
        """
        return self._call(AgentSend, workerId=workerId, message=encodeMessage(message))

    def workers(self) -> list[int]:
        """
        The worker ids that are ready, as the master last said.
        """
        return list(self._workers)

    # What the master sends ---------------------------------------------------------

    def _request(self, workerId: int, text: str) -> defer.Deferred:
        if self._handler is None:
            return defer.fail(AgentFailed("the agent set no request handler (currentAgent().setRequestHandler)"))
        try:
            message = json.loads(text)
        except ValueError as e:
            return defer.fail(AgentFailed(f"the request is not JSON: {e}"))
        d = defer.maybeDeferred(self._handler, workerId, message)

        def encode(answer):
            try:
                return encodeMessage(answer)
            except Exception as e:
                raise AgentFailed(f"the agent's answer cannot be sent: {e}") from None

        def failed(failure):
            if failure.check(AgentFailed):
                return failure
            _log.failure("the agent's request handler failed on a request of worker {workerId}", failure, workerId=workerId)
            raise AgentFailed(f"the agent's request handler raised {failure.type.__name__}: {failure.getErrorMessage()}")

        self.outstanding += 1

        def answered(result):
            self.outstanding -= 1
            if self._worker is not None and self.outstanding == 0:
                self._worker._checkDrained()
            return result

        return d.addCallback(encode).addErrback(failed).addBoth(answered)

    def _workersChanged(self, workerIds: list) -> None:
        self._workers = tuple(workerIds)

    def _call(self, command, **arguments) -> defer.Deferred:
        channel = self._worker.channel
        if channel is None or channel.transport is None:
            return defer.fail(MasterUnavailable("the channel to the master is closed"))
        return channel.callRemote(command, **arguments).addCallback(lambda _: None)
