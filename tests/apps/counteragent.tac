"""
An agent for the tests: answers {"op": "count"} with the next number of
the cluster's count, {"op": "pid"} with its pid.  When the file named by
$AGENT_BROKEN exists, loading this file fails (an agent that cannot come
back).  It prints (flushed) "counteragent: ready <pid>" once started.
"""

import os

from twisted.application import service

from txcluster import currentAgent

if os.environ.get("AGENT_BROKEN") and os.path.exists(os.environ["AGENT_BROKEN"]):
    raise RuntimeError("this agent is broken on purpose")


class Counter(service.Service):
    total = 0

    def startService(self):
        super().startService()
        currentAgent().setRequestHandler(self.request)
        print(f"counteragent: ready {os.getpid()}", flush=True)

    def request(self, workerId, message):
        if message["op"] == "pid":
            return os.getpid()
        self.total += 1
        return self.total


application = service.Application("counteragent")
Counter().setServiceParent(application)
