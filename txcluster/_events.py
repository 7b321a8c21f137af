# -*- test-case-name: tests.test_master -*-
"""
The lifecycle events a L{ClusterService} reports to its observers (Node's
C{fork}, C{online}, C{listening}, C{disconnect}, C{exit}, C{message}, plus
C{ready}).  Each is a frozen value naming the worker id and pid.
"""

from __future__ import annotations

from typing import Any, Optional

from attrs import frozen


@frozen
class WorkerForked:
    """
    A worker process was spawned.
    """

    workerId: int
    pid: Optional[int]


@frozen
class WorkerOnline:
    """
    The worker process is running and its channel works.
    """

    workerId: int
    pid: Optional[int]


@frozen
class WorkerListening:
    """
    The worker takes connections on C{address} (C{tcp:127.0.0.1:8080},
    C{unix:/run/app.sock}, C{udp:0.0.0.0:5353}).
    """

    workerId: int
    pid: Optional[int]
    address: str
    host: str
    port: int


@frozen
class WorkerReady:
    """
    The worker's application started and all its listens are established.
    """

    workerId: int
    pid: Optional[int]


@frozen
class WorkerDisconnected:
    """
    The worker leaves gracefully; C{reason} says why.  Asked by the master:
    C{stop} (the master is stopping), C{replaced} (its replacement is ready,
    in a reload or a recycling), C{scale} (scaled away).  On its own (the
    master replaces it): C{SIGTERM}, C{disconnect()}, C{the application
    stopped the reactor}.
    """

    workerId: int
    pid: Optional[int]
    reason: str


@frozen
class WorkerExited:
    """
    The worker process ended, with C{exitCode} or killed by C{signal}.

    @ivar expected: the end is not a failure (it does not count towards
        C{--max-restarts}): the master had asked it to leave, it left on its
        own, a stop signal ended it, or it exited 0 after it was ready.
        See C{docs/lifecycle.md}.
    """

    workerId: int
    pid: Optional[int]
    exitCode: Optional[int]
    signal: Optional[int]
    expected: bool


@frozen
class WorkerMessage:
    """
    The worker sent C{message} (a JSON value) with C{sendToMaster}.
    """

    workerId: int
    pid: Optional[int]
    message: Any


@frozen
class ClusterStopping:
    """
    The master began to stop (C{SIGTERM}, C{SIGINT}, C{txcluster stop} or
    C{stopService}): readiness turns false now; the workers drain after
    C{drainDelay} seconds.
    """

    drainDelay: float


@frozen
class WorkerRecycling:
    """
    The master is replacing worker C{workerId}'s process with a fresh one,
    ready-gated: C{memory} (C{--max-memory}), C{lifetime}
    (C{--max-lifetime}), C{max-requests} or C{control} (C{txcluster
    recycle}).
    """

    workerId: int
    pid: Optional[int]
    reason: str


@frozen
class ReloadStarted:
    """
    A rolling reload began (C{SIGHUP}, C{txcluster reload} or C{reload()});
    C{workers} worker ids are to get a fresh process.  A reload asked for
    while one runs joins it and reports nothing new.
    """

    workers: int


@frozen
class ReloadFinished:
    """
    The rolling reload ended: C{outcome} is C{succeeded}, C{failed} (the
    old workers keep serving; C{why} says what failed) or C{stopped} (the
    cluster began to stop).
    """

    outcome: str
    why: str = ""


ClusterEvent = (
    WorkerForked,
    WorkerOnline,
    WorkerListening,
    WorkerReady,
    WorkerDisconnected,
    WorkerExited,
    WorkerMessage,
    WorkerRecycling,
    ReloadStarted,
    ReloadFinished,
    ClusterStopping,
)
