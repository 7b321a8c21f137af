"""
Tests for L{txcluster.tap}: C{twistd txcluster}'s options.
"""

import os
import signal

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from txcluster import tap

from tests._harness import app


def parse(*args):
    options = tap.Options()
    options.parseOptions(list(args))
    return options


class OptionsTests(SynchronousTestCase):
    def test_defaults(self):
        """
        Only --app is required; the defaults are the documented ones, with
        one worker per usable CPU.
        """
        options = parse("--app", app("web.tac"))
        config = tap.configFromOptions(options)
        self.assertEqual(config.workers, tap.usableCPUs())
        self.assertEqual(config.scheduling, "rr")
        self.assertEqual(config.gracefulTimeout, 30.0)
        self.assertEqual(config.startTimeout, 30.0)
        self.assertEqual(config.maxRestarts, 5)
        self.assertEqual(config.restartWindow, 60.0)
        self.assertEqual(config.workerTimeout, 30.0)
        self.assertEqual(config.reloadConcurrency, 1)
        self.assertEqual((config.maxRequests, config.maxRequestsJitter), (0, 0))
        self.assertEqual((config.listens, config.allowListen, config.user, config.group), ((), (), None, None))
        self.assertEqual(config.app, app("web.tac"))
        self.assertEqual((config.drainDelay, config.minReady), (0.0, None))
        self.assertEqual((options["control"], options["no-control"], options["metrics"]), (None, False, None))
        self.assertEqual((config.maxMemory, config.memoryInterval), (0.0, 5.0))
        self.assertEqual((config.maxLifetime, config.maxLifetimeJitter), (0.0, 0.0))

    def test_workersAuto(self):
        """
        C{--workers auto} (the default) is the CPU budget of
        L{txcluster._cgroups.cpuBudget}, and says where it came from.
        """
        from txcluster import _cgroups

        self.patch(_cgroups, "cpuBudget", lambda: _cgroups.CPUBudget(3, "a quota of 3 CPUs"))
        for args in ((), ("--workers", "auto")):
            options = parse("--app", app("web.tac"), *args)
            self.assertEqual((options["workers"], options["workers-source"]), (3, "a quota of 3 CPUs"))
        options = parse("--app", app("web.tac"), "--workers", "5")
        self.assertEqual((options["workers"], options["workers-source"]), (5, None))

    def test_agentOptions(self):
        """
        C{--agent} (an absolute path) and C{--agent-timeout} reach the
        config; without them there is no agent.
        """
        config = tap.configFromOptions(parse("--app", app("web.tac")))
        self.assertEqual((config.agent, config.agentTimeout), (None, 10.0))
        options = parse("--app", app("web.tac"), "--agent", os.path.relpath(app("whoami.tac")), "--agent-timeout", "2.5")
        config = tap.configFromOptions(options)
        self.assertEqual((config.agent, config.agentTimeout), (app("whoami.tac"), 2.5))

    def test_fairAcceptOption(self):
        """
        Fair accept is on by default; C{--no-fair-accept} (with C{shared})
        turns it off.
        """
        self.assertTrue(tap.configFromOptions(parse("--app", app("web.tac"))).fairAccept)
        options = parse("--app", app("web.tac"), "--scheduling", "shared", "--no-fair-accept")
        self.assertFalse(tap.configFromOptions(options).fairAccept)

    def test_proxyOptions(self):
        """
        C{--proxy-protocol}, C{--proxy-allow-from} (repeatable; loopback by
        default) and C{--proxy-timeout} reach the config, and C{sticky}
        scheduling is a choice.
        """
        config = tap.configFromOptions(parse("--app", app("web.tac")))
        self.assertEqual((config.proxyProtocol, config.proxyAllowFrom, config.proxyTimeout), (False, ("127.0.0.0/8", "::1/128"), 5.0))
        options = parse(
            "--app", app("web.tac"), "--proxy-protocol", "--proxy-allow-from", "10.0.0.0/8",
            "--proxy-allow-from", "192.0.2.7", "--proxy-timeout", "2", "--scheduling", "sticky",
        )
        config = tap.configFromOptions(options)
        self.assertEqual(
            (config.proxyProtocol, config.proxyAllowFrom, config.proxyTimeout, config.scheduling),
            (True, ("10.0.0.0/8", "192.0.2.7"), 2.0, "sticky"),
        )

    def test_recyclingOptions(self):
        """
        C{--max-memory}, C{--memory-interval}, C{--max-lifetime} and
        C{--max-lifetime-jitter} reach the config.
        """
        options = parse(
            "--app", app("web.tac"), "--max-memory", "512", "--memory-interval", "2.5",
            "--max-lifetime", "3600", "--max-lifetime-jitter", "600",
        )
        config = tap.configFromOptions(options)
        self.assertEqual(
            (config.maxMemory, config.memoryInterval, config.maxLifetime, config.maxLifetimeJitter),
            (512.0, 2.5, 3600.0, 600.0),
        )

    def test_operationsOptions(self):
        """
        --control is made absolute, --metrics kept as the endpoint
        description, --drain-delay and --min-ready reach the configuration.
        """
        options = parse(
            "--app", app("web.tac"), "-w", "4", "--control", "c.sock", "--metrics", "tcp:9100:interface=127.0.0.1",
            "--drain-delay", "2.5", "--min-ready", "3",
        )
        config = tap.configFromOptions(options)
        self.assertEqual(options["control"], os.path.abspath("c.sock"))
        self.assertEqual(options["metrics"], "tcp:9100:interface=127.0.0.1")
        self.assertEqual((config.drainDelay, config.minReady), (2.5, 3))

    def test_values(self):
        """
        Every option reaches the configuration, converted; --listen and
        --allow-listen repeat.
        """
        options = parse(
            "--app", app("web.tac"), "-w", "3", "-s", "least-busy", "--graceful-timeout", "2.5",
            "--start-timeout", "0", "--max-restarts", "0", "--restart-window", "10",
            "--worker-timeout", "0", "--reload-concurrency", "2", "--max-requests", "1000",
            "--max-requests-jitter", "50", "--listen", "tcp:8080", "--listen", "unix:/tmp/x.sock",
            "--allow-listen", "tcp:9000-9100", "--allow-listen", "udp:*",
        )
        config = tap.configFromOptions(options)
        self.assertEqual(config.workers, 3)
        self.assertEqual(config.scheduling, "least-busy")
        self.assertEqual(config.gracefulTimeout, 2.5)
        self.assertEqual(config.startTimeout, 0.0)
        self.assertEqual(config.maxRestarts, 0)
        self.assertEqual(config.reloadConcurrency, 2)
        self.assertEqual((config.maxRequests, config.maxRequestsJitter), (1000, 50))
        self.assertEqual(config.listens, ("tcp:8080", "unix:/tmp/x.sock"))
        self.assertEqual(config.allowListen, ("tcp:9000-9100", "udp:*"))

    def test_badValuesNameTheOption(self):
        """
        Each bad value is a usage error that names its option.
        """
        for args, option in [
            (["--workers", "0"], "--workers"),
            (["--workers", "x"], "--workers"),
            (["--scheduling", "fifo"], "--scheduling"),
            (["--graceful-timeout", "-1"], "--graceful-timeout"),
            (["--graceful-timeout", "nan"], "--graceful-timeout"),
            (["--start-timeout", "soon"], "--start-timeout"),
            (["--max-restarts", "-2"], "--max-restarts"),
            (["--restart-window", "x"], "--restart-window"),
            (["--worker-timeout", "-5"], "--worker-timeout"),
            (["--reload-concurrency", "0"], "--reload-concurrency"),
            (["--max-requests", "1.5"], "--max-requests"),
            (["--max-requests-jitter", "-1"], "--max-requests-jitter"),
            (["--listen", "tcp:http"], "--listen"),
            (["--allow-listen", "tcp:9-1"], "--allow-listen"),
            (["--user", "no-such-user-txcluster"], "--user"),
            (["--group", "no-such-group-txcluster"], "--group"),
            (["--drain-delay", "-1"], "--drain-delay"),
            (["--drain-delay", "inf"], "--drain-delay"),
            (["--graceful-timeout", "inf"], "--graceful-timeout"),
            (["--min-ready", "0"], "--min-ready"),
            (["-w", "2", "--min-ready", "3"], "--min-ready"),
            (["--control", "/nonexistent-dir/c.sock"], "--control"),
            (["--control", "/tmp"], "--control"),
            (["--control", "/tmp/" + "x" * 120], "--control"),
            (["--control", "/tmp/c.sock", "--no-control"], "--no-control"),
            (["--metrics", "nonsense:9100"], "--metrics"),
            (["--metrics", "tcp:port"], "--metrics"),
            (["--metrics", "ssl:9443"], "--metrics"),
            (["--workers", "automatic"], "--workers"),
            (["--agent", "/nonexistent/agent.tac"], "--agent"),
            (["--agent", "/tmp"], "--agent"),
            (["--agent-timeout", "0"], "--agent-timeout"),
            (["--proxy-protocol", "--proxy-allow-from", "10.0.0.0/33"], "--proxy-allow-from"),
            (["--proxy-allow-from", "10.0.0.1"], "--proxy-allow-from"),
            (["--proxy-protocol", "--proxy-timeout", "0"], "--proxy-timeout"),
            (["--scheduling", "stickyish"], "--scheduling"),
            (["--no-fair-accept"], "--no-fair-accept"),
            (["--agent-timeout", "soon"], "--agent-timeout"),
            (["--max-memory", "-1"], "--max-memory"),
            (["--max-memory", "lots"], "--max-memory"),
            (["--memory-interval", "0"], "--memory-interval"),
            (["--max-lifetime", "-1"], "--max-lifetime"),
            (["--max-lifetime", "inf"], "--max-lifetime"),
            (["--max-lifetime-jitter", "x"], "--max-lifetime-jitter"),
            (["--listen", "systemd:domain=INET"], "--listen"),
            (["--listen", "systemd:domain=INET:index=0"], "--listen systemd:domain=INET:index=0"),
        ]:
            with self.assertRaises(usage.UsageError) as e:
                parse("--app", app("web.tac"), *args)
            self.assertIn(option, str(e.exception), args)

    def test_maxRequestsNeedsTheMasterToHandOut(self):
        """
        --max-requests with --scheduling shared is refused, naming both: the
        workers accept on their own there, so nobody could count.
        """
        with self.assertRaises(usage.UsageError) as e:
            parse("--app", app("web.tac"), "--max-requests", "100", "--scheduling", "shared")
        self.assertIn("--max-requests needs --scheduling rr or least-busy", str(e.exception))
        self.assertEqual(parse("--app", app("web.tac"), "--max-requests", "100", "-s", "least-busy")["max-requests"], 100)
        with self.assertRaises(usage.UsageError) as e:
            parse("--app", app("web.tac"), "--max-requests", "100", "--listen", "udp:5353")
        self.assertIn("--listen udp:5353: --max-requests counts connections", str(e.exception))

    def test_app(self):
        """
        --app is required, must exist, be a file and be readable; it is made
        absolute.
        """
        with self.assertRaises(usage.UsageError) as e:
            parse()
        self.assertIn("--app is required", str(e.exception))
        with self.assertRaises(usage.UsageError) as e:
            parse("--app", "/nonexistent.tac")
        self.assertIn("no such file", str(e.exception))
        with self.assertRaises(usage.UsageError) as e:
            parse("--app", os.path.dirname(app("web.tac")))
        self.assertIn("not a file", str(e.exception))
        relative = os.path.relpath(app("web.tac"))
        self.assertEqual(parse("--app", relative)["app"], app("web.tac"))

    def test_unreadableApp(self):
        """
        An app file the master cannot read is refused.
        """
        if os.geteuid() == 0:
            raise self.skipTest("root can read anything")
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("application = None\n")
        os.chmod(path, 0)
        with self.assertRaises(usage.UsageError) as e:
            parse("--app", path)
        self.assertIn("not readable", str(e.exception))

    def test_numericUserIsTheMaster(self):
        """
        --user naming the master's own uid switches nothing.
        """
        from txcluster._access import workerIdentity

        self.assertEqual(workerIdentity(str(os.getuid()), None), (None, None))
        self.assertEqual(workerIdentity(None, str(os.getgid())), (None, None))


