"""
A twisted.web test application that says who it is and who it thinks the
client is: GET / answers "worker <id> <pid> client <host>", the host being
C{request.getClientAddress().host} (under C{--proxy-protocol}, the address
the balancer's PROXY header named).  It listens on $WHOCLIENT_LISTEN (a
strports description, e.g. C{tcp:8080:interface=10.200.1.2}).
"""

import os

from twisted.application import service, strports
from twisted.web import resource, server

from txcluster import currentWorker

worker = currentWorker()
WHO = f"worker {worker.id if worker is not None else 0} {os.getpid()}"


class WhoClient(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        client = getattr(request.getClientAddress(), "host", "-")
        return f"{WHO} client {client}\n".encode()


site = server.Site(WhoClient())
site.displayTracebacks = False
site.log = lambda request: None
application = service.Application("whoclient")
strports.service(os.environ["WHOCLIENT_LISTEN"], site).setServiceParent(application)
