"""
Deterministic tests of the master's HTTP endpoint (L{txcluster._health}):
C{/metrics}, C{/healthz} and C{/readyz} of a real L{ClusterService} on a
fake reactor with fake workers, requested in memory with treq's
L{StubTreq}; and the stop's C{drainDelay}.
"""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.error import ConnectionDone
from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from txcluster._commands import CollectMetrics, CompressedText, Disconnect, FinalMetrics
from txcluster._events import ClusterStopping
from txcluster._health import COLLECT_WAIT, MetricsServer

from .test_master import LOCAL, ClusterTestsMixin


class EndpointTestsMixin(ClusterTestsMixin):
    def serve(self, cluster):
        self.server = MetricsServer(cluster, "tcp:0", reactor=self.reactor)
        self.http = StubTreq(self.server.site().resource)

    def get(self, path: str):
        """
        GET C{path}; C{(code, body)} once answered.
        """
        responses: list = []
        self.http.get(f"http://127.0.0.1{path}").addBoth(responses.append)
        for _ in range(20):
            self.http.flush()
            self.spawner.flush()
            if responses:
                break
            self.reactor.advance(0.1)
        [response] = responses
        body = self.successResultOf(self.http.content(response))
        return response.code, body

    def samples(self, body: bytes) -> dict:
        found = {}
        for family in text_string_to_metric_families(body.decode("utf-8")):
            for sample in family.samples:
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return found


class HealthTests(EndpointTestsMixin, SynchronousTestCase):
    def test_readyOnceAllWorkersAre(self):
        """
        C{/readyz} is 503 until every worker is ready (the default
        C{minReady}), then 200; C{/healthz} is 200 from the first ready
        worker, with the counts.
        """
        cluster = self.makeCluster(2)
        self.serve(cluster)
        self.assertEqual(self.get("/readyz")[0], 503)
        self.assertEqual(self.get("/healthz")[0], 503)
        self.worker(1).start()
        self.assertEqual(self.get("/readyz")[0], 503)
        code, body = self.get("/healthz")
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body), {"status": "ok", "ready": 1, "workers": 2, "stopping": False})
        self.worker(2).start()
        code, body = self.get("/readyz")
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body)["ready"], 2)

    def test_minReady(self):
        """
        With C{minReady}, that many ready workers make the cluster ready.
        """
        cluster = self.makeCluster(3, minReady=2)
        self.serve(cluster)
        self.worker(1).start()
        self.assertEqual(self.get("/readyz")[0], 503)
        self.worker(2).start()
        self.assertEqual(self.get("/readyz")[0], 200)

    def test_notReadyFromTheStopOn(self):
        """
        From the moment a stop begins C{/readyz} is 503, while the workers
        still serve (for C{drainDelay}); C{/healthz} stays 200 meanwhile.
        """
        cluster = self.readyCluster(2, drainDelay=5)
        self.serve(cluster)
        self.assertEqual(self.get("/readyz")[0], 200)
        cluster.stopService()
        code, body = self.get("/readyz")
        self.assertEqual(code, 503)
        self.assertEqual(json.loads(body)["status"], "stopping")
        self.assertEqual(self.get("/healthz")[0], 200)
        self.assertEqual(self.eventsOf(ClusterStopping), [ClusterStopping(5.0)])


class DrainDelayTests(EndpointTestsMixin, SynchronousTestCase):
    def test_workersDrainAfterTheDelay(self):
        """
        A stop with C{drainDelay} tells the workers to leave only once the
        delay is over; the master keeps taking connections until then.
        """
        cluster = self.readyCluster(2, listens=[LOCAL], drainDelay=3)
        d = cluster.stopService()
        self.reactor.advance(2.9)
        self.spawner.flush()
        self.assertFalse([w for w in self.spawner.running() if w.commands(Disconnect)])
        self.assertTrue(cluster._table.accepting)
        self.reactor.advance(0.1)
        self.spawner.flush()
        self.assertEqual(len([w for w in self.spawner.running() if w.commands(Disconnect)]), 2)
        for worker in self.spawner.running():
            worker.exit()
        self.successResultOf(d)
        self.successResultOf(cluster.whenStopped())

    def test_stopNow(self):
        """
        L{ClusterService.stopNow} (a second stop signal) cuts the delay
        short.
        """
        cluster = self.readyCluster(1, drainDelay=30)
        cluster.stopService()
        cluster.stopNow()
        self.reactor.advance(0)
        self.spawner.flush()
        self.assertTrue(self.worker(1).commands(Disconnect))

    def test_whenStoppedOfAClusterThatNeverStarted(self):
        """
        A cluster stopped before it ever started (its start failed) still
        fires L{ClusterService.whenStopped}: nothing waits forever.
        """
        cluster = self.makeCluster(1, start=False)
        d = cluster.whenStopped()
        cluster.stopService()
        self.successResultOf(d)

    def test_whenStoppedBeforeTheStop(self):
        """
        L{ClusterService.whenStopped} asked before a stop fires once that
        stop is over.
        """
        cluster = self.readyCluster(1)
        d = cluster.whenStopped()
        self.assertNoResult(d)
        cluster.stopService()
        self.spawner.flush()
        self.assertNoResult(d)
        self.worker(1).exit()
        self.successResultOf(d)


APP = """\
# HELP app_requests_total Requests.
# TYPE app_requests_total counter
app_requests_total{path="/"} %d.0
"""


