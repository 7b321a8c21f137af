"""
The C{twistd txcluster} plugin.  Deliberately tiny: it names the module that
holds the options and the service as a string, so that plugin discovery
imports nothing of txcluster (and never the reactor).
"""

from twisted.application.service import ServiceMaker

txcluster = ServiceMaker(
    "txcluster",
    "txcluster.tap",
    "Run a Twisted application on every core: one master shares its "
    "listening sockets with N worker processes.",
    "txcluster",
)
