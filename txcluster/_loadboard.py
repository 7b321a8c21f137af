# -*- test-case-name: tests.test_loadboard -*-
"""
Fair accept for C{shared} scheduling: every worker's open connections on a
board in shared memory, and a gate before each accept on a shared port.

Under C{shared} every worker accepts from the same listening socket, and
the kernel gives a connection to whichever worker calls C{accept} first:
the one that is awake already.  A burst of keep-alive connections then
lands on one worker (measured: 26 of 32 on one of two workers), which
serves them all while the other idles, for as long as they live.

So the master keeps a L{LoadBoard}: a page of shared memory (a C{memfd},
inherited as fd L{BOARD_FD<txcluster._commands.BOARD_FD>}) with a slot per
worker process, in which each worker writes how many connections it holds
and how many it has accepted, whenever that changes (a store to memory,
no system call).  Before it accepts on a shared port a worker reads the
board (L{AcceptGate}):

  - under its share of the cluster's connections plus L{SLACK} (the next
    one counted), it accepts up to that, in Twisted's adaptive batch;
  - over it, while the others accept too (they took some within the last
    L{ACCEPT_PAUSE} seconds: a busy cluster), it accepts one at a time,
    and none while it holds L{YIELD} more than their average: they take
    what waits, and the reactor calls again while something does;
  - over it while the others take nothing (asleep, as in a burst after a
    quiet while), it stops accepting for L{ACCEPT_PAUSE} seconds, so that
    another wakes and takes what waits.  If what waits is still there
    when it looks again, nobody else is taking it (busy, or blocked), and
    it takes it anyway, twice as many each time it finds so: the gate
    never leaves a connection waiting for a worker that does not come.

Workers that leave (drain) free their slot, so the share is that of the
workers that accept.  The price, measured in C{docs/performance.md}: the
reads of the board and the accepts one at a time cost some throughput on
short connections; C{--no-fair-accept} turns it off.
"""

from __future__ import annotations

import mmap
import os
import struct
from math import ceil
from typing import Optional

from twisted.logger import Logger

from txcluster import _commands

_log = Logger(namespace="txcluster.master")

#: The slots on the board: the most worker processes (a reload runs two
#: of each) one master runs at once with a fair accept.
SLOTS = 1024

#: A free slot.
FREE = -1

#: How long a worker that holds more than its share stops accepting on a
#: shared port, in seconds.
ACCEPT_PAUSE = 0.001

#: How many connections a worker may hold over its share.
SLACK = 1

#: How many connections over the others' average a worker holds before
#: it leaves what waits to them, when they are accepting too.
YIELD = 3

#: The most a gate lets a worker accept at once (Twisted's own batch).
MAX_BATCH = 100

_SLOT = struct.Struct("=i")
_STRUCTS: dict = {}


def _ints(count: int) -> struct.Struct:
    found = _STRUCTS.get(count)
    if found is None:
        found = _STRUCTS[count] = struct.Struct(f"={count}i")
    return found


