"""
txcluster: Node.js C{cluster} for Twisted.

One master process owns the listening sockets; N worker processes run an
unmodified Twisted application; the master hands accepted connections to
the workers over AMP with file descriptor passing, keeps the workers
alive, reloads them without dropping a connection, and shuts them down
gracefully.

Public names (everything else is private):

  - L{ClusterService}, L{ClusterConfig}: the master, as an C{IService}.
  - L{ClusterStatistics}, L{WorkerStatistics}: snapshots from
    C{ClusterService.statistics()}.
  - L{WorkerForked}, L{WorkerOnline}, L{WorkerListening}, L{WorkerReady},
    L{WorkerDisconnected}, L{WorkerExited}, L{WorkerMessage}: lifecycle
    events for C{ClusterService.addObserver}.
  - L{ReloadFailed}, L{ClusterStopped}: why a C{reload()} or C{scale()}
    failed.
  - L{currentWorker}, L{Worker}: in a worker, who it is and how it talks
    to the master.
  - L{exclusive}: mark a factory to bind inside the worker instead.

Modules:

  - C{tap}: C{twistd txcluster} options.
  - C{_commands}: the AMP protocol between master and workers.
  - C{_scheduler}: pure dispatch logic (round-robin, least-busy).
  - C{_policy}: pure supervision rules (backoff, give-up, recycling).
  - C{_sockets}: the master's listening sockets.
  - C{_handles}: the master's table of shared listens.
  - C{_process}: spawning a worker and relaying its output.
  - C{_master}: the master service and its supervision.
  - C{_worker}, C{_intercept}, C{_workermain}: the worker side.
"""

from txcluster._events import (
    WorkerDisconnected,
    WorkerExited,
    WorkerForked,
    WorkerListening,
    WorkerMessage,
    WorkerOnline,
    WorkerReady,
)
from txcluster._intercept import exclusive
from txcluster._master import (
    ClusterConfig,
    ClusterService,
    ClusterStatistics,
    ClusterStopped,
    ReloadFailed,
    WorkerStatistics,
)
from txcluster._version import __version__
from txcluster._worker import Worker, currentWorker

__all__ = [
    "ClusterConfig",
    "ClusterService",
    "ClusterStatistics",
    "ClusterStopped",
    "ReloadFailed",
    "Worker",
    "WorkerDisconnected",
    "WorkerExited",
    "WorkerForked",
    "WorkerListening",
    "WorkerMessage",
    "WorkerOnline",
    "WorkerReady",
    "WorkerStatistics",
    "__version__",
    "currentWorker",
    "exclusive",
]
