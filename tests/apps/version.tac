"""
A web application that loads slowly (it sleeps $SLOW_LOAD seconds, default
0.5) and reads $VERSION_FILE as it loads: GET / answers
"worker <id> <pid> <version>", the code it runs.  It listens on $WEB_LISTEN
(default tcp:0:interface=127.0.0.1).
"""

import os
import time

from twisted.application import service, strports
from twisted.web import resource, server

from txcluster import currentWorker

with open(os.environ["VERSION_FILE"]) as f:
    VERSION = f.read().strip()
time.sleep(float(os.environ.get("SLOW_LOAD", "0.5")))

worker = currentWorker()
LINE = f"worker {worker.id if worker is not None else 0} {os.getpid()} {VERSION}\n".encode()


class Who(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        return LINE


application = service.Application("version")
site = server.Site(Who())
site.log = lambda request: None
strports.service(os.environ.get("WEB_LISTEN", "tcp:0:interface=127.0.0.1"), site).setServiceParent(application)
