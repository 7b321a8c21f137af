"""
Tests for the agent (C{--agent}): its place in the supervisor (started
first, stopped last, respawned, its own give-up) and the messenger between
it and the workers, on a fake reactor with fake processes.
"""

from __future__ import annotations

import signal

from twisted.internet import defer
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from txcluster import AgentFailed, AgentUnavailable, WorkerForked, WorkerReady
from txcluster._agent import AgentRelay
from txcluster._agentapi import Agent
from txcluster._commands import AGENT_ID

from tests.test_master import ClusterTestsMixin


class AgentSupervisionTests(ClusterTestsMixin, SynchronousTestCase):
    """
    The agent's slot, beside the workers'.
    """

    def agentCluster(self, workers: int = 2, **config):
        config.setdefault("agent", "agent.tac")
        return self.makeCluster(workers, **config)

    def test_startsFirst(self) -> None:
        """
        The agent is spawned alone, with its own file and role; the
        workers are spawned once it is ready.
        """
        self.agentCluster(2)
        (agent,) = self.spawner.running()
        self.assertEqual((agent.workerId, agent.appPath, agent.env["TXCLUSTER_ROLE"]), (AGENT_ID, "agent.tac", "agent"))
        self.assertLogged("starting the agent first: the workers start once it is ready")
        agent.start()
        workers = self.spawner.running()[1:]
        self.assertEqual([w.workerId for w in workers], [1, 2])
        self.assertEqual([w.appPath for w in workers], ["app.tac", "app.tac"])
        self.assertNotIn("TXCLUSTER_ROLE", workers[0].env)
        self.assertEqual(self.eventsOf(WorkerForked)[0], WorkerForked(AGENT_ID, agent.pid))

    def test_notAWorker(self) -> None:
        """
        The agent is not counted in the workers, in readiness, in the
        reload, nor sent the cluster's broadcasts; its status row is there.
        """
        cluster = self.agentCluster(1)
        agent = self.worker(AGENT_ID)
        agent.start()
        self.worker(1).start()
        self.assertEqual((cluster.workerCount(), cluster.readyWorkers()), (1, 1))
        self.assertTrue(cluster.isReady())
        self.assertEqual([w.workerId for w in cluster.statistics().workers], [AGENT_ID, 1])
        cluster.broadcast({"to": "workers"})
        self.spawner.flush()
        self.assertEqual(agent.messages, [])
        self.assertEqual(self.worker(1).messages, [{"to": "workers"}])
        cluster.reload()
        self.assertEqual(len(self.spawner.running()), 3)
        self.assertEqual(self.spawner.running()[-1].workerId, 1)

    def test_respawned(self) -> None:
        """
        An agent that dies is respawned (with backoff); the workers keep
        running.
        """
        self.agentCluster(1)
        agent = self.worker(AGENT_ID)
        agent.start()
        self.worker(1).start()
        agent.exit(1)
        self.assertLogged(f"the agent (pid {agent.pid}) died (exit code 1)")
        self.advance(1)
        fresh = self.worker(AGENT_ID)
        self.assertIsNot(fresh, agent)
        self.assertEqual([w.workerId for w in self.spawner.running()], [1, AGENT_ID])
        (row,) = [w for w in self.cluster.statistics().workers if w.workerId == AGENT_ID]
        self.assertEqual((row.pid, row.restarts), (fresh.pid, 1))

    def test_giveUp(self) -> None:
        """
        An agent that keeps failing makes the master give up, saying so;
        the agent's failures are counted apart from the workers'.
        """
        cluster = self.agentCluster(1, maxRestarts=2, restartWindow=60)
        self.worker(AGENT_ID).start()
        self.worker(1).start()
        for _ in range(3):
            self.worker(AGENT_ID).exit(1)
            self.advance(2)
        self.assertEqual(cluster.statistics().failures, 0)
        self.assertLogged("giving up: more than 2 agent failures within 60 s", LogLevel.critical)

    def test_stopOrder(self) -> None:
        """
        A stop drains the workers first and the agent once they are gone.
        """
        cluster = self.agentCluster(2)
        agent = self.worker(AGENT_ID)
        agent.start()
        one, two = self.worker(1), self.worker(2)
        one.start()
        two.start()
        stopped = cluster.stopService()
        self.advance(0.5)
        self.assertTrue(one.disconnectRequested and two.disconnectRequested)
        self.assertFalse(agent.disconnectRequested)
        one.exit(0)
        self.advance(0.5)
        self.assertFalse(agent.disconnectRequested)
        two.exit(0)
        self.advance(0.5)
        self.assertTrue(agent.disconnectRequested)
        self.assertNoResult(stopped)
        agent.exit(0)
        self.successResultOf(stopped)
        self.assertLogged("the workers are gone: stopping the agent")

    def test_reloadWithTheAgent(self) -> None:
        """
        C{reload(agent=True)} restarts the agent first, never two at once,
        then replaces the workers.
        """
        cluster = self.agentCluster(1)
        agent = self.worker(AGENT_ID)
        agent.start()
        worker = self.worker(1)
        worker.start()
        d = cluster.reload(agent=True)
        self.spawner.flush()
        self.assertTrue(agent.disconnectRequested)
        self.assertIs(self.worker(AGENT_ID), agent)
        agent.exit(0)
        self.advance(1)
        fresh = self.worker(AGENT_ID)
        self.assertIsNot(fresh, agent)
        self.assertEqual(len(self.spawner.running()), 2)
        fresh.start()
        self.advance(0.5)
        self.worker(1).start()
        worker.exit(0)
        self.successResultOf(d)

    def test_blockedAgentIsReplaced(self) -> None:
        """
        A blocked agent misses its heartbeats: its stacks are dumped
        (C{SIGUSR1}), it is killed and a new agent takes its place.
        """
        import signal

        from txcluster._master import STACK_DUMP_GRACE

        self.agentCluster(1, workerTimeout=3, stableAfter=0)
        agent = self.worker(AGENT_ID)
        agent.start()
        self.worker(1).start()
        agent.block()
        self.advance(4)
        self.assertEqual(agent.process.signalNumbers(), [signal.SIGUSR1])
        self.assertLogged(f"the agent (pid {agent.pid}) has not answered a heartbeat for 3 s", LogLevel.error)
        self.advance(STACK_DUMP_GRACE)
        self.assertEqual(agent.process.signalNumbers(), [signal.SIGUSR1, signal.SIGKILL])
        agent.kill()
        self.advance(1)
        self.assertIsNot(self.worker(AGENT_ID), agent)

    def test_scaleWhileTheAgentBoots(self) -> None:
        """
        A scale before the agent is ready does not make a worker id's
        process twice once it is.
        """
        cluster = self.agentCluster(1)
        cluster.scale(2)
        self.worker(AGENT_ID).start()
        self.assertEqual(sorted(w.workerId for w in self.spawner.running()), [AGENT_ID, 1, 2])

    def test_neverTwoAgents(self) -> None:
        """
        An agent that leaves on its own (SIGTERM) is replaced once it has
        exited, not while it still runs.
        """
        self.agentCluster(1)
        agent = self.worker(AGENT_ID)
        agent.start()
        self.worker(1).start()
        agent.disconnect("SIGTERM")
        self.advance(1)
        self.assertIs(self.worker(AGENT_ID), agent)
        agent.exit(0)
        self.advance(1)
        self.assertIsNot(self.worker(AGENT_ID), agent)

    def test_noRespawnOnceStopping(self) -> None:
        """
        Once the cluster stops, a lost agent is not respawned (the workers
        drain without it).
        """
        cluster = self.agentCluster(1)
        agent = self.worker(AGENT_ID)
        agent.start()
        self.worker(1).start()
        cluster.stopService()
        agent.exit(1)
        self.advance(5)
        self.assertEqual([w.workerId for w in self.spawner.running()], [1])

    def test_reloadJoinsTheAgentReload(self) -> None:
        """
        A reload asked for while one with the agent restarts it joins it:
        no second reload, the workers replaced once, after the agent.
        """
        cluster = self.agentCluster(1)
        agent = self.worker(AGENT_ID)
        agent.start()
        self.worker(1).start()
        first = cluster.reload(agent=True)
        second = cluster.reload()
        self.spawner.flush()
        agent.exit(0)
        self.advance(1)
        self.worker(AGENT_ID).start()
        self.advance(0.5)
        self.assertEqual(len([w for w in self.spawner.running() if w.workerId == 1]), 2)
        self.worker(1).start()
        self.spawner.running()[0].exit(0)
        self.successResultOf(first)
        self.successResultOf(second)
        from txcluster import ReloadStarted

        self.assertEqual(len(self.eventsOf(ReloadStarted)), 1)

    def test_reloadAgentWithoutOne(self) -> None:
        """
        Asking to reload an agent a cluster does not run fails, saying so.
        """
        cluster = self.readyCluster(1)
        failure = self.failureResultOf(cluster.reload(agent=True))
        self.assertIn("runs no agent", str(failure.value))


