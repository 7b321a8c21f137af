# -*- test-case-name: tests.test_lifecycle -*-
"""
A worker's life as the master sees it.

Two things live here, and everything that decides them:

  - the I{phase} of one worker process (L{Phase}), kept on its
    L{WorkerProcess} record, and how its end is judged (L{judge}): a
    failure that counts towards C{--max-restarts}, or not;
  - the state machine of one I{slot} (a worker id, 1..N): which process
    serves it, which one boots to replace it, when it respawns.  It is an
    Automat C{TypeMachineBuilder} machine whose states carry their own data;
    L{Slot} wraps it and routes each event about a process to the input
    that process's role in the slot calls for.

The machine never does anything itself.  Each input returns a list of
effects (L{Spawn}, L{Serve}, L{Drain}, L{Kill}, L{Fire}) that the caller
carries out once the input has returned, so that an observer of what an
effect causes (an event, a Deferred's callback) may feed the slot again.
Only timers are set and cancelled inside the machine: that never calls
back synchronously.

An input with no transition in the current state is a bug in the master;
L{Slot} logs it at critical level and does nothing.
"""

from __future__ import annotations

import enum
import signal as signalModule
from typing import Any, Callable, Optional, Protocol, Union

from attrs import field, frozen, mutable
from automat import NoTransition, TypeMachineBuilder
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from txcluster._commands import describeWorkerId
from txcluster._scheduler import Allowance

_log = Logger(namespace="txcluster.master")


class ReloadFailed(Exception):
    """
    A replacement worker did not become ready; the reload stopped there and
    the old worker keeps serving.
    """


