"""
Tests for L{txcluster._procstats.readMemory}: a process's own memory, from
fake C{/proc} trees and from this process's.
"""

from __future__ import annotations

import os

from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from txcluster._procstats import _PAGE, MemoryUsage, readMemory

SMAPS_ROLLUP = b"""\
55e4f511a000-7fff5cdde000 ---p 00000000 00:00 0                          [rollup]
Rss:                1736 kB
Pss:                 379 kB
Shared_Clean:       1584 kB
Shared_Dirty:          0 kB
Private_Clean:        40 kB
Private_Dirty:       112 kB
Referenced:         1736 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:    2048 kB
Swap:                  0 kB
"""

STATM = b"765 440 412 5 0 123 0\n"


class ReadMemoryTests(TestCase):
    def fakeProc(self, pid: int, files: dict) -> str:
        """
        A fake C{/proc} holding C{files} (a directory for L{None}, which
        cannot be read as a file) for C{pid}.
        """
        proc = FilePath(self.mktemp())
        proc.child(str(pid)).makedirs()
        for name, content in files.items():
            if content is None:
                proc.child(str(pid)).child(name).makedirs()
            else:
                proc.child(str(pid)).child(name).setContent(content)
        return proc.path

    def test_uss(self) -> None:
        """
        The unique set size is the sum of the C{Private_} lines of
        C{smaps_rollup}, in bytes.
        """
        proc = self.fakeProc(7, {"smaps_rollup": SMAPS_ROLLUP, "statm": STATM})
        self.assertEqual(readMemory(7, proc), MemoryUsage((40 + 112 + 2048) * 1024, "uss"))

    def test_ussWithoutHugetlb(self) -> None:
        """
        A kernel that gives no C{Private_Hugetlb} line still gives a USS.
        """
        lines = SMAPS_ROLLUP.splitlines(True)
        rollup = b"".join(line for line in lines if not line.startswith(b"Private_Hugetlb"))
        proc = self.fakeProc(7, {"smaps_rollup": rollup})
        self.assertEqual(readMemory(7, proc), MemoryUsage((40 + 112) * 1024, "uss"))

    def test_noSmapsRollup(self) -> None:
        """
        Without C{smaps_rollup} (an older kernel) the memory is the
        resident pages of C{statm} less its shared ones.
        """
        proc = self.fakeProc(7, {"statm": STATM})
        self.assertEqual(readMemory(7, proc), MemoryUsage((440 - 412) * _PAGE, "rss-shared"))

    def test_smapsRollupUnreadable(self) -> None:
        """
        An C{smaps_rollup} that cannot be read (another user's process)
        falls back on C{statm}.
        """
        proc = self.fakeProc(7, {"smaps_rollup": None, "statm": STATM})
        self.assertEqual(readMemory(7, proc), MemoryUsage((440 - 412) * _PAGE, "rss-shared"))

    def test_smapsRollupMalformed(self) -> None:
        """
        An C{smaps_rollup} without both C{Private_Clean} and
        C{Private_Dirty} as kB falls back on C{statm}.
        """
        for rollup in [
            b"",
            b"Private_Clean: 40 kB\n",
            b"Private_Clean: 40 kB\nPrivate_Dirty: lots kB\n",
            b"Private_Clean: 40 kB\nPrivate_Dirty: 112 pages\n",
            b"Private_Clean: -40 kB\nPrivate_Dirty: 112 kB\n",
        ]:
            proc = self.fakeProc(7, {"smaps_rollup": rollup, "statm": STATM})
            self.assertEqual(readMemory(7, proc), MemoryUsage((440 - 412) * _PAGE, "rss-shared"), rollup)

    def test_gone(self) -> None:
        """
        A process that is gone has no memory: L{None}.
        """
        proc = self.fakeProc(7, {"statm": STATM})
        self.assertIsNone(readMemory(8, proc))

    def test_statmMalformed(self) -> None:
        """
        Without C{smaps_rollup}, a malformed C{statm} is L{None}.
        """
        for statm in [b"", b"765\n", b"765 lots 412\n"]:
            self.assertIsNone(readMemory(7, self.fakeProc(7, {"statm": statm})), statm)

    def test_thisProcess(self) -> None:
        """
        This process, on this machine, has a USS of some bytes.
        """
        usage = readMemory(os.getpid())
        self.assertIsNotNone(usage)
        self.assertGreater(usage.bytes, 0)
        self.assertEqual(usage.kind, "uss")
