# -*- test-case-name: tests.test_scheduler -*-
"""
Who gets the next connection: the pure dispatch logic of one listening handle.

This is Node's C{RoundRobinHandle} (free list, pending queue, C{newconn} /
C{accepted}) with batching, a window of outstanding handoffs per worker and
redistribution of everything a dead worker had not taken.  It never touches
a socket, a reactor or a clock: the master feeds it events and executes the
actions it returns.  Connections are opaque values (file descriptors in the
master, plain integers in the tests).

Under the sticky policy each client's connections go to one worker, chosen
by rendezvous hashing (L{txcluster._proxy.rank}) over the ids of the
workers taking connections.
"""

from __future__ import annotations

import heapq
from collections import deque
from math import ceil
from typing import Callable, Generic, Hashable, Iterable, Optional, TypeVar, Union

from attrs import field, frozen, mutable

from txcluster._proxy import preferred

Conn = TypeVar("Conn", bound=Hashable)

ROUND_ROBIN = "rr"
LEAST_BUSY = "least-busy"
STICKY = "sticky"

#: Handoffs a worker may have unanswered.  Enough that a burst of
#: long-lived connections splits evenly even while a worker is busy serving
#: the first ones; few enough that a stuck worker holds little.
DEFAULT_WINDOW = 8


@frozen(eq=False)
class Handoff(Generic[Conn]):
    """
    Send C{connections} to worker C{worker} in one L{NewConn} and report the
    answer with L{Dispatcher.answered}.  Compared by identity: it is also the
    token that names this handoff.
    """

    worker: Hashable
    connections: tuple


@frozen
class Release(Generic[Conn]):
    """
    The master's copies of C{connections} can be closed: a worker took them
    (C{taken=True}) or there is nobody left to take them (C{taken=False}).
    """

    connections: tuple
    taken: bool


Action = Union[Handoff, Release]


@mutable(eq=False)
class Allowance:
    """
    How many connections one worker may be sent in all (C{--max-requests}),
    across every handle it listens on: the dispatchers of those handles
    share it.  C{used} counts what was sent, answered or not; refused and
    lost connections are given back.

    @ivar limit: the most it may take; L{None}: no limit.
    """

    limit: Optional[int] = None
    used: int = 0

    @property
    def exhausted(self) -> bool:
        """
        Whether the worker has been sent all it may take.
        """
        return self.limit is not None and self.used >= self.limit

    def remaining(self) -> Optional[int]:
        """
        How many more it may take; L{None}: any number.
        """
        return None if self.limit is None else max(0, self.limit - self.used)


@mutable
class _Member:
    worker: Hashable
    allowance: Allowance
    taking: bool = True
    outstanding: list = field(factory=list)
    reported: int = 0
    acceptedSinceReport: int = 0
    handed: int = 0

    def inFlight(self) -> int:
        return sum(len(h.connections) for h in self.outstanding)

    def estimate(self) -> int:
        return self.reported + self.acceptedSinceReport + self.inFlight()


@frozen
class MemberStatistics:
    """
    One worker's view from a handle.

    @ivar handed: connections this worker has taken on this handle.
    @ivar inFlight: connections sent and not yet answered.
    @ivar estimate: open connections as last reported plus those taken since.
    """

    worker: Hashable
    taking: bool
    handed: int
    inFlight: int
    estimate: int


@frozen
class DispatcherStatistics:
    """
    A snapshot of a L{Dispatcher}.
    """

    policy: str
    pending: int
    members: tuple