class MessengerTests(ClusterTestsMixin, SynchronousTestCase):
    """
    A worker's requests to the agent, and the agent's messages to workers.
    """

    def setUp(self) -> None:
        super().setUp()
        self.makeCluster(2, agent="agent.tac", agentTimeout=5)
        self.agent = self.worker(AGENT_ID)
        self.agent.agentHandler = lambda workerId, message: {"from": workerId, "echo": message}
        self.agent.start()
        self.one, self.two = self.worker(1), self.worker(2)
        self.one.start()
        self.two.start()

    def test_askAndAnswer(self) -> None:
        """
        The agent's handler gets the worker's id and message; its answer
        comes back.
        """
        self.assertEqual(self.successResultOf(self.one.askAgent({"n": 1})), {"from": 1, "echo": {"n": 1}})
        self.assertEqual(self.successResultOf(self.two.askAgent([2])), {"from": 2, "echo": [2]})

    def test_handlerFails(self) -> None:
        """
        An agent that answers with L{AgentFailed} (its handler raised)
        fails the request with L{AgentFailed}, its message kept.
        """

        def broken(workerId, message):
            raise AgentFailed("the handler raised ValueError: bad")

        self.agent.agentHandler = broken
        failure = self.failureResultOf(self.one.askAgent("x"), AgentFailed)
        self.assertIn("the handler raised ValueError: bad", failure.getErrorMessage())

    def test_floodIsBounded(self) -> None:
        """
        One worker may have L{MAX_OUTSTANDING} requests waiting; more fail
        at once, and other workers' requests still go through.
        """
        from txcluster._agent import MAX_OUTSTANDING

        self.agent.exit(1)
        waiting = [self.one.askAgent(n) for n in range(MAX_OUTSTANDING)]
        over = self.one.askAgent("one more")
        self.spawner.flush()
        failure = self.failureResultOf(over, AgentUnavailable)
        self.assertIn(f"{MAX_OUTSTANDING} requests to the agent unanswered", str(failure.value))
        other = self.two.askAgent("mine")
        self.advance(1)
        fresh = self.worker(AGENT_ID)
        fresh.agentHandler = lambda workerId, message: message
        fresh.start()
        self.spawner.flush()
        self.assertEqual(self.successResultOf(other), "mine")
        self.assertEqual(self.successResultOf(waiting[-1]), MAX_OUTSTANDING - 1)

    def test_waitsForTheAgent(self) -> None:
        """
        While the agent restarts, requests wait, and go to the new agent in
        the order they came.
        """
        self.agent.exit(1)
        first, second = self.one.askAgent(1), self.two.askAgent(2)
        self.assertNoResult(first)
        self.advance(1)
        fresh = self.worker(AGENT_ID)
        seen = []
        fresh.agentHandler = lambda workerId, message: seen.append(message) or message
        fresh.start()
        self.spawner.flush()
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (1, 2))
        self.assertEqual(seen, [1, 2])
        self.assertLogged("the agent is ready: sending it 2 requests that waited for it")

    def test_timeout(self) -> None:
        """
        A request that waits longer than C{agentTimeout} fails with
        L{AgentUnavailable}, saying so.
        """
        self.agent.exit(1)
        self.spawner.spawnError = OSError("no more processes")
        d = self.one.askAgent(1)
        self.advance(5)
        failure = self.failureResultOf(d, AgentUnavailable)
        self.assertIn("did not come back within 5 s (--agent-timeout)", str(failure.value))
        self.flushLoggedErrors(OSError)

    def test_agentLostWhileAnswering(self) -> None:
        """
        A request the agent had when it died fails with
        L{AgentUnavailable}: it may or may not have acted on it.
        """
        from txcluster._commands import AgentRequest

        self.agent.holding.add(AgentRequest)
        d = self.one.askAgent(1)
        self.assertNoResult(d)
        self.agent.exit(9)
        self.spawner.flush()
        failure = self.failureResultOf(d, AgentUnavailable)
        self.assertIn("lost while it handled this request", str(failure.value))

    def test_workersList(self) -> None:
        """
        The agent is told which workers are ready, and again when that
        changes.
        """
        self.assertEqual(self.agent.agentWorkers, [1, 2])
        self.two.exit(1)
        self.spawner.flush()
        self.assertEqual(self.agent.agentWorkers, [1])

    def test_broadcastAndSend(self) -> None:
        """
        The agent's broadcast reaches every worker's message observers, not
        the agent; a message to one worker reaches that one only; to a
        worker that does not run, it fails.
        """
        self.successResultOf(self.agent.agentBroadcast({"all": True}))
        self.assertEqual((self.one.messages, self.two.messages, self.agent.messages), ([{"all": True}], [{"all": True}], []))
        self.successResultOf(self.agent.agentSend(2, "two"))
        self.assertEqual(self.two.messages[-1], "two")
        self.assertEqual(len(self.one.messages), 1)
        failure = self.failureResultOf(self.agent.agentSend(7, "nobody"))
        self.assertIn("no running worker 7", failure.getErrorMessage())

    def test_onlyTheAgentBroadcasts(self) -> None:
        """
        A worker that sends the agent's commands misbehaves: it is cut off.
        """
        self.one.agentBroadcast("me too")
        self.spawner.flush()
        self.assertLogged("sent AgentBroadcast, which only the agent may send")
        self.assertEqual(self.two.messages, [])
        self.assertIn(signal.SIGKILL, self.one.process.signalNumbers())


