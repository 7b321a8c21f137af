"""
Deterministic tests of a worker's life as the master sees it
(L{txcluster._lifecycle}): the phase of a process and how its end is
judged, and the state machine of a slot, driven input by input with a fake
host and a L{Clock}.  No process, no channel: the effects an input returns
are checked, and carried out by the test where it matters.
"""

from __future__ import annotations

import signal

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from txcluster._lifecycle import (
    ClusterStopped,
    Drain,
    Ending,
    Fire,
    Kill,
    Phase,
    ReloadFailed,
    Serve,
    Slot,
    Spawn,
    WorkerProcess,
    judge,
    seconds,
    spawnFailed,
)


class FakeHost:
    """
    A L{txcluster._lifecycle.SlotHost} on a L{Clock}; timers that fire feed
    the slot and keep the effects in C{fired}.
    """

    startTimeout = 5.0
    stableAfter = 10.0
    maxRestartDelay = 30.0

    def __init__(self) -> None:
        self.clock = Clock()
        self.fired: list = []
        self.delays = lambda quickDeaths: 0.0 if quickDeaths == 0 else 2.0**quickDeaths

    def seconds(self) -> float:
        return self.clock.seconds()

    def callLater(self, delay, f, *args):
        return self.clock.callLater(delay, f, *args)

    def restartDelay(self, quickDeaths: int) -> float:
        return self.delays(quickDeaths)

    def timerFired(self, slot, event) -> None:
        self.fired.extend(event(slot))


class SlotTestsMixin:
    def setUp(self) -> None:
        self.host = FakeHost()
        self.serial = 0
        self.slot = Slot(3, self.host, self.newProcess)
        self.logs: list = []
        globalLogPublisher.addObserver(self.logs.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs.append)

    def newProcess(self, workerId: int) -> WorkerProcess:
        self.serial += 1
        return WorkerProcess(workerId, self.serial)

    def spawned(self, effects) -> WorkerProcess:
        """
        The process of the one L{Spawn} in C{effects}, "spawned" now.
        """
        (spawn,) = [e for e in effects if isinstance(e, Spawn)]
        spawn.process.forkedAt = self.host.seconds()
        spawn.process.pid = 1000 + spawn.process.serial
        return spawn.process

    def ready(self, process: WorkerProcess) -> list:
        process.phase = Phase.READY
        process.readyAt = self.host.seconds()
        return self.slot.processReady(process)

    def end(self, process: WorkerProcess, exitCode=0, signal=None) -> list:
        process.ending = judge(process, exitCode, signal)
        process.phase = Phase.DEAD
        return self.slot.processLost(process)

    def serving(self) -> WorkerProcess:
        process = self.spawned(self.slot.start())
        self.ready(process)
        return process

    def messages(self, level=None) -> list:
        return [formatEvent(e) for e in self.logs if level is None or e.get("log_level") == level]


