"""
A web app for the agent tests, on $AGENTWEB_PORT (127.0.0.1): GET /count
asks the agent for the next number and answers "<number> <worker id>
<pid>", or "unavailable <why>" with status 503 when the agent is away;
GET /plain answers "plain <worker id> <pid>" without asking the agent.
"""

import os

from twisted.application import internet, service
from twisted.web import resource, server

from txcluster import AgentUnavailable, currentWorker


class Root(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        worker = currentWorker()
        if request.path == b"/plain":
            return f"plain {worker.id} {os.getpid()}\n".encode()

        def answered(number):
            request.write(f"{number} {worker.id} {os.getpid()}\n".encode())
            request.finish()

        def unavailable(failure):
            failure.trap(AgentUnavailable)
            request.setResponseCode(503)
            request.write(f"unavailable {failure.getErrorMessage()}\n".encode())
            request.finish()

        worker.askAgent({"op": "count"}).addCallbacks(answered, unavailable)
        return server.NOT_DONE_YET


application = service.Application("agentweb")
site = server.Site(Root())
site.log = lambda request: None
internet.TCPServer(int(os.environ["AGENTWEB_PORT"]), site, interface="127.0.0.1").setServiceParent(application)
