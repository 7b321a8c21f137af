"""
Tests for L{txcluster._scheduler}: the pure dispatch of accepted connections
to workers.  Connections are plain integers and workers plain strings or
integers; no reactor, no sockets, no clock.
"""

from __future__ import annotations

from collections import deque
from math import ceil

from attrs.exceptions import FrozenInstanceError
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from txcluster._proxy import preferred, rank
from txcluster._scheduler import (
    LEAST_BUSY,
    ROUND_ROBIN,
    STICKY,
    Allowance,
    Dispatcher,
    DispatcherStatistics,
    Handoff,
    MemberStatistics,
    Release,
)

_settings = settings(max_examples=120, derandomize=True, deadline=None, database=None)


def handoffs(actions: list) -> list:
    """
    The handoffs among C{actions}, as C{(worker, connections)} pairs.
    """
    return [(a.worker, a.connections) for a in actions if isinstance(a, Handoff)]


def only(actions: list) -> Handoff:
    """
    The single action in C{actions}, which must be a handoff.
    """
    [action] = actions
    assert isinstance(action, Handoff), action
    return action


def joined(*workers, **kwargs) -> Dispatcher:
    """
    A dispatcher that C{workers} joined, in that order.
    """
    dispatcher = Dispatcher(**kwargs)
    for worker in workers:
        assert dispatcher.join(worker) == []
    return dispatcher


def serveOne(dispatcher: Dispatcher, connection: int) -> object:
    """
    Accept C{connection}, let the worker it goes to take it, and return that
    worker.
    """
    handoff = only(dispatcher.accepted([connection]))
    assert dispatcher.answered(handoff, 1) == [Release((connection,), True)]
    return handoff.worker


class ConstructionTests(SynchronousTestCase):
    def test_unknownPolicy(self):
        """
        A policy other than round-robin and least-busy is refused.
        """
        self.assertRaises(ValueError, Dispatcher, "random")

    def test_windowAndBatchAtLeastOne(self):
        """
        A window or a batch size below one is refused.
        """
        self.assertRaises(ValueError, Dispatcher, window=0)
        self.assertRaises(ValueError, Dispatcher, maxBatch=0)

    def test_emptyDispatcher(self):
        """
        A new dispatcher has no workers, nothing pending and nothing in
        flight.
        """
        dispatcher = Dispatcher()
        self.assertEqual(dispatcher.takers(), [])
        self.assertEqual(dispatcher.pending, 0)
        self.assertEqual(dispatcher.inFlight(), 0)
        self.assertEqual(dispatcher.policy, ROUND_ROBIN)


    def test_handoffsCompareByIdentity(self):
        """
        Two handoffs of the same connections to the same worker are distinct
        tokens, while releases compare by value.
        """
        self.assertNotEqual(Handoff("a", (1,)), Handoff("a", (1,)))
        self.assertEqual(Release((1,), True), Release((1,), True))
        self.assertNotEqual(Release((1,), True), Release((1,), False))


class RoundRobinTests(SynchronousTestCase):
    """
    Round-robin dispatch: Node's C{RoundRobinHandle} order.
    """

    def test_rotationFollowsJoinOrder(self):
        """
        Sequential connections with idle workers go to the workers in join
        order, round and round.
        """
        dispatcher = joined("a", "b", "c")
        served = [serveOne(dispatcher, n) for n in range(7)]
        self.assertEqual(served, ["a", "b", "c", "a", "b", "c", "a"])

    def test_rotationWithoutAnswers(self):
        """
        The rotation does not wait for answers while every worker has room in
        its window.
        """
        dispatcher = joined("a", "b", "c", window=3)
        served = [only(dispatcher.accepted([n])).worker for n in range(6)]
        self.assertEqual(served, ["a", "b", "c", "a", "b", "c"])
        self.assertEqual(dispatcher.inFlight(), 6)

    def test_integerWorkers(self):
        """
        Workers can be any hashable value, integers included.
        """
        dispatcher = joined(7, 3)
        self.assertEqual([serveOne(dispatcher, n) for n in range(3)], [7, 3, 7])

    def test_lateJoinerTakesItsTurnAtTheEnd(self):
        """
        A worker that joins later comes after the others in the rotation.
        """
        dispatcher = joined("a", "b")
        self.assertEqual(serveOne(dispatcher, 1), "a")
        dispatcher.join("c")
        self.assertEqual(
            [serveOne(dispatcher, n) for n in range(2, 6)], ["b", "c", "a", "b"]
        )

    def test_rotationSurvivesLoss(self):
        """
        When a worker that already had its turn is lost, the rotation goes on
        with the worker whose turn it was instead of skipping it.
        """
        dispatcher = joined("a", "b", "c")
        self.assertEqual([serveOne(dispatcher, n) for n in (1, 2)], ["a", "b"])
        self.assertEqual(dispatcher.lose("a"), [])
        self.assertEqual(
            [serveOne(dispatcher, n) for n in (3, 4, 5)], ["c", "b", "c"]
        )

    def test_rotationSurvivesLeave(self):
        """
        When an idle worker that already had its turn leaves, the rotation
        goes on with the worker whose turn it was.
        """
        dispatcher = joined("a", "b", "c")
        self.assertEqual([serveOne(dispatcher, n) for n in (1, 2)], ["a", "b"])
        self.assertEqual(dispatcher.leave("a"), [])
        self.assertEqual(
            [serveOne(dispatcher, n) for n in (3, 4, 5)], ["c", "b", "c"]
        )

    def test_rotationSurvivesRefusal(self):
        """
        A connection refused by the first worker goes to the next one in turn
        and the rotation goes on from there without skipping anybody.
        """
        dispatcher = joined("a", "b", "c")
        handoff = only(dispatcher.accepted([1]))
        self.assertEqual(handoff.worker, "a")
        self.assertEqual(handoffs(dispatcher.answered(handoff, 0)), [("b", (1,))])
        self.assertEqual(dispatcher.takers(), ["b", "c"])
        self.assertEqual(
            [serveOne(dispatcher, n) for n in (2, 3, 4)], ["c", "b", "c"]
        )

    def test_rotationAfterLosingTheLastWorker(self):
        """
        Losing the worker that was served last, at the end of the join order,
        hands the next connection to the first worker.
        """
        dispatcher = joined("a", "b", "c")
        self.assertEqual([serveOne(dispatcher, n) for n in (1, 2, 3)], ["a", "b", "c"])
        dispatcher.lose("c")
        self.assertEqual([serveOne(dispatcher, n) for n in (4, 5)], ["a", "b"])

    def test_windowLimitsOutstandingHandoffs(self):
        """
        A worker with C{window} unanswered handoffs is sent nothing more
        until it answers one of them.
        """
        dispatcher = joined("a", window=3)
        first = only(dispatcher.accepted([1]))
        second = only(dispatcher.accepted([2, 3, 4]))
        only(dispatcher.accepted([5]))
        dispatcher.answered(second, 2)
        [member] = dispatcher.statistics().members
        self.assertEqual((member.handed, member.taking, member.inFlight), (2, False, 2))
        dispatcher.answered(first, 1)
        [member] = dispatcher.statistics().members
        self.assertEqual(member.handed, 3)