class Dispatcher(Generic[Conn]):
    """
    Hands the connections accepted on one handle to the workers listening on
    it.

    A worker is sent at most C{window} batches before it answers, each of at
    most C{maxBatch} connections.  With C{policy="rr"} connections go to the
    workers in turn (each ready worker takes its share of the queue, so one
    fast answer does not drain the whole queue into one worker); with
    C{policy="least-busy"} each connection goes to the worker with the fewest
    open connections (as reported, plus taken since the report, plus in
    flight).

    With C{policy="sticky"} each connection goes to the worker whose id its
    client ranks first (L{txcluster._proxy.rank} of C{keyOf(connection)})
    among the ids of the workers taking connections; of two such workers
    with one id (a worker and its replacement), to the one that joined
    last.  While that worker's window is full its clients' connections
    wait, in order, and nobody else's wait behind them.  Allowances count
    what is sent, but do not limit it: a worker past its C{--max-requests}
    still serves its clients until it is recycled.

    Every method returns the list of actions to carry out, in order.
    """

    def __init__(
        self,
        policy: str = ROUND_ROBIN,
        window: int = DEFAULT_WINDOW,
        maxBatch: int = 253,
        keyOf: Optional[Callable[[Conn], bytes]] = None,
        idOf: Optional[Callable[[Hashable], int]] = None,
    ) -> None:
        """
        @param keyOf: for C{"sticky"}: the key of a connection's client
            (L{txcluster._proxy.clientKey} of its address), read once as
            the connection starts to wait (and again if it comes back
            refused or lost).  It must not raise: C{b""} for a connection
            whose peer is unknown.
        @param idOf: for C{"sticky"}: the id of a worker, which its
            replacement shares.
        """
        if policy not in (ROUND_ROBIN, LEAST_BUSY, STICKY):
            raise ValueError(f"unknown dispatch policy {policy!r}")
        if window < 1 or maxBatch < 1:
            raise ValueError("window and maxBatch must be at least 1")
        if policy == STICKY and (keyOf is None or idOf is None):
            raise ValueError("sticky dispatch needs keyOf and idOf")
        self.policy = policy
        self._window = window
        self._maxBatch = maxBatch
        self._idOf = idOf
        self._members: dict[int, _Member] = {}
        self._pending = _StickyQueue(keyOf) if policy == STICKY else deque()
        self._next = 0
        self._closed = False

    @property
    def pending(self) -> int:
        """
        How many accepted connections wait in the master for a worker.
        """
        return len(self._pending)

    def inFlight(self) -> int:
        """
        How many connections were sent to workers and not answered yet.
        """
        return sum(m.inFlight() for m in self._members.values())

    def takers(self) -> list:
        """
        The workers in rotation, in join order.
        """
        return [m.worker for m in self._members.values() if m.taking]

    def join(self, worker: Hashable, allowance: Optional[Allowance] = None) -> list[Action]:
        """
        C{worker} takes connections from now on.

        @param allowance: how many connections it may be sent in all,
            shared with the other handles it listens on (L{None}: no
            limit).  A worker that has used its allowance is sent nothing
            while another worker in rotation still has some; when none has,
            the handle is still served, by the workers over their limits.
        """
        member = self._members.get(worker)
        if member is None:
            self._members[worker] = _Member(worker, allowance if allowance is not None else Allowance())
        else:
            member.taking = True
            if allowance is not None:
                member.allowance = allowance
        return self._dispatch()

    def leave(self, worker: Hashable) -> list[Action]:
        """
        C{worker} stopped taking connections but is alive: what it was sent
        is still answered (most likely refused), so nothing moves yet.
        """
        member = self._members.get(worker)
        if member is not None:
            member.taking = False
            self._forgetIfIdle(member)
        return self._dispatch()

    def lose(self, worker: Hashable) -> list[Action]:
        """
        C{worker} is gone: everything sent to it and not answered goes back
        to the front of the queue, oldest first.
        """
        member = self._members.get(worker)
        if member is None:
            return []
        self._remove(worker)
        unanswered = [c for h in member.outstanding for c in h.connections]
        member.outstanding.clear()
        member.allowance.used -= len(unanswered)
        return self._requeue(unanswered)

    def accepted(self, connections: Iterable[Conn]) -> list[Action]:
        """
        The master accepted C{connections}.
        """
        if self._closed:
            return _release(tuple(connections), taken=False)
        self._pending.extend(connections)
        return self._dispatch()

    def answered(self, handoff: Handoff, accepted: int) -> list[Action]:
        """
        The worker answered C{handoff}: it took the first C{accepted}
        connections; the others are refused and go to another worker, and a
        worker that refuses is out of rotation until it joins again.
        """
        member = self._members.get(handoff.worker)
        if member is None or handoff not in member.outstanding:
            return []
        member.outstanding.remove(handoff)
        accepted = max(0, min(accepted, len(handoff.connections)))
        taken = handoff.connections[:accepted]
        refused = handoff.connections[accepted:]
        member.handed += accepted
        member.acceptedSinceReport += accepted
        member.allowance.used -= len(refused)
        if refused:
            member.taking = False
        self._forgetIfIdle(member)
        actions: list[Action] = _release(taken, taken=True)
        if refused:
            actions.extend(self._requeue(list(refused)))
        else:
            actions.extend(self._dispatch())
        return actions

    def reportLoad(self, worker: Hashable, connections: int) -> None:
        """
        C{worker} has C{connections} open.
        """
        member = self._members.get(worker)
        if member is not None:
            member.reported = max(0, connections)
            member.acceptedSinceReport = 0

    def close(self) -> list[Action]:
        """
        The handle is closing: release whatever waits, and whatever comes
        back refused from now on.
        """
        self._closed = True
        waiting = tuple(self._pending)
        self._pending.clear()
        return _release(waiting, taken=False)

    def statistics(self) -> DispatcherStatistics:
        return DispatcherStatistics(
            policy=self.policy,
            pending=len(self._pending),
            members=tuple(
                MemberStatistics(
                    worker=m.worker,
                    taking=m.taking,
                    handed=m.handed,
                    inFlight=m.inFlight(),
                    estimate=m.estimate(),
                )
                for m in self._members.values()
            ),
        )

    def _forgetIfIdle(self, member: _Member) -> None:
        # A member that left keeps its record only while it owes answers.
        if not member.taking and not member.outstanding and member.worker in self._members:
            self._remove(member.worker)

    def _remove(self, worker: Hashable) -> None:
        # The turn is an index into the members in join order: removing one
        # before it must not make the rotation skip the worker whose turn it is.
        if list(self._members).index(worker) < self._next:
            self._next -= 1
        del self._members[worker]

    def _requeue(self, connections: list) -> list[Action]:
        if self._closed:
            return _release(tuple(connections), taken=False)
        self._pending.extendleft(reversed(connections))
        return self._dispatch()

    def _candidates(self) -> tuple[list[_Member], bool]:
        """
        The members that may be sent connections now, in turn order, and
        whether their allowances limit them.  When no member in rotation is
        under its limit, one of them serves on, so that the handle is still
        served and only one worker goes over: the one furthest over already
        (the first in turn, at first).
        """
        members = list(self._members.values())
        if not members:
            return [], False
        start = self._next % len(members)
        rotated = members[start:] + members[:start]
        if not any(m.allowance.limit is not None for m in members):
            # No --max-requests: the common case, and the hot path.
            return [m for m in rotated if m.taking and len(m.outstanding) < self._window], False
        taking = [m for m in rotated if m.taking]
        allowed = [m for m in taking if not m.allowance.exhausted]
        if allowed:
            pool, limited = allowed, True
        elif taking:
            pool, limited = [max(taking, key=lambda m: m.allowance.used - m.allowance.limit)], False
        else:
            return [], False
        return [m for m in pool if len(m.outstanding) < self._window], limited

    def _dispatch(self) -> list[Action]:
        if self._closed or not self._pending:
            return []
        if self.policy == STICKY:
            return self._handOff(self._stickyBatches())
        candidates, limited = self._candidates()
        if not candidates:
            return []
        if self.policy == LEAST_BUSY:
            batches = self._leastBusyBatches(candidates, limited)
        else:
            batches = self._roundRobinBatches(candidates, limited)
        return self._handOff(batches)

    def _handOff(self, batches: list) -> list[Action]:
        actions: list[Action] = []
        for member, batch in batches:
            handoff = Handoff(member.worker, tuple(batch))
            member.outstanding.append(handoff)
            member.allowance.used += len(batch)
            actions.append(handoff)
        return actions

    def _room(self, member: _Member, limited: bool) -> int:
        if not limited:
            return self._maxBatch
        remaining = member.allowance.remaining()
        return self._maxBatch if remaining is None else min(self._maxBatch, remaining)

    def _roundRobinBatches(self, candidates: list[_Member], limited: bool) -> list:
        if limited:
            takers = sum(1 for m in self._members.values() if m.taking and not m.allowance.exhausted)
        else:
            takers = sum(1 for m in self._members.values() if m.taking)
        share = ceil(len(self._pending) / max(1, takers))
        batches = []
        order = list(self._members)
        for member in candidates:
            if not self._pending:
                break
            size = min(share, self._room(member, limited), len(self._pending))
            batch = [self._pending.popleft() for _ in range(size)]
            batches.append((member, batch))
            self._next = order.index(member.worker) + 1
        return batches

    def _leastBusyBatches(self, candidates: list[_Member], limited: bool) -> list:
        heap = [(m.estimate(), rank, m) for rank, m in enumerate(candidates)]
        heapq.heapify(heap)
        batches: dict[Hashable, list] = {}
        while self._pending and heap:
            load, rank, member = heapq.heappop(heap)
            batch = batches.setdefault(member.worker, [])
            batch.append(self._pending.popleft())
            if len(batch) < self._room(member, limited):
                heapq.heappush(heap, (load + 1, rank, member))
        # Ties go to the next worker in turn after the last one served.
        self._next = list(self._members).index(member.worker) + 1
        byId = {m.worker: m for m in candidates}
        return [(byId[worker], batch) for worker, batch in batches.items()]

    def _stickyBatches(self) -> list:
        owners: dict = {}
        for member in self._members.values():
            # In join order: of two members with one id, the later wins.
            if member.taking:
                owners[self._idOf(member.worker)] = member
        self._pending.rankAmong(frozenset(owners))
        batches = []
        for workerId, member in owners.items():
            if len(member.outstanding) < self._window:
                batch = self._pending.take(workerId, self._maxBatch)
                if batch:
                    batches.append((member, batch))
        return batches