class BootTests(SlotTestsMixin, SynchronousTestCase):
    def test_startSpawns(self) -> None:
        """
        A new slot is idle; starting it asks for one process to be spawned
        and gives it C{startTimeout} to be ready.
        """
        self.assertEqual(self.slot.view().state, "idle")
        effects = self.slot.start()
        process = self.spawned(effects)
        self.assertEqual([type(e) for e in effects], [Spawn])
        self.assertEqual(process.workerId, 3)
        view = self.slot.view()
        self.assertEqual((view.state, view.current, view.booting), ("booting", process, process))
        self.assertEqual([c.getTime() for c in self.host.clock.getDelayedCalls()], [5.0])

    def test_readyServes(self) -> None:
        """
        The booting process's readiness makes it the slot's ready process:
        the effects say so and fire whoever waited for the slot to be ready.
        """
        process = self.spawned(self.slot.start())
        waiting = self.slot.whenReady()
        effects = self.ready(process)
        self.assertEqual([type(e) for e in effects], [Serve, Fire])
        self.assertIs(effects[0].process, process)
        self.assertEqual(effects[1].waiters, (waiting,))
        self.assertEqual(self.slot.view().state, "serving")
        self.assertEqual(self.host.clock.getDelayedCalls(), [])
        self.successResultOf(self.slot.whenReady())

    def test_readinessOfAnotherProcessIsIgnored(self) -> None:
        """
        A process that is not the slot's booting one becoming ready changes
        nothing.
        """
        self.spawned(self.slot.start())
        stranger = WorkerProcess(3, 99)
        self.assertEqual(self.slot.processReady(stranger), [])
        self.assertEqual(self.slot.view().state, "booting")

    def test_bootTimeout(self) -> None:
        """
        A process not ready within C{startTimeout} is killed, with how it
        failed in the words of the log ("was not ready within 5 s").
        """
        process = self.spawned(self.slot.start())
        self.host.clock.advance(5)
        self.assertEqual([type(e) for e in self.host.fired], [Kill])
        self.assertIs(self.host.fired[0].process, process)
        self.assertEqual(self.host.fired[0].how, "was not ready within 5 s")
        self.assertEqual(self.slot.view().state, "booting")

    def test_bootLossBacksOff(self) -> None:
        """
        A process lost before it was ready is a quick loss: the slot waits
        the backoff delay, then spawns afresh.
        """
        process = self.spawned(self.slot.start())
        self.assertEqual(self.end(process, 3), [])
        self.assertEqual(self.slot.view().state, "respawning")
        self.assertEqual(self.slot.core.quickDeaths, 1)
        self.host.clock.advance(1.99)
        self.assertEqual(self.host.fired, [])
        self.host.clock.advance(0.02)
        fresh = self.spawned(self.host.fired)
        self.assertIsNot(fresh, process)
        self.assertEqual(self.slot.view().current, fresh)
        self.assertEqual(self.slot.core.restarts, 1)

    def test_spawnFailureWaitsTheLongestBackoff(self) -> None:
        """
        A process that could not be spawned is retried after
        C{maxRestartDelay}, without counting as a quick death.
        """
        (spawn,) = self.slot.start()
        spawn.process.ending = spawnFailed("EAGAIN")
        spawn.process.phase = Phase.DEAD
        self.slot.processLost(spawn.process)
        self.assertEqual(self.slot.core.quickDeaths, 0)
        self.assertEqual([c.getTime() for c in self.host.clock.getDelayedCalls()], [30.0])


class ServingTests(SlotTestsMixin, SynchronousTestCase):
    def test_stableLossRespawnsAtOnce(self) -> None:
        """
        A process that had been up for C{stableAfter} and is lost is
        replaced at once, and the backoff starts over.
        """
        process = self.serving()
        self.host.clock.advance(10)
        effects = self.end(process, 1)
        fresh = self.spawned(effects)
        self.assertEqual(self.slot.view().state, "booting")
        self.assertIs(self.slot.view().current, fresh)
        self.assertEqual(self.slot.core.quickDeaths, 0)

    def test_quickLossBacksOff(self) -> None:
        """
        A ready process lost sooner than C{stableAfter} backs off.
        """
        process = self.serving()
        self.host.clock.advance(9)
        self.assertEqual(self.end(process, 1), [])
        self.assertEqual(self.slot.view().state, "respawning")

    def test_leavingOnItsOwnIsALoss(self) -> None:
        """
        A process leaving on its own (still running) is let go as if it had
        ended: the slot boots another one.
        """
        process = self.serving()
        self.host.clock.advance(10)
        process.phase = Phase.LEAVING
        fresh = self.spawned(self.slot.processLost(process))
        self.assertIsNot(fresh, process)
        self.assertEqual(self.slot.view().processes, (fresh,))
        self.assertEqual(self.slot.processLost(process), [])