class LoseTests(SynchronousTestCase):
    """
    L{Dispatcher.lose}: a dead worker's unanswered connections move on.
    """

    def test_unansweredGoToTheFrontOldestFirst(self):
        """
        Every connection a lost worker had not answered goes back to the
        front of the queue, from its oldest handoff to its newest, ahead of
        the connections that were waiting.
        """
        dispatcher = joined("a", window=2)
        only(dispatcher.accepted([1, 2]))
        only(dispatcher.accepted([3]))
        self.assertEqual(dispatcher.accepted([4]), [])
        self.assertEqual(dispatcher.lose("a"), [])
        self.assertEqual(dispatcher.pending, 4)
        self.assertEqual(dispatcher.inFlight(), 0)
        self.assertEqual(handoffs(dispatcher.join("b")), [("b", (1, 2, 3, 4))])

    def test_unansweredGoToTheRemainingWorkers(self):
        """
        A lost worker's connections go out to the workers still in rotation.
        """
        dispatcher = joined("a")
        only(dispatcher.accepted([1, 2]))
        dispatcher.join("b")
        dispatcher.join("c")
        self.assertEqual(
            handoffs(dispatcher.lose("a")), [("b", (1,)), ("c", (2,))]
        )
        self.assertEqual(dispatcher.takers(), ["b", "c"])

    def test_lostWorkerForgotten(self):
        """
        A lost worker is out of rotation and out of the statistics.
        """
        dispatcher = joined("a", "b")
        dispatcher.lose("a")
        self.assertEqual(dispatcher.takers(), ["b"])
        self.assertEqual([m.worker for m in dispatcher.statistics().members], ["b"])

    def test_loseUnknownWorker(self):
        """
        Losing a worker that never joined, or twice, does nothing.
        """
        dispatcher = joined("a")
        only(dispatcher.accepted([1]))
        self.assertEqual(dispatcher.lose("z"), [])
        self.assertEqual(dispatcher.lose("a"), [])
        self.assertEqual(dispatcher.lose("a"), [])
        self.assertEqual(dispatcher.pending, 1)

    def test_loseLeftWorker(self):
        """
        A worker that left and then died before answering has its
        connections moved on.
        """
        dispatcher = joined("a", "b")
        only(dispatcher.accepted([1]))
        self.assertEqual(dispatcher.leave("a"), [])
        self.assertEqual(handoffs(dispatcher.lose("a")), [("b", (1,))])


class LeaveTests(SynchronousTestCase):
    """
    L{Dispatcher.leave}: a live worker stops taking connections.
    """

    def test_leaveKeepsOutstandingAnswerable(self):
        """
        A worker that leaves still answers what it was sent: nothing moves
        when it leaves, it gets nothing new, and its answer counts.
        """
        dispatcher = joined("a", "b")
        handoff = only(dispatcher.accepted([1]))
        self.assertEqual(dispatcher.leave("a"), [])
        self.assertEqual(dispatcher.takers(), ["b"])
        self.assertEqual(dispatcher.inFlight(), 1)
        self.assertEqual(serveOne(dispatcher, 2), "b")
        self.assertEqual(serveOne(dispatcher, 3), "b")
        self.assertEqual(dispatcher.answered(handoff, 1), [Release((1,), True)])
        self.assertEqual([m.worker for m in dispatcher.statistics().members], ["b"])

    def test_leftWorkerStatisticsUntilAnswered(self):
        """
        A worker that left appears in the statistics, not taking, while it
        owes an answer.
        """
        dispatcher = joined("a")
        only(dispatcher.accepted([1]))
        dispatcher.leave("a")
        [member] = dispatcher.statistics().members
        self.assertEqual((member.worker, member.taking, member.inFlight), ("a", False, 1))

    def test_refusalAfterLeaveGoesElsewhere(self):
        """
        What a worker that left refuses goes to the workers in rotation.
        """
        dispatcher = joined("a", "b")
        handoff = only(dispatcher.accepted([1]))
        dispatcher.leave("a")
        self.assertEqual(handoffs(dispatcher.answered(handoff, 0)), [("b", (1,))])

    def test_leaveIdleWorkerForgotten(self):
        """
        An idle worker that leaves is forgotten at once.
        """
        dispatcher = joined("a", "b")
        self.assertEqual(dispatcher.leave("a"), [])
        self.assertEqual([m.worker for m in dispatcher.statistics().members], ["b"])

    def test_leaveUnknownWorker(self):
        """
        A worker that never joined can leave without effect.
        """
        dispatcher = joined("a")
        self.assertEqual(dispatcher.leave("z"), [])
        self.assertEqual(dispatcher.takers(), ["a"])

    def test_rejoinBeforeAnswering(self):
        """
        A worker that left and joins again before answering keeps its place
        in the join order and its window.
        """
        dispatcher = joined("a", "b", window=1)
        only(dispatcher.accepted([1]))
        dispatcher.leave("a")
        dispatcher.join("a")
        self.assertEqual(dispatcher.takers(), ["a", "b"])
        self.assertEqual(serveOne(dispatcher, 2), "b")

    def test_leaveRedistributesShare(self):
        """
        Connections waiting for busy workers are shared again among the
        workers that remain when one leaves.
        """
        dispatcher = joined("a", "b", window=1)
        toA = only(dispatcher.accepted([1]))
        toB = only(dispatcher.accepted([2]))
        dispatcher.accepted([3, 4, 5, 6])
        dispatcher.leave("b")
        actions = dispatcher.answered(toA, 1)
        self.assertEqual(handoffs(actions), [("a", (3, 4, 5, 6))])
        self.assertEqual(dispatcher.answered(toB, 1), [Release((2,), True)])


class CloseTests(SynchronousTestCase):
    """
    L{Dispatcher.close}: the handle is going away.
    """

    def test_closeReleasesPending(self):
        """
        Closing releases the waiting connections as not taken.
        """
        dispatcher = Dispatcher()
        dispatcher.accepted([1, 2])
        self.assertEqual(dispatcher.close(), [Release((1, 2), False)])
        self.assertEqual(dispatcher.pending, 0)

    def test_closeWithNothingPending(self):
        """
        Closing with nothing waiting releases nothing.
        """
        self.assertEqual(Dispatcher().close(), [])

    def test_acceptedAfterClose(self):
        """
        Connections accepted after closing are released at once, not queued
        and not handed off.
        """
        dispatcher = joined("a")
        dispatcher.close()
        self.assertEqual(dispatcher.accepted([1, 2]), [Release((1, 2), False)])
        self.assertEqual(dispatcher.accepted([]), [])
        self.assertEqual(dispatcher.pending, 0)

    def test_refusedAfterClose(self):
        """
        After closing, taken connections are released as taken and refused
        ones as not taken.
        """
        dispatcher = joined("a")
        small = only(dispatcher.accepted([1]))
        bigger = only(dispatcher.accepted([2, 3, 4]))
        self.assertEqual(dispatcher.close(), [])
        self.assertEqual(
            dispatcher.answered(bigger, 1),
            [Release((2,), True), Release((3, 4), False)],
        )
        self.assertEqual(dispatcher.answered(small, 0), [Release((1,), False)])
        self.assertEqual(dispatcher.pending, 0)
        self.assertEqual(dispatcher.inFlight(), 0)

    def test_takenAfterCloseDispatchesNothing(self):
        """
        An answer after closing releases what was taken and sends nothing.
        """
        dispatcher = joined("a", window=1)
        handoff = only(dispatcher.accepted([1]))
        dispatcher.accepted([2])
        self.assertEqual(dispatcher.close(), [Release((2,), False)])
        self.assertEqual(dispatcher.answered(handoff, 1), [Release((1,), True)])

    def test_lostAfterClose(self):
        """
        After closing, a lost worker's unanswered connections are released
        as not taken.
        """
        dispatcher = joined("a", "b", window=2)
        only(dispatcher.accepted([1]))
        only(dispatcher.accepted([2]))
        only(dispatcher.accepted([3]))
        dispatcher.close()
        self.assertEqual(dispatcher.lose("a"), [Release((1, 3), False)])
        self.assertEqual(dispatcher.lose("b"), [Release((2,), False)])
        self.assertEqual(dispatcher.inFlight(), 0)

    def test_joinAfterClose(self):
        """
        A worker joining a closed dispatcher is sent nothing.
        """
        dispatcher = Dispatcher()
        dispatcher.close()
        self.assertEqual(dispatcher.join("a"), [])
        self.assertEqual(dispatcher.accepted([1]), [Release((1,), False)])


