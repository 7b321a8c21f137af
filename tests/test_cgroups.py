"""
Tests for L{txcluster._cgroups}: the CPUs and memory a process may use,
read from fake cgroup trees built in temporary directories.
"""

from __future__ import annotations

import os

from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from txcluster._cgroups import CPUBudget, cpuBudget, memoryLimit


def asBytes(content: str | bytes) -> bytes:
    return content.encode() if isinstance(content, str) else content


def v1CPU(directory: str, quota: str, period: str = "100000\n") -> dict:
    """
    The files of a v1 CPU quota in C{directory}.
    """
    return {f"{directory}/cpu.cfs_quota_us": quota, f"{directory}/cpu.cfs_period_us": period}


class FakeHostMixin:
    """
    Builds a fake C{/proc/self/cgroup} and C{/sys/fs/cgroup}.
    """

    def fakeHost(self, procSelfCgroup: str | bytes | None, files: dict) -> tuple[str, str]:
        """
        @param procSelfCgroup: the content of C{/proc/self/cgroup}, or
            L{None} for none.
        @param files: file contents (or L{None} for a directory, which
            cannot be read as a file) by path under the cgroup root.
        @return: the paths of C{/proc/self/cgroup} and of the cgroup root.
        """
        base = FilePath(self.mktemp())
        root = base.child("cgroup")
        root.makedirs()
        cgroupFile = base.child("proc-self-cgroup")
        if procSelfCgroup is not None:
            cgroupFile.setContent(asBytes(procSelfCgroup))
        for relative, content in files.items():
            f = root.preauthChild(relative)
            if content is None:
                f.makedirs()
                continue
            f.parent().makedirs(ignoreExistingDirectory=True)
            f.setContent(asBytes(content))
        self.root = root.path
        return cgroupFile.path, root.path

    def budget(self, procSelfCgroup, files: dict, affinity: int = 4) -> CPUBudget:
        cgroupFile, root = self.fakeHost(procSelfCgroup, files)
        return cpuBudget(lambda: affinity, cgroupFile, root)

    def path(self, relative: str) -> str:
        return os.path.join(self.root, relative)


#: A pure v2 host's root marker.
V2 = {"cgroup.controllers": "cpuset cpu io memory pids\n"}

#: The budget of the fake affinity, when no quota is tighter.
AFFINITY = CPUBudget(4, "4 CPUs in the scheduler affinity")


