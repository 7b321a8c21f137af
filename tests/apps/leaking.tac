"""
A web application that leaks: every request keeps $LEAK_KB kilobytes
(default 512) of touched memory forever, as a cache without a bound
would.  Listens on $LEAKING_PORT on 127.0.0.1; GET / answers "pid <pid>
<kept KB>".
"""

import os

from twisted.application import internet, service
from twisted.web import resource, server

KEPT = []
SIZE = int(os.environ.get("LEAK_KB", "512")) * 1024


class Leaking(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        KEPT.append(bytearray(os.urandom(64)) * (SIZE // 64))
        return f"pid {os.getpid()} {len(KEPT) * SIZE // 1024}\n".encode()


application = service.Application("leaking")
site = server.Site(Leaking())
site.log = lambda request: None
internet.TCPServer(int(os.environ["LEAKING_PORT"]), site, interface="127.0.0.1").setServiceParent(application)