class ReplaceTests(SlotTestsMixin, SynchronousTestCase):
    def test_replacementGatedOnReadiness(self) -> None:
        """
        A replacement boots beside the ready process; once it is ready it
        serves, the old one is drained ("replaced") and the caller's
        Deferred fires, in that order.
        """
        old = self.serving()
        done = defer.Deferred()
        new = self.spawned(self.slot.replace("reload", done))
        view = self.slot.view()
        self.assertEqual((view.state, view.current, view.successor), ("replacing", old, new))
        self.assertNoResult(done)
        effects = self.ready(new)
        self.assertEqual([type(e) for e in effects], [Serve, Drain, Fire, Fire])
        self.assertIs(effects[0].process, new)
        self.assertEqual((effects[1].process, effects[1].reason), (old, "replaced"))
        self.assertEqual(effects[2].waiters, (done,))
        self.assertEqual(self.slot.view().processes, (new,))

    def test_failedReplacementKeepsTheOld(self) -> None:
        """
        A replacement lost before it was ready leaves the old process
        serving, and the caller's Deferred fails with L{ReloadFailed} saying
        how the replacement failed.
        """
        old = self.serving()
        done = defer.Deferred()
        new = self.spawned(self.slot.replace("reload", done))
        (fire,) = self.end(new, 3)
        self.assertEqual(self.slot.view().processes, (old,))
        self.assertEqual(self.slot.view().state, "serving")
        self.assertIsInstance(fire.result, Failure)
        fire.result.trap(ReloadFailed)
        self.assertEqual(str(fire.result.value), f"replacement worker 3 (pid {new.pid}) died with exit code 3")

    def test_replacementTimesOut(self) -> None:
        """
        The replacement has C{startTimeout} to be ready; then it is killed.
        """
        self.serving()
        new = self.spawned(self.slot.replace("reload", defer.Deferred()))
        self.host.clock.advance(5)
        self.assertEqual([(type(e), e.process) for e in self.host.fired], [(Kill, new)])

    def test_oldLostDuringReplacement(self) -> None:
        """
        When the process being replaced is lost, its replacement boots on as
        the slot's own process (with what is left of its start timeout) and
        the caller is done: nothing is left to replace.
        """
        old = self.serving()
        done = defer.Deferred()
        new = self.spawned(self.slot.replace("reload", done))
        self.host.clock.advance(2)
        (fire,) = self.end(old, 1)
        self.assertEqual(fire.waiters, (done,))
        self.assertIsNone(fire.result)
        self.assertEqual(self.slot.view().state, "booting")
        self.assertIs(self.slot.view().current, new)
        self.assertEqual([c.getTime() for c in self.host.clock.getDelayedCalls()], [5.0])

    def test_secondReplaceJoins(self) -> None:
        """
        A replace asked for while one is under way waits for the same
        replacement; nothing more is spawned.
        """
        self.serving()
        first, second = defer.Deferred(), defer.Deferred()
        new = self.spawned(self.slot.replace("reload", first))
        self.assertEqual(self.slot.replace("recycle", second), [])
        effects = self.ready(new)
        self.assertEqual([e.waiters for e in effects if isinstance(e, Fire)][0], (first, second))

    def test_nothingToReplace(self) -> None:
        """
        Replacing a slot that has no ready process fails at once (as an
        effect, fired by the caller) with L{ReloadFailed}.
        """
        self.spawned(self.slot.start())
        done = defer.Deferred()
        (fire,) = self.slot.replace("reload", done)
        self.assertEqual(fire.waiters, (done,))
        fire.result.trap(ReloadFailed)
        self.assertEqual(self.slot.view().state, "booting")

    def test_effectsMayFeedTheSlotAgain(self) -> None:
        """
        Whoever an effect wakes may feed the slot again at once: the input
        that returned the effects is over (an observer of a ready worker may
        reload).
        """
        self.serving()
        done = defer.Deferred()
        new = self.spawned(self.slot.replace("reload", done))
        again = defer.Deferred()
        done.addCallback(lambda _: self.slot.replace("reload", again))
        for effect in self.ready(new):
            if isinstance(effect, Fire):
                for d in effect.waiters:
                    d.callback(None)
        self.assertEqual(self.slot.view().state, "replacing")
        self.assertIs(self.slot.view().current, new)


