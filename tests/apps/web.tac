"""
A twisted.web test application: GET / answers "worker <id> <pid>";
GET /slow?seconds=S answers the same after S seconds.  It listens on
$WEB_LISTEN (a strports description, default tcp:0:interface=127.0.0.1).
"""

import os

from twisted.application import service, strports
from twisted.internet import reactor, task
from twisted.web import resource, server

from txcluster import currentWorker

worker = currentWorker()
LINE = f"worker {worker.id if worker is not None else 0} {os.getpid()}\n".encode()


class Who(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        if request.path == b"/slow":
            seconds = float(request.args.get(b"seconds", [b"1"])[0])
            task.deferLater(reactor, seconds, lambda: None).addCallback(self._finish, request)
            return server.NOT_DONE_YET
        return LINE

    def _finish(self, _, request):
        request.write(LINE)
        request.finish()


site = server.Site(Who())
site.displayTracebacks = False
site.log = lambda request: None
application = service.Application("web")
strports.service(os.environ.get("WEB_LISTEN", "tcp:0:interface=127.0.0.1"), site).setServiceParent(application)
