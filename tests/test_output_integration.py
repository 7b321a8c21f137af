"""
A worker that writes as fast as it can, on stdout or through its log, with
real processes: the master relays what the budget allows, drops the rest
with a counted note, and neither slows down nor grows while it does.
"""

from __future__ import annotations

import os
import re
import time

from twisted.trial import unittest

from tests._harness import LogCapture, MasterProcess, app, freePort, listeningPort, sleep, startCluster


def cpuSeconds(pid: int) -> float:
    """
    The user and system CPU time process C{pid} has used, from /proc.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def residentKilobytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class FloodTests(unittest.TestCase):
    timeout = 60

    async def flood(self, kind: str) -> None:
        port = freePort()
        master = MasterProcess(
            self,
            ["--app", app("chatty.tac"), "--workers", "2"],
            env={"WEB_LISTEN": f"tcp:{port}:interface=127.0.0.1"},
        )
        await master.waitFor(r"ready in", count=2)
        import treq

        async def get(path: str = "/") -> float:
            started = time.monotonic()
            response = await treq.get(f"http://127.0.0.1:{port}{path}", persistent=False, timeout=10)
            self.assertEqual(response.code, 200)
            await response.content()
            return time.monotonic() - started

        quiet = sorted([await get() for _ in range(50)])
        rss = residentKilobytes(master.pid)
        # Both workers flood (connections go to each in turn).
        await get(f"/flood?kind={kind}&seconds=6")
        await get(f"/flood?kind={kind}&seconds=6")
        await sleep(1.0)
        before, started = cpuSeconds(master.pid), time.monotonic()
        await sleep(2.0)
        share = (cpuSeconds(master.pid) - before) / (time.monotonic() - started)
        flooding = sorted([await get() for _ in range(50)])
        grown = residentKilobytes(master.pid) - rss
        await master.waitFor(r"wrote more than 1000 lines a second: \d+ dropped", count=2)
        master.signal("TERM")
        await master.output.ended
        text = master.output.text()
        relayed = len(re.findall(r"flood (line|event) \d+", text))
        # The master spends a part of one core on the two floods (0.07 for
        # printing, 0.2 for log events, on a quiet 2-CPU machine): it reads
        # a full pipe every pause, not every write.  Reading every write
        # took a whole core.
        self.assertLess(share, 0.6, share)
        self.assertLess(flooding[len(flooding) // 2], quiet[len(quiet) // 2] + 0.02, (quiet, flooding))
        self.assertLess(grown, 10_000)
        self.assertGreater(relayed, 1000)
        self.assertNotIn("died", text)
        self.assertEqual(master.output.reason.value.exitCode, 0)

    def test_printing(self):
        """
        Two workers printing in a tight loop: bounded relays, counted drops,
        requests answered as fast as before, the master's memory flat.
        """
        return self.flood("print")

    def test_logging(self):
        """
        The same with log events (the JSON log pipe).
        """
        return self.flood("log")


class ForgeryTests(unittest.TestCase):
    timeout = 30

    async def test_aWorkerCannotSpeakAsTheMaster(self):
        """
        An event a worker logs in the master's namespace, with the master's
        system and another worker's id, reaches the master's log as that
        worker's: namespace txcluster.worker, its own system, id and pid.
        """
        logs = LogCapture(self)
        cluster, events = await startCluster(self, app("chatty.tac"), workers=1)
        port = listeningPort(events)
        import treq

        response = await treq.get(f"http://127.0.0.1:{port}/forge", persistent=False, timeout=10)
        who = (await response.text()).split()
        for _ in range(100):
            forged = [e for e in logs.events if "workers are gone" in (e.get("log_format") or "")]
            if forged:
                break
            await sleep(0.05)
        (event,) = forged
        pid = int(who[2])
        self.assertEqual(event["log_namespace"], "txcluster.worker")
        self.assertEqual(event["workerNamespace"], "txcluster.master")
        self.assertEqual((event["log_system"], event["workerId"], event["pid"]), (f"worker 1 pid {pid}", 1, pid))
