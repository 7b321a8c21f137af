"""
A web application that takes a while to start, like one with heavy imports
and a slow connection pool: loading the file sleeps $SLOW_LOAD seconds
(default 0.5), starting its service sleeps $SLOW_START more (default 0),
both in the reactor's thread, before it listens.  It prints (flushed)
"slowstart: loading" and "slowstart: starting" as each sleep begins.
GET / then answers "worker <id> <pid>".  It listens on $WEB_LISTEN (a
strports description, default tcp:0:interface=127.0.0.1).
"""

import os
import time

from twisted.application import service, strports
from twisted.web import resource, server

from txcluster import currentWorker

print("slowstart: loading", flush=True)
time.sleep(float(os.environ.get("SLOW_LOAD", "0.5")))

worker = currentWorker()
LINE = f"worker {worker.id if worker is not None else 0} {os.getpid()}\n".encode()


class Who(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        return LINE


class SlowStart(service.MultiService):
    def startService(self):
        print("slowstart: starting", flush=True)
        time.sleep(float(os.environ.get("SLOW_START", "0")))
        service.MultiService.startService(self)


site = server.Site(Who())
site.displayTracebacks = False
site.log = lambda request: None
application = service.Application("slowstart")
slow = SlowStart()
slow.setServiceParent(application)
strports.service(os.environ.get("WEB_LISTEN", "tcp:0:interface=127.0.0.1"), site).setServiceParent(slow)
