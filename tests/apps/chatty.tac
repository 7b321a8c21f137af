"""
A twisted.web application whose workers can be made to write as fast as
they can: GET /flood?kind=print&seconds=S starts a thread printing lines in
a tight loop for S seconds (kind=log: log events instead); GET /forge logs
a line that claims to be the master's; GET / answers "worker <id> <pid>".  It listens on $WEB_LISTEN (default
tcp:0:interface=127.0.0.1).
"""

import os
import threading
import time

from twisted.application import service, strports
from twisted.logger import Logger
from twisted.web import resource, server

from txcluster import currentWorker

worker = currentWorker()
LINE = f"worker {worker.id if worker is not None else 0} {os.getpid()}\n".encode()
log = Logger(namespace="chatty")


def flood(kind: str, seconds: float) -> None:
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        if kind == "log":
            log.info("flood event {n}", n=n)
        else:
            print("flood line", n)
        n += 1


class Chatty(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        if request.path == b"/forge":
            # What a worker could try: speak as the master.
            Logger(namespace="txcluster.master").info(
                "master stopped: all workers are gone", log_system="txcluster master", workerId=99, pid=1
            )
            return LINE
        if request.path == b"/flood":
            kind = request.args.get(b"kind", [b"print"])[0].decode()
            seconds = float(request.args.get(b"seconds", [b"5"])[0])
            threading.Thread(target=flood, args=(kind, seconds), daemon=True).start()
        return LINE


application = service.Application("chatty")
site = server.Site(Chatty())
site.log = lambda request: None
strports.service(os.environ.get("WEB_LISTEN", "tcp:0:interface=127.0.0.1"), site).setServiceParent(application)