class ServiceTests(SynchronousTestCase):
    def test_makeService(self):
        """
        makeService builds the master (a ClusterService configured from the
        options) beside the signal handling, without starting anything.
        """
        from txcluster import ClusterService

        self.keepSignalHandlers()
        top = tap.makeService(parse("--app", app("web.tac"), "-w", "2"))
        services = list(top)
        clusters = [s for s in services if isinstance(s, ClusterService)]
        self.assertEqual(len(clusters), 1)
        self.assertEqual(clusters[0].config.workers, 2)
        self.assertFalse(clusters[0].running)
        from txcluster._control import ControlServer, defaultControlPath

        [control] = [s for s in services if isinstance(s, ControlServer)]
        self.assertEqual(control.path, defaultControlPath())
        self.assertEqual(len(services), 3)

    def test_makeServiceWithoutControlWithMetrics(self):
        """
        --no-control leaves the control socket out; --metrics adds the
        metrics and health endpoint.
        """
        from txcluster._control import ControlServer
        from txcluster._health import MetricsServer

        self.keepSignalHandlers()
        top = tap.makeService(parse("--app", app("web.tac"), "--no-control", "--metrics", "tcp:0"))
        services = list(top)
        self.assertFalse([s for s in services if isinstance(s, ControlServer)])
        [metrics] = [s for s in services if isinstance(s, MetricsServer)]
        self.assertEqual(metrics.description, "tcp:0")

    def test_theMasterStaysLean(self):
        """
        Parsing the options (which checks --control and --metrics) and
        making the service load neither pyOpenSSL (the master never does
        TLS) nor prometheus_client (only a scrape needs it).
        """
        import subprocess
        import sys

        code = (
            "import sys\n"
            "from txcluster import tap\n"
            "o = tap.Options()\n"
            f"o.parseOptions(['--app', {app('web.tac')!r}, '--metrics', 'tcp:0', '--control', 'c.sock'])\n"
            "tap.makeService(o)\n"
            "print(sys.modules.get('OpenSSL') is not None, 'prometheus_client' in sys.modules)\n"
        )
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(tap.__file__))))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(out.stdout.split(), ["False", "False"], out.stderr)

    def test_noEndpointParsingWithoutSystemd(self):
        """
        Binding the declared listens does not load Twisted's endpoint
        parsers (they load every plugin: megabytes) unless systemd may
        have passed sockets.
        """
        import subprocess
        import sys

        path = os.path.abspath(self.mktemp())
        code = (
            "import sys\n"
            "from txcluster import tap\n"
            "o = tap.Options()\n"
            f"o.parseOptions(['--app', {app('web.tac')!r}, '--no-control', '--listen', 'unix:{path}'])\n"
            "s = tap.makeService(o)\n"
            "from twisted.internet import endpoints\n"
            "parsed = []\n"
            "endpoints.serverFromString = lambda *a, **k: parsed.append(a)\n"
            "s.getServiceNamed('txcluster').privilegedStartService()\n"
            "print(bool(parsed))\n"
        )
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(tap.__file__))))
        env.pop("LISTEN_FDNAMES", None)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(out.stdout.split(), ["False"], out.stderr)

    def keepSignalHandlers(self):
        """
        Put this process's handlers of the master's signals back after the
        test.
        """
        saved = {signum: signal.getsignal(signum) for signum in tap.SignalControl.SIGNALS}
        self.addCleanup(lambda: [signal.signal(signum, handler) for signum, handler in saved.items()])

    def test_signalsBeforeTheReactorRuns(self):
        """
        From makeService until the reactor runs, the master's signals are
        kept instead of killing it (or raising KeyboardInterrupt), to be
        acted on once the reactor runs (as the real-process tests of
        tests.test_lifecycle_integration show).
        """
        self.keepSignalHandlers()
        top = tap.makeService(parse("--app", app("web.tac"), "-w", "2"))
        (control,) = [s for s in top if isinstance(s, tap.SignalControl)]
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGINT)
        self.assertEqual(control._early, [signal.SIGHUP, signal.SIGINT])
