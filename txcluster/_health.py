# -*- test-case-name: tests.test_health -*-
"""
The master's HTTP endpoint (C{--metrics}): C{/metrics} in the Prometheus
text format (txcluster's own metrics and the applications', collected over
the worker channels), C{/healthz} and C{/readyz}.

Everything is answered by the master from its own state, never through a
worker: a scrape asks the workers for their metrics but waits at most
L{COLLECT_WAIT} seconds, then serves what each last reported.
"""

from __future__ import annotations

import json
from typing import Optional

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

_log = Logger(namespace="txcluster.metrics")

#: How long a scrape waits for the workers' metrics.
COLLECT_WAIT = 0.5


class _Leaf(resource.Resource):
    isLeaf = True

    def __init__(self, server: "MetricsServer") -> None:
        super().__init__()
        self._server = server


class HealthResource(_Leaf):
    """
    C{/healthz}: 200 while at least one worker is ready (the master runs,
    and serves), also during a stop's drain delay; 503 otherwise.  The body is a small JSON object with the counts.
    """

    def render_GET(self, request):
        cluster = self._server.cluster
        ready = cluster.readyWorkers()
        # A stop's drain delay still serves: healthy while a worker is ready.
        healthy = ready >= 1
        body = {
            "status": "ok" if healthy else "unhealthy",
            "ready": ready,
            "workers": cluster.workerCount(),
            "stopping": cluster.stopping,
        }
        return _json(request, 200 if healthy else 503, body)


class ReadyResource(_Leaf):
    """
    C{/readyz}: 200 once C{--min-ready} workers are ready, 503 before, and
    from the moment a stop begins.
    """

    def render_GET(self, request):
        cluster = self._server.cluster
        ready = cluster.isReady()
        body = {
            "status": "ready" if ready else ("stopping" if cluster.stopping else "not ready"),
            "ready": cluster.readyWorkers(),
            "minReady": cluster.minReady(),
            "stopping": cluster.stopping,
        }
        return _json(request, 200 if ready else 503, body)


class MetricsResource(_Leaf):
    """
    C{/metrics}: the registry of L{txcluster._metrics}, made by
    C{prometheus_client}.
    """

    def render_GET(self, request):
        d = self._server.cluster.collectMetrics(COLLECT_WAIT)

        def render(_):
            from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

            try:
                output = generate_latest(self._server.registry)
            except Exception:
                _log.failure("could not render /metrics")
                request.setResponseCode(500)
                output = b"could not render the metrics; see the master's log\n"
            else:
                request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
            if not request.finished and not getattr(request, "_disconnected", False):
                request.write(output)
                request.finish()

        d.addCallback(render)
        d.addErrback(lambda f: _log.failure("a scrape failed", f))
        return server.NOT_DONE_YET


def _json(request, code: int, body: dict) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body).encode("utf-8") + b"\n"


class MetricsServer(service.Service):
    """
    Serves C{/metrics}, C{/healthz} and C{/readyz} for C{cluster} on the
    server endpoint C{description}, from the start until the cluster's
    stop is over (so that C{/readyz} says 503 while it drains).

    @param reactor: the cluster's by default.
    """

    name = "txcluster-metrics"

    def __init__(self, cluster, description: str, reactor=None) -> None:
        self.cluster = cluster
        self.description = description
        self._reactor = reactor
        self._port = None
        self.registry = None
        cluster.servesMetrics = True

    @property
    def reactor(self):
        # The cluster's, unless one was given.
        return self._reactor if self._reactor is not None else self.cluster.reactor

    def site(self) -> server.Site:
        """
        The web site, for tests and for composing into another server.
        """
        from txcluster._metrics import makeRegistry

        if self.registry is None:
            from prometheus_client import ProcessCollector

            cluster = self.cluster
            self.registry = makeRegistry(cluster.recorder, cluster.appMetrics, cluster.statistics, self.reactor.seconds)
            # The master's own memory, CPU and descriptors.
            ProcessCollector(namespace="txcluster_master", registry=self.registry)
        root = resource.Resource()
        root.putChild(b"metrics", MetricsResource(self))
        root.putChild(b"healthz", HealthResource(self))
        root.putChild(b"readyz", ReadyResource(self))
        site = server.Site(root)
        site.noisy = False
        site.log = lambda request: None
        return site

    def privilegedStartService(self) -> None:
        # Bound before twistd drops privileges, like --listen.
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self._port is None:
            self._listen()

    def _listen(self) -> None:
        from twisted.internet import endpoints
        from twisted.internet.error import CannotListenError

        if self._port is not None:
            return
        endpoint = endpoints.serverFromString(self.reactor, self.description)
        d = endpoint.listen(self.site())
        failures: list = []
        d.addCallbacks(self._listening, failures.append)
        if failures:
            error = failures[0].value
            reason = getattr(error, "socketError", None) or error
            raise CannotListenError("--metrics", self.description, reason) from None

    def _listening(self, port) -> None:
        self._port = port
        _log.info("metrics, /healthz and /readyz on {address}", address=_describe(port.getHost()))

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self.cluster.whenStopped().addCallback(lambda _: self._close())

    def _close(self) -> Optional[defer.Deferred]:
        port, self._port = self._port, None
        if port is not None:
            return defer.maybeDeferred(port.stopListening)
        return None


def _describe(address) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"http://{host}:{port}/"
    return str(address)