class CPUBudgetV2Tests(FakeHostMixin, TestCase):
    def test_quota(self) -> None:
        """
        A quota of 1.5 CPUs in C{cpu.max}, with 4 CPUs in the affinity, is
        a budget of 2 CPUs, and the source names the file and the rounding.
        """
        budget = self.budget("0::/docker/abc\n", {**V2, "docker/abc/cpu.max": "150000 100000\n"})
        self.assertEqual(
            budget,
            CPUBudget(
                2,
                f"cgroup v2 CPU quota 150000/100000 in {self.path('docker/abc/cpu.max')} "
                "(1.5 CPUs, rounded up to 2)",
            ),
        )

    def test_exactQuota(self) -> None:
        """
        A quota of a whole number of CPUs says nothing of rounding.
        """
        budget = self.budget("0::/a\n", {**V2, "a/cpu.max": "200000 100000\n"})
        source = f"cgroup v2 CPU quota 200000/100000 in {self.path('a/cpu.max')} (2 CPUs)"
        self.assertEqual(budget, CPUBudget(2, source))

    def test_noLimit(self) -> None:
        """
        C{max} in C{cpu.max} is no limit: the affinity is the budget.
        """
        budget = self.budget("0::/docker/abc\n", {**V2, "docker/abc/cpu.max": "max 100000\n"})
        self.assertEqual(budget, AFFINITY)

    def test_parentTighter(self) -> None:
        """
        A quota in an ancestor tighter than the cgroup's own is the one
        that counts.
        """
        budget = self.budget(
            "0::/docker/abc\n",
            {
                **V2,
                "cpu.max": "max 100000\n",
                "docker/cpu.max": "100000 100000\n",
                "docker/abc/cpu.max": "300000 100000\n",
            },
        )
        source = f"cgroup v2 CPU quota 100000/100000 in {self.path('docker/cpu.max')} (1 CPU)"
        self.assertEqual(budget, CPUBudget(1, source))

    def test_childTighter(self) -> None:
        """
        A quota in the cgroup tighter than its ancestors' is the one that
        counts.
        """
        budget = self.budget(
            "0::/docker/abc\n",
            {**V2, "docker/cpu.max": "300000 100000\n", "docker/abc/cpu.max": "100000 100000\n"},
        )
        self.assertEqual(budget.count, 1)
        self.assertIn(self.path("docker/abc/cpu.max"), budget.source)

    def test_namespaceRoot(self) -> None:
        """
        In a cgroup namespace the path is C{/} and the container's quota is
        at the root.
        """
        budget = self.budget("0::/\n", {**V2, "cpu.max": "250000 100000\n"})
        self.assertEqual(budget.count, 3)
        self.assertIn(self.path("cpu.max"), budget.source)

    def test_hostPathNotMounted(self) -> None:
        """
        Without a cgroup namespace a container sees the host's path, which
        does not exist in its mount: the missing directories are skipped
        and the quota at the root is found.
        """
        budget = self.budget("0::/kubepods/pod1/abc\n", {**V2, "cpu.max": "100000 100000\n"})
        self.assertEqual(budget.count, 1)

    def test_climbingPath(self) -> None:
        """
        A path outside the namespace (C{/../x}) is read at the root only,
        never above it.
        """
        cgroupFile, root = self.fakeHost("0::/../x\n", {**V2, "cpu.max": "max 100000\n"})
        outside = FilePath(root).sibling("x")
        outside.makedirs()
        outside.child("cpu.max").setContent(b"100000 100000\n")
        self.assertEqual(cpuBudget(lambda: 4, cgroupFile, root).count, 4)

    def test_affinitySmaller(self) -> None:
        """
        An affinity smaller than the quota is the budget.
        """
        budget = self.budget("0::/a\n", {**V2, "a/cpu.max": "800000 100000\n"}, affinity=2)
        self.assertEqual(budget, CPUBudget(2, "2 CPUs in the scheduler affinity"))

    def test_quotaEqualToAffinity(self) -> None:
        """
        A quota of as many CPUs as the affinity is not tighter: the
        affinity is named.
        """
        budget = self.budget("0::/a\n", {**V2, "a/cpu.max": "400000 100000\n"})
        self.assertEqual(budget, AFFINITY)

    def test_quotaBelowAffinityRoundsToIt(self) -> None:
        """
        A quota of 1.5 CPUs with 2 in the affinity is still named as the
        source: it is the tighter.
        """
        budget = self.budget("0::/a\n", {**V2, "a/cpu.max": "150000 100000\n"}, affinity=2)
        self.assertEqual(budget.count, 2)
        self.assertTrue(budget.source.startswith("cgroup v2 CPU quota 150000/100000"), budget.source)

    def test_roundedUpToOne(self) -> None:
        """
        Half a CPU, or less, is rounded up to one.
        """
        for quota, cpus in [("50000 100000", "0.5 CPUs"), ("1 100000", "1e-05 CPUs")]:
            budget = self.budget("0::/a\n", {**V2, "a/cpu.max": quota})
            quota = quota.replace(" ", "/")
            source = f"cgroup v2 CPU quota {quota} in {self.path('a/cpu.max')} ({cpus}, rounded up to 1)"
            self.assertEqual(budget, CPUBudget(1, source))

    def test_atLeastOne(self) -> None:
        """
        An affinity of no CPUs is a budget of one.
        """
        self.assertEqual(self.budget(None, {}, affinity=0).count, 1)

    def test_malformedIgnored(self) -> None:
        """
        A C{cpu.max} that is malformed or cannot be read sets no limit; a
        valid one in an ancestor still does.
        """
        for content in ["", "150000", "lots 100000", "150000 0", "-5 100000", "1 2 3", b"\xff\xfe 1", None]:
            budget = self.budget("0::/a\n", {**V2, "a/cpu.max": content})
            self.assertEqual(budget, AFFINITY, content)
            budget = self.budget("0::/a\n", {**V2, "a/cpu.max": content, "cpu.max": "100000 100000"})
            self.assertEqual(budget.count, 1, content)

    def test_noProcSelfCgroup(self) -> None:
        """
        Without C{/proc/self/cgroup} (not Linux) the affinity is the budget.
        """
        self.assertEqual(self.budget(None, {**V2, "cpu.max": "100000 100000"}), AFFINITY)

    def test_malformedProcSelfCgroup(self) -> None:
        """
        Lines of C{/proc/self/cgroup} that are not C{id:controllers:path}
        are ignored.
        """
        for content in ["garbage\n", "0:/a\n", b"\xff\xfe\n", ""]:
            self.assertEqual(self.budget(content, {**V2, "cpu.max": "100000 100000"}).count, 4, content)

    def test_defaultAffinity(self) -> None:
        """
        By default the affinity is the scheduler's.
        """
        cgroupFile, root = self.fakeHost(None, {})
        budget = cpuBudget(procSelfCgroup=cgroupFile, cgroupRoot=root)
        if hasattr(os, "sched_getaffinity"):
            cpus = len(os.sched_getaffinity(0))
            plural = "" if cpus == 1 else "s"
            self.assertEqual(budget, CPUBudget(cpus, f"{cpus} CPU{plural} in the scheduler affinity"))
        else:
            self.assertEqual(budget.count, os.cpu_count() or 1)

    def test_thisMachine(self) -> None:
        """
        On the machine running the tests there is a budget of at least one
        CPU, from somewhere.
        """
        budget = cpuBudget()
        self.assertGreaterEqual(budget.count, 1)
        self.assertIsInstance(budget.source, str)
        self.assertTrue(budget.source)