class LeastBusyTests(SynchronousTestCase):
    """
    Least-busy dispatch: connections go to the worker with the fewest open.
    """

    def test_policy(self):
        """
        The policy is named in the dispatcher and its statistics.
        """
        dispatcher = Dispatcher(LEAST_BUSY)
        self.assertEqual(dispatcher.policy, LEAST_BUSY)
        self.assertEqual(dispatcher.statistics().policy, LEAST_BUSY)

    def test_picksTheFewestReported(self):
        """
        A connection goes to the worker that reported the fewest open
        connections.
        """
        dispatcher = joined("a", "b", "c", policy=LEAST_BUSY)
        dispatcher.reportLoad("a", 5)
        dispatcher.reportLoad("b", 2)
        dispatcher.reportLoad("c", 3)
        self.assertEqual(serveOne(dispatcher, 1), "b")

    def test_countsTakenSinceReport(self):
        """
        Connections a worker took since its last report count towards its
        load.
        """
        dispatcher = joined("a", "b", policy=LEAST_BUSY)
        dispatcher.reportLoad("a", 1)
        dispatcher.reportLoad("b", 0)
        self.assertEqual(serveOne(dispatcher, 1), "b")
        self.assertEqual(serveOne(dispatcher, 2), "a")
        self.assertEqual(serveOne(dispatcher, 3), "b")
        self.assertEqual([m.estimate for m in dispatcher.statistics().members], [2, 2])

    def test_countsInFlight(self):
        """
        Connections sent and not answered count towards a worker's load.
        """
        dispatcher = joined("a", "b", policy=LEAST_BUSY, window=4)
        dispatcher.reportLoad("b", 3)
        (first,) = dispatcher.accepted([1, 2])
        self.assertEqual((first.worker, first.connections), ("a", (1, 2)))
        dispatcher.answered(first, 2)
        self.assertEqual([m.estimate for m in dispatcher.statistics().members], [2, 3])
        self.assertEqual(only(dispatcher.accepted([3])).worker, "a")
        self.assertEqual([m.inFlight for m in dispatcher.statistics().members], [1, 0])

    def test_reportResetsTakenSinceReport(self):
        """
        A new report replaces the count of connections taken since the last
        one.
        """
        dispatcher = joined("a", "b", policy=LEAST_BUSY)
        dispatcher.reportLoad("b", 2)
        self.assertEqual([serveOne(dispatcher, n) for n in (1, 2)], ["a", "a"])
        dispatcher.reportLoad("a", 0)
        self.assertEqual(serveOne(dispatcher, 3), "a")

    def test_negativeReportIsZero(self):
        """
        A negative load report counts as zero.
        """
        dispatcher = joined("a", policy=LEAST_BUSY)
        dispatcher.reportLoad("a", -5)
        [member] = dispatcher.statistics().members
        self.assertEqual(member.estimate, 0)

    def test_reportFromUnknownWorkerIgnored(self):
        """
        A load report from a worker that is not a member changes nothing.
        """
        dispatcher = joined("a", policy=LEAST_BUSY)
        self.assertIsNone(dispatcher.reportLoad("z", 3))
        self.assertEqual([m.worker for m in dispatcher.statistics().members], ["a"])

    def test_tiesRotateInJoinOrder(self):
        """
        Among equally loaded workers, connections go round in join order.
        """
        dispatcher = joined("a", "b", "c", policy=LEAST_BUSY)
        served = []
        for n in range(6):
            worker = serveOne(dispatcher, n)
            dispatcher.reportLoad(worker, 0)
            served.append(worker)
        self.assertEqual(served, ["a", "b", "c", "a", "b", "c"])

    def test_tiesRotateAroundABusyWorker(self):
        """
        Equally loaded workers take turns even when a busier worker sits
        between them in the join order.
        """
        dispatcher = joined("a", "b", "c", policy=LEAST_BUSY)
        dispatcher.reportLoad("b", 5)
        served = []
        for n in range(6):
            worker = serveOne(dispatcher, n)
            dispatcher.reportLoad(worker, 0)
            served.append(worker)
        self.assertEqual(served, ["a", "c", "a", "c", "a", "c"])

    def test_batchFillsTheLeastBusyFirst(self):
        """
        A batch of connections levels the load: the least busy worker is
        filled up to the next one's load before that one gets any.
        """
        dispatcher = joined("a", "b", policy=LEAST_BUSY)
        dispatcher.reportLoad("b", 2)
        self.assertEqual(
            handoffs(dispatcher.accepted([1, 2, 3, 4])), [("a", (1, 2, 3)), ("b", (4,))]
        )

    def test_batchAtMostMaxBatch(self):
        """
        No least-busy handoff carries more than C{maxBatch} connections.
        """
        dispatcher = joined("a", "b", policy=LEAST_BUSY, maxBatch=2)
        dispatcher.reportLoad("b", 10)
        self.assertEqual(
            handoffs(dispatcher.accepted([1, 2, 3, 4, 5])),
            [("a", (1, 2)), ("b", (3, 4))],
        )
        self.assertEqual(dispatcher.pending, 1)

    def test_windowApplies(self):
        """
        A least-busy worker with a full window is passed over.
        """
        dispatcher = joined("a", "b", policy=LEAST_BUSY, window=1)
        dispatcher.reportLoad("b", 10)
        self.assertEqual(only(dispatcher.accepted([1])).worker, "a")
        self.assertEqual(only(dispatcher.accepted([2])).worker, "b")
        self.assertEqual(dispatcher.accepted([3]), [])

    def test_refusalGoesToTheNextLeastBusy(self):
        """
        A connection the least busy worker refuses goes to the next least
        busy one.
        """
        dispatcher = joined("a", "b", "c", policy=LEAST_BUSY)
        dispatcher.reportLoad("b", 4)
        dispatcher.reportLoad("c", 2)
        handoff = only(dispatcher.accepted([1]))
        self.assertEqual(handoff.worker, "a")
        self.assertEqual(handoffs(dispatcher.answered(handoff, 0)), [("c", (1,))])


class StatisticsTests(SynchronousTestCase):
    """
    L{Dispatcher.statistics}, L{Dispatcher.inFlight} and
    L{Dispatcher.pending}.
    """

    def test_snapshot(self):
        """
        The statistics name the policy, the waiting connections and, per
        member in join order, whether it takes connections, what it took,
        what is in flight and its estimated load.
        """
        dispatcher = joined("a", "b", "c", window=1)
        self.assertEqual(serveOne(dispatcher, 1), "a")
        self.assertEqual(only(dispatcher.accepted([2])).worker, "b")
        self.assertEqual(only(dispatcher.accepted([3])).worker, "c")
        self.assertEqual(only(dispatcher.accepted([4])).worker, "a")
        self.assertEqual(dispatcher.accepted([5]), [])
        self.assertEqual(dispatcher.leave("b"), [])
        dispatcher.reportLoad("c", 7)
        self.assertEqual(
            dispatcher.statistics(),
            DispatcherStatistics(
                policy=ROUND_ROBIN,
                pending=1,
                members=(
                    MemberStatistics("a", True, 1, 1, 2),
                    MemberStatistics("b", False, 0, 1, 1),
                    MemberStatistics("c", True, 0, 1, 8),
                ),
            ),
        )

    def test_snapshotIsFrozen(self):
        """
        A statistics snapshot cannot be changed and does not change when the
        dispatcher does.
        """
        dispatcher = joined("a")
        before = dispatcher.statistics()
        only(dispatcher.accepted([1]))
        self.assertEqual(before.members, (MemberStatistics("a", True, 0, 0, 0),))
        self.assertRaises(FrozenInstanceError, setattr, before, "pending", 3)
        self.assertEqual(dispatcher.statistics().members[0].inFlight, 1)

    def test_inFlightAndPending(self):
        """
        C{inFlight()} counts connections sent and not answered;
        C{pending} those waiting for a worker.
        """
        dispatcher = joined("a", "b", window=1, maxBatch=2)
        dispatcher.accepted(range(7))
        self.assertEqual((dispatcher.inFlight(), dispatcher.pending), (4, 3))
        dispatcher.lose("a")
        self.assertEqual((dispatcher.inFlight(), dispatcher.pending), (2, 5))

    def test_takersInJoinOrder(self):
        """
        C{takers()} lists the workers in rotation, in join order.
        """
        dispatcher = joined(3, 1, 2)
        dispatcher.leave(1)
        self.assertEqual(dispatcher.takers(), [3, 2])
        dispatcher.join(1)
        self.assertEqual(dispatcher.takers(), [3, 2, 1])


