# -*- test-case-name: tests.test_handles -*-
"""
The master's table of listening handles: one bound socket per L{ListenKey},
the workers sharing it, and (for round-robin and least-busy handles) the
L{Dispatcher} whose actions it carries out with real file descriptors.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable, Hashable, Optional

from attrs import field, frozen, mutable
from twisted.internet import defer
from twisted.internet.error import ConnectionClosed
from twisted.logger import Logger

from txcluster._scheduler import (
    DEFAULT_WINDOW,
    Allowance,
    LEAST_BUSY,
    ROUND_ROBIN,
    STICKY,
    Dispatcher,
    DispatcherStatistics,
    Handoff,
    Release,
)
from txcluster._sockets import AcceptReader, ListenKey, bindSocket, boundAddress, printablePath
from txcluster._sticky import ClientKeys

_log = Logger(namespace="txcluster.master")

SHARED = "shared"
SCHEDULING = (ROUND_ROBIN, SHARED, LEAST_BUSY, STICKY)


@mutable(eq=False)
class Handle:
    """
    One bound socket and who shares it.

    @ivar members: the workers that asked for it (L{QueryServer}) and have not
        closed it.
    @ivar dispatcher: for C{rr} and C{least-busy}; L{None} when workers accept
        themselves (C{shared}, and always UDP).
    """

    listenId: int
    key: ListenKey
    sock: Optional[socket.socket]
    scheduling: str
    host: str
    port: int
    members: set = field(factory=set)
    dispatcher: Optional[Dispatcher] = None
    reader: Optional[AcceptReader] = None
    reading: bool = False
    accepted: int = 0
    #: Bound at start-up (C{--listen}): stays open without workers.
    declared: bool = False
    #: Passed by systemd (socket activation): its UNIX path is systemd's.
    inherited: bool = False
    #: While accepting is paused for lack of descriptors: the call that resumes it.
    resourcePause: Any = None

    def describe(self) -> str:
        if self.key.kind == "unix":
            return f"unix:{printablePath(self.host)}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.key.kind[:3]}:{host}:{self.port}"


@frozen
class HandleStatistics:
    """
    A snapshot of one handle.
    """

    listenId: int
    address: str
    scheduling: str
    workers: int
    accepted: int
    dispatch: Optional[DispatcherStatistics]


class HandleTable:
    """
    Binds each key once, hands its connections out and closes it when its
    last worker leaves.

    @param sendConnections: C{(worker, listenId, fds) -> Deferred[int]}: send
        a L{NewConn} to that worker; the result is how many it took.
    @param badAnswer: C{(worker, why)}: a worker answered a handoff with
        an error.
    @param maxPending: stop accepting on a handle while this many accepted
        connections wait for a worker (the kernel's backlog holds the rest);
        resume below half of it.
    @param adopted: C{(seconds, count)}: C{count} connections were taken
        by a worker C{seconds} after they were accepted.
    @param keys: the L{ClientKeys} of sticky handles' connections.
    @ivar beforeDispatch: called when connections were accepted, first.
    """

    def __init__(
        self,
        reactor,
        scheduling: str,
        sendConnections: Callable[[Hashable, int, list], defer.Deferred],
        window: int = DEFAULT_WINDOW,
        maxBatch: int = 253,
        maxPending: int = 1024,
        resourcePause: float = 0.5,
        badAnswer: Callable[[Hashable, str], None] = lambda worker, why: None,
        adopted: Optional[Callable[[float, int], None]] = None,
        keys: Optional[ClientKeys] = None,
    ) -> None:
        if scheduling not in SCHEDULING:
            raise ValueError(f"unknown scheduling {scheduling!r}")
        self._reactor = reactor
        self.scheduling = scheduling
        self._send = sendConnections
        self._window = window
        self._maxBatch = maxBatch
        self._maxPending = maxPending
        self._resourcePause = resourcePause
        self._badAnswer = badAnswer
        self._adopted = adopted
        self.beforeDispatch: Callable[[], None] = lambda: None
        #: Who each connection's client is, for sticky handles.
        self.keys = keys if keys is not None else ClientKeys(reactor)
        # When each connection the master holds was accepted.
        self._acceptedAt: dict[int, float] = {}
        self._byKey: dict[ListenKey, Handle] = {}
        self._byId: dict[int, Handle] = {}
        self._nextId = 1
        self._accepting = True
        self._idleWaiters: list[defer.Deferred] = []
        self.dropped = 0

    # Lookups

    @property
    def accepting(self) -> bool:
        """
        Whether the master still accepts connections (it stops for good
        with L{stopAccepting}).
        """
        return self._accepting

    def get(self, listenId: int) -> Optional[Handle]:
        return self._byId.get(listenId)

    def handles(self) -> list[Handle]:
        return list(self._byId.values())

    def statistics(self) -> tuple:
        return tuple(map(_statistics, self._byId.values()))

    # Worker requests

    def query(self, worker: Hashable, key: ListenKey, backlog: int = 50, mode: int = 0o666) -> Handle:
        """
        C{worker} wants to listen on C{key}: bind it unless it is bound.

        @raise OSError: binding failed; nothing is remembered, so a later
            query binds afresh.
        """
        handle = self._byKey.get(key)
        if handle is None:
            handle = self._bind(key, backlog, mode)
        handle.members.add(worker)
        return handle

    def declare(self, key: ListenKey, backlog: int = 50, mode: int = 0o666) -> Handle:
        """
        Bind C{key} now, before any worker asks (C{--listen}); it stays open
        while no worker listens on it (connections wait, or the kernel's
        backlog holds them) until the master stops.

        @raise OSError: binding failed.
        """
        handle = self._byKey.get(key) or self._bind(key, backlog, mode)
        handle.declared = True
        return handle

    def inherit(self, key: ListenKey, sock: socket.socket, aliases: tuple = ()) -> Handle:
        """
        Serve C{sock}, a listening socket the master was given (systemd's
        socket activation), as C{key} and every key in C{aliases} (a dual
        stack C{[::]} socket serves C{0.0.0.0} too); declared, as with
        L{declare}.
        """
        handle = self._install(key, sock)
        handle.declared = handle.inherited = True
        for alias in aliases:
            self._byKey.setdefault(alias, handle)
        return handle

    def listening(self, worker: Hashable, listenId: int, allowance: Optional[Allowance] = None) -> Optional[Handle]:
        """
        C{worker}'s port for C{listenId} is up: it takes connections now, up
        to C{allowance} (shared with its other handles; see
        L{Dispatcher.join}).
        """
        handle = self._byId.get(listenId)
        if handle is None or worker not in handle.members:
            return None
        if handle.dispatcher is not None:
            self._run(handle, handle.dispatcher.join(worker, allowance))
        return handle

    def close(self, worker: Hashable, listenId: int) -> Optional[Handle]:
        """
        C{worker} stopped listening on C{listenId}; the last one out closes
        the socket.
        """
        handle = self._byId.get(listenId)
        if handle is None or worker not in handle.members:
            return None
        handle.members.discard(worker)
        if handle.dispatcher is not None:
            self._run(handle, handle.dispatcher.leave(worker))
        if not handle.members and not handle.declared:
            self._closeHandle(handle, "its last worker closed it")
        self._checkIdle()
        return handle

    def lose(self, worker: Hashable, keepOrphans: bool) -> None:
        """
        C{worker} is gone: what it had not taken goes to the other workers.
        A handle left with no worker stays open (its queue waiting) when
        C{keepOrphans} is true, because a replacement is on its way.
        """
        for handle in list(self._byId.values()):
            if handle.dispatcher is not None:
                self._run(handle, handle.dispatcher.lose(worker))
            if worker in handle.members:
                handle.members.discard(worker)
                if not handle.members and not keepOrphans and not handle.declared:
                    self._closeHandle(handle, "its last worker is gone")
        self._checkIdle()

    def reportLoad(self, worker: Hashable, connections: int) -> None:
        for handle in self._byId.values():
            if handle.dispatcher is not None and worker in handle.members:
                handle.dispatcher.reportLoad(worker, connections)

    def leaveAll(self, worker: Hashable) -> None:
        """
        Take C{worker} out of every rotation without forgetting it: what it
        was sent is still answered.
        """
        for handle in list(self._byId.values()):
            if handle.dispatcher is not None and worker in handle.members:
                self._run(handle, handle.dispatcher.leave(worker))

    def closeOrphans(self) -> None:
        """
        Close every handle no worker shares any more.
        """
        for handle in list(self._byId.values()):
            if not handle.members and not handle.declared:
                self._closeHandle(handle, "no worker listens on it")

    def unused(self) -> list[Handle]:
        "The declared handles no worker listens on."
        return [h for h in self._byId.values() if h.declared and not h.members]

    # Shutdown

    def stopAccepting(self) -> None:
        """
        Accept what is already waiting, then stop accepting for good and
        close the master's listening sockets.  Connections already accepted
        still go to workers.
        """
        self._accepting = False
        self.keys.stop()
        for handle in list(self._byId.values()):
            if handle.reader is not None and handle.sock is not None:
                waiting = handle.reader.acceptAll(10_000)
                self._stopReading(handle)
                if waiting:
                    self._accepted(handle, waiting)
            self._closeSocket(handle)

    def whenIdle(self) -> defer.Deferred:
        """
        A Deferred that fires once no accepted connection waits in the
        master and no handoff awaits its answer.
        """
        d = defer.Deferred()
        self._idleWaiters.append(d)
        self._checkIdle()
        return d

    def closeAll(self) -> None:
        for handle in list(self._byId.values()):
            self._closeHandle(handle, "the master is stopping")

    # Internals

    def _bind(self, key: ListenKey, backlog: int, mode: int) -> Handle:
        handle = self._install(key, bindSocket(key, backlog, mode))
        _log.info("bound {address} ({scheduling})", address=handle.describe(), scheduling=handle.scheduling)
        return handle

    def _install(self, key: ListenKey, sock: socket.socket) -> Handle:
        host, port = boundAddress(sock, key)
        scheduling = self.scheduling if key.isStream else SHARED
        handle = Handle(
            listenId=self._nextId,
            key=key,
            sock=sock,
            scheduling=scheduling,
            host=host,
            port=port,
        )
        self._nextId += 1
        if scheduling != SHARED:
            handle.dispatcher = Dispatcher(
                scheduling, self._window, self._maxBatch, keyOf=self.keys.keyOf, idOf=_workerIdOf
            )
            handle.reader = AcceptReader(
                sock,
                lambda fds, handle=handle: self._accepted(handle, fds),
                lambda error, handle=handle: self._outOfResources(handle, error),
                handle.describe(),
            )
            if self._accepting:
                self._startReading(handle)
        self._byKey[key] = handle
        self._byId[handle.listenId] = handle
        return handle

    def _accepted(self, handle: Handle, fds: list) -> None:
        self.beforeDispatch()
        handle.accepted += len(fds)
        if self._adopted is not None:
            self._acceptedAt.update(dict.fromkeys(fds, self._reactor.seconds()))
        if handle.scheduling == STICKY:
            self.keys.admit(fds, lambda known: self._run(handle, handle.dispatcher.accepted(known)))
        else:
            self._run(handle, handle.dispatcher.accepted(fds))

    def _run(self, handle: Handle, actions: list) -> None:
        for action in actions:
            if isinstance(action, Handoff):
                self._handoff(handle, action)
            else:
                self._release(handle, action)
        self._regulate(handle)
        self._checkIdle()

    def _handoff(self, handle: Handle, handoff: Handoff) -> None:
        try:
            d = self._send(handoff.worker, handle.listenId, list(handoff.connections))
        except Exception:
            d = defer.fail()
        d.addCallbacks(
            self._answered,
            self._handoffFailed,
            callbackArgs=(handle, handoff),
            errbackArgs=(handle, handoff),
        )

    def _answered(self, accepted: int, handle: Handle, handoff: Handoff) -> None:
        if handle.dispatcher is not None:
            self._run(handle, handle.dispatcher.answered(handoff, accepted))

    def _handoffFailed(self, failure, handle: Handle, handoff: Handoff) -> None:
        if handle.dispatcher is None:
            return
        if failure.check(ConnectionClosed, defer.CancelledError):
            # The worker's channel is gone: what it had not answered moves on.
            self._run(handle, handle.dispatcher.lose(handoff.worker))
            return
        # The worker answered with an error, which a worker never does: it
        # may have adopted some of the connections, so giving them to
        # another worker could serve a request twice.  Treat them as taken
        # and report the worker.
        self._run(handle, handle.dispatcher.answered(handoff, len(handoff.connections)))
        self._badAnswer(
            handoff.worker,
            f"answered a handoff of {len(handoff.connections)} connections on "
            f"{handle.describe()} with an error ({failure.getErrorMessage()[:80]})",
        )

    def _release(self, handle: Handle, release: Release) -> None:
        if self._adopted is not None:
            self._timeAdoption(release)
        for fd in release.connections:
            try:
                os.close(fd)
            except OSError:
                pass
        if not release.taken:
            self.dropped += len(release.connections)
            _log.warn(
                "closed {count} accepted connections on {address}: no worker listens on it",
                count=len(release.connections),
                address=handle.describe(),
            )

    def _timeAdoption(self, release: Release) -> None:
        # Connections accepted together share one time: one report a run.
        now = self._reactor.seconds()
        pop = self._acceptedAt.pop
        last, count = None, 0
        for fd in release.connections:
            at = pop(fd, None)
            if at is None or not release.taken:
                continue
            if at != last:
                if count:
                    self._adopted(now - last, count)
                last, count = at, 0
            count += 1
        if count:
            self._adopted(now - last, count)

    def _regulate(self, handle: Handle) -> None:
        if handle.dispatcher is None or handle.sock is None or not self._accepting:
            return
        if handle.resourcePause is not None:
            return
        pending = handle.dispatcher.pending
        if handle.reading and pending >= self._maxPending:
            _log.warn(
                "{pending} connections wait for a worker on {address}: pausing accept",
                pending=pending,
                address=handle.describe(),
            )
            self._stopReading(handle)
        elif not handle.reading and pending <= self._maxPending // 2:
            self._startReading(handle)

    def _outOfResources(self, handle: Handle, error: OSError) -> None:
        _log.error(
            "cannot accept on {address}: {error}; pausing accept for {seconds} s",
            address=handle.describe(),
            error=error,
            seconds=self._resourcePause,
        )
        self._stopReading(handle)
        if handle.resourcePause is not None:
            return

        def resume():
            handle.resourcePause = None
            self._regulate(handle)

        handle.resourcePause = self._reactor.callLater(self._resourcePause, resume)

    def _startReading(self, handle: Handle) -> None:
        if not handle.reading and handle.reader is not None:
            self._reactor.addReader(handle.reader)
            handle.reading = True

    def _stopReading(self, handle: Handle) -> None:
        if handle.reading:
            self._reactor.removeReader(handle.reader)
            handle.reading = False

    def _closeSocket(self, handle: Handle) -> None:
        if handle.sock is None:
            return
        self._stopReading(handle)
        if handle.resourcePause is not None:
            handle.resourcePause.cancel()
            handle.resourcePause = None
        handle.sock.close()
        handle.sock = None
        if handle.key.kind == "unix" and not handle.key.address.startswith("\0") and not handle.inherited:
            # (An abstract name has no file to remove.)
            try:
                os.unlink(handle.key.address)
            except OSError:
                pass

    def _closeHandle(self, handle: Handle, why: str) -> None:
        self._closeSocket(handle)
        if handle.dispatcher is not None:
            self._run(handle, handle.dispatcher.close())
        for key in [k for k, h in self._byKey.items() if h is handle]:
            del self._byKey[key]
        self._byId.pop(handle.listenId, None)
        _log.info("closed {address}: {why}", address=handle.describe(), why=why)
        self._checkIdle()

    def _busy(self) -> bool:
        for handle in self._byId.values():
            if handle.dispatcher is not None:
                # Once the master stops accepting, a queue no worker listens
                # for waits for nobody (nothing respawns): it is not work.
                waiting = handle.dispatcher.pending and (handle.members or self._accepting)
                if waiting or handle.dispatcher.inFlight():
                    return True
        return self.keys.waiting > 0

    def _checkIdle(self) -> None:
        if self._idleWaiters and not self._busy():
            waiters, self._idleWaiters = self._idleWaiters, []
            for d in waiters:
                d.callback(None)


def _statistics(h: Handle) -> HandleStatistics:
    return HandleStatistics(
        listenId=h.listenId,
        address=h.describe(),
        scheduling=h.scheduling,
        workers=len(h.members),
        accepted=h.accepted,
        dispatch=None if h.dispatcher is None else h.dispatcher.statistics(),
    )


def _workerIdOf(worker) -> int:
    # Sticky dispatch ranks worker ids: a replacement has its worker's.
    return worker.workerId
