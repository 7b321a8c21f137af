"""
The agent of examples/agent: one process for the whole cluster that
counts the requests every worker serves.

    twistd -n txcluster --app examples/agent/web.tac --agent examples/agent/agent.tac --workers 4
    curl http://127.0.0.1:8080/

Each worker asks the agent for the next number (askAgent); the agent,
one process, answers them in turn, so the numbers are the cluster's.
Every 100th request it tells every worker (broadcast).
"""

import os

from twisted.application import service
from twisted.logger import Logger

from txcluster import currentAgent

log = Logger(namespace="agent")


class Counter(service.Service):
    def __init__(self):
        self.total = 0

    def startService(self):
        super().startService()
        agent = currentAgent()
        if agent is None:
            raise SystemExit("run this file with txcluster --agent")
        agent.setRequestHandler(self.request)
        log.info("counting for the cluster in pid {pid}", pid=os.getpid())

    def request(self, workerId, message):
        if message.get("op") != "count":
            raise ValueError(f"unknown op {message.get('op')!r}")
        self.total += 1
        if self.total % 100 == 0:
            currentAgent().broadcast({"milestone": self.total, "workers": currentAgent().workers()})
        return {"total": self.total}


application = service.Application("agent")
Counter().setServiceParent(application)