class _Model:
    """
    Drives a L{Dispatcher} and keeps an independent account of where every
    connection is, checking each action the dispatcher returns against it.
    """

    def __init__(self, testCase, policy: str, window: int, maxBatch: int) -> None:
        self.t = testCase
        self.policy = policy
        self.window = window
        self.maxBatch = maxBatch
        self.dispatcher = Dispatcher(policy, window=window, maxBatch=maxBatch)
        # worker -> [taking, outstanding handoffs oldest first], in join order
        self.members: dict = {}
        self.pending: deque = deque()
        self.inFlight: dict = {}
        self.released: dict = {}
        self.handed: dict = {}
        # worker -> [connections last reported, connections taken since]
        self.load: dict = {}
        self.accepted = 0
        self.everSent: list = []
        self.closed = False

    # Operations

    def accept(self, count: int) -> None:
        connections = list(range(self.accepted, self.accepted + count))
        self.accepted += count
        before = self._estimates()
        pendingBefore = len(self.pending)
        actions = self.dispatcher.accepted(connections)
        if self.closed:
            expected = [Release(tuple(connections), False)] if connections else []
            self.t.assertEqual(actions, expected)
            self._release(connections, False)
            return
        self.pending.extend(connections)
        sent = self._handoffs(actions)
        if self.policy == ROUND_ROBIN:
            takers = sum(1 for taking, _ in self.members.values() if taking)
            if takers:
                share = min(self.maxBatch, ceil((pendingBefore + count) / takers))
                for handoff in sent:
                    self.t.assertLessEqual(len(handoff.connections), share)
        else:
            self._checkLevelled(before, sent)

    def answer(self, index: int, count: int) -> None:
        if not self.everSent:
            return
        handoff = self.everSent[index % len(self.everSent)]
        actions = self.dispatcher.answered(handoff, count)
        member = self.members.get(handoff.worker)
        if member is None or not any(h is handoff for h in member[1]):
            self.t.assertEqual(actions, [])
            return
        member[1].remove(handoff)
        count = max(0, min(count, len(handoff.connections)))
        taken = handoff.connections[:count]
        refused = handoff.connections[count:]
        for c in handoff.connections:
            del self.inFlight[c]
        self.handed[handoff.worker] = self.handed.get(handoff.worker, 0) + count
        self.load[handoff.worker][1] += count
        if taken:
            self.t.assertEqual(actions[0], Release(taken, True))
            actions = actions[1:]
            self._release(taken, True)
        if refused:
            member[0] = False
        self._forgetIfIdle(handoff.worker)
        self._requeue(list(refused), actions)

    def join(self, worker) -> None:
        if worker in self.members:
            self.members[worker][0] = True
        else:
            self.members[worker] = [True, []]
            self.load[worker] = [0, 0]
        self._handoffs(self.dispatcher.join(worker))

    def leave(self, worker) -> None:
        actions = self.dispatcher.leave(worker)
        if worker in self.members:
            self.members[worker][0] = False
            self._forgetIfIdle(worker)
        self._handoffs(actions)

    def lose(self, worker) -> None:
        actions = self.dispatcher.lose(worker)
        if worker not in self.members:
            self.t.assertEqual(actions, [])
            return
        _, outstanding = self.members.pop(worker)
        self.handed.pop(worker, None)
        del self.load[worker]
        unanswered = [c for h in outstanding for c in h.connections]
        for c in unanswered:
            del self.inFlight[c]
        self._requeue(unanswered, actions)

    def reportLoad(self, worker, connections: int) -> None:
        self.t.assertIsNone(self.dispatcher.reportLoad(worker, connections))
        if worker in self.members:
            self.load[worker] = [max(0, connections), 0]

    def close(self) -> None:
        actions = self.dispatcher.close()
        waiting = tuple(self.pending)
        self.t.assertEqual(actions, [Release(waiting, False)] if waiting else [])
        self.pending.clear()
        self._release(waiting, False)
        self.closed = True

    # Bookkeeping

    def _forgetIfIdle(self, worker) -> None:
        taking, outstanding = self.members[worker]
        if not taking and not outstanding:
            del self.members[worker]
            self.handed.pop(worker, None)
            del self.load[worker]

    def _release(self, connections, taken: bool) -> None:
        for c in connections:
            self.t.assertNotIn(c, self.released, f"connection {c} released twice")
            self.released[c] = taken

    def _requeue(self, connections: list, actions: list) -> None:
        if self.closed:
            expected = [Release(tuple(connections), False)] if connections else []
            self.t.assertEqual(actions, expected)
            self._release(connections, False)
            return
        self.pending.extendleft(reversed(connections))
        self._handoffs(actions)

    def _handoffs(self, actions: list) -> list:
        """
        Every action must be a handoff of the oldest waiting connections to
        a worker in rotation with room in its window.
        """
        self.t.assertTrue(all(isinstance(a, Handoff) for a in actions), actions)
        if actions:
            self.t.assertFalse(self.closed)
        sent = [c for a in actions for c in a.connections]
        oldest = list(self.pending)[: len(sent)]
        if self.policy == ROUND_ROBIN:
            self.t.assertEqual(sent, oldest)
        else:
            self.t.assertEqual(sorted(sent), sorted(oldest))
        order = {c: i for i, c in enumerate(oldest)}
        workers = [a.worker for a in actions]
        self.t.assertEqual(len(workers), len(set(workers)), "two handoffs to one worker")
        for handoff in actions:
            self.t.assertIn(handoff.worker, self.members)
            taking, outstanding = self.members[handoff.worker]
            self.t.assertTrue(taking, f"{handoff.worker} is not in rotation")
            self.t.assertLess(len(outstanding), self.window)
            self.t.assertGreaterEqual(len(handoff.connections), 1)
            self.t.assertLessEqual(len(handoff.connections), self.maxBatch)
            positions = [order[c] for c in handoff.connections]
            self.t.assertEqual(positions, sorted(positions))
            outstanding.append(handoff)
            self.everSent.append(handoff)
            for c in handoff.connections:
                self.inFlight[c] = handoff
        for _ in sent:
            self.pending.popleft()
        return actions

    def _estimates(self) -> dict:
        return {m.worker: m.estimate for m in self.dispatcher.statistics().members}

    def _checkLevelled(self, before: dict, sent: list) -> None:
        """
        Least-busy: no worker was given a connection while a worker in
        rotation with room, and room in its batch, was less busy.
        """
        batch = {h.worker: len(h.connections) for h in sent}
        candidates = [
            w
            for w, (taking, outstanding) in self.members.items()
            if taking and len(outstanding) - (w in batch) < self.window
        ]
        for w in batch:
            lastLoad = before[w] + batch[w] - 1
            for v in candidates:
                if batch.get(v, 0) < self.maxBatch:
                    self.t.assertLessEqual(lastLoad, before[v] + batch.get(v, 0))

    def check(self) -> None:
        """
        Every connection is in exactly one place and the dispatcher's own
        account agrees with the model's.
        """
        t = self.t
        places = [set(self.pending), set(self.inFlight), set(self.released)]
        t.assertEqual(sum(map(len, places)), self.accepted)
        t.assertEqual(set().union(*places), set(range(self.accepted)))
        t.assertEqual(len(self.pending), len(set(self.pending)))
        t.assertEqual(self.dispatcher.pending, len(self.pending))
        t.assertEqual(self.dispatcher.inFlight(), len(self.inFlight))
        t.assertEqual(
            self.dispatcher.takers(), [w for w, (taking, _) in self.members.items() if taking]
        )
        stats = self.dispatcher.statistics()
        t.assertEqual(stats.pending, len(self.pending))
        t.assertEqual([m.worker for m in stats.members], list(self.members))
        for m in stats.members:
            taking, outstanding = self.members[m.worker]
            t.assertEqual(m.taking, taking)
            t.assertEqual(m.inFlight, sum(len(h.connections) for h in outstanding))
            t.assertLessEqual(len(outstanding), self.window)
            t.assertEqual(m.handed, self.handed.get(m.worker, 0))
            t.assertEqual(m.estimate, sum(self.load[m.worker]) + m.inFlight)
        if self.closed:
            t.assertEqual(len(self.pending), 0)
        elif self.pending:
            # Nothing waits while a worker in rotation sits idle.
            for w, (taking, outstanding) in self.members.items():
                if taking:
                    t.assertTrue(outstanding, f"{w} idle while {len(self.pending)} wait")