class LoadBoard:
    """
    What each worker process holds and has accepted, in a page of shared
    memory: the number of slots in use (the highest assigned, plus one),
    then for each slot two 32-bit numbers, the connections its worker
    holds (L{FREE} for a free slot) and how many it has accepted (wrapping
    around).  The master creates it and assigns the slots; each worker
    writes its own.
    """

    size = _SLOT.size * (1 + 2 * SLOTS)

    def __init__(self, fd: int) -> None:
        """
        @param fd: the board's file (a C{memfd}); it is mapped, and stays
            the caller's to close.
        """
        self._memory = mmap.mmap(fd, self.size)

    @classmethod
    def create(cls) -> tuple["LoadBoard", int]:
        """
        A new board with every slot free (in the master).

        @return: the board and its file descriptor, to pass to workers.
        """
        fd = os.memfd_create("txcluster-load-board", os.MFD_CLOEXEC)
        os.ftruncate(fd, cls.size)
        board = cls(fd)
        board._memory[:] = _ints(1 + 2 * SLOTS).pack(0, *[FREE, 0] * SLOTS)
        return board, fd

    def assign(self, taken: set) -> Optional[int]:
        """
        Claim the first free slot not in C{taken} for a new worker (it
        reads 0).

        @return: the slot, or L{None} if all are used.
        """
        for slot in range(SLOTS):
            if slot not in taken and self.read(slot) == FREE:
                self.write(slot, 0)
                if slot >= self._inUse():
                    _SLOT.pack_into(self._memory, 0, slot + 1)
                return slot
        return None

    def _inUse(self) -> int:
        return min(_SLOT.unpack_from(self._memory, 0)[0], SLOTS)

    def read(self, slot: int) -> int:
        """
        How many connections C{slot}'s worker holds (L{FREE}: none there).
        """
        return _SLOT.unpack_from(self._memory, _SLOT.size * (1 + 2 * slot))[0]

    def write(self, slot: int, held: int) -> None:
        _SLOT.pack_into(self._memory, _SLOT.size * (1 + 2 * slot), held)

    def writeAccepted(self, slot: int, accepted: int) -> None:
        _SLOT.pack_into(self._memory, _SLOT.size * (2 + 2 * slot), accepted & 0x7FFFFFFF)

    def free(self, slot: int) -> None:
        """
        C{slot}'s worker no longer accepts (it leaves, or is gone).
        """
        self.write(slot, FREE)

    def loads(self, slot: int) -> Optional[tuple]:
        """
        C{(mine, held, others, accepted)}: what C{slot}'s worker holds;
        what the other workers on the board hold in all, how many they
        are and how many they have accepted in all; L{None} when it is
        alone.
        """
        inUse = self._inUse()
        values = _ints(2 * inUse).unpack_from(self._memory, _SLOT.size)
        held = others = accepted = 0
        for index in range(0, 2 * inUse, 2):
            if values[index] >= 0 and index != 2 * slot:
                others += 1
                held += values[index]
                accepted += values[index + 1]
        if not others:
            return None
        mine = values[2 * slot] if slot < inUse else 0
        return max(0, mine), held, others, accepted

    def allowance(self, slot: int) -> Optional[int]:
        """
        How many more connections C{slot}'s worker may accept now to hold
        no more than its share plus L{SLACK} (the next connection
        counted); L{None} when it is the only worker on the board.
        """
        loads = self.loads(slot)
        if loads is None:
            return None
        return _allowance(*loads[:3])

    def close(self) -> None:
        self._memory.close()


def _allowance(mine: int, held: int, others: int) -> int:
    return ceil((mine + held + 1) / (others + 1)) + SLACK - mine


class BoardSlots:
    """
    The master's side: the board, made when the first worker needs a slot
    and closed when the last one is gone, and who has which slot.
    """

    def __init__(self, enabled: bool = True) -> None:
        """
        @param enabled: whether there is a board at all (shared scheduling).
        """
        self._board: Optional[LoadBoard] = None
        self._fd: Optional[int] = None
        self._slots: dict = {}
        self._failed = not enabled

    def assign(self, process, env: dict) -> dict:
        """
        Give C{process} a slot: set C{env}'s L{ENV_LOAD_SLOT<_commands.ENV_LOAD_SLOT>}.

        @return: the spawner's keyword argument that passes the board
            (empty when there is none: the worker accepts as Twisted does).
        """
        if self._board is None and not self._failed:
            try:
                self._board, self._fd = LoadBoard.create()
            except OSError as e:
                self._failed = True
                _log.warn("no fair accept on shared listens: cannot make the load board ({error})", error=e)
        slot = None if self._board is None else self._board.assign(set(self._slots.values()))
        if slot is None:
            return {}
        self._slots[process] = slot
        env[_commands.ENV_LOAD_SLOT] = str(slot)
        return {"board": self._fd}

    def free(self, process) -> None:
        """
        C{process} is gone (or never started).
        """
        slot = self._slots.pop(process, None)
        if slot is not None:
            self._board.free(slot)
        if not self._slots:
            self.close()

    def close(self) -> None:
        """
        Close the board (a new one is made if a worker needs it again).
        """
        if self._board is not None:
            self._board.close()
            os.close(self._fd)
            self._board = self._fd = None
        self._slots.clear()


