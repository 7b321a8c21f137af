"""
The benchmark application: the same file runs under plain
C{twistd -ny benchmarks/app.tac} and as C{twistd txcluster --app benchmarks/app.tac}.

Two listening ports, both on 127.0.0.1:

  - C{$BENCH_HTTP_PORT}: a minimal HTTP/1.1 responder (C{hello\\n}, keep-alive
    unless the request says C{Connection: close}).  Every response carries
    C{X-Worker: <pid>}.  C{/cpu} first computes C{$BENCH_CPU_ITERATIONS}
    rounds of PBKDF2-SHA256 (about 1 ms of CPU: run.py calibrates the count;
    the CPU-bound workload).  C{/slow} answers after a non-blocking 50-200 ms
    (C{deferLater}); C{/block} blocks the process for 2-10 ms of CPU first
    (a handler that does synchronous work); C{/stall} blocks the reactor for
    20-60 ms in a sleeping synchronous call; C{/chunk} does 4-20 ms of CPU in
    1 ms slices with a reactor turn between them (cooperative heavy work,
    the mixed workload's slow requests).
  - C{$BENCH_FLOOD_PORT}: closes every connection as soon as it arrives
    (the connect-flood micro-benchmark).

Each process counts the connections it got.  On SIGUSR2 it writes
C{$BENCH_STATS_DIR/<pid>.json}; nothing is logged per request, so the
master does not relay any per-request output.

The app is deliberately tiny (not C{twisted.web}) so that the benchmark
measures connection dispatch rather than HTTP parsing in Python; pass
C{BENCH_APP=web} to serve the same paths with C{twisted.web} instead.
"""

import hashlib
import json
import os
import random
import signal
import time

from twisted.application import internet, service
from twisted.internet import protocol, reactor, task

HTTP_PORT = int(os.environ.get("BENCH_HTTP_PORT", "8080"))
FLOOD_PORT = int(os.environ.get("BENCH_FLOOD_PORT", "8081"))
STATS_DIR = os.environ.get("BENCH_STATS_DIR", "")
APP_KIND = os.environ.get("BENCH_APP", "raw")
CPU_ITERATIONS = int(os.environ.get("BENCH_CPU_ITERATIONS", "2000"))
INTERFACE = "127.0.0.1"
PID = os.getpid()
PID_BYTES = str(PID).encode()

counts = {"pid": PID, "http": 0, "flood": 0, "open": 0, "requests": 0}


def dumpStats(signum=None, frame=None):
    if not STATS_DIR:
        return
    path = os.path.join(STATS_DIR, f"{PID}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(counts, f)
    os.replace(tmp, path)


signal.signal(signal.SIGUSR2, dumpStats)


def _response(close: bool) -> bytes:
    body = b"hello\n"
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nX-Worker: "
        + PID_BYTES
        + (b"\r\nConnection: close" if close else b"")
        + b"\r\n\r\n"
        + body
    )


KEEP = _response(False)
CLOSE = _response(True)


def stallForAWhile():
    # 20-60 ms blocked in a synchronous call (a slow database driver, say):
    # the worker's reactor does nothing else meanwhile.
    time.sleep(random.uniform(0.020, 0.060))


def computeForAWhile():
    # A fixed amount of work, not a fixed time: a process that shares its
    # core gets slower, which is what the scaling ratios measure.
    hashlib.pbkdf2_hmac("sha256", b"txcluster", b"benchmark", CPU_ITERATIONS)


def blockForAWhile():
    # 2-10 ms of CPU: the handler does synchronous work.
    end = time.perf_counter() + random.uniform(0.002, 0.010)
    while time.perf_counter() < end:
        pass


