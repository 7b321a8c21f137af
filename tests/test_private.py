"""
The master-worker channel stays private: the only sockets txcluster's
processes listen on are the application's.
"""

import os
import shutil
import tempfile
import time

from twisted.trial import unittest

from tests._harness import (
    MasterProcess,
    app,
    freePort,
    inetSockets,
    pidAlive,
    socketInodes,
    sleep,
    tcp,
    unixSockets,
    whoami,
)


def socketsOf(pids) -> dict:
    """
    Every socket the processes C{pids} hold, by kind: C{listening} (TCP
    LISTEN, UDP, listening UNIX sockets), C{connections} (other TCP and
    named UNIX sockets), C{unnamed} (unnamed UNIX sockets: socketpairs)
    and C{unknown} (inodes in no table: netlink, raw, packet...).
    """
    inodes = set().union(*(socketInodes(pid) for pid in pids))
    found = {"listening": set(), "connections": set(), "unnamed": 0, "unknown": set()}
    seen = set()
    for table in ("tcp", "tcp6"):
        for inode, state, local, remote in inetSockets(table):
            if inode in inodes:
                seen.add(inode)
                if state == "0A":
                    found["listening"].add(("tcp", local[0], local[1]))
                else:
                    found["connections"].add(("tcp", local, remote))
    for table in ("udp", "udp6"):
        for inode, state, local, remote in inetSockets(table):
            if inode in inodes:
                seen.add(inode)
                found["listening"].add(("udp", local[0], local[1]))
    for inode, listening, path in unixSockets():
        if inode in inodes:
            seen.add(inode)
            if listening:
                found["listening"].add(("unix", path))
            elif path:
                found["connections"].add(("unix", path))
            else:
                found["unnamed"] += 1
    found["unknown"] = inodes - seen
    return found


async def settledSockets(pids, timeout: float = 3.0) -> dict:
    """
    L{socketsOf} once the connections the test just closed are gone from
    the processes (a socket closed between reading a process's fds and
    reading C{/proc/net} shows up as unknown meanwhile).
    """
    deadline = time.monotonic() + timeout
    while True:
        found = socketsOf(pids)
        if (not found["connections"] and not found["unknown"]) or time.monotonic() > deadline:
            return found
        await sleep(0.05)


class PrivateChannelTests(unittest.TestCase):
    timeout = 60

    async def assertOnlyTheAppListens(self, scheduling: str) -> None:
        port, udpPort = freePort(), freePort()
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "app.sock")
        master = MasterProcess(
            self,
            ["--app", app("whoami.tac"), "--workers", "2", "--scheduling", scheduling],
            env={
                "WHOAMI_LISTEN": f"tcp:{port}:interface=127.0.0.1 unix:{path}",
                "WHOAMI_UDP": f"127.0.0.1:{udpPort}",
                "WHOAMI_CLOSE": "1",
            },
        )
        await master.waitFor(r"worker \d \(pid \d+\) ready", count=2)
        # The application's addresses, and the master's control socket
        # (for the txcluster command): nothing for the workers' channels.
        expected = {("tcp", "127.0.0.1", port), ("udp", "127.0.0.1", udpPort), ("unix", path), ("unix", master.control)}
        for generation in ("first", "reloaded"):
            for _ in range(4):
                await whoami(tcp(port))
            pids = [master.pid] + [pid for pid in master.workerPids().values() if pidAlive(pid)]
            self.assertEqual(len(pids), 3, master.output.text())
            found = await settledSockets(pids)
            self.assertEqual(found["listening"], expected, (generation, found))
            self.assertEqual(found["connections"], set(), (generation, found))
            self.assertEqual(found["unknown"], set(), (generation, found))
            # Each worker's channel: one socketpair, one end in each process.
            self.assertEqual(found["unnamed"], 2 * 2, (generation, found))
            if generation == "first":
                master.signal("HUP")
                await master.waitFor(r"reload complete")

    async def test_onlyTheAppListensRoundRobin(self):
        """
        With round-robin scheduling, the master and its workers listen on
        exactly the application's TCP, UNIX and UDP addresses and the
        master's control socket: no socket for the workers' channels, in
        the filesystem, the abstract namespace or the network, before and
        after a reload; all else are socketpairs.
        """
        await self.assertOnlyTheAppListens("rr")

    async def test_onlyTheAppListensShared(self):
        """
        With shared scheduling (the workers hold the listening sockets too),
        the master and its workers listen on exactly the application's
        addresses (and the master's control socket), before and after a
        reload.
        """
        await self.assertOnlyTheAppListens("shared")