class LeaveTests(SlotTestsMixin, SynchronousTestCase):
    def test_retireEachState(self) -> None:
        """
        Scaling a slot away drains whatever it holds ("scale"), cancels its
        timers, and fails those waiting for it to be ready.
        """
        # Booting.
        process = self.spawned(self.slot.start())
        waiting = self.slot.whenReady()
        effects = self.slot.retire()
        self.assertEqual([(type(e), getattr(e, "process", None)) for e in effects], [(Drain, process), (Fire, None)])
        self.assertEqual(effects[0].reason, "scale")
        effects[1].result.trap(ClusterStopped)
        self.assertEqual(effects[1].waiters, (waiting,))
        self.assertEqual(self.slot.view().state, "retired")
        self.assertEqual(self.host.clock.getDelayedCalls(), [])

    def test_retireReplacing(self) -> None:
        """
        A slot scaled away while replacing drains both processes; whoever
        waited for the replacement is done with it.
        """
        old = self.serving()
        done = defer.Deferred()
        new = self.spawned(self.slot.replace("reload", done))
        effects = self.slot.retire()
        self.assertEqual([e.process for e in effects if isinstance(e, Drain)], [new, old])
        self.assertEqual([(e.waiters, e.result) for e in effects if isinstance(e, Fire)], [((done,), None)])

    def test_retireRespawning(self) -> None:
        """
        A slot waiting to respawn is scaled away without spawning.
        """
        self.end(self.spawned(self.slot.start()), 1)
        self.slot.retire()
        self.assertEqual(self.host.clock.getDelayedCalls(), [])
        self.host.clock.advance(100)
        self.assertEqual(self.host.fired, [])

    def test_stopDrainsEverything(self) -> None:
        """
        A stop drains every process the slot holds ("stop"), and fails
        every waiter with L{ClusterStopped}.
        """
        old = self.serving()
        done = defer.Deferred()
        new = self.spawned(self.slot.replace("reload", done))
        effects = self.slot.stop()
        self.assertEqual(
            [(e.process, e.reason) for e in effects if isinstance(e, Drain)],
            [(new, "stop"), (old, "stop")],
        )
        for fire in [e for e in effects if isinstance(e, Fire)]:
            fire.result.trap(ClusterStopped)
        self.assertEqual(self.slot.view().state, "stopped")
        self.assertEqual(self.slot.view().processes, ())

    def test_stoppedSlotLetsGoOfItsProcesses(self) -> None:
        """
        After a stop, the end of a process the slot held is not the slot's
        business any more.
        """
        old = self.serving()
        self.slot.stop()
        self.assertEqual(self.end(old, 0), [])
        self.assertEqual(self.slot.view().state, "stopped")
        self.failureResultOf(self.slot.whenReady(), ClusterStopped)


class BugTests(SlotTestsMixin, SynchronousTestCase):
    def test_inputWithoutTransitionIsLoggedAsABug(self) -> None:
        """
        An input the current state has no transition for is a bug of the
        master: it is logged at critical level, naming the input and the
        state, and changes nothing.
        """
        self.assertEqual(self.slot.bootTimedOut(), [])
        self.assertEqual(self.slot.view().state, "idle")
        (line,) = self.messages(LogLevel.critical)
        self.assertEqual(line, "bug: worker 3's slot got bootTimedOut while idle; ignored")

    def test_machineRefusesReentrantInputs(self) -> None:
        """
        Inputs return effects instead of doing things, and Automat refuses
        an input that returns a value while another input runs: nothing in
        an output may feed the machine.
        """
        self.serving()
        machine = self.slot._machine
        callLater = self.host.callLater

        def reentering(*args):
            machine.view()
            return callLater(*args)

        # Entering the replacing state sets its boot deadline in an output.
        self.host.callLater = reentering
        self.assertRaises(RuntimeError, self.slot.replace, "reload", defer.Deferred())