class MetricsTests(EndpointTestsMixin, SynchronousTestCase):
    def test_txclusterMetrics(self):
        """
        C{/metrics} serves txcluster's own metrics in the Prometheus text
        format: the workers by state, the queue.
        """
        cluster = self.readyCluster(2)
        self.serve(cluster)
        code, body = self.get("/metrics")
        self.assertEqual(code, 200)
        samples = self.samples(body)
        self.assertEqual(samples[("txcluster_workers", (("state", "ready"),))], 2.0)
        self.assertEqual(samples[("txcluster_dispatch_queue_connections", ())], 0.0)

    def test_applicationMetricsSummedAcrossAReplacement(self):
        """
        The workers' application metrics are served with a C{worker}
        label; a worker id's counter goes on from its predecessor's last
        report (its FinalMetrics) in its replacement.
        """
        cluster = self.readyCluster(1)
        self.serve(cluster)
        old = self.worker(1)
        old.metrics = APP % 5
        samples = self.samples(self.get("/metrics")[1])
        self.assertEqual(samples[("app_requests_total", (("path", "/"), ("worker", "1")))], 5.0)
        cluster.reload()
        self.spawner.flush()
        new = self.worker(1)
        new.start()
        self.reactor.advance(0)
        self.spawner.flush()
        old.callRemote(FinalMetrics, metrics=APP % 7)
        self.spawner.flush()
        old.exit()
        new.metrics = APP % 2
        samples = self.samples(self.get("/metrics")[1])
        self.assertEqual(samples[("app_requests_total", (("path", "/"), ("worker", "1")))], 9.0)

    def test_busyWorkerDoesNotHoldTheScrape(self):
        """
        A worker that does not answer delays a scrape by at most
        L{COLLECT_WAIT}; its last report is served.
        """
        cluster = self.readyCluster(2)
        self.serve(cluster)
        self.worker(1).metrics = APP % 3
        self.worker(2).metrics = APP % 4
        self.get("/metrics")
        self.worker(1).holding.add(CollectMetrics)
        self.worker(1).metrics = APP % 30
        responses: list = []
        self.http.get("http://127.0.0.1/metrics").addBoth(responses.append)
        self.http.flush()
        self.spawner.flush()
        self.http.flush()
        self.assertEqual(responses, [])
        self.reactor.advance(COLLECT_WAIT)
        self.http.flush()
        body = self.successResultOf(self.http.content(responses[0]))
        samples = self.samples(body)
        self.assertEqual(samples[("app_requests_total", (("path", "/"), ("worker", "1")))], 3.0)
        self.assertEqual(samples[("app_requests_total", (("path", "/"), ("worker", "2")))], 4.0)

    def test_badMetricsAreLogged(self):
        """
        Metrics that do not parse are logged with the worker; the scrape
        serves the rest.
        """
        cluster = self.readyCluster(1)
        self.serve(cluster)
        self.worker(1).metrics = "this is { not prometheus"
        code, _ = self.get("/metrics")
        self.assertEqual(code, 200)
        self.assertLogged(f"worker 1 (pid {self.worker(1).pid}) reported metrics the master cannot use")

    def test_scaledAwayWorkersAreNotServed(self):
        """
        Once a worker id is scaled away and its process is gone, its series
        are no longer served.
        """
        cluster = self.readyCluster(2)
        self.serve(cluster)
        self.worker(2).metrics = APP % 4
        samples = self.samples(self.get("/metrics")[1])
        self.assertIn(("app_requests_total", (("path", "/"), ("worker", "2"))), samples)
        cluster.scale(1)
        self.spawner.flush()
        self.reactor.advance(0)
        self.worker(2).exit()
        samples = self.samples(self.get("/metrics")[1])
        self.assertNotIn(("app_requests_total", (("path", "/"), ("worker", "2"))), samples)
        self.assertNotIn(("txcluster_connections_handed_total", (("worker", "2"),)), samples)

    def test_mastersOwnProcess(self):
        """
        The master's own memory and CPU are served too.
        """
        self.serve(self.readyCluster(1))
        samples = self.samples(self.get("/metrics")[1])
        self.assertGreater(samples[("txcluster_master_process_resident_memory_bytes", ())], 1024 * 1024)

    def test_metricsBomb(self):
        """
        A worker whose last metrics decompress to more than
        L{CompressedText.LIMIT} misbehaved: it is logged and killed.
        """
        self.readyCluster(1)
        self.patch(CompressedText, "LIMIT", 100)
        sent = self.worker(1).callRemote(FinalMetrics, metrics="#" * 1000)
        self.spawner.flush()
        # The master dropped the channel without answering.
        self.failureResultOf(sent, ConnectionDone)
        self.assertLogged("sent a malformed FinalMetrics")
        self.assertIn(9, self.worker(1).process.signalNumbers())

    def test_handedAndLatency(self):
        """
        Connections handed to a worker are counted, and the time from
        accept to adoption observed.
        """
        import socket

        cluster = self.readyCluster(1, listens=[LOCAL])
        self.serve(cluster)
        port = self.worker(1).listens and cluster.statistics().listeners[0].address.rsplit(":", 1)[1]
        client = socket.create_connection(("127.0.0.1", int(port)))
        self.addCleanup(client.close)
        for _ in range(20):
            self.reactor.advance(0.01)
            self.spawner.flush()
            for selectable in list(self.reactor.getReaders()):
                selectable.doRead()
            self.spawner.flush()
            if cluster.statistics().workers[0].handed:
                break
        samples = self.samples(self.get("/metrics")[1])
        self.assertEqual(samples[("txcluster_connections_handed_total", (("worker", "1"),))], 1.0)
        self.assertEqual(samples[("txcluster_handoff_seconds_count", ())], 1.0)