_workers = st.integers(min_value=0, max_value=3)
_operations = st.one_of(
    st.tuples(st.just("accept"), st.integers(min_value=0, max_value=6)),
    st.tuples(st.just("answer"), st.integers(min_value=0, max_value=50), st.integers(-1, 7)),
    st.tuples(st.just("answer"), st.integers(min_value=0, max_value=50), st.integers(-1, 7)),
    st.tuples(st.just("join"), _workers),
    st.tuples(st.just("leave"), _workers),
    st.tuples(st.just("lose"), _workers),
    st.tuples(st.just("reportLoad"), _workers, st.integers(min_value=-1, max_value=8)),
)


class PropertyTests(SynchronousTestCase):
    """
    Random sequences of events never lose, duplicate or misdirect a
    connection.
    """

    @_settings
    @given(
        policy=st.sampled_from([ROUND_ROBIN, LEAST_BUSY]),
        window=st.integers(min_value=1, max_value=3),
        maxBatch=st.integers(min_value=1, max_value=4),
        operations=st.lists(_operations, min_size=10, max_size=50),
        closeAt=st.one_of(st.none(), st.integers(min_value=0, max_value=40)),
    )
    def test_everyConnectionInExactlyOnePlace(
        self, policy, window, maxBatch, operations, closeAt
    ):
        """
        Whatever happens, every connection ever accepted is waiting, in
        flight in exactly one handoff, or released exactly once; no worker
        has more than C{window} handoffs outstanding; no handoff carries more
        than C{maxBatch} connections; handoffs only go to workers in
        rotation, carry the oldest waiting connections, and nothing waits
        while a worker in rotation is idle.
        """
        model = _Model(self, policy, window, maxBatch)
        for step, (name, *args) in enumerate(operations):
            if step == closeAt:
                model.close()
                model.check()
            getattr(model, name)(*args)
            model.check()

    @_settings
    @given(
        policy=st.sampled_from([ROUND_ROBIN, LEAST_BUSY]),
        window=st.integers(min_value=1, max_value=3),
        maxBatch=st.integers(min_value=1, max_value=4),
        operations=st.lists(_operations, min_size=10, max_size=50),
    )
    def test_everythingReleasedInTheEnd(self, policy, window, maxBatch, operations):
        """
        After any history, closing and then losing every worker releases
        every connection that was not taken, exactly once.
        """
        model = _Model(self, policy, window, maxBatch)
        for name, *args in operations:
            getattr(model, name)(*args)
        model.close()
        for worker in list(model.members):
            model.lose(worker)
        model.check()
        self.assertEqual(sorted(model.released), list(range(model.accepted)))
        self.assertEqual(model.dispatcher.inFlight(), 0)

    @_settings
    @given(
        founders=st.integers(min_value=0, max_value=4),
        churn=st.lists(
            st.one_of(
                st.tuples(st.just("join"), _workers),
                st.tuples(st.just("leave"), _workers),
                st.tuples(st.just("lose"), _workers),
                st.tuples(st.just("serve"), st.booleans()),
                st.tuples(st.just("serve"), st.just(False)),
            ),
            max_size=30,
        ),
    )
    def test_rotationResumesAfterTheLastServed(self, founders, churn):
        """
        With idle workers, each connection goes to the first worker in
        rotation after the one served last, in join order, even when workers
        join, leave, die or refuse in between.
        """
        dispatcher = Dispatcher(window=1)
        # The join order, with a removed worker kept as a tombstone so that
        # the rotation can resume after its old place.
        entries: list = []
        last = None
        connection = 0

        def nextTaker():
            present = [i for i, (_, alive) in enumerate(entries) if alive]
            if not present:
                return None
            after = [i for i in present if last is None or i > last]
            return (after or present)[0]

        def remove(worker):
            for entry in entries:
                if entry[0] == worker and entry[1]:
                    entry[1] = False

        for name, arg in [("join", w) for w in range(founders)] + churn:
            if name == "join":
                if not any(w == arg and alive for w, alive in entries):
                    entries.append([arg, True])
                dispatcher.join(arg)
            elif name in ("leave", "lose"):
                remove(arg)
                self.assertEqual(getattr(dispatcher, name)(arg), [])
            else:
                expected = nextTaker()
                if expected is None:
                    continue
                handoff = only(dispatcher.accepted([connection]))
                self.assertEqual(handoff.worker, entries[expected][0])
                last = expected
                remove(handoff.worker)
                if arg and nextTaker() is not None:
                    # A refusal: the worker is out, the connection moves on.
                    expected = nextTaker()
                    moved = only(dispatcher.answered(handoff, 0))
                    self.assertEqual(moved.worker, entries[expected][0])
                    last = expected
                    handoff = moved
                else:
                    entries[last][1] = True
                self.assertEqual(dispatcher.answered(handoff, 1), [Release((connection,), True)])
                connection += 1
            self.assertEqual(dispatcher.takers(), [w for w, alive in entries if alive])