class CPUBudgetHybridTests(FakeHostMixin, TestCase):
    def test_unified(self) -> None:
        """
        On a hybrid host, where the root holds the v1 hierarchies, the
        unified one is read at C{unified}.
        """
        budget = self.budget(
            "1:cpu:/\n0::/docker/abc\n",
            {
                "unified/cgroup.controllers": "cpu\n",
                "unified/docker/abc/cpu.max": "100000 100000\n",
                **v1CPU("cpu", "-1\n"),
            },
        )
        source = f"cgroup v2 CPU quota 100000/100000 in {self.path('unified/docker/abc/cpu.max')} (1 CPU)"
        self.assertEqual(budget, CPUBudget(1, source))

    def test_unifiedNotReadOnV2(self) -> None:
        """
        On a pure v2 host C{unified} is a cgroup like any other, not a
        mount: its C{cpu.max} is not this process's.
        """
        budget = self.budget("0::/\n", {**V2, "unified/cpu.max": "100000 100000\n"})
        self.assertEqual(budget.count, 4)

    def test_tightestOfBoth(self) -> None:
        """
        With quotas in both hierarchies, the tighter counts.
        """
        files = {"unified/cgroup.controllers": "", "unified/a/cpu.max": "300000 100000"}
        files.update(v1CPU("cpu/a", "200000"))
        budget = self.budget("1:cpu:/a\n0::/a\n", files)
        self.assertEqual(budget.count, 2)
        self.assertIn("cgroup v1", budget.source)


