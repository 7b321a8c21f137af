"""
A web application whose reactor can be blocked on purpose: GET / answers
"worker <id> <pid>"; GET /block?seconds=S first answers the same, then
calls time.sleep(S) in the reactor's thread (a synchronous call that never
returns in time).  It listens on $WEB_LISTEN (a strports description,
default tcp:0:interface=127.0.0.1).
"""

import os
import time

from twisted.application import service, strports
from twisted.internet import reactor
from twisted.web import resource, server

from txcluster import currentWorker

worker = currentWorker()
LINE = f"worker {worker.id if worker is not None else 0} {os.getpid()}\n".encode()


class Who(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        if request.path == b"/block":
            seconds = float(request.args.get(b"seconds", [b"30"])[0])
            # After the answer has been written out.
            reactor.callLater(0.1, time.sleep, seconds)
        return LINE


site = server.Site(Who())
site.displayTracebacks = False
site.log = lambda request: None
application = service.Application("blocking")
strports.service(os.environ.get("WEB_LISTEN", "tcp:0:interface=127.0.0.1"), site).setServiceParent(application)
