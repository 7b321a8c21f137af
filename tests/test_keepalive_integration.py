"""
Keep-alive clients across a reload and a recycling, with real processes: a
C{twistd -n txcluster} master with two workers of C{tests/apps/counting.tac}
(twisted.web) and HTTP/1.1 clients that keep their connections open.  A
leaving worker tells them C{Connection: close}, so they move to the new
workers at once instead of pinning the old ones until the graceful timeout.
"""

from __future__ import annotations

import http.client
import threading
import time

from twisted.internet import threads
from twisted.trial import unittest

from tests._harness import MasterProcess, app, freePort
from tests.test_operations_integration import ended, txcluster

READY = r"worker \d \(pid \d+\) ready in"


class KeepAliveClient:
    """
    One HTTP/1.1 client in a thread, sending GETs on one connection (which
    http.client opens again when the server closes it) until stopped.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.answers: list[tuple[float, str, bool]] = []
        self.errors: list[str] = []
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "KeepAliveClient":
        self._thread.start()
        return self

    def _run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self._stop.is_set():
            try:
                if connection.sock is None:
                    self.connections += 1
                connection.request("GET", "/")
                response = connection.getresponse()
                body = response.read().decode().strip()
                closing = (response.getheader("connection") or "").lower() == "close"
                self.answers.append((time.monotonic(), body, closing))
            except Exception as e:
                self.errors.append(f"{type(e).__name__}: {e}")
                connection.close()
            time.sleep(0.01)
        connection.close()

    def stop(self):
        self._stop.set()
        return threads.deferToThread(self._thread.join, 30)


class KeepAliveTests(unittest.TestCase):
    timeout = 90

    async def test_reload(self):
        """
        During a reload, keep-alive clients are told C{Connection: close}
        by the old workers and carry on with the new ones; the old workers
        leave long before the graceful timeout and no request fails.
        """
        port = freePort()
        master = MasterProcess(
            self,
            ["--app", app("counting.tac"), "--workers", "2", "--graceful-timeout", "30"],
            env={"COUNTING_PORT": str(port)},
        )
        await master.waitFor(READY, 2)
        old = set(master.workerPids().values())
        clients = [KeepAliveClient(port).start() for _ in range(4)]
        try:
            while sum(len(c.answers) for c in clients) < 40:
                await threads.deferToThread(time.sleep, 0.05)
            result = await txcluster(self, master.control, "reload")
            self.assertEqual(result.code, 0, result)
            # Not held by the keep-alive connections for --graceful-timeout.
            self.assertLess(result.took, 15, result)
            after = sum(len(c.answers) for c in clients)
            while sum(len(c.answers) for c in clients) < after + 40:
                await threads.deferToThread(time.sleep, 0.05)
        finally:
            for client in clients:
                await client.stop()
        self.assertEqual([e for c in clients for e in c.errors], [])
        text = master.output.text()
        self.assertNotIn("still open after", text)
        new = set(master.workerPids().values()) - old
        for client in clients:
            self.assertTrue(any(closing for _, _, closing in client.answers), "no Connection: close")
            last = client.answers[-1][1]
            self.assertIn(int(last.split()[1]), new, client.answers[-5:])
        master.signal("TERM")
        self.assertEqual(await ended(master, timeout=30), (0, None))