class AllowanceTests(SynchronousTestCase):
    """
    A worker's L{Allowance} (C{--max-requests}): what the dispatchers of
    its handles may send it in all.
    """

    def test_noMoreWhileAnotherHasSome(self) -> None:
        """
        A worker that used its allowance gets nothing while another worker
        in rotation has some left.
        """
        d = Dispatcher(window=8)
        d.join("a", Allowance(2))
        d.join("b", Allowance(10))
        sent = handoffs_(d.accepted(list(range(6))))
        self.assertEqual(sorted((h.worker, len(h.connections)) for h in sent), [("a", 2), ("b", 3)])
        later = []
        for handoff in sent:
            later += handoffs_(d.answered(handoff, len(handoff.connections)))
        self.assertEqual([(h.worker, h.connections) for h in later], [("b", (5,))])

    def test_oneGoesOverWhenNoneHasAny(self) -> None:
        """
        When no worker in rotation has any allowance left, one of them —
        the same one — takes what comes, so that the handle is served.
        """
        d = Dispatcher(window=8)
        a, b = Allowance(1), Allowance(1)
        d.join("a", a)
        d.join("b", b)
        for handoff in [h for h in d.accepted([0, 1]) if isinstance(h, Handoff)]:
            d.answered(handoff, 1)
        over = set()
        for connection in range(2, 8):
            for handoff in [h for h in d.accepted([connection]) if isinstance(h, Handoff)]:
                over.add(handoff.worker)
                d.answered(handoff, 1)
        self.assertEqual(len(over), 1)
        self.assertEqual(a.used + b.used, 8)

    def test_sharedAcrossHandles(self) -> None:
        """
        One allowance counts what every handle sends.
        """
        first, second = Dispatcher(), Dispatcher()
        a = Allowance(3)
        first.join("a", a)
        second.join("a", a)
        first.join("b", Allowance(100))
        second.join("b", Allowance(100))
        first.accepted([0, 1])
        second.accepted([2, 3, 4, 5])
        self.assertEqual(a.used, 3)

    def test_refusedAndLostAreGivenBack(self) -> None:
        """
        Connections a worker refused, or did not answer for before it was
        lost, do not count against its allowance.
        """
        d = Dispatcher(window=8)
        a = Allowance(5)
        d.join("a", a)
        (handoff,) = handoffs_(d.accepted([0, 1, 2]))
        d.answered(handoff, 1)
        self.assertEqual(a.used, 1)
        d.join("a")
        d.accepted([3, 4])
        d.lose("a")
        self.assertEqual(a.used, 1)

    @_settings
    @given(
        limits=st.lists(st.one_of(st.none(), st.integers(min_value=0, max_value=6)), min_size=1, max_size=4),
        policy=st.sampled_from([ROUND_ROBIN, LEAST_BUSY]),
        operations=st.lists(
            st.one_of(
                st.tuples(st.just("accept"), st.integers(min_value=1, max_value=5)),
                st.tuples(st.just("answer"), st.integers(min_value=0, max_value=50), st.integers(0, 5)),
                st.tuples(st.just("lose"), st.integers(min_value=0, max_value=3)),
                st.tuples(st.just("rejoin"), st.integers(min_value=0, max_value=3)),
            ),
            max_size=40,
        ),
    )
    def test_theCapHolds(self, limits, policy, operations) -> None:
        """
        Whatever happens: a worker is sent connections past its limit only
        when no other worker in rotation has allowance left, and then only
        that one worker is sent anything; a worker with allowance left is
        never pushed past its limit; and each allowance counts exactly what
        its worker was sent and did not refuse or lose.
        """
        d = Dispatcher(policy, window=2, maxBatch=3)
        allowances = {w: Allowance(limit) for w, limit in enumerate(limits)}
        expected = {w: 0 for w in allowances}
        alive = set(allowances)
        outstanding: list = []
        accepted = 0

        def exhausted(w, used):
            limit = allowances[w].limit
            return limit is not None and used >= limit

        def run(actions, usedBefore):
            sent = [a for a in actions if isinstance(a, Handoff)]
            for handoff in sent:
                expected[handoff.worker] += len(handoff.connections)
                outstanding.append(handoff)
            over = {h.worker for h in sent if exhausted(h.worker, usedBefore[h.worker])}
            if over:
                self.assertEqual({h.worker for h in sent}, over)
                self.assertEqual(len(over), 1)
                for w in d.takers():
                    if w not in over:
                        self.assertTrue(exhausted(w, usedBefore[w]), (w, usedBefore, limits))
            else:
                for handoff in sent:
                    limit = allowances[handoff.worker].limit
                    if limit is not None:
                        self.assertLessEqual(allowances[handoff.worker].used, limit)

        for w in allowances:
            run(d.join(w, allowances[w]), {v: a.used for v, a in allowances.items()})
        for name, *args in operations:
            usedBefore = {v: a.used for v, a in allowances.items()}
            if name == "accept":
                count = args[0]
                run(d.accepted(list(range(accepted, accepted + count))), usedBefore)
                accepted += count
            elif name == "answer" and outstanding:
                handoff = outstanding.pop(args[0] % len(outstanding))
                count = min(args[1], len(handoff.connections))
                refused = len(handoff.connections) - count
                expected[handoff.worker] -= refused
                usedBefore[handoff.worker] -= refused
                run(d.answered(handoff, count), usedBefore)
            elif name == "lose" and args[0] in alive:
                w = args[0]
                alive.discard(w)
                mine = [h for h in outstanding if h.worker == w]
                for h in mine:
                    outstanding.remove(h)
                    expected[w] -= len(h.connections)
                    usedBefore[w] -= len(h.connections)
                run(d.lose(w), usedBefore)
            elif name == "rejoin" and args[0] in alive:
                run(d.join(args[0]), usedBefore)
            for w, allowance in allowances.items():
                self.assertEqual(allowance.used, expected[w])


def handoffs_(actions: list) -> list:
    return [a for a in actions if isinstance(a, Handoff)]


# Sticky dispatch ------------------------------------------------------------------


def clientOf(connection: int) -> bytes:
    """
    The key of connection C{connection}'s client: one of a hundred.
    """
    return b"client %d" % (connection % 100)


def idOf(worker) -> int:
    """
    A worker's id: the worker itself, or the first of a C{(id, generation)}
    pair (a worker and its replacement share an id).
    """
    return worker[0] if isinstance(worker, tuple) else worker


def sticky(*workers, **kwargs) -> Dispatcher:
    """
    A sticky dispatcher that C{workers} joined, in that order.
    """
    dispatcher = Dispatcher(STICKY, keyOf=clientOf, idOf=idOf, **kwargs)
    for worker in workers:
        assert dispatcher.join(worker) == []
    return dispatcher


def connectionsOf(workerId: int, ids, count: int = 1, after: int = 0) -> list:
    """
    The first C{count} connections (from C{after} on) whose clients rank
    C{workerId} first among C{ids}.
    """
    found = []
    connection = after
    while len(found) < count:
        if preferred(clientOf(connection), ids) == workerId:
            found.append(connection)
        connection += 1
    return found