class Http(protocol.Protocol):
    """
    Just enough HTTP/1.1 for wrk: GET without a body, keep-alive by default.
    """

    _buf = b""
    _busy = False

    def connectionMade(self):
        counts["http"] += 1
        counts["open"] += 1

    def connectionLost(self, reason):
        counts["open"] -= 1

    def dataReceived(self, data):
        self._buf += data
        self._serve()

    def _serve(self):
        while not self._busy:
            buf = self._buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = buf[:end]
            self._buf = buf[end + 4 :]
            counts["requests"] += 1
            close = b"onnection: close" in head or b"onnection: Close" in head
            space = head.find(b" ")
            path = head[space + 1 : space + 7]
            if path.startswith(b"/slow"):
                self._busy = True
                d = task.deferLater(reactor, random.uniform(0.05, 0.2), lambda: None)
                d.addCallback(lambda _, close=close: self._later(close))
                return
            if path.startswith(b"/chunk"):
                self._busy = True
                self._chunks(random.randint(4, 20), close)
                return
            if path.startswith(b"/cpu"):
                computeForAWhile()
            elif path.startswith(b"/block"):
                blockForAWhile()
            elif path.startswith(b"/stall"):
                stallForAWhile()
            self._answer(close)
            if close:
                return

    def _answer(self, close):
        if self.transport is None:
            return
        self.transport.write(CLOSE if close else KEEP)
        if close:
            self.transport.loseConnection()

    def _chunks(self, left, close):
        # Cooperative CPU work: 1 ms slices with a reactor turn between them.
        end = time.perf_counter() + 0.001
        while time.perf_counter() < end:
            pass
        if left > 1 and not self.transport.disconnected:
            reactor.callLater(0, self._chunks, left - 1, close)
        else:
            self._later(close)

    def _later(self, close):
        self._busy = False
        if not self.transport.disconnected:
            self._answer(close)
            if not close:
                self._serve()


class HttpFactory(protocol.Factory):
    protocol = Http
    noisy = False


class Flood(protocol.Protocol):
    def connectionMade(self):
        counts["flood"] += 1
        self.transport.loseConnection()


class FloodFactory(protocol.Factory):
    protocol = Flood
    noisy = False


def webSite():
    from twisted.web import resource, server

    class Root(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            request.setHeader(b"content-type", b"text/plain")
            request.setHeader(b"x-worker", PID_BYTES)
            if request.path.startswith(b"/slow"):
                d = task.deferLater(reactor, random.uniform(0.05, 0.2), lambda: None)

                def finish(_):
                    if not request.finished and not request._disconnected:
                        request.write(b"hello\n")
                        request.finish()

                d.addCallback(finish)
                return server.NOT_DONE_YET
            if request.path.startswith(b"/chunk"):

                def chunk(left):
                    end = time.perf_counter() + 0.001
                    while time.perf_counter() < end:
                        pass
                    if left > 1 and not request._disconnected:
                        reactor.callLater(0, chunk, left - 1)
                    elif not request.finished and not request._disconnected:
                        request.write(b"hello\n")
                        request.finish()

                chunk(random.randint(4, 20))
                return server.NOT_DONE_YET
            if request.path.startswith(b"/cpu"):
                computeForAWhile()
            elif request.path.startswith(b"/block"):
                blockForAWhile()
            return b"hello\n"

    class CountingSite(server.Site):
        noisy = False

        def buildProtocol(self, addr):
            counts["http"] += 1
            counts["open"] += 1
            p = super().buildProtocol(addr)
            lost = p.connectionLost

            def connectionLost(reason):
                counts["open"] -= 1
                return lost(reason)

            p.connectionLost = connectionLost
            return p

        def log(self, request):
            counts["requests"] += 1

    site = CountingSite(Root())
    site.displayTracebacks = False
    return site


application = service.Application("txcluster-bench")
httpFactory = webSite() if APP_KIND == "web" else HttpFactory()
internet.TCPServer(HTTP_PORT, httpFactory, backlog=1024, interface=INTERFACE).setServiceParent(application)
internet.TCPServer(FLOOD_PORT, FloodFactory(), backlog=1024, interface=INTERFACE).setServiceParent(application)
