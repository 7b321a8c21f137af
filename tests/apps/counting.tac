"""
A web application that counts its requests with prometheus_client, the
usual way (a Counter in the default registry): the master's /metrics
serves the count of every worker.  Listens on $COUNTING_PORT (default
8080) on 127.0.0.1.  GET /block?seconds=N blocks the reactor in
blockedForStacks() for N seconds (for "txcluster stacks").
"""

import os
import time

from prometheus_client import Counter, Histogram
from twisted.application import internet, service
from twisted.web import resource, server

REQUESTS = Counter("app_requests", "Requests served.", ["path"])
LATENCY = Histogram("app_request_seconds", "Time to answer a request.")


def blockedForStacks(seconds):
    time.sleep(seconds)


class Root(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        started = time.monotonic()
        path = request.path.decode("ascii", "replace")
        REQUESTS.labels(path).inc()
        if path == "/block":
            blockedForStacks(float(request.args.get(b"seconds", [b"3"])[0]))
        LATENCY.observe(time.monotonic() - started)
        return f"pid {os.getpid()}\n".encode()


application = service.Application("counting")
site = server.Site(Root())
site.log = lambda request: None
internet.TCPServer(int(os.environ.get("COUNTING_PORT", "8080")), site, interface="127.0.0.1").setServiceParent(application)