class StickyTests(SynchronousTestCase):
    """
    Sticky dispatch: a client's connections go to the worker its address
    ranks first among the workers taking connections.
    """

    def test_needsKeyAndId(self) -> None:
        """
        A sticky dispatcher needs to know connections' clients and workers'
        ids.
        """
        self.assertRaises(ValueError, Dispatcher, STICKY)
        self.assertRaises(ValueError, Dispatcher, STICKY, keyOf=clientOf)
        self.assertRaises(ValueError, Dispatcher, STICKY, idOf=idOf)
        self.assertEqual(sticky().statistics().policy, STICKY)

    def test_aClientStaysOnItsWorker(self) -> None:
        """
        Every connection of a client goes to the worker its key ranks
        first, however many come and in whatever order.
        """
        dispatcher = sticky(0, 1, 2, 3)
        served = {}
        for connection in range(1000):
            served.setdefault(clientOf(connection), set()).add(serveOne(dispatcher, connection))
        self.assertEqual(len(served), 100)
        for key, workers in served.items():
            self.assertEqual(workers, {rank(key, range(4))[0]})
        self.assertEqual(len(set().union(*served.values())), 4)

    def test_oneBatchPerWorker(self) -> None:
        """
        What is accepted together goes out in one handoff per worker, each
        in acceptance order.
        """
        dispatcher = sticky(0, 1, 2)
        actions = dispatcher.accepted(list(range(30)))
        self.assertEqual(sorted(c for a in actions for c in a.connections), list(range(30)))
        for handoff in actions:
            self.assertEqual(list(handoff.connections), sorted(handoff.connections))
            for connection in handoff.connections:
                self.assertEqual(handoff.worker, preferred(clientOf(connection), [0, 1, 2]))
        self.assertEqual(len({a.worker for a in actions}), len(actions))

    def test_nextInRankingWhenNotTaking(self) -> None:
        """
        While a client's first worker is not taking connections (booting,
        draining), its connections go to the next in its ranking; back to
        the first once it takes connections again.
        """
        [connection] = connectionsOf(2, [0, 1, 2, 3])
        second = rank(clientOf(connection), [0, 1, 2, 3])[1]
        dispatcher = sticky(0, 1, 3)
        self.assertEqual(serveOne(dispatcher, connection), second)
        dispatcher.join(2)
        self.assertEqual(serveOne(dispatcher, connection + 100), 2)
        dispatcher.leave(2)
        self.assertEqual(serveOne(dispatcher, connection + 200), second)

    def test_refusedGoesToTheNext(self) -> None:
        """
        What a worker refuses goes to the next worker of each client's
        ranking.
        """
        dispatcher = sticky(0, 1, 2)
        connections = connectionsOf(1, [0, 1, 2], 3)
        handoff = only(dispatcher.accepted(connections))
        self.assertEqual(handoff.worker, 1)
        moved = handoffs(dispatcher.answered(handoff, 1)[1:])
        expected = {}
        for connection in connections[1:]:
            expected.setdefault(rank(clientOf(connection), [0, 1, 2])[1], []).append(connection)
        self.assertEqual(sorted(moved), sorted((w, tuple(c)) for w, c in expected.items()))

    def test_replacementTakesOver(self) -> None:
        """
        Of two workers with one id (a worker and the replacement that is
        starting while it drains), the one that joined last gets the id's
        clients; when it goes, the other has them again.
        """
        old, new = (2, "old"), (2, "new")
        dispatcher = sticky(0, 1, old)
        connections = connectionsOf(2, [0, 1, 2], 3)
        self.assertEqual(serveOne(dispatcher, connections[0]), old)
        dispatcher.join(new)
        self.assertEqual(serveOne(dispatcher, connections[1]), new)
        dispatcher.lose(new)
        self.assertEqual(serveOne(dispatcher, connections[2]), old)
        third = (2, "third")
        dispatcher.join(third)
        dispatcher.leave(old)
        self.assertEqual(serveOne(dispatcher, connections[2] + 100), third)
        self.assertEqual(dispatcher.takers(), [0, 1, third])

    def test_lostGoToTheReplacement(self) -> None:
        """
        What a worker had not answered when it died goes to the worker that
        replaces it (same id), first.
        """
        old, new = (1, "old"), (1, "new")
        dispatcher = sticky(0, old, window=1)
        first, second = connectionsOf(1, [0, 1], 2)
        only(dispatcher.accepted([first]))
        dispatcher.join(new)
        handoff = only(dispatcher.accepted([second]))
        self.assertEqual(handoff.worker, new)
        self.assertEqual(dispatcher.lose(old), [])
        self.assertEqual(dispatcher.pending, 1)
        moved = only(dispatcher.answered(handoff, 1)[1:])
        self.assertEqual((moved.worker, moved.connections), (new, (first,)))

    def test_lostGoToEachClientsNext(self) -> None:
        """
        When a worker dies, each connection it had not answered goes to the
        next worker in its own client's ranking, oldest first.
        """
        dispatcher = sticky(0, 1, 2, 3)
        connections = connectionsOf(3, [0, 1, 2, 3], 12)
        only(dispatcher.accepted(connections))
        moved = handoffs(dispatcher.lose(3))
        expected: dict = {}
        for connection in connections:
            expected.setdefault(preferred(clientOf(connection), [0, 1, 2]), []).append(connection)
        self.assertEqual(dict((w, list(c)) for w, c in moved), expected)
        self.assertGreater(len(expected), 1)

    def test_windowFullWaits(self) -> None:
        """
        When a client's worker has its window full, the client's
        connections wait for it, in order, and other workers' clients are
        not held up behind them.
        """
        dispatcher = sticky(0, 1, window=1)
        ones = connectionsOf(1, [0, 1], 3)
        zeros = connectionsOf(0, [0, 1], 2)
        first = only(dispatcher.accepted(ones[:1]))
        self.assertEqual(dispatcher.accepted(ones[1:2]), [])
        toZero = only(dispatcher.accepted([ones[2], zeros[0]]))
        self.assertEqual((toZero.worker, toZero.connections), (0, (zeros[0],)))
        self.assertEqual(dispatcher.pending, 2)
        self.assertEqual(dispatcher.answered(toZero, 1), [Release((zeros[0],), True)])
        self.assertEqual(handoffs(dispatcher.accepted([zeros[1]])), [(0, (zeros[1],))])
        actions = dispatcher.answered(first, 1)
        self.assertEqual(handoffs(actions), [(1, tuple(ones[1:]))])
        self.assertEqual(dispatcher.pending, 0)

    def test_waitingMoveWhenTheirWorkerLeaves(self) -> None:
        """
        Connections waiting for a full worker go to their next worker when
        it leaves: membership changes rank again.
        """
        dispatcher = sticky(0, 1, window=1)
        ones = connectionsOf(1, [0, 1], 3)
        only(dispatcher.accepted(ones[:1]))
        dispatcher.accepted(ones[1:])
        self.assertEqual(handoffs(dispatcher.leave(1)), [(0, tuple(ones[1:]))])

    def test_maxBatch(self) -> None:
        """
        A handoff carries at most C{maxBatch} connections; the rest wait
        for the worker's next turn.
        """
        dispatcher = sticky(0, maxBatch=2)
        first = only(dispatcher.accepted([0, 1, 2, 3, 4]))
        self.assertEqual(first.connections, (0, 1))
        self.assertEqual(handoffs(dispatcher.answered(first, 2)[1:]), [(0, (2, 3))])

    def test_nobodyTaking(self) -> None:
        """
        With no worker taking connections they wait, and go to their
        clients' workers once there are some.
        """
        dispatcher = sticky()
        self.assertEqual(dispatcher.accepted([0, 1, 2, 3]), [])
        self.assertEqual(dispatcher.pending, 4)
        self.assertEqual(handoffs(dispatcher.join(5)), [(5, (0, 1, 2, 3))])

    def test_closeReleasesInOrder(self) -> None:
        """
        Closing releases what waits in the order it would have been sent:
        connections put back in front first, then by acceptance.
        """
        dispatcher = sticky(0, window=1)
        handoff = only(dispatcher.accepted([0, 1]))
        self.assertEqual(dispatcher.accepted([2, 3]), [])
        self.assertEqual(dispatcher.answered(handoff, 1), [Release((0,), True)])
        self.assertEqual(dispatcher.takers(), [])
        self.assertEqual(dispatcher.close(), [Release((1, 2, 3), False)])
        self.assertEqual(dispatcher.pending, 0)

    def test_allowanceCountsButDoesNotLimit(self) -> None:
        """
        A worker's allowance counts what sticky dispatch sends it, but a
        worker past its limit still gets its clients.
        """
        allowance = Allowance(1)
        dispatcher = Dispatcher(STICKY, keyOf=clientOf, idOf=idOf)
        dispatcher.join(0, allowance)
        dispatcher.join(1, Allowance(100))
        connections = connectionsOf(0, [0, 1], 3)
        [handoff] = dispatcher.accepted(connections)
        self.assertEqual((handoff.worker, allowance.used), (0, 3))
        dispatcher.answered(handoff, 2)
        self.assertEqual(allowance.used, 2)

    def test_keyReadOncePerConnection(self) -> None:
        """
        A connection's client key is read once while it waits, however
        often it is ranked again.
        """
        calls = []

        def keyOf(connection):
            calls.append(connection)
            return clientOf(connection)

        dispatcher = Dispatcher(STICKY, window=1, keyOf=keyOf, idOf=idOf)
        dispatcher.join(0)
        only(dispatcher.accepted([0]))
        dispatcher.accepted([1, 2, 3])
        for worker in (1, 2, 3):
            dispatcher.join(worker)
            dispatcher.leave(worker)
        self.assertEqual(sorted(calls), [0, 1, 2, 3])