class CPUBudgetV1Tests(FakeHostMixin, TestCase):
    def test_quota(self) -> None:
        """
        A v1 quota of 1.5 CPUs in C{cpu.cfs_quota_us} under
        C{cpu,cpuacct} is a budget of 2.
        """
        budget = self.budget("5:cpu,cpuacct:/docker/abc\n", v1CPU("cpu,cpuacct/docker/abc", "150000\n"))
        quota = self.path("cpu,cpuacct/docker/abc/cpu.cfs_quota_us")
        source = f"cgroup v1 CPU quota 150000/100000 in {quota} (1.5 CPUs, rounded up to 2)"
        self.assertEqual(budget, CPUBudget(2, source))

    def test_cpuLink(self) -> None:
        """
        The C{cpu,cpuacct} hierarchy is also found at C{cpu}.
        """
        budget = self.budget("5:cpu,cpuacct:/\n", v1CPU("cpu", "100000\n"))
        self.assertEqual(budget.count, 1)

    def test_cpuAlone(self) -> None:
        """
        A C{cpu} hierarchy of its own is read at C{cpu}; C{cpuacct} is not
        C{cpu}.
        """
        files = v1CPU("cpu", "100000\n")
        self.assertEqual(self.budget("2:cpuacct:/\n1:cpu:/\n", files).count, 1)
        self.assertEqual(self.budget("2:cpuacct:/\n", files).count, 4)

    def test_noLimit(self) -> None:
        """
        A quota of -1 is no limit.
        """
        self.assertEqual(self.budget("5:cpu,cpuacct:/\n", v1CPU("cpu,cpuacct", "-1\n")), AFFINITY)

    def test_ancestors(self) -> None:
        """
        A tighter quota in an ancestor counts; a cgroup whose directory
        does not exist is skipped.
        """
        budget = self.budget(
            "5:cpu,cpuacct:/docker/abc/gone\n",
            {**v1CPU("cpu,cpuacct/docker", "100000\n"), **v1CPU("cpu,cpuacct/docker/abc", "300000\n")},
        )
        self.assertEqual(budget.count, 1)
        self.assertIn(self.path("cpu,cpuacct/docker/cpu.cfs_quota_us"), budget.source)

    def test_missingPeriod(self) -> None:
        """
        A quota without its period, or a malformed period, sets no limit.
        """
        self.assertEqual(self.budget("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "100000"}), AFFINITY)
        self.assertEqual(self.budget("1:cpu:/\n", v1CPU("cpu", "100000", "soon")), AFFINITY)


class MemoryLimitTests(FakeHostMixin, TestCase):
    def limit(self, procSelfCgroup, files: dict):
        return memoryLimit(*self.fakeHost(procSelfCgroup, files))

    def test_v2(self) -> None:
        """
        C{memory.max} is the limit, in bytes.
        """
        self.assertEqual(self.limit("0::/a\n", {**V2, "a/memory.max": "536870912\n"}), 536870912)

    def test_v2NoLimit(self) -> None:
        """
        C{max} is no limit.
        """
        self.assertIsNone(self.limit("0::/a\n", {**V2, "a/memory.max": "max\n"}))

    def test_v2Ancestors(self) -> None:
        """
        The tightest of the cgroup's and its ancestors' limits counts.
        """
        files = {**V2, "a/b/memory.max": "max\n", "a/memory.max": "1048576\n", "memory.max": "2097152\n"}
        self.assertEqual(self.limit("0::/a/b\n", files), 1048576)

    def test_v1(self) -> None:
        """
        C{memory.limit_in_bytes} under C{memory} is the v1 limit.
        """
        limit = self.limit("4:memory:/a\n", {"memory/a/memory.limit_in_bytes": "1073741824\n"})
        self.assertEqual(limit, 1073741824)

    def test_v1NoLimit(self) -> None:
        """
        v1's huge page-aligned "no limit" is none.
        """
        limit = self.limit("4:memory:/a\n", {"memory/a/memory.limit_in_bytes": "9223372036854771712\n"})
        self.assertIsNone(limit)

    def test_hybrid(self) -> None:
        """
        On a hybrid host the limit may be in the v1 hierarchy while the
        unified one has no memory controller.
        """
        files = {"unified/cgroup.controllers": "", "memory/a/memory.limit_in_bytes": "1073741824\n"}
        self.assertEqual(self.limit("4:memory:/a\n0::/\n", files), 1073741824)

    def test_unreadable(self) -> None:
        """
        Without C{/proc/self/cgroup}, or with malformed files, there is no
        limit.
        """
        self.assertIsNone(self.limit(None, {**V2, "memory.max": "1048576"}))
        for content in ["", "lots", "-1", "0", b"\xff", None]:
            self.assertIsNone(self.limit("0::/\n", {**V2, "memory.max": content}), content)

    def test_thisMachine(self) -> None:
        """
        On the machine running the tests the limit is none or a positive
        number of bytes.
        """
        limit = memoryLimit()
        if limit is not None:
            self.assertGreater(limit, 0)
