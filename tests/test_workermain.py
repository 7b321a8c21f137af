"""
Tests for L{txcluster._workermain}'s start-up steps that do not need a
whole worker: dying with the master, and the first thing a worker does
about SIGINT.
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import sys

from twisted.trial.unittest import SynchronousTestCase

from txcluster import _workermain

#: prctl(2): read the parent-death signal.
PR_GET_PDEATHSIG = 2


def inChild(testCase, run) -> tuple:
    """
    Fork; the child runs C{run()}, which returns an int the child writes
    back, and exits 0 (or the code C{run} exits with).

    @return: C{(exit status, the int or None)}.
    """
    readEnd, writeEnd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(readEnd)
            value = run()
            os.write(writeEnd, struct.pack("i", value))
        finally:
            os._exit(0)
    os.close(writeEnd)
    try:
        data = b""
        while True:
            chunk = os.read(readEnd, 4)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(readEnd)
    _, status = os.waitpid(pid, 0)
    value = struct.unpack("i", data)[0] if len(data) == 4 else None
    return os.waitstatus_to_exitcode(status), value


class DieWithMasterTests(SynchronousTestCase):
    if not sys.platform.startswith("linux"):
        skip = "PR_SET_PDEATHSIG is Linux's"

    def test_killedWithItsParent(self) -> None:
        """
        A worker asks the kernel to SIGKILL it when its parent (the master)
        dies, so that nothing it does can keep it alive.
        """

        def run():
            armed = _workermain.dieWithMaster(os.getppid())
            libc = ctypes.CDLL(None, use_errno=True)
            value = ctypes.c_int()
            libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0)
            return value.value if armed else -1

        self.assertEqual(inChild(self, run), (0, signal.SIGKILL))

    def test_masterAlreadyGone(self) -> None:
        """
        A worker whose parent is not its master any more (the master died
        before the worker could ask) exits at once.
        """
        code, value = inChild(self, lambda: _workermain.dieWithMaster(os.getppid() + 100000) or 0)
        self.assertEqual((code, value), (1, None))