class StickyMovementTests(SynchronousTestCase):
    """
    Scaling a sticky handle moves about 1/N of the clients.
    """

    def placement(self, workers, keys) -> list:
        """
        Where each client of C{keys} goes with C{workers} taking
        connections.
        """
        dispatcher = Dispatcher(STICKY, keyOf=keys.__getitem__, idOf=idOf)
        for worker in workers:
            dispatcher.join(worker)
        placed = []
        for connection in range(len(keys)):
            placed.append(serveOne(dispatcher, connection))
        return placed

    @settings(max_examples=12, derandomize=True, deadline=None, database=None)
    @given(
        count=st.integers(min_value=2, max_value=8),
        salt=st.binary(min_size=1, max_size=4),
        removed=st.integers(min_value=0, max_value=7),
    )
    def test_aboutOneInNMove(self, count, salt, removed) -> None:
        """
        Adding a worker to N moves only clients to the new worker, about
        1/(N+1) of a thousand; removing one moves only its own clients.
        """
        keys = [salt + b"%d" % n for n in range(1000)]
        before = self.placement(range(count), keys)
        grown = self.placement(range(count + 1), keys)
        moved = [(b, a) for b, a in zip(before, grown) if b != a]
        self.assertEqual({a for _, a in moved}, {count} if moved else set())
        self.assertLess(abs(len(moved) / 1000 - 1 / (count + 1)), 0.05)
        removed %= count
        shrunk = self.placement([w for w in range(count) if w != removed], keys)
        moved = [b for b, a in zip(before, shrunk) if b != a]
        self.assertEqual(len(moved), before.count(removed))
        self.assertEqual(set(moved), {removed} if moved else set())

    def test_fourToFive(self) -> None:
        """
        From four workers to five, about a fifth of a thousand clients move.
        """
        keys = [b"10.0.%d.%d" % divmod(n, 256) for n in range(1000)]
        four, five = self.placement(range(4), keys), self.placement(range(5), keys)
        self.assertLess(abs(sum(a != b for a, b in zip(four, five)) / 1000 - 0.2), 0.04)

    def test_deterministic(self) -> None:
        """
        Two dispatchers, with their workers joined in any order, place
        every client alike.
        """
        keys = [b"%d" % n for n in range(300)]
        self.assertEqual(self.placement([0, 1, 2, 3], keys), self.placement([3, 1, 0, 2], keys))


class _StickyModel:
    """
    Drives a sticky L{Dispatcher} and keeps its own account: where every
    connection is, and which worker each should go to.
    """

    def __init__(self, testCase, window: int) -> None:
        self.t = testCase
        self.window = window
        self.dispatcher = Dispatcher(STICKY, window=window, keyOf=clientOf, idOf=idOf)
        # worker -> [taking, outstanding handoffs], in join order
        self.members: dict = {}
        self.pending: list = []
        self.inFlight: dict = {}
        self.released: dict = {}
        self.everSent: list = []
        self.accepted = 0

    def owners(self) -> dict:
        owners = {}
        for worker, (taking, _) in self.members.items():
            if taking:
                owners[idOf(worker)] = worker
        return owners

    def accept(self, count: int) -> None:
        connections = list(range(self.accepted, self.accepted + count))
        self.accepted += count
        self.pending.extend(connections)
        self._handoffs(self.dispatcher.accepted(connections))

    def answer(self, index: int, count: int) -> None:
        if not self.everSent:
            return
        handoff = self.everSent[index % len(self.everSent)]
        actions = self.dispatcher.answered(handoff, count)
        member = self.members.get(handoff.worker)
        if member is None or not any(h is handoff for h in member[1]):
            self.t.assertEqual(actions, [])
            return
        member[1].remove(handoff)
        count = max(0, min(count, len(handoff.connections)))
        taken, refused = handoff.connections[:count], handoff.connections[count:]
        for c in handoff.connections:
            del self.inFlight[c]
        if taken:
            self.t.assertEqual(actions[0], Release(taken, True))
            actions = actions[1:]
            self.released.update(dict.fromkeys(taken, True))
        if refused:
            member[0] = False
        self._forgetIfIdle(handoff.worker)
        self.pending[:0] = refused
        self._handoffs(actions)

    def join(self, worker) -> None:
        if worker in self.members:
            self.members[worker][0] = True
        else:
            self.members[worker] = [True, []]
        self._handoffs(self.dispatcher.join(worker))

    def leave(self, worker) -> None:
        actions = self.dispatcher.leave(worker)
        if worker in self.members:
            self.members[worker][0] = False
            self._forgetIfIdle(worker)
        self._handoffs(actions)

    def lose(self, worker) -> None:
        actions = self.dispatcher.lose(worker)
        if worker not in self.members:
            self.t.assertEqual(actions, [])
            return
        _, outstanding = self.members.pop(worker)
        unanswered = [c for h in outstanding for c in h.connections]
        for c in unanswered:
            del self.inFlight[c]
        self.pending[:0] = unanswered
        self._handoffs(actions)

    def _forgetIfIdle(self, worker) -> None:
        taking, outstanding = self.members[worker]
        if not taking and not outstanding:
            del self.members[worker]

    def _handoffs(self, actions: list) -> None:
        """
        Every handoff goes to the worker owning the id its connections'
        clients rank first, with room in its window, and carries the oldest
        connections waiting for that worker, in order.
        """
        owners = self.owners()
        for handoff in actions:
            self.t.assertIsInstance(handoff, Handoff)
            taking, outstanding = self.members[handoff.worker]
            self.t.assertTrue(taking)
            self.t.assertLess(len(outstanding), self.window)
            workerId = idOf(handoff.worker)
            self.t.assertIs(owners[workerId], handoff.worker)
            waiting = [c for c in self.pending if preferred(clientOf(c), owners) == workerId]
            self.t.assertEqual(list(handoff.connections), waiting[: len(handoff.connections)])
            outstanding.append(handoff)
            self.everSent.append(handoff)
            for c in handoff.connections:
                self.pending.remove(c)
                self.inFlight[c] = handoff

    def check(self) -> None:
        """
        Every connection is in one place, the dispatcher agrees, and nothing
        waits while its worker has room.
        """
        t = self.t
        places = [set(self.pending), set(self.inFlight), set(self.released)]
        t.assertEqual(sum(map(len, places)), self.accepted)
        t.assertEqual(set().union(*places), set(range(self.accepted)))
        t.assertEqual(self.dispatcher.pending, len(self.pending))
        t.assertEqual(self.dispatcher.inFlight(), len(self.inFlight))
        t.assertEqual(self.dispatcher.takers(), [w for w, (taking, _) in self.members.items() if taking])
        owners = self.owners()
        for c in self.pending:
            if owners:
                worker = owners[preferred(clientOf(c), owners)]
                t.assertEqual(len(self.members[worker][1]), self.window, f"{c} waits while {worker} has room")


_stickyWorkers = st.tuples(st.integers(min_value=0, max_value=3), st.integers(min_value=0, max_value=1))


class StickyPropertyTests(SynchronousTestCase):
    """
    Random histories of a sticky dispatcher never lose, duplicate or
    misdirect a connection.
    """

    @_settings
    @given(
        window=st.integers(min_value=1, max_value=3),
        operations=st.lists(
            st.one_of(
                st.tuples(st.just("accept"), st.integers(min_value=0, max_value=6)),
                st.tuples(st.just("answer"), st.integers(min_value=0, max_value=50), st.integers(-1, 7)),
                st.tuples(st.just("answer"), st.integers(min_value=0, max_value=50), st.integers(-1, 7)),
                st.tuples(st.just("join"), _stickyWorkers),
                st.tuples(st.just("leave"), _stickyWorkers),
                st.tuples(st.just("lose"), _stickyWorkers),
            ),
            min_size=10,
            max_size=50,
        ),
    )
    def test_everyConnectionToItsWorker(self, window, operations) -> None:
        """
        Whatever happens (workers and their replacements joining, leaving,
        dying, refusing), every connection is waiting, in flight or
        released exactly once; every handoff goes to the worker its
        clients rank first among those taking connections (the last joined
        of an id), and carries the oldest connections waiting for it; and
        nothing waits while the worker it waits for has room.
        """
        model = _StickyModel(self, window)
        for name, *args in operations:
            getattr(model, name)(*args)
            model.check()
        self.assertEqual(model.dispatcher.close(), [Release(tuple(model.pending), False)] if model.pending else [])
