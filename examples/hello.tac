"""
A twisted.web site that says which worker answered.

    twistd -n txcluster --app examples/hello.tac --workers 4
    curl http://127.0.0.1:8080/

The port comes from $PORT when it is set (default 8080).  The same file runs
unchanged under plain `twistd -ny examples/hello.tac`.
"""

import os

from twisted.application import service, strports
from twisted.web import resource, server

from txcluster import currentWorker


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        worker = currentWorker()
        who = f"worker {worker.id}" if worker is not None else "a single process"
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return f"hello from {who} (pid {os.getpid()})\n".encode()


application = service.Application("hello")
site = server.Site(Hello())
site.displayTracebacks = False
strports.service(f"tcp:{os.environ.get('PORT', '8080')}", site).setServiceParent(application)