class JudgeTests(SynchronousTestCase):
    """
    L{judge}: which ends count as failures.
    """

    def process(self, phase: Phase, ready: bool = True, why=None) -> WorkerProcess:
        process = WorkerProcess(1, 1, phase=phase, why=why)
        process.readyAt = 1.0 if ready else None
        return process

    def test_crashes(self) -> None:
        """
        A non-zero exit, a signal other than a stop signal, and an exit 0
        before the worker was ready are failures.
        """
        self.assertEqual(judge(self.process(Phase.READY), 3, None).failure, "died with exit code 3")
        self.assertEqual(judge(self.process(Phase.READY), None, signal.SIGKILL).failure, "was killed by SIGKILL")
        self.assertEqual(judge(self.process(Phase.READY), None, signal.SIGSEGV).failure, "was killed by SIGSEGV")
        self.assertEqual(
            judge(self.process(Phase.ONLINE, ready=False), 0, None).failure,
            "exited (exit code 0) before it was ready",
        )

    def test_whatTheMasterKilledItFor(self) -> None:
        """
        A process the master was killing ends with how it failed.
        """
        ending = judge(self.process(Phase.FAILING, why="was not ready within 5 s"), None, signal.SIGKILL)
        self.assertEqual(ending, Ending(None, signal.SIGKILL, "killed by SIGKILL", "was not ready within 5 s"))

    def test_notFailures(self) -> None:
        """
        A process that was asked to leave, left on its own, was sent a stop
        signal, or exited 0 after it was ready did not fail.
        """
        cases = [
            (self.process(Phase.DRAINING, why="stop"), 0, None, "stop"),
            (self.process(Phase.DRAINING, why="replaced"), None, signal.SIGKILL, "replaced"),
            (self.process(Phase.LEAVING, why="SIGTERM"), 0, None, "SIGTERM"),
            (self.process(Phase.ONLINE, ready=False), None, signal.SIGTERM, "SIGTERM"),
            (self.process(Phase.READY), None, signal.SIGINT, "SIGINT"),
            (self.process(Phase.READY), 0, None, None),
        ]
        for process, exitCode, signum, why in cases:
            ending = judge(process, exitCode, signum)
            self.assertIsNone(ending.failure, (process, exitCode, signum))
            self.assertEqual(ending.why, why)


class PhaseTests(SynchronousTestCase):
    def test_advance(self) -> None:
        """
        A process moves along its phases, keeping why it leaves.
        """
        process = WorkerProcess(1, 1)
        self.assertTrue(process.advance(Phase.ONLINE))
        self.assertTrue(process.advance(Phase.READY))
        self.assertTrue(process.advance(Phase.DRAINING, "stop"))
        self.assertEqual((process.phase, process.why, process.leaving), (Phase.DRAINING, "stop", True))

    def test_noWayBack(self) -> None:
        """
        A move its phase does not allow is logged as a bug and not made.
        """
        logs: list = []
        globalLogPublisher.addObserver(logs.append)
        self.addCleanup(globalLogPublisher.removeObserver, logs.append)
        process = WorkerProcess(1, 1, phase=Phase.DRAINING)
        self.assertFalse(process.advance(Phase.READY))
        self.assertEqual(process.phase, Phase.DRAINING)
        (event,) = [e for e in logs if e.get("log_level") == LogLevel.critical]
        self.assertEqual(formatEvent(event), "bug: worker 1 (pid None) cannot go from draining to ready")


class SecondsTests(SynchronousTestCase):
    def test_rounded(self) -> None:
        """
        Durations in log lines are rounded to what a person reads.
        """
        self.assertEqual(seconds(30.0), "30 s")
        self.assertEqual(seconds(29.99987506866455), "30 s")
        self.assertEqual(seconds(12.4), "12 s")
        self.assertEqual(seconds(2.5), "2.5 s")
        self.assertEqual(seconds(2.04), "2 s")
        self.assertEqual(seconds(0.25), "0.25 s")
        self.assertEqual(seconds(0.5123), "0.51 s")
        self.assertEqual(seconds(0), "0 s")


class DocumentedTableTests(SynchronousTestCase):
    def test_docsListEveryTransition(self) -> None:
        """
        The transition table of C{docs/lifecycle.md} is the machine's: the
        same (state, input, next state) rows, no more, no fewer.
        """
        import os
        import re

        from txcluster._lifecycle import _SlotMachine

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(here, "docs", "lifecycle.md"), encoding="utf-8") as f:
            text = f.read()
        table = text.split("## Every transition", 1)[1]
        documented = set(re.findall(r"^\| `(\w+)` \| `(\w+)` \| `(\w+)` \|", table, re.M))
        # The automaton is Automat's; there is no public way to list it.
        automaton = getattr(_SlotMachine, "__automat_automaton__", None)
        self.assertIsNotNone(
            automaton, "Automat no longer keeps a TypeMachine's automaton as __automat_automaton__: this test must follow"
        )
        machine = {
            (old.name, name, new.name) for old, name, new, outputs in automaton.allTransitions() if name != "view"
        }
        self.assertEqual(documented - machine, set(), "documented, not in the machine")
        self.assertEqual(machine - documented, set(), "in the machine, not documented")