class _StickyQueue:
    """
    The connections waiting in a sticky L{Dispatcher}: one queue per worker
    id, each connection in the queue of the id its client ranks first
    among the ids last ranked among.  When those ids change, everything is
    ranked again.

    It does, for the dispatcher, what the other policies' C{deque} does:
    count, iterate oldest first, C{extend}, C{extendleft} (put back in
    front) and C{clear}.
    """

    def __init__(self, keyOf: Callable) -> None:
        self._keyOf = keyOf
        self._ids: frozenset = frozenset()
        self._queues: dict[Optional[int], deque] = {}
        # connection -> (place in the order of all waiting, client key)
        self._waiting: dict = {}
        self._front = 0
        self._back = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def __iter__(self):
        return iter(sorted(self._waiting, key=lambda c: self._waiting[c][0]))

    def extend(self, connections: Iterable) -> None:
        for connection in connections:
            key = self._keyOf(connection)
            self._waiting[connection] = (self._back, key)
            self._back += 1
            self._queueFor(key).append(connection)

    def extendleft(self, connections: Iterable) -> None:
        # As deque.extendleft: each goes in front of the one before it.
        for connection in connections:
            key = self._keyOf(connection)
            self._front -= 1
            self._waiting[connection] = (self._front, key)
            self._queueFor(key).appendleft(connection)

    def clear(self) -> None:
        self._waiting.clear()
        self._queues.clear()

    def rankAmong(self, ids: frozenset) -> None:
        """
        Queue every connection for the id among C{ids} its client ranks
        first.
        """
        if ids == self._ids:
            return
        self._ids = ids
        waiting = list(self)
        self._queues.clear()
        for connection in waiting:
            self._queueFor(self._waiting[connection][1]).append(connection)

    def take(self, workerId: int, most: int) -> list:
        """
        Up to C{most} of the connections waiting for C{workerId}, oldest
        first, no longer waiting.
        """
        queue = self._queues.get(workerId)
        if not queue:
            return []
        batch = [queue.popleft() for _ in range(min(most, len(queue)))]
        for connection in batch:
            del self._waiting[connection]
        return batch

    def _queueFor(self, key: bytes) -> deque:
        target = preferred(key, self._ids) if self._ids else None
        queue = self._queues.get(target)
        if queue is None:
            queue = self._queues[target] = deque()
        return queue


def _release(connections: tuple, taken: bool) -> list[Action]:
    return [Release(tuple(connections), taken)] if connections else []
