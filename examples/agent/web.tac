"""
The web app of examples/agent: every response carries the cluster-wide
request count, which the agent (agent.tac) keeps.

    twistd -n txcluster --app examples/agent/web.tac --agent examples/agent/agent.tac --workers 4
    curl http://127.0.0.1:8080/
    request 1234 of the cluster, served by worker 3 (pid 4321)

Without the agent (or while it restarts for longer than --agent-timeout)
the page says so instead of failing.  The port comes from $PORT (default
8080).
"""

import os

from twisted.application import service, strports
from twisted.logger import Logger
from twisted.web import resource, server

from txcluster import AgentFailed, AgentUnavailable, currentWorker

log = Logger(namespace="web")


class Count(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        worker = currentWorker()
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")

        def answered(answer):
            request.write(f"request {answer['total']} of the cluster, served by worker {worker.id} (pid {os.getpid()})\n".encode())
            request.finish()

        def unavailable(failure):
            failure.trap(AgentUnavailable, AgentFailed)
            request.write(f"the agent is away ({failure.getErrorMessage()}); served by worker {worker.id}\n".encode())
            request.finish()

        worker.askAgent({"op": "count"}).addCallbacks(answered, unavailable)
        return server.NOT_DONE_YET


def milestone(message):
    if "milestone" in message:
        log.info("the cluster served {milestone} requests", milestone=message["milestone"])


application = service.Application("agent-web")
if currentWorker() is not None:
    currentWorker().addMessageObserver(milestone)
site = server.Site(Count())
strports.service(f"tcp:{os.environ.get('PORT', '8080')}", site).setServiceParent(application)
