# -*- test-case-name: tests.test_agent -*-
"""
The master's side of the messenger between the workers and the agent
(C{--agent}): it forwards each worker's L{AskAgent} to the agent as an
L{AgentRequest} and its answer back, holds requests while the agent
restarts (up to C{--agent-timeout}), and keeps the agent told which
workers are ready.

Requests reach the agent in the order the master got them (one AMP
channel), so one worker's requests arrive in the order it sent them.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure

from txcluster._commands import AGENT_ID, AgentRequest, AgentUnavailable, AgentWorkers, ToWorker
from txcluster._lifecycle import SERVING_PHASES, WorkerProcess, seconds

_log = Logger(namespace="txcluster.master")

#: Seconds a request waits for the agent (to answer, or to come back from
#: a restart) before it fails with L{AgentUnavailable}: C{--agent-timeout}.
AGENT_TIMEOUT = 10.0

#: Requests one worker may have unanswered; more fail at once with
#: L{AgentUnavailable} (one worker's flood must not starve the others).
MAX_OUTSTANDING = 1000


class _Request:
    __slots__ = ("workerId", "message", "result", "timer", "sent")

    def __init__(self, workerId: int, message: str, result: defer.Deferred, timer) -> None:
        self.workerId = workerId
        self.message = message
        self.result = result
        self.timer = timer
        self.sent = False


class AgentRelay:
    """
    Carries requests from workers to the agent and answers back.

    @param configured: whether the cluster runs an agent at all.
    @param timeout: L{AGENT_TIMEOUT}.
    """

    def __init__(self, clock, configured: bool, timeout: float = AGENT_TIMEOUT) -> None:
        self._clock = clock
        self.configured = configured
        self._timeout = timeout
        self._agent: Optional[WorkerProcess] = None
        # Waiting for an agent, in arrival order (a dict: removal is O(1)).
        self._waiting: dict[_Request, None] = {}
        self._outstanding: dict[int, int] = {}
        self._workers: tuple = ()
        self._stopped = False
        #: Requests answered, failed, timed out (for the status).
        self.answered = 0
        self.failed = 0

    @property
    def agent(self) -> Optional[WorkerProcess]:
        """
        The agent process taking requests, if one is.
        """
        return self._agent

    def ask(self, workerId: int, message: str) -> defer.Deferred:
        """
        Worker C{workerId}'s request (JSON text).

        @return: a Deferred firing with the agent's answer (JSON text), or
            failing with L{AgentUnavailable} or L{txcluster._commands.AgentFailed}.
        """
        if not self.configured:
            return defer.fail(AgentUnavailable("no agent runs in this cluster (see --agent)"))
        if self._stopped:
            return defer.fail(AgentUnavailable("the agent has stopped: the cluster is stopping"))
        if self._outstanding.get(workerId, 0) >= MAX_OUTSTANDING:
            return defer.fail(
                AgentUnavailable(f"this worker has {MAX_OUTSTANDING} requests to the agent unanswered already")
            )
        result = defer.Deferred()
        request = _Request(workerId, message, result, None)
        request.timer = self._clock.callLater(self._timeout, self._expired, request)
        self._outstanding[workerId] = self._outstanding.get(workerId, 0) + 1
        result.addBoth(self._done, workerId)
        if self._agent is not None:
            self._send(request)
        else:
            self._waiting[request] = None
        return result

    def _done(self, result, workerId: int):
        count = self._outstanding.get(workerId, 1) - 1
        if count:
            self._outstanding[workerId] = count
        else:
            self._outstanding.pop(workerId, None)
        return result

    # The agent's comings and goings ----------------------------------------------

    def agentReady(self, process: WorkerProcess) -> None:
        """
        C{process}, the agent, is ready: what waited goes to it, in order.
        """
        self._agent = process
        self._tell(process)
        waiting, self._waiting = list(self._waiting), {}
        if waiting:
            _log.info(
                "the agent is ready: sending it {count} {requests} that waited for it",
                count=len(waiting),
                requests="request" if len(waiting) == 1 else "requests",
            )
        for request in waiting:
            self._send(request)

    def agentLost(self, process: WorkerProcess) -> None:
        """
        C{process}, the agent, is leaving or gone: requests wait for the
        next one (those it was answering fail; see L{AgentUnavailable}).
        """
        if self._agent is process:
            self._agent = None

    def workersChanged(self, workerIds: tuple) -> None:
        """
        The ready worker ids are now C{workerIds}.
        """
        if workerIds != self._workers:
            self._workers = workerIds
            if self._agent is not None:
                self._tell(self._agent)

    def toWorkers(self, processes: list, workerId: Optional[int], text: str) -> defer.Deferred:
        """
        The agent's message (JSON text) to every worker of C{processes}
        that is not leaving (C{workerId} L{None}), or to worker
        C{workerId}'s newest process.

        @return: a Deferred; it fails with L{AgentUnavailable} when no such
            worker runs.
        """
        workers = [
            p for p in processes
            if p.workerId != AGENT_ID and p.phase in SERVING_PHASES and p.channel.transport is not None
        ]
        if workerId is not None:
            workers = [p for p in workers if p.workerId == workerId][-1:]
            if not workers:
                return defer.fail(AgentUnavailable(f"no running worker {workerId}"))
        for process in workers:
            process.channel.callRemote(ToWorker, message=text).addErrback(
                lambda f, process=process: _log.debug(
                    "{worker} did not take the agent's message: {why}", worker=process.describe(), why=f.getErrorMessage()
                )
            )
        return defer.succeed(None)

    def stop(self) -> None:
        """
        The agent is gone for good: whatever waits fails.
        """
        self._stopped = True
        self._agent = None
        waiting, self._waiting = list(self._waiting), {}
        for request in waiting:
            self._fail(request, AgentUnavailable("the agent has stopped: the cluster is stopping"))

    # Requests -----------------------------------------------------------------------

    def _tell(self, process: WorkerProcess) -> None:
        channel = process.channel
        if channel is not None and channel.transport is not None:
            channel.callRemote(AgentWorkers, workerIds=list(self._workers))

    def _send(self, request: _Request) -> None:
        agent = self._agent
        channel = agent.channel
        if channel is None or channel.transport is None:
            self._waiting[request] = None
            self._agent = None
            return
        request.sent = True
        d = channel.callRemote(AgentRequest, workerId=request.workerId, message=request.message)
        d.addCallbacks(self._answered, self._refused, callbackArgs=(request,), errbackArgs=(request, agent))

    def _answered(self, answer: dict, request: _Request) -> None:
        if request.result.called:
            return
        request.timer.cancel()
        self.answered += 1
        request.result.callback(answer["answer"])

    def _refused(self, failure: Failure, request: _Request, agent: WorkerProcess) -> None:
        if request.result.called:
            return
        if failure.check(ConnectionDone, ConnectionLost):
            _log.warn(
                "{agent} was lost while it handled a request of worker {workerId}: the request fails "
                "(the agent may or may not have acted on it)",
                agent=agent.describe(),
                workerId=request.workerId,
            )
            failure = Failure(AgentUnavailable("the agent was lost while it handled this request"))
        self._fail(request, failure)

    def _expired(self, request: _Request) -> None:
        if request in self._waiting:
            del self._waiting[request]
            why = f"the agent did not come back within {seconds(self._timeout)} (--agent-timeout)"
        else:
            why = f"the agent did not answer within {seconds(self._timeout)} (--agent-timeout)"
        _log.warn("a request of worker {workerId} failed: {why}", workerId=request.workerId, why=why)
        self.failed += 1
        if not request.result.called:
            request.result.errback(AgentUnavailable(why))

    def _fail(self, request: _Request, why) -> None:
        if request.timer.active():
            request.timer.cancel()
        self.failed += 1
        if not request.result.called:
            request.result.errback(why)


class AgentKeeper:
    """
    The agent's slot in a supervisor: started before the workers (they
    are spawned once it is first ready), stopped after them, supervised
    like a worker (respawned with backoff, heartbeated) but with failures
    of its own towards giving up.

    @param supervisor: the L{txcluster._supervisor.Supervisor}: the slot's
        host, and what spawns and drains.
    """

    def __init__(self, supervisor, relay: AgentRelay, maxRestarts: int, restartWindow: float) -> None:
        from txcluster._policy import FailureWindow

        self._supervisor = supervisor
        self.relay = relay
        self._failures = FailureWindow(maxRestarts, restartWindow)
        self.slot = None
        self._then = None
        self._held: Optional[list] = None
        #: The reload of the agent under way, which a reload joins.
        self.restarting: Optional[defer.Deferred] = None

    def start(self, then) -> None:
        """
        Start the agent; call C{then()} once it is first ready.
        """
        from txcluster._commands import AGENT_ID
        from txcluster._lifecycle import Slot

        supervisor = self._supervisor
        self._then = then
        self.slot = Slot(AGENT_ID, supervisor, supervisor.processes.new)
        _log.info("starting the agent first: the workers start once it is ready")
        supervisor.run(self.slot, self.slot.start())

    def slotOf(self, process: WorkerProcess):
        if self.slot is not None and process in self.slot.view().processes:
            return self.slot
        return None

    def current(self) -> Optional[WorkerProcess]:
        return None if self.slot is None else self.slot.view().current

    def served(self, process: WorkerProcess) -> None:
        """
        The agent C{process} is ready.
        """
        self.relay.agentReady(process)
        then, self._then = self._then, None
        if then is not None:
            then()

    def ended(self, process: WorkerProcess, failed: bool, now: float) -> bool:
        """
        The agent C{process} ended.

        @return: whether the master should give up (too many agent
            failures).
        """
        self.relay.agentLost(process)
        return failed and self._failures.record(now)

    def failures(self, now: float) -> int:
        return self._failures.count(now)

    async def restart(self) -> None:
        """
        Replace the agent: the old one leaves first (there is never more
        than one), requests wait meanwhile; done once the new one is ready.
        """
        from txcluster._deferreds import observe

        supervisor = self._supervisor
        old = self.current()
        if old is None:
            return
        _log.info("reload: restarting {agent} first (--agent)", agent=old.describe())
        self.relay.agentLost(old)
        supervisor.processes.drain(old, "reload")
        await observe(old.exited)
        while not supervisor.stopping():
            view = self.slot.view()
            if view.state == "serving" and view.current is not old:
                return
            await supervisor.changed(self.slot)

    def halt(self) -> None:
        """
        The cluster begins to stop: the agent is not respawned any more
        (it keeps serving the workers until they are gone; see L{stop}).
        """
        from txcluster._lifecycle import Drain

        if self.slot is None or self._held is not None:
            return
        self._held = list(self.slot.view().processes)
        effects = self.slot.stop()
        self._supervisor.run(self.slot, [e for e in effects if not isinstance(e, Drain)])

    async def stop(self, remaining: float) -> None:
        """
        Stop the agent (the workers are gone): it drains with what is left
        of the graceful timeout.
        """
        from txcluster._deferreds import observe

        self.halt()
        held = self._held or []
        for process in held:
            self._supervisor.processes.drain(process, "stop", remaining)
        await defer.DeferredList([observe(p.exited) for p in held])
        self.relay.stop()
