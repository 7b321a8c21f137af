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
    L{WorkerDisconnected}, L{WorkerExited}, L{WorkerMessage},
    L{WorkerRecycling}, L{ReloadStarted}, L{ReloadFinished},
    L{ClusterStopping}: lifecycle events for C{ClusterService.addObserver}.
  - L{ControlServer}: the control socket the C{txcluster} command talks to;
    L{MetricsServer}: C{/metrics}, C{/healthz} and C{/readyz}.  Both
    serve a L{ClusterService}, beside it in one's own service tree.
  - L{ReloadFailed}, L{ClusterStopped}: why a C{reload()} or C{scale()}
    failed.
  - L{currentAgent}, L{Agent}, L{AgentUnavailable}, L{AgentFailed}: the
    agent process (C{--agent}) and the messenger between it and the
    workers (C{Worker.askAgent}).
  - L{currentWorker}, L{Worker}: in a worker, who it is and how it talks
    to the master.
  - L{exclusive}: mark a factory to bind inside the worker instead.

Public modules: C{txcluster.tap} (C{twistd txcluster}) and
C{txcluster.testing} (fakes for testing code that uses txcluster).

Modules:

  - C{tap}: C{twistd txcluster} options.
  - C{_commands}: the AMP protocol between master and workers.
  - C{_scheduler}: pure dispatch logic (round-robin, least-busy).
  - C{_policy}: pure supervision rules (backoff, give-up, recycling).
  - C{_sockets}: the master's listening sockets.
  - C{_handles}: the master's table of shared listens.
  - C{_access}: declared listens and the C{--allow-listen} policy.
  - C{_process}: spawning a worker and relaying its output.
  - C{_channel}: the master's end of a worker's AMP channel, and
    C{WorkerRequests}, what a worker may ask of the master.
  - C{_lifecycle}: a process's phase, how its end is judged, and the
    state machine of a worker slot (see C{docs/lifecycle.md}).
  - C{_supervisor}: the slots, spawning, restart policy, give-up,
    scaling, recycling and the stop; C{_reload}: the rolling reload.
  - C{_processes}: the master's table of worker processes.
  - C{_heartbeat}: the ping that catches a blocked worker reactor.
  - C{_listens}: the listen broker and its checks.
  - C{_master}: C{ClusterService}, the façade over all of that;
    C{_status}: its snapshots and readiness.
  - C{_control}, C{_controlcommands}, C{_cli}: the control socket, its
    protocol, and the C{txcluster} command.
  - C{_metrics}, C{_health}, C{_procstats}: the metrics (txcluster's and
    the applications'), the HTTP endpoint serving them with the health
    checks, and what C{/proc} says of a worker.
  - C{_twistedcompat}: every use of a Twisted private, each pinned by a
    test.
  - C{_deferreds}: Deferreds several callers wait on.
  - C{_worker}, C{_workerchannel}, C{_ports}, C{_intercept},
    C{_workermain}: the worker side.
"""

import importlib

from txcluster._version import __version__

# Names are imported on first use, so that importing txcluster.tap (which
# twistd does while parsing options) loads nothing heavy.
_exports = {
    "ClusterConfig": "txcluster._master",
    "ClusterService": "txcluster._master",
    "ClusterStatistics": "txcluster._master",
    "ClusterStopped": "txcluster._master",
    "ReloadFailed": "txcluster._master",
    "WorkerStatistics": "txcluster._master",
    "ClusterStopping": "txcluster._events",
    "ReloadFinished": "txcluster._events",
    "ReloadStarted": "txcluster._events",
    "WorkerRecycling": "txcluster._events",
    "ControlServer": "txcluster._control",
    "MetricsServer": "txcluster._health",
    "WorkerDisconnected": "txcluster._events",
    "WorkerExited": "txcluster._events",
    "WorkerForked": "txcluster._events",
    "WorkerListening": "txcluster._events",
    "WorkerMessage": "txcluster._events",
    "WorkerOnline": "txcluster._events",
    "WorkerReady": "txcluster._events",
    "Worker": "txcluster._worker",
    "Agent": "txcluster._agentapi",
    "currentAgent": "txcluster._agentapi",
    "AgentUnavailable": "txcluster._commands",
    "AgentFailed": "txcluster._commands",
    "currentWorker": "txcluster._worker",
    "exclusive": "txcluster._intercept",
}

__all__ = sorted(_exports) + ["__version__"]


def __getattr__(name: str):
    try:
        module = _exports[name]
    except KeyError:
        raise AttributeError(f"module 'txcluster' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