class NoAgentTests(ClusterTestsMixin, SynchronousTestCase):
    def test_noAgent(self) -> None:
        """
        Without C{--agent}, a request fails at once with
        L{AgentUnavailable}, saying why.
        """
        self.readyCluster(1)
        failure = self.failureResultOf(self.worker(1).askAgent(1), AgentUnavailable)
        self.assertIn("no agent runs in this cluster (see --agent)", str(failure.value))


class AgentAPITests(SynchronousTestCase):
    """
    L{Agent}, the agent's side.
    """

    def test_request(self) -> None:
        """
        The handler's answer (or Deferred) is JSON; what it raises is
        L{AgentFailed}, with its message.
        """
        agent = Agent(worker=None)
        agent.setRequestHandler(lambda workerId, message: defer.succeed({"w": workerId, "m": message}))
        self.assertEqual(self.successResultOf(agent._request(3, '{"a": 1}')), '{"w": 3, "m": {"a": 1}}')

        def broken(workerId, message):
            raise ValueError("bad count")

        agent.setRequestHandler(broken)
        failure = self.failureResultOf(agent._request(3, "1"), AgentFailed)
        self.assertIn("raised ValueError: bad count", str(failure.value))
        self.flushLoggedErrors(ValueError)
        agent.setRequestHandler(lambda workerId, message: object())
        self.failureResultOf(agent._request(3, "1"), AgentFailed)

    def test_workers(self) -> None:
        agent = Agent(worker=None)
        self.assertEqual(agent.workers(), [])
        agent._workersChanged([1, 3])
        self.assertEqual(agent.workers(), [1, 3])

    def test_relayWithoutAgent(self) -> None:
        """
        A relay of a cluster without an agent refuses at once.
        """
        from twisted.internet.task import Clock

        self.failureResultOf(AgentRelay(Clock(), configured=False).ask(1, "1"), AgentUnavailable)
