# -*- test-case-name: tests.test_master -*-
"""
The rolling reload: every worker is replaced by a process started after
the reload was asked for, a few at a time, each replacement ready before
the process it replaces stops taking connections.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from txcluster import _events
from txcluster._commands import AGENT_ID

from txcluster._deferreds import observe
from txcluster._lifecycle import ClusterStopped, ReloadFailed, Slot

_log = Logger(namespace="txcluster.master")


class ReloadHost(Protocol):
    """
    What a reload needs of the supervisor that runs it.
    """

    config: Any
    slots: dict
    processes: Any
    #: The L{txcluster._agent.AgentKeeper}.
    agent: Any
    #: Called with how each reload request ended.
    reloaded: Any

    def emit(self, event) -> None:
        """
        Tell the cluster's observers.
        """

    def stopping(self) -> bool:
        """
        Whether the cluster is stopping.
        """

    def replace(self, slot: Slot, reason: str, done: defer.Deferred) -> None:
        """
        Replace C{slot}'s ready process; C{done} says how it went.
        """

    def changed(self, slot: Slot) -> defer.Deferred:
        """
        A Deferred firing after C{slot}'s next input.
        """


class RollingReload:
    """
    Runs the reloads of one supervisor: at most one at a time; a reload
    asked for while one runs joins it, and the one running then also
    replaces every process started before the new request.

    A process is I{stale} when its serial is at most the I{mark}: the
    serial of the last process made when the latest reload was asked for.
    The reload is done when no slot holds a stale process and every stale
    process has exited.
    """

    def __init__(self, supervisor: ReloadHost) -> None:
        self._supervisor = supervisor
        self._running: Optional[defer.Deferred] = None
        self._mark = 0

    @property
    def running(self) -> bool:
        """
        Whether a reload is under way.
        """
        return self._running is not None

    def progress(self) -> tuple[int, int]:
        """
        C{(done, total)}: how many worker ids already serve with a process
        started after the reload was asked for, out of how many there are.
        """
        slots = self._supervisor.slots.values()
        done = sum(
            1
            for slot in slots
            if slot.view().state == "serving" and slot.view().current.serial > self._mark
        )
        return done, len(slots)

    def reload(self, agent: bool = False) -> defer.Deferred:
        """
        Ask for a reload, told to the observers (L{_events.ReloadStarted},
        L{_events.ReloadFinished}) unless it joins one under way; with
        C{agent}, the agent is restarted first (never doubled: the old one
        leaves, then the new one starts).
        """
        supervisor = self._supervisor
        if supervisor.stopping():
            return defer.fail(ClusterStopped("the cluster is stopping"))
        if agent and supervisor.config.agent is None:
            return defer.fail(ReloadFailed("this cluster runs no agent (--agent)"))
        if supervisor.agent.restarting is not None:
            # A reload with the agent runs: it replaces the workers next.
            return observe(supervisor.agent.restarting)
        joined = self.running
        if not joined:
            supervisor.emit(_events.ReloadStarted(len(supervisor.slots)))

        def outcome(result):
            if not isinstance(result, Failure):
                finished = _events.ReloadFinished("succeeded")
            elif result.check(ClusterStopped):
                finished = _events.ReloadFinished("stopped", result.getErrorMessage())
            else:
                finished = _events.ReloadFinished("failed", result.getErrorMessage())
            supervisor.reloaded(finished.outcome)
            if not joined:
                supervisor.emit(finished)
            return result

        if not agent:
            return self.request().addBoth(outcome)
        requested = defer.ensureDeferred(supervisor.agent.restart()).addCallback(lambda _: self.request())
        whole = supervisor.agent.restarting = requested.addBoth(outcome)

        def over(result):
            supervisor.agent.restarting = None
            return result

        whole.addBoth(over)
        return observe(whole)

    def request(self) -> defer.Deferred:
        """
        Ask for a reload.

        @return: fires once it is done, or fails with L{ReloadFailed} or
            L{ClusterStopped}.
        """
        self._mark = self._supervisor.processes.lastSerial
        if self._running is not None:
            _log.info(
                "reload requested while one is running: every worker started before now is "
                "replaced too"
            )
            return observe(self._running)
        # run() may finish at once (nothing to replace), and then finished()
        # has cleared self._running already.
        running = self._running = defer.ensureDeferred(self._run())

        def finished(result):
            self._running = None
            return result

        running.addBoth(finished)
        return observe(running)

    def _stale(self, slot: Slot, mark: int) -> bool:
        view = slot.view()
        return view.state in ("booting", "serving", "replacing") and any(p.serial <= mark for p in view.processes)

    async def _run(self) -> None:
        supervisor = self._supervisor
        concurrency = supervisor.config.reloadConcurrency
        _log.info(
            "reload: replacing {count} workers, {concurrency} at a time",
            count=len(supervisor.slots),
            concurrency=concurrency,
        )
        replaced = [0]
        while True:
            mark = self._mark
            stale = [supervisor.slots[w] for w in sorted(supervisor.slots) if self._stale(supervisor.slots[w], mark)]
            if stale:
                await self._refreshAll(stale, mark, concurrency, replaced)
                continue
            # The old processes are gone before the reload is done: no
            # worker runs code loaded before it was asked for.
            await defer.DeferredList(
                [
                    observe(p.exited)
                    for p in supervisor.processes.processes
                    if p.serial <= mark and p.workerId != AGENT_ID
                ]
            )
            if supervisor.stopping():
                raise ClusterStopped("the cluster is stopping")
            if self._mark == mark:
                break
            # Asked for again meanwhile: what started since is stale too.
        _log.info(
            "reload complete: {count} {workers} replaced",
            count=replaced[0],
            workers="worker" if replaced[0] == 1 else "workers",
        )

    async def _refreshAll(self, stale: list, mark: int, concurrency: int, replaced: list) -> None:
        supervisor = self._supervisor
        semaphore = defer.DeferredSemaphore(concurrency)
        failures: list = []

        async def step(slot: Slot) -> None:
            if failures or supervisor.stopping():
                return
            try:
                replaced[0] += await self._refresh(slot, mark)
            except Exception as e:
                failures.append(e)

        await defer.DeferredList([semaphore.run(lambda s=s: defer.ensureDeferred(step(s))) for s in stale])
        if supervisor.stopping() or any(isinstance(e, ClusterStopped) for e in failures):
            raise ClusterStopped("the cluster is stopping")
        if failures:
            why = failures[0]
            _log.error("reload aborted: {why}; the remaining old workers keep serving", why=why)
            raise ReloadFailed(str(why))

    async def _refresh(self, slot: Slot, mark: int) -> int:
        """
        Make C{slot} run a process made after C{mark}: replace its ready
        process, or wait for a booting one to be ready and replace it then.

        @return: how many processes were replaced by a ready one.
        """
        supervisor = self._supervisor
        count = 0
        while supervisor.slots.get(slot.workerId) is slot and not supervisor.stopping():
            view = slot.view()
            if view.state == "serving":
                if view.current.serial > mark:
                    break
                done = defer.Deferred()
                supervisor.replace(slot, "reload", done)
                await done
                after = slot.view()
                if after.state == "serving" and after.current.serial > mark:
                    count += 1
            elif view.state in ("booting", "replacing") and self._stale(slot, mark):
                await supervisor.changed(slot)
            else:
                break
        return count
