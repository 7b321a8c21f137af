"""
The agent (C{--agent}) with real processes: a C{twistd -n txcluster}
master, two workers running C{tests/apps/agentweb.tac} that ask the agent
(C{tests/apps/counteragent.tac}) for the cluster's count, real HTTP on
loopback.  Every process is ended by the test's cleanups.
"""

from __future__ import annotations

import os
import re
import signal
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from twisted.internet import threads
from twisted.trial import unittest

from tests._harness import MasterProcess, app, freePort, pidAlive, sleep
from tests.test_operations_integration import ended

READY = r"worker \d \(pid \d+\) ready in"
AGENT_READY = r"the agent \(pid (\d+)\) ready in"


def get(port: int, path: str, timeout: float = 30.0) -> tuple[int, str]:
    """
    One GET (blocking: run it in a thread): C{(status, body)}.
    """
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.status, response.read().decode().strip()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode().strip()


def agentPids(master: MasterProcess) -> list[int]:
    return [int(p) for p in re.findall(r"the agent \(pid (\d+)\) forked", master.output.text())]


class AgentTests(unittest.TestCase):
    timeout = 120

    def startMaster(self, *args, env=None) -> tuple[MasterProcess, int]:
        port = freePort()
        master = MasterProcess(
            self,
            ["--app", app("agentweb.tac"), "--agent", app("counteragent.tac"), "--workers", "2", *args],
            env=dict(env or {}, AGENTWEB_PORT=str(port)),
        )
        return master, port

    async def test_countedExactlyOnce(self):
        """
        200 requests from 4 client threads over 2 workers, each asking the
        agent for the next number: the numbers are 1..200, each once, and
        both workers served.
        """
        master, port = self.startMaster()
        await master.waitFor(READY, 2)
        text = master.output.text()
        self.assertLess(text.index("the agent (pid"), text.index("worker 1 (pid"))

        def load():
            with ThreadPoolExecutor(4) as pool:
                return list(pool.map(lambda n: get(port, "/count"), range(200)))

        answers = await threads.deferToThread(load)
        self.assertEqual({status for status, _ in answers}, {200}, answers[:5])
        numbers = sorted(int(body.split()[0]) for _, body in answers)
        self.assertEqual(numbers, list(range(1, 201)))
        self.assertEqual({body.split()[1] for _, body in answers}, {"1", "2"})
        with open(f"/proc/{agentPids(master)[0]}/cmdline", "rb") as f:
            self.assertIn(b"txcluster agent [counteragent.tac]", f.read())

    async def test_agentKilled(self):
        """
        SIGKILL to the agent: a new agent process starts; the workers serve
        what does not need it meanwhile; a request made while it is away
        waits and is answered by the new one.
        """
        master, port = self.startMaster()
        await master.waitFor(READY, 2)
        (first,) = agentPids(master)
        self.assertEqual((await threads.deferToThread(get, port, "/count"))[1].split()[0], "1")
        os.kill(first, signal.SIGKILL)
        waiting = threads.deferToThread(get, port, "/count")
        plain = await threads.deferToThread(get, port, "/plain")
        self.assertEqual(plain[0], 200)
        self.assertTrue(plain[1].startswith("plain "))
        status, body = await waiting
        self.assertEqual(status, 200, body)
        # The new agent counts afresh: its state was the old one's.
        self.assertEqual(body.split()[0], "1")
        pids = agentPids(master)
        self.assertEqual(len(pids), 2)
        self.assertNotEqual(pids[1], first)
        self.assertIn(f"the agent (pid {first}) died (killed by SIGKILL)", master.output.text())
        self.assertEqual(set(master.workerPids()), {1, 2})

    async def test_agentDoesNotComeBack(self):
        """
        An agent that cannot come back: requests fail with
        AgentUnavailable after --agent-timeout; the workers serve on.
        """
        broken = self.mktemp()
        master, port = self.startMaster("--agent-timeout", "1", "--max-restarts", "100", env={"AGENT_BROKEN": broken})
        await master.waitFor(READY, 2)
        open(broken, "w").close()
        os.kill(agentPids(master)[0], signal.SIGKILL)
        status, body = await threads.deferToThread(get, port, "/count")
        self.assertEqual(status, 503)
        self.assertIn("unavailable the agent did not come back within 1 s (--agent-timeout)", body)
        self.assertEqual((await threads.deferToThread(get, port, "/plain"))[0], 200)

    async def test_stopOrder(self):
        """
        SIGTERM to the master stops the workers first and the agent last.
        """
        master, port = self.startMaster()
        await master.waitFor(READY, 2)
        (agent,) = agentPids(master)
        workers = master.workerPids()
        master.signal("TERM")
        await master.waitFor(r"the workers are gone: stopping the agent")
        self.assertTrue(pidAlive(agent))
        self.assertEqual([pid for pid in workers.values() if pidAlive(pid)], [])
        self.assertEqual(await ended(master), (0, None))
        text = master.output.text()
        self.assertLess(
            max(text.index(f"worker {i} (pid {pid}) exited") for i, pid in workers.items()),
            text.index(f"the agent (pid {agent}) exited"),
        )
        while pidAlive(agent):
            await sleep(0.05)
