"""
Integration tests: a real master (in this process) with real worker
processes, real sockets on loopback and real file descriptor passing.
"""

import os
import signal
import socket

import treq
from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from txcluster import WorkerExited, WorkerListening, WorkerMessage

from tests._harness import app, freePort, listeningPort, sleep, socketPath, startCluster, tcp, unix, whoami, workerOf


class TCPTests(unittest.TestCase):
    timeout = 60

    async def test_everyWorkerAnswers(self):
        """
        HTTP requests to the one port are answered by every worker, in turn.
        """
        cluster, events = await startCluster(self, app("web.tac"), workers=3)
        port = listeningPort(events)
        seen = []
        for _ in range(6):
            response = await treq.get(f"http://127.0.0.1:{port}/", persistent=False)
            self.assertEqual(response.code, 200)
            seen.append(workerOf((await response.text()).strip()))
        self.assertEqual(sorted(set(seen)), [1, 2, 3])
        self.assertEqual(sorted(seen[:3]), [1, 2, 3])

    async def test_portZeroShared(self):
        """
        Every worker's n-th listen(0) shares one ephemeral port: two such
        listens in each of three workers make exactly two ports, each
        served by all three, and getHost() in the workers reports them.
        """
        cluster, events = await startCluster(
            self,
            app("whoami.tac"),
            workers=3,
            env={"WHOAMI_LISTEN": "tcp:0:interface=127.0.0.1 tcp:0:interface=127.0.0.1"},
        )
        await events.waitCount(WorkerListening, 6)
        ports = sorted({e.port for e in events.of(WorkerListening)})
        self.assertEqual(len(ports), 2)
        self.assertNotIn(0, ports)
        for port in ports:
            seen = {workerOf(await whoami(tcp(port))) for _ in range(6)}
            self.assertEqual(seen, {1, 2, 3})
        for workerId in (1, 2, 3):
            answer = events.wait(lambda e: isinstance(e, WorkerMessage) and "ports" in e.message and e.workerId == workerId)
            await cluster.sendMessage(workerId, {"cmd": "ports"})
            message = (await answer).message
            self.assertEqual(sorted(p[2] for p in message["ports"]), ports)
            self.assertEqual({p[0] for p in message["ports"]}, {"IPv4Address"})

    async def test_tcp6(self):
        """
        A tcp6: endpoint is shared the same way, and the workers' getHost()
        reports an IPv6 address.
        """
        try:
            probe = socket.socket(socket.AF_INET6)
            probe.bind(("::1", 0))
            probe.close()
        except OSError:
            raise unittest.SkipTest("no IPv6 loopback here")
        cluster, events = await startCluster(
            self, app("whoami.tac"), workers=2, env={"WHOAMI_LISTEN": "tcp6:0:interface=\\:\\:1"}
        )
        await events.waitCount(WorkerListening, 2)
        (listening,) = {(e.address, e.port) for e in events.of(WorkerListening)}
        self.assertTrue(listening[0].startswith("tcp:[::1]:"), listening)
        from twisted.internet.endpoints import TCP6ClientEndpoint

        seen = {workerOf(await whoami(TCP6ClientEndpoint(reactor, "::1", listening[1]))) for _ in range(4)}
        self.assertEqual(seen, {1, 2})
        answer = events.wait(lambda e: isinstance(e, WorkerMessage) and "ports" in e.message)
        await cluster.sendMessage(1, {"cmd": "ports"})
        self.assertEqual((await answer).message["ports"], [["IPv6Address", "::1", listening[1]]])

    async def test_synchronousListen(self):
        """
        reactor.listenTCP in a worker returns a port bound by the master:
        the same port in every worker.
        """
        cluster, events = await startCluster(self, app("whoami.tac"), workers=2, env={"WHOAMI_TCP_SYNC": "0"})
        port = listeningPort(events)
        seen = {workerOf(await whoami(tcp(port))) for _ in range(4)}
        self.assertEqual(seen, {1, 2})