class WorkerBoard:
    """
    A worker's side: its slot, written as its connections change, and the
    gates of its shared ports.
    """

    def __init__(self, board: LoadBoard, slot: int, held) -> None:
        """
        @param held: how many connections the worker holds now.
        """
        self._board = board
        self._slot = slot
        self._held = held
        self._leaving = False
        self._accepted = 0
        board.write(slot, held())

    @classmethod
    def fromEnvironment(cls, environ, held) -> Optional["WorkerBoard"]:
        """
        The board the master passed (fd L{BOARD_FD<_commands.BOARD_FD>}),
        if it passed one; the descriptor is closed once mapped.
        """
        slot = environ.get(_commands.ENV_LOAD_SLOT)
        if slot is None:
            return None
        board = LoadBoard(_commands.BOARD_FD)
        os.close(_commands.BOARD_FD)
        return cls(board, int(slot), held)

    def changed(self, delta: int) -> None:
        """
        The worker's connections changed by C{delta}.
        """
        if not self._leaving:
            self._board.write(self._slot, self._held())
            if delta > 0:
                self._accepted += delta
                self._board.writeAccepted(self._slot, self._accepted)

    def leave(self) -> None:
        """
        The worker stops accepting: the others' shares leave it out.
        """
        self._leaving = True
        self._board.free(self._slot)

    def gate(self, port, reactor) -> Optional["AcceptGate"]:
        """
        An L{AcceptGate} on C{port}, if it is one that accepts.
        """
        if not hasattr(port, "numberAccepts"):
            return None
        return AcceptGate(port, self._board, self._slot, reactor, self._held)


class AcceptGate:
    """
    Fair accept on one shared port of one worker (see the module
    docstring): wraps the port's C{doRead}.
    """

    def __init__(self, port, board: LoadBoard, slot: int, reactor, held) -> None:
        """
        @param port: a Twisted listening port (C{tcp.Port}, C{unix.Port}):
            its C{numberAccepts} bounds each C{doRead}'s accepts.
        @param held: how many connections the worker holds now.
        """
        self._port = port
        self._board = board
        self._slot = slot
        self._reactor = reactor
        self._held = held
        self._accept = port.doRead
        self._paused = None
        self._burst = 1
        # The others' accepted total at the start of the current window,
        # and whether they accepted any in the window before.
        self._markAt = float("-inf")
        self._markAccepted = 0
        self._othersActive = False
        port.doRead = self.doRead

    def doRead(self):
        loads = self._board.loads(self._slot)
        if loads is None:
            return self._accept()
        mine, held, others, accepted = loads
        othersAccepting = self._othersAccepting(accepted)
        allowance = _allowance(mine, held, others)
        if allowance > 0:
            # Twisted adapts its batch to the traffic; the share caps it.
            self._burst = 1
            self._port.numberAccepts = max(1, min(allowance, self._port.numberAccepts, MAX_BATCH))
            return self._accept()
        if othersAccepting:
            # Over its share while the others take connections too (a busy
            # cluster, short connections): one at a time, as they do, and
            # none while it holds YIELD more than their average (they take
            # what waits; the reactor calls again while something does).
            if mine * others >= held + YIELD * others:
                return None
            self._port.numberAccepts = 1
            return self._accept()
        if self._paused is None:
            self._port.stopReading()
            self._paused = self._reactor.callLater(ACCEPT_PAUSE, self._resume)
        return None

    def _othersAccepting(self, accepted: int) -> bool:
        # Whether the others accepted any connection since the mark, or in
        # the window of ACCEPT_PAUSE before it (a stale one counts as none).
        now = self._reactor.seconds()
        if now - self._markAt >= ACCEPT_PAUSE:
            recent = now - self._markAt < 2 * ACCEPT_PAUSE
            self._othersActive = recent and accepted != self._markAccepted
            self._markAt, self._markAccepted = now, accepted
        return self._othersActive or accepted != self._markAccepted

    def _resume(self) -> None:
        self._paused = None
        port = self._port
        if not port.connected:
            return
        port.startReading()
        allowance = self._board.allowance(self._slot)
        if allowance is not None and allowance <= 0:
            # Still over its share: whatever waits now, nobody else took.
            before = self._held()
            port.numberAccepts = self._burst
            self._accept()
            if self._held() > before:
                self._burst = min(self._burst * 2, MAX_BATCH)
            else:
                self._burst = 1

    def stop(self) -> None:
        """
        The port stops listening: no more pauses.
        """
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
