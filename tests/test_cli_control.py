"""
Unit tests of the C{txcluster} command's parsing and output
(L{txcluster._cli}); the command against a live master is in
L{tests.test_operations_integration}.
"""

import io

from twisted.trial.unittest import SynchronousTestCase

from txcluster import _cli

STATUS = {
    "pid": 4242,
    "uptime": 3725.0,
    "app": "/srv/app.tac",
    "scheduling": "rr",
    "workerCount": 2,
    "ready": 1,
    "minReady": 2,
    "stopping": False,
    "queue": 3,
    "dropped": 0,
    "failures": 1,
    "listeners": [],
    "workers": [
        {
            "id": 1, "pid": 100, "state": "ready", "uptime": 65.2, "restarts": 0, "handed": 12,
            "connections": 2, "rss": 50 * 1024 * 1024, "cpuPercent": 3.5, "cpuSeconds": 1.0,
            "lag": 0.0012, "memory": 30 * 1024 * 1024, "recycling": "memory", "listens": ["tcp:0.0.0.0:8080"],
        },
        {
            "id": 2, "pid": None, "state": "waiting", "uptime": 0.0, "restarts": 4, "handed": 0,
            "connections": None, "rss": None, "cpuPercent": None, "cpuSeconds": None, "lag": None, "listens": [],
        },
    ],
}


class FormatTests(SynchronousTestCase):
    def test_statusTable(self):
        """
        C{status} prints a header (the master's pid, uptime, app,
        scheduling, ready workers and the queue) and one aligned row per
        worker; what is not known is C{-}; a worker being recycled says
        why.
        """
        text = _cli.formatStatus(STATUS)
        lines = text.splitlines()
        self.assertIn("master pid 4242, up 1h02m, /srv/app.tac, rr scheduling", lines[0])
        self.assertIn("workers: 1/2 ready (ready at 2); queue: 3 connections waiting", lines[1])
        header, first, second = lines[3:]
        self.assertEqual(header.split(), ["ID", "PID", "STATE", "UPTIME", "RESTARTS", "HANDED", "OPEN", "RSS", "USS", "CPU%", "LAG", "LISTENS"])
        self.assertEqual(
            first.split(),
            ["1", "100", "ready", "(recycling:", "memory)", "1m05s", "0", "12", "2", "50.0M", "30.0M", "3.5", "1.2ms", "tcp:0.0.0.0:8080"],
        )
        self.assertEqual(second.split(), ["2", "-", "waiting", "-", "4", "0", "-", "-", "-", "-", "-", "-"])
        self.assertEqual(header.index("PID"), first.index("100"))

    def test_stoppingIsSaid(self):
        """
        A stopping master says so in the header.
        """
        self.assertIn("STOPPING", _cli.formatStatus(dict(STATUS, stopping=True)))

    def test_eventLine(self):
        """
        C{watch} prints one line an event: its time, name, the worker and
        the other fields as JSON values.
        """
        line = _cli.formatEvent({"event": "exit", "time": 0, "workerId": 2, "pid": 7, "exitCode": 0, "signal": None})
        self.assertRegex(line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d exit +worker 2 \(pid 7\) exitCode=0 signal=null$")
        self.assertIn(" master drainDelay=2.0", _cli.formatEvent({"event": "stopping", "time": 0, "drainDelay": 2.0}))


class UsageTests(SynchronousTestCase):
    def test_badUsage(self):
        """
        A bad command line exits with L{EXIT_USAGE}, saying what is wrong,
        without connecting to anything.
        """
        for argv in (["bogus"], ["scale"], ["scale", "x"], ["recycle"], []):
            err = io.StringIO()
            self.patch(_cli.sys, "stderr", err)
            self.assertEqual(_cli.main(argv, err=err), _cli.EXIT_USAGE, argv)
            self.assertIn("usage: txcluster", err.getvalue())

    def test_help(self):
        """
        C{--help} names every command and the exit codes, and exits 0.
        """
        out = io.StringIO()
        self.patch(_cli.sys, "stdout", out)
        self.assertEqual(_cli.main(["--help"]), _cli.EXIT_OK)
        for word in ("status", "reload", "scale", "recycle", "stop", "stacks", "watch", "Exit codes"):
            self.assertIn(word, out.getvalue())