class FairSharedAcceptTests(unittest.TestCase):
    timeout = 60

    async def test_burstSpreads(self):
        """
        Under shared scheduling a burst of long-lived connections, opened
        at once while both workers idle, is spread over the workers (the
        load board and the accept gate): without them one worker, the
        first awake, takes most or all of it.
        """
        from collections import Counter

        from twisted.internet.threads import deferToThread

        cluster, events = await startCluster(
            self, app("whoami.tac"), workers=2, scheduling="shared", env={"WHOAMI_LISTEN": "tcp:0:interface=127.0.0.1"}
        )
        await events.waitCount(WorkerListening, 2)
        port = listeningPort(events)

        def burst(count: int) -> Counter:
            socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
            try:
                seen = Counter()
                for s in socks:
                    line = b""
                    while not line.endswith(b"\n"):
                        chunk = s.recv(100)
                        if not chunk:
                            raise AssertionError("a connection closed early")
                        line += chunk
                    seen[workerOf(line.decode())] += 1
                return seen
            finally:
                for s in socks:
                    s.close()

        seen = await deferToThread(burst, 16)
        self.assertEqual(sum(seen.values()), 16)
        self.assertGreaterEqual(min(seen.get(1, 0), seen.get(2, 0)), 3, seen)


class ExclusiveTests(unittest.TestCase):
    timeout = 60

    async def test_exclusiveBindsInTheWorker(self):
        """
        A listen with an exclusive factory binds in the worker itself: the
        master has no socket for it, and the worker serves it.
        """
        port = freePort()
        cluster, events = await startCluster(self, app("whoami.tac"), workers=1, env={"WHOAMI_EXCLUSIVE": str(port)})
        self.assertEqual(cluster.statistics().listeners, ())
        self.assertEqual(events.of(WorkerListening), [])
        self.assertEqual(workerOf(await whoami(tcp(port))), 1)


class OtherTransportTests(unittest.TestCase):
    timeout = 60

    async def test_unixSocket(self):
        """
        A UNIX socket listen is bound once by the master and served by every
        worker; the socket file goes away when the cluster stops.
        """
        path = socketPath(self)
        cluster, events = await startCluster(self, app("whoami.tac"), workers=2, env={"WHOAMI_LISTEN": f"unix:{path}"})
        await events.waitCount(WorkerListening, 2)
        self.assertEqual({e.address for e in events.of(WorkerListening)}, {f"unix:{path}"})
        seen = {workerOf(await whoami(unix(path))) for _ in range(4)}
        self.assertEqual(seen, {1, 2})
        await cluster.stopService()
        self.assertFalse(os.path.exists(path))

    async def test_udpSpreadsOverWorkers(self):
        """
        UDP is always shared: the master binds one socket, every worker reads
        it, and datagrams are answered by more than one worker.
        """
        cluster, events = await startCluster(self, app("whoami.tac"), workers=2, env={"WHOAMI_UDP": "127.0.0.1:0"})
        await events.waitCount(WorkerListening, 2)
        (port,) = {e.port for e in events.of(WorkerListening)}
        answers = []

        class Client(protocol.DatagramProtocol):
            def datagramReceived(self, data, addr):
                answers.append(workerOf(data.decode()))

        client = reactor.listenUDP(0, Client(), interface="127.0.0.1")
        self.addCleanup(client.stopListening)
        for _ in range(200):
            if len(set(answers)) == 2:
                break
            for _ in range(10):
                client.transport.write(b"?", ("127.0.0.1", port)) if hasattr(client, "transport") else client.write(b"?", ("127.0.0.1", port))
            await sleep(0.02)
        self.assertEqual(set(answers), {1, 2})

    async def test_ssl(self):
        """
        An ssl: endpoint works: the master hands over raw TCP connections and
        each worker does the TLS itself.
        """
        from tests._tls import clientOptions, writeCertificate

        keyPath, certPath = writeCertificate(self.mktemp())
        cluster, events = await startCluster(
            self,
            app("whoami.tac"),
            workers=2,
            env={"WHOAMI_LISTEN": f"ssl:0:interface=127.0.0.1:privateKey={keyPath}:certKey={certPath}"},
        )
        port = listeningPort(events)
        from twisted.internet.endpoints import wrapClientTLS

        seen = set()
        for _ in range(4):
            line = await whoami(wrapClientTLS(clientOptions(certPath), tcp(port)))
            seen.add(workerOf(line))
        self.assertEqual(seen, {1, 2})