class UnknownWorker(KeyError):
    """
    No running worker has that id.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "no such worker"


class ClusterStopped(Exception):
    """
    The cluster stopped (or gave up) before the operation finished.
    """


def seconds(value: float) -> str:
    """
    A duration for a log line: C{"30 s"}, C{"2.5 s"}, C{"0.25 s"}.
    """
    if value >= 10 or value == int(value):
        return f"{value:.0f} s"
    if value >= 1:
        return f"{value:.1f} s".replace(".0 s", " s")
    return f"{value:.2g} s"


# One worker process ------------------------------------------------------------


class Phase(enum.Enum):
    """
    Where one worker process is in its life.
    """

    #: Spawned; its channel has not said L{Online} yet.
    STARTING = "starting"
    #: Its channel works; it is loading and starting the application.
    ONLINE = "online"
    #: Its application started and its listens are established.
    READY = "ready"
    #: The master asked it to leave (stop, reload, scale, recycling).
    DRAINING = "draining"
    #: It is leaving on its own (SIGTERM, C{disconnect()}, ...).
    LEAVING = "leaving"
    #: The master is killing it: it failed (boot timeout, heartbeat,
    #: misbehaviour).
    FAILING = "failing"
    #: It ended.
    DEAD = "dead"


#: Each phase, and those it may move to.
_NEXT = {
    Phase.STARTING: {Phase.ONLINE, Phase.READY, Phase.DRAINING, Phase.LEAVING, Phase.FAILING, Phase.DEAD},
    Phase.ONLINE: {Phase.READY, Phase.DRAINING, Phase.LEAVING, Phase.FAILING, Phase.DEAD},
    Phase.READY: {Phase.DRAINING, Phase.LEAVING, Phase.FAILING, Phase.DEAD},
    Phase.DRAINING: {Phase.DEAD},
    Phase.LEAVING: {Phase.DEAD},
    Phase.FAILING: {Phase.DEAD},
    Phase.DEAD: set(),
}

#: The phases of a process that may take connections.
SERVING_PHASES = frozenset({Phase.STARTING, Phase.ONLINE, Phase.READY})


@frozen
class Ending:
    """
    How a worker process ended, as judged by L{judge}.

    @ivar description: C{"exit code 0"}, C{"killed by SIGKILL"}.
    @ivar failure: how it failed, worded to follow "which" (C{"died with
        exit code 3"}, C{"was not ready within 30 s"}); L{None} when the end
        is not a failure.
    @ivar why: why it was leaving, when it was (C{"stop"}, C{"SIGTERM"}).
    @ivar spawned: L{False} for a process the spawner could not start.
    """

    exitCode: Optional[int]
    signal: Optional[int]
    description: str
    failure: Optional[str]
    why: Optional[str] = None
    spawned: bool = True


@mutable(eq=False)
class WorkerProcess:
    """
    One worker process: its phase and what the master knows of it.

    @ivar serial: counts processes in spawn order: one spawned after a
        reload was asked for has a higher serial than any before.
    @ivar why: in L{Phase.DRAINING} and L{Phase.LEAVING}, why it leaves; in
        L{Phase.FAILING}, how it failed.
    @ivar allowance: the connections it may take (C{--max-requests}).
    @ivar connections: how many connections it said it has open (in its
        last L{NewConn} answer, load report or heartbeat), if it did.
    @ivar exited: fires with the L{Ending} once the process is gone.
    """

    workerId: int
    serial: int
    allowance: Allowance = field(factory=Allowance)
    phase: Phase = Phase.STARTING
    why: Optional[str] = None
    pid: Optional[int] = None
    forkedAt: Optional[float] = None
    readyAt: Optional[float] = None
    handed: int = 0
    connections: Optional[int] = None
    transport: Any = None
    channel: Any = None
    output: Any = None
    ending: Optional[Ending] = None
    exited: defer.Deferred = field(factory=defer.Deferred)

    def advance(self, phase: Phase, why: Optional[str] = None) -> bool:
        """
        Move to C{phase}, if this phase may; log a bug otherwise.

        @return: whether it moved.
        """
        if phase not in _NEXT[self.phase]:
            if phase is not self.phase:
                _log.critical(
                    "bug: worker {workerId} (pid {pid}) cannot go from {old} to {new}",
                    workerId=self.workerId,
                    pid=self.pid,
                    old=self.phase.value,
                    new=phase.value,
                )
            return False
        self.phase = phase
        if why is not None:
            self.why = why
        return True

    @property
    def leaving(self) -> bool:
        """
        Whether it was asked to leave, or is leaving on its own.
        """
        return self.phase in (Phase.DRAINING, Phase.LEAVING)

    def describe(self) -> str:
        return f"{describeWorkerId(self.workerId)} (pid {self.pid})"

    def __repr__(self) -> str:
        return f"<worker {self.workerId} pid {self.pid} {self.phase.value}>"


def describeExit(exitCode: Optional[int], signal: Optional[int]) -> str:
    """
    C{"exit code N"} or C{"killed by SIGNAME"}.
    """
    if signal is not None:
        try:
            name = signalModule.Signals(signal).name
        except ValueError:
            name = str(signal)
        return f"killed by {name}"
    return f"exit code {exitCode}"


#: Signals sent to stop a worker: an end by one of them is not a crash.
STOP_SIGNALS = frozenset({signalModule.SIGTERM, signalModule.SIGINT})


def judge(process: WorkerProcess, exitCode: Optional[int], signal: Optional[int]) -> Ending:
    """
    How C{process} ended, and whether that is a failure (it counts towards
    C{--max-restarts}).  It is not when the worker was leaving (asked by
    the master, or on its own), when a stop signal ended it (an operator's
    C{SIGTERM}), or when it exited 0 after it was ready.  A non-zero exit,
    any other signal, an exit before it was ready, and whatever the master
    killed it for (boot timeout, heartbeat, misbehaviour) are.
    """
    description = describeExit(exitCode, signal)
    if process.phase is Phase.FAILING:
        return Ending(exitCode, signal, description, process.why)
    if process.leaving:
        return Ending(exitCode, signal, description, None, process.why)
    if signal in STOP_SIGNALS:
        return Ending(exitCode, signal, description, None, signalModule.Signals(signal).name)
    if signal is not None:
        return Ending(exitCode, signal, description, f"was {description}")
    if exitCode == 0 and process.readyAt is not None:
        return Ending(exitCode, signal, description, None)
    if exitCode == 0:
        return Ending(exitCode, signal, description, "exited (exit code 0) before it was ready")
    return Ending(exitCode, signal, description, f"died with exit code {exitCode}")


# Effects: what a slot's input asks its caller to do --------------------------


@frozen(eq=False)
class Spawn:
    """
    Start C{process}.  If that fails, tell the slot it is lost.
    """

    process: WorkerProcess


@frozen(eq=False)
class Serve:
    """
    C{process} is now the ready process of its slot.
    """

    process: WorkerProcess


@frozen(eq=False)
class Drain:
    """
    Ask C{process} to leave gracefully, for C{reason}; kill it after
    C{timeout} seconds (the graceful timeout by default).
    """

    process: WorkerProcess
    reason: str
    timeout: Optional[float] = None


@frozen(eq=False)
class Kill:
    """
    C{process} failed (C{how}, worded to follow "which"): kill it.
    """

    process: WorkerProcess
    how: str


@frozen(eq=False)
class Fire:
    """
    Fire each of C{waiters} with C{result} (a L{Failure}: errback).
    """

    waiters: tuple
    result: Any = None


Effect = Union[Spawn, Serve, Drain, Kill, Fire]
Effects = list


@frozen
class SlotView:
    """
    What a slot holds: a read-only view of its state.

    @ivar state: the state's name.
    @ivar current: the process that serves (or boots to serve) the slot.
    @ivar successor: the process booting to replace C{current}.
    """

    state: str
    current: Optional[WorkerProcess] = None
    successor: Optional[WorkerProcess] = None

    @property
    def booting(self) -> Optional[WorkerProcess]:
        """
        The slot's process that is not ready yet, if any.
        """
        if self.successor is not None:
            return self.successor
        return self.current if self.state == "booting" else None

    @property
    def processes(self) -> tuple:
        return tuple(p for p in (self.current, self.successor) if p is not None)


class SlotHost(Protocol):
    """
    What a slot needs from the supervisor that runs it.
    """

    startTimeout: float
    stableAfter: float
    maxRestartDelay: float

    def seconds(self) -> float:
        """
        The time now.
        """

    def callLater(self, delay: float, f: Callable, *args: Any) -> Any:
        """
        Call C{f(*args)} after C{delay} seconds; return the delayed call.
        """

    def restartDelay(self, quickDeaths: int) -> float:
        """
        How long to wait before respawning after C{quickDeaths} quick deaths
        in a row.
        """

    def timerFired(self, slot: "Slot", event: Callable[["Slot"], Effects]) -> None:
        """
        One of C{slot}'s timers fired: call C{event(slot)} and carry out
        its effects.
        """


@mutable(eq=False)
class SlotCore:
    """
    What a slot keeps whatever its state.

    @ivar quickDeaths: how many times in a row its process was lost soon
        after it started.
    @ivar restarts: how many times it respawned.
    @ivar readyWaiters: Deferreds waiting for it to have a ready process.
    """

    workerId: int
    host: SlotHost
    slot: Optional["Slot"] = None
    quickDeaths: int = 0
    restarts: int = 0
    readyWaiters: list = field(factory=list)

    def bootDeadline(self, process: WorkerProcess):
        """
        The timer that gives up on C{process} becoming ready.
        """
        limit = self.host.startTimeout
        if limit <= 0:
            return None
        if process.forkedAt is None:
            remaining = limit
        else:
            remaining = max(0.0, process.forkedAt + limit - self.host.seconds())
        return self.host.callLater(remaining, self.host.timerFired, self.slot, Slot.bootTimedOut)

    def lossDelay(self, lost: WorkerProcess) -> float:
        """
        How long to wait before respawning after the slot lost C{lost}.

        A process lost soon after it started (before it was ready, or
        within C{stableAfter}) is a quick loss; quick losses in a row back
        off: a failure by C{restartDelay(n)} for the n-th in a row, an end
        that is not a failure (it was stopped, or left on its own) one step
        later, so that an operator's first C{SIGTERM} is replaced at once
        but an application that stops itself right after it starts does
        not loop.  A process that had been up for C{stableAfter} is
        replaced at once, and one that could not be spawned after the
        longest backoff.  Counts the restart and logs what it decided.
        """
        self.restarts += 1
        now = self.host.seconds()
        if lost.ending is not None and not lost.ending.spawned:
            delay = self.host.maxRestartDelay
            _log.warn(
                "{who} could not be spawned: trying again in {delay}",
                who=self.describe(),
                workerId=self.workerId,
                delay=seconds(delay),
            )
            return delay
        quick = lost.readyAt is None or lost.forkedAt is None or now - lost.forkedAt < self.host.stableAfter
        self.quickDeaths = self.quickDeaths + 1 if quick else 0
        failed = lost.ending.failure is not None if lost.ending is not None else lost.phase is Phase.FAILING
        steps = self.quickDeaths if failed else self.quickDeaths - 1
        delay = max(0.0, self.host.restartDelay(steps)) if steps > 0 else 0.0
        if delay <= 0:
            _log.info("respawning {who}", who=self.describe(), workerId=self.workerId)
        else:
            verb = "failed" if failed else "ended"
            _log.warn(
                "{who} {ended} soon after starting: backing off for {delay}",
                who=self.describe(),
                workerId=self.workerId,
                ended=verb if self.quickDeaths == 1 else f"{verb} {self.quickDeaths} times in a row",
                delay=seconds(delay),
            )
        return delay

    def describe(self) -> str:
        """
        The slot's worker id for a log line (id 0 is the agent's).
        """
        return describeWorkerId(self.workerId)

    def respawnTimer(self, delay: float):
        """
        The timer that respawns the slot after C{delay} seconds.
        """
        return self.host.callLater(delay, self.host.timerFired, self.slot, Slot.respawnDue)

    def takeReadyWaiters(self) -> tuple:
        waiters, self.readyWaiters = tuple(self.readyWaiters), []
        return waiters


def spawnFailed(why: str) -> Ending:
    """
    The L{Ending} of a process the spawner could not start (C{why}): not a
    failure of the application, retried after the longest backoff.
    """
    return Ending(None, None, f"could not be spawned: {why}", None, spawned=False)


# The slot machine ---------------------------------------------------------------


class _Inputs(Protocol):
    """
    The inputs of a slot's machine, each about the process its role names.
    """

    def view(self) -> SlotView:
        "What the slot holds."

    def start(self, process: WorkerProcess) -> Effects:
        "Start the slot with C{process}."

    def respawn(self, process: WorkerProcess) -> Effects:
        "The backoff is over: boot C{process}."

    def booted(self, process: WorkerProcess) -> Effects:
        "The booting process C{process} is ready."

    def bootTimedOut(self) -> Effects:
        "The booting process did not become ready in time."

    def lost(self, delay: float) -> Effects:
        "The current process ended or is leaving on its own: respawn after C{delay}."

    def respawnNow(self, process: WorkerProcess) -> Effects:
        "The ready process ended or is leaving on its own: boot C{process} at once."

    def predecessorGone(self, process: WorkerProcess) -> Effects:
        "The process being replaced is gone; its successor C{process} boots on."

    def successorFailed(self, process: WorkerProcess) -> Effects:
        "The successor is lost before it was ready; C{process} serves on."

    def replace(self, old: WorkerProcess, new: WorkerProcess, reason: str, done: defer.Deferred) -> Effects:
        "Boot C{new} to replace C{old}; C{done} fires when that is settled."

    def retire(self) -> Effects:
        "The slot is scaled away."

    def stop(self) -> Effects:
        "The cluster stops; its processes are to be drained."


@frozen(eq=False)
class _Booting:
    process: WorkerProcess
    deadline: Any


@frozen(eq=False)
class _Serving:
    process: WorkerProcess


@frozen(eq=False)
class _Replacing:
    old: WorkerProcess
    new: WorkerProcess
    deadline: Any
    reason: str
    waiters: list


@frozen(eq=False)
class _Respawning:
    call: Any


def _howLost(process: WorkerProcess) -> str:
    """
    How a process a slot was waiting for got lost, worded to follow its
    name: C{"died with exit code 3"}, C{"could not be spawned: ..."}.
    """
    ending = process.ending
    if ending is None:
        return f"left before it was ready ({process.why or 'no reason given'})"
    if ending.failure is not None:
        tail = getattr(process.output, "stderrTail", None)
        if tail:
            # What it said last is most often why (an ImportError).
            return f"{ending.failure}; its last error line: {tail[-1].strip()[:200]}"
        return ending.failure
    if not ending.spawned:
        return ending.description
    return f"ended before it was ready ({ending.description}{', ' + ending.why if ending.why else ''})"


def _cancel(call) -> None:
    if call is not None and call.active():
        call.cancel()


def _stopped(why: str) -> Failure:
    return Failure(ClusterStopped(why))


def _buildMachine():
    machine = TypeMachineBuilder(_Inputs, SlotCore)

    idle = machine.state("idle")
    booting = machine.state(
        "booting", lambda m, core, process: _Booting(process, core.bootDeadline(process))
    )
    serving = machine.state("serving", lambda m, core, process: _Serving(process))
    replacing = machine.state(
        "replacing",
        lambda m, core, old, new, reason, done: _Replacing(old, new, core.bootDeadline(new), reason, [done]),
    )
    respawning = machine.state("respawning", lambda m, core, delay: _Respawning(core.respawnTimer(delay)))
    retired = machine.state("retired")
    stopped = machine.state("stopped")

    # Views.

    @idle.upon(_Inputs.view).loop()
    def _idleView(m, core) -> SlotView:
        return SlotView("idle")

    @booting.upon(_Inputs.view).loop()
    def _bootingView(m, core, s: _Booting) -> SlotView:
        return SlotView("booting", s.process)

    @serving.upon(_Inputs.view).loop()
    def _servingView(m, core, s: _Serving) -> SlotView:
        return SlotView("serving", s.process)

    @replacing.upon(_Inputs.view).loop()
    def _replacingView(m, core, s: _Replacing) -> SlotView:
        return SlotView("replacing", s.old, s.new)

    @respawning.upon(_Inputs.view).loop()
    def _respawningView(m, core, s: _Respawning) -> SlotView:
        return SlotView("respawning")

    @retired.upon(_Inputs.view).loop()
    def _retiredView(m, core) -> SlotView:
        return SlotView("retired")

    @stopped.upon(_Inputs.view).loop()
    def _stoppedView(m, core) -> SlotView:
        return SlotView("stopped")

    # Booting.

    @idle.upon(_Inputs.start).to(booting)
    def _start(m, core, process) -> Effects:
        return [Spawn(process)]

    @respawning.upon(_Inputs.respawn).to(booting)
    def _respawn(m, core, s: _Respawning, process) -> Effects:
        return [Spawn(process)]

    @booting.upon(_Inputs.booted).to(serving)
    def _booted(m, core, s: _Booting, process) -> Effects:
        _cancel(s.deadline)
        return [Serve(process), Fire(core.takeReadyWaiters())]

    @booting.upon(_Inputs.bootTimedOut).loop()
    def _bootTimedOut(m, core, s: _Booting) -> Effects:
        return [Kill(s.process, f"was not ready within {seconds(core.host.startTimeout)}")]

    @booting.upon(_Inputs.lost).to(respawning)
    def _bootLost(m, core, s: _Booting, delay) -> Effects:
        _cancel(s.deadline)
        return []

    # Serving.

    @serving.upon(_Inputs.lost).to(respawning)
    def _servingLost(m, core, s: _Serving, delay) -> Effects:
        return []

    @serving.upon(_Inputs.respawnNow).to(booting)
    def _servingLostStable(m, core, s: _Serving, process) -> Effects:
        return [Spawn(process)]

    @serving.upon(_Inputs.replace).to(replacing)
    def _replace(m, core, s: _Serving, old, new, reason, done) -> Effects:
        return [Spawn(new)]

    # Replacing: the old process serves while the new one boots.

    @replacing.upon(_Inputs.replace).loop()
    def _replaceAgain(m, core, s: _Replacing, old, new, reason, done) -> Effects:
        # Already under way: one more caller waits for it.
        s.waiters.append(done)
        return []

    @replacing.upon(_Inputs.booted).to(serving)
    def _replaced(m, core, s: _Replacing, process) -> Effects:
        _cancel(s.deadline)
        return [
            Serve(s.new),
            Drain(s.old, "replaced"),
            Fire(tuple(s.waiters)),
            Fire(core.takeReadyWaiters()),
        ]

    @replacing.upon(_Inputs.bootTimedOut).loop()
    def _replacementTimedOut(m, core, s: _Replacing) -> Effects:
        return [Kill(s.new, f"was not ready within {seconds(core.host.startTimeout)}")]

    @replacing.upon(_Inputs.successorFailed).to(serving)
    def _replacementFailed(m, core, s: _Replacing, process) -> Effects:
        _cancel(s.deadline)
        why = ReloadFailed(f"replacement worker {s.new.workerId} (pid {s.new.pid}) {_howLost(s.new)}")
        return [Fire(tuple(s.waiters), Failure(why))]

    @replacing.upon(_Inputs.predecessorGone).to(booting)
    def _predecessorGone(m, core, s: _Replacing, process) -> Effects:
        # Nothing is left to replace: whoever waits for the replacement is
        # done with it, and the new process boots as the slot's own.
        _cancel(s.deadline)
        return [Fire(tuple(s.waiters))]

    # Leaving the cluster.

    @idle.upon(_Inputs.retire).to(retired)
    def _retireIdle(m, core) -> Effects:
        return [Fire(core.takeReadyWaiters(), _stopped(f"worker {core.workerId} was scaled away"))]

    @booting.upon(_Inputs.retire).to(retired)
    def _retireBooting(m, core, s: _Booting) -> Effects:
        _cancel(s.deadline)
        return [Drain(s.process, "scale"), Fire(core.takeReadyWaiters(), _stopped(f"worker {core.workerId} was scaled away"))]

    @serving.upon(_Inputs.retire).to(retired)
    def _retireServing(m, core, s: _Serving) -> Effects:
        return [Drain(s.process, "scale")]

    @replacing.upon(_Inputs.retire).to(retired)
    def _retireReplacing(m, core, s: _Replacing) -> Effects:
        _cancel(s.deadline)
        # Nothing is left to replace: the reload or recycling is done with it.
        return [Drain(s.new, "scale"), Drain(s.old, "scale"), Fire(tuple(s.waiters))]

    @respawning.upon(_Inputs.retire).to(retired)
    def _retireRespawning(m, core, s: _Respawning) -> Effects:
        _cancel(s.call)
        return [Fire(core.takeReadyWaiters(), _stopped(f"worker {core.workerId} was scaled away"))]

    @idle.upon(_Inputs.stop).to(stopped)
    def _stopIdle(m, core) -> Effects:
        return [Fire(core.takeReadyWaiters(), _stopped("the cluster stopped"))]

    @booting.upon(_Inputs.stop).to(stopped)
    def _stopBooting(m, core, s: _Booting) -> Effects:
        _cancel(s.deadline)
        return [Drain(s.process, "stop"), Fire(core.takeReadyWaiters(), _stopped("the cluster stopped"))]

    @serving.upon(_Inputs.stop).to(stopped)
    def _stopServing(m, core, s: _Serving) -> Effects:
        return [Drain(s.process, "stop"), Fire(core.takeReadyWaiters(), _stopped("the cluster stopped"))]

    @replacing.upon(_Inputs.stop).to(stopped)
    def _stopReplacing(m, core, s: _Replacing) -> Effects:
        _cancel(s.deadline)
        stop = _stopped("the cluster stopped")
        return [
            Drain(s.new, "stop"),
            Drain(s.old, "stop"),
            Fire(tuple(s.waiters), stop),
            Fire(core.takeReadyWaiters(), stop),
        ]

    @respawning.upon(_Inputs.stop).to(stopped)
    def _stopRespawning(m, core, s: _Respawning) -> Effects:
        _cancel(s.call)
        return [Fire(core.takeReadyWaiters(), _stopped("the cluster stopped"))]

    return machine.build()


_SlotMachine = _buildMachine()


class Slot:
    """
    One worker id: its state machine, and the routing of events about its
    processes to the machine's inputs.  Each method returns the effects to
    carry out.

    @ivar workerId: the worker id.
    """

    def __init__(self, workerId: int, host: SlotHost, newProcess: Callable[[int], WorkerProcess]) -> None:
        self.core = SlotCore(workerId, host)
        self.core.slot = self
        self._newProcess = newProcess
        self._machine = _SlotMachine(self.core)

    @property
    def workerId(self) -> int:
        return self.core.workerId

    def view(self) -> SlotView:
        """
        What the slot holds now.
        """
        return self._machine.view()

    def whenReady(self) -> defer.Deferred:
        """
        A Deferred firing once the slot has a ready process (at once if it
        has), or failing with L{ClusterStopped} if it is stopped or scaled
        away first.
        """
        state = self.view().state
        if state in ("serving", "replacing"):
            return defer.succeed(None)
        if state in ("stopped", "retired"):
            return defer.fail(ClusterStopped(f"worker {self.workerId} is not running"))
        d = defer.Deferred()
        self.core.readyWaiters.append(d)
        return d

    # Events --------------------------------------------------------------------

    def start(self) -> Effects:
        """
        Boot the slot's first process.
        """
        return self._input("start", self._newProcess(self.workerId))

    def respawnDue(self) -> Effects:
        """
        The backoff after a loss is over.
        """
        return self._input("respawn", self._newProcess(self.workerId))

    def bootTimedOut(self) -> Effects:
        """
        The booting process's start timeout passed.
        """
        return self._input("bootTimedOut")

    def processReady(self, process: WorkerProcess) -> Effects:
        """
        C{process} said it is ready.
        """
        if process is self.view().booting:
            return self._input("booted", process)
        return []

    def processLost(self, process: WorkerProcess) -> Effects:
        """
        C{process} ended, or is leaving on its own: the slot lets it go.
        Nothing happens when it is not one of the slot's (a process the slot
        let go already).
        """
        view = self.view()
        if view.successor is not None:
            if process is view.current:
                return self._input("predecessorGone", view.successor)
            if process is view.successor:
                return self._input("successorFailed", view.current)
            return []
        if process is view.current:
            delay = self.core.lossDelay(process)
            if delay <= 0 and view.state == "serving":
                return self._input("respawnNow", self._newProcess(self.workerId))
            return self._input("lost", delay)
        return []

    def replace(self, reason: str, done: defer.Deferred) -> Effects:
        """
        Replace the ready process with a new one, gated on the new one's
        readiness: C{done} fires once the new one is ready (or nothing is
        left to replace), or fails with L{ReloadFailed} if it is lost first
        (the old one serves on) or L{ClusterStopped}.
        """
        view = self.view()
        if view.state not in ("serving", "replacing"):
            return [Fire((done,), Failure(ReloadFailed(f"worker {self.workerId} is {view.state}, not serving")))]
        # Already replacing: the caller joins; no new process is made.
        new = view.successor if view.successor is not None else self._newProcess(self.workerId)
        return self._input("replace", view.current, new, reason, done)

    def retire(self) -> Effects:
        """
        Scale the slot away: its processes drain.
        """
        return self._input("retire")

    def stop(self) -> Effects:
        """
        The cluster stops: its processes are to drain (the caller says
        with how much time left).
        """
        return self._input("stop")

    def _input(self, name: str, *args) -> Effects:
        try:
            return getattr(self._machine, name)(*args)
        except NoTransition:
            _log.critical(
                "bug: worker {workerId}'s slot got {input} while {state}; ignored",
                workerId=self.workerId,
                input=name,
                state=self.view().state,
            )
            return []

    def __repr__(self) -> str:
        return f"<slot {self.workerId} {self.view().state}>"