class BindErrorTests(unittest.TestCase):
    timeout = 60

    async def test_addressInUseReachesTheApp(self):
        """
        EADDRINUSE in the master reaches the application as a
        CannotListenError through the endpoint's Deferred, naming the
        address and the OS error; once the port is free, a later listen on
        the same key succeeds.
        """
        holder = socket.socket()
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        busy = holder.getsockname()[1]
        self.addCleanup(holder.close)
        cluster, events = await startCluster(self, app("whoami.tac"), workers=1)
        error = events.wait(lambda e: isinstance(e, WorkerMessage) and "error" in e.message)
        await cluster.sendMessage(1, {"cmd": "listen", "endpoint": f"tcp:{busy}:interface=127.0.0.1"})
        message = (await error).message
        self.assertIn(f"127.0.0.1:{busy}", message["error"])
        self.assertIn("Address already in use", message["error"])
        self.assertEqual(message["errno"], 98)
        holder.close()
        listened = events.wait(lambda e: isinstance(e, WorkerMessage) and "listened" in e.message)
        await cluster.sendMessage(1, {"cmd": "listen", "endpoint": f"tcp:{busy}:interface=127.0.0.1"})
        self.assertEqual((await listened).message["listened"], busy)
        self.assertEqual(workerOf(await whoami(tcp(busy))), 1)


class NoLossTests(unittest.TestCase):
    timeout = 90

    async def test_killedWorkerLosesNothing(self):
        """
        Connections queued in the master for a worker, and connections
        handed to it that it had not answered for, all go to the other
        worker when it is killed: every connection is answered.
        """
        cluster, events = await startCluster(
            self, app("whoami.tac"), workers=2, env={"WHOAMI_LISTEN": "tcp:0:interface=127.0.0.1"}, workerTimeout=0
        )
        port = listeningPort(events)
        victim = {w.workerId: w.pid for w in cluster.statistics().workers}[1]
        # Block worker 1's reactor: it cannot answer NewConn any more.
        cluster.sendMessage(1, {"cmd": "freeze", "seconds": 30}).addErrback(lambda f: None)
        await sleep(0.2)
        lines = [defer.ensureDeferred(whoami(tcp(port), timeout=30)) for _ in range(20)]
        await sleep(0.5)
        stats = cluster.statistics()
        (listener,) = stats.listeners
        stranded = listener.dispatch.pending + sum(
            m.inFlight for m in listener.dispatch.members if m.worker.workerId == 1
        )
        self.assertGreater(stranded, 0, "no connection was waiting on the frozen worker")
        os.kill(victim, signal.SIGKILL)
        answers = await defer.gatherResults(lines)
        self.assertEqual(len(answers), 20)
        self.assertNotIn(str(victim), " ".join(answers))
        exited = await events.wait(lambda e: isinstance(e, WorkerExited) and e.pid == victim, past=True)
        self.assertEqual(exited.signal, signal.SIGKILL)
        self.assertEqual(cluster.statistics().dropped, 0)


class StopTests(unittest.TestCase):
    timeout = 60

    async def test_gracefulStopFinishesSlowRequest(self):
        """
        Stopping the master lets a request already in flight finish; the
        stop completes once the workers have exited, and the port is closed.
        """
        cluster, events = await startCluster(self, app("web.tac"), workers=2)
        port = listeningPort(events)
        slow = treq.get(f"http://127.0.0.1:{port}/slow?seconds=1.5", persistent=False)
        await sleep(0.3)
        stopping = cluster.stopService()
        response = await slow
        self.assertEqual(response.code, 200)
        self.assertTrue((await response.text()).startswith("worker "))
        await stopping
        self.assertEqual(cluster.statistics().workers, ())
        self.assertEqual(
            {e.exitCode for e in events.of(WorkerExited)}, {0}, "every worker exited by itself, with 0"
        )
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
