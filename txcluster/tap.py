# -*- test-case-name: tests.test_tap -*-
"""
C{twistd txcluster}: command-line options and the service they make.

Nothing here imports the reactor at module level: twistd imports this
module while parsing options, before it installs C{--reactor}.
"""

from __future__ import annotations

import os
import signal
import stat

from twisted.application import service
from twisted.python import usage

SCHEDULING_CHOICES = ("rr", "shared", "least-busy", "sticky")


def usableCPUs() -> int:
    """
    The CPUs this process may use: its scheduler affinity, bounded by its
    cgroup's CPU quota; at least 1.
    """
    from txcluster._cgroups import cpuBudget

    return cpuBudget().count


def _number(kind, minimum, what):
    def coerce(value):
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be {what}, not {value!r}")
        if number < minimum or number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"must be {what}, not {value!r}")
        return number

    return coerce


_positiveInt = _number(int, 1, "a whole number of at least 1")


def _workerCount(value):
    from txcluster._master import MAX_WORKERS

    count = _positiveInt(value)
    if count > MAX_WORKERS:
        raise ValueError(f"must be at most {MAX_WORKERS}, not {count}")
    return count
_count = _number(int, 0, "a whole number of at least 0")
_seconds = _number(float, 0, "a number of seconds, 0 or more")


class Options(usage.Options):
    """
    Options of C{twistd txcluster}; see C{docs/operations.md}.
    """

    synopsis = "[options]"
    longdesc = (
        "Run the Twisted application in --app in several worker processes. "
        "The master owns every listening socket the application asks for and "
        "hands connections to the workers (or shares the socket), keeps the "
        "workers alive, reloads them on SIGHUP without dropping a connection, "
        "scales them on SIGTTIN/SIGTTOU and drains them on SIGTERM/SIGINT."
    )

    optParameters = [
        ["app", "a", None, "The .tac or .py file that defines `application` (required)."],
        ["workers", "w", "auto", "Number of worker processes, or auto: the CPUs this process may use (affinity and cgroup CPU quota)."],
        ["scheduling", "s", "rr", "How connections reach workers: rr, shared, least-busy or sticky (one client address, one worker)."],
        ["graceful-timeout", None, "30", "Seconds a leaving worker may take to finish its connections and stop its app."],
        ["start-timeout", None, "30", "Seconds a new worker may take to become ready (0: no limit)."],
        ["max-restarts", None, "5", "Give up after more worker failures than this within --restart-window."],
        ["restart-window", None, "60", "The window, in seconds, in which --max-restarts counts failures (0: never give up)."],
        ["worker-timeout", None, "30", "Seconds without a heartbeat before a worker is killed (0: off)."],
        ["reload-concurrency", None, "1", "How many workers a reload (SIGHUP) replaces at once."],
        ["max-requests", None, "0", "Recycle a worker once it was sent this many connections (0: never; rr and least-busy only)."],
        ["max-requests-jitter", None, "0", "Add a random 0..N to --max-requests per worker."],
        ["max-memory", None, "0", "Recycle a worker whose unique memory (USS) stays above this many MiB for 3 samples in a row (0: never)."],
        ["memory-interval", None, "5", "Seconds between two samples of the workers' memory (--max-memory)."],
        ["max-lifetime", None, "0", "Recycle a worker process after it served this many seconds (0: never)."],
        ["max-lifetime-jitter", None, "0", "Add a random 0..N seconds to --max-lifetime per worker process."],
        ["agent", None, None, "Run this .tac or .py file as the agent: one process started before the workers and stopped after them, which they reach with askAgent() [default: none]."],
        ["proxy-timeout", None, "5", "Seconds a connection has to send its PROXY header (--proxy-protocol)."],
        ["agent-timeout", None, "10", "Seconds a worker's askAgent() waits for the agent to answer, or to come back from a restart."],
        ["user", "u", None, "Run the workers as this user (name or uid) [default: the master's]."],
        ["group", "g", None, "Run the workers with this group (name or gid) [default: the user's]."],
        ["control", None, None, "The control socket the txcluster command talks to [default: $RUNTIME_DIRECTORY/txcluster.sock under systemd, else ./txcluster.sock]."],
        ["metrics", None, None, "Serve /metrics, /healthz and /readyz on this endpoint (strports: tcp:9100:interface=127.0.0.1) [default: off]."],
        ["min-ready", None, None, "Ready workers the cluster needs to be ready (/readyz) [default: --workers]."],
        ["drain-delay", None, "0", "On a stop, seconds between /readyz turning 503 and the workers draining; the master keeps taking connections meanwhile."],
    ]

    optFlags = [
        ["no-control", None, "Serve no control socket."],
        ["no-fair-accept", None, "Under --scheduling shared, every worker accepts as Twisted does: faster on very short connections, but a burst lands on whichever worker is awake."],
        ["proxy-protocol", None, "Every stream listen expects a PROXY protocol header (v1 or v2) from the balancer; the app sees the client's address as its peer."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["allow-listen"] = []
        self["proxy-allow-from"] = []

    def opt_listen(self, description: str) -> None:
        # usage.Options prints a method's docstring as it is: keep it one line.
        self["listen"].append(description)

    opt_listen.__doc__ = (
        "Bind this endpoint (strports syntax: tcp:80, unix:/run/app.sock, udp:53) in the "
        "master at start-up, before twistd drops privileges, or serve a socket systemd "
        "passed (systemd:domain=INET:name=web); workers that listen on its address "
        "share it. Repeatable."
    )

    def opt_proxy_allow_from(self, network: str) -> None:
        self["proxy-allow-from"].append(network)

    opt_proxy_allow_from.__doc__ = (
        "Who may send a PROXY header (--proxy-protocol): an address or ADDRESS/PREFIX. "
        "Repeatable. [default: 127.0.0.0/8 and ::1/128]"
    )

    def opt_allow_listen(self, rule: str) -> None:
        self["allow-listen"].append(rule)

    opt_allow_listen.__doc__ = (
        "Workers may have the master bind only what matches a rule: tcp:8080, "
        "tcp:8000-8099, tcp:*, udp:53, unix:/run/app/* or *. Repeatable. [default: "
        "anything; only the --listen endpoints when the master runs as root and the "
        "workers (--user) do not]"
    )

    compData = usage.Completions(
        optActions={
            "app": usage.CompleteFiles("*.tac *.py"),
            "scheduling": usage.CompleteList(SCHEDULING_CHOICES),
        }
    )

    _coercions = {
        "workers": _workerCount,
        "graceful-timeout": _seconds,
        "start-timeout": _seconds,
        "max-restarts": _count,
        "restart-window": _seconds,
        "worker-timeout": _seconds,
        "reload-concurrency": _positiveInt,
        "max-requests": _count,
        "max-requests-jitter": _count,
        "max-memory": _number(float, 0, "a number of MiB, 0 or more"),
        "memory-interval": _number(float, 0.1, "a number of seconds, at least 0.1"),
        "max-lifetime": _seconds,
        "max-lifetime-jitter": _seconds,
        "agent-timeout": _number(float, 0.001, "a number of seconds, more than 0"),
        "proxy-timeout": _number(float, 0.001, "a number of seconds, more than 0"),
        "drain-delay": _seconds,
    }

    def postOptions(self) -> None:
        # Checking --control and --metrics imports what loads pyOpenSSL
        # (AMP, endpoints): keep it out of the master from here on.
        leaveOutTLS()
        self["workers-source"] = None
        if self["workers"] == "auto":
            from txcluster._cgroups import cpuBudget

            budget = cpuBudget()
            self["workers"], self["workers-source"] = str(budget.count), budget.source
        for name, coerce in self._coercions.items():
            try:
                self[name] = coerce(self[name])
            except ValueError as e:
                raise usage.UsageError(f"--{name} {e}")
        if self["min-ready"] is not None:
            try:
                self["min-ready"] = _positiveInt(self["min-ready"])
            except ValueError as e:
                raise usage.UsageError(f"--min-ready {e}")
            if self["min-ready"] > self["workers"]:
                raise usage.UsageError(
                    f"--min-ready {self['min-ready']} is more than --workers {self['workers']}: the cluster could never be ready"
                )
        if self["no-control"] and self["control"] is not None:
            raise usage.UsageError("--control and --no-control contradict each other")
        if self["control"] is not None:
            self["control"] = checkControlPath(self["control"])
        if not self["no-control"]:
            from txcluster._control import defaultControlPath, liveMasterOn

            path = self["control"] or checkControlPath(defaultControlPath())
            if liveMasterOn(path):
                raise usage.UsageError(
                    f"--control {path}: a master is already running with this control socket "
                    "(stop it, or give this one another --control)"
                )
        if self["metrics"] is not None:
            self["metrics"] = checkEndpoint(self["metrics"])
        if self["scheduling"] not in SCHEDULING_CHOICES:
            raise usage.UsageError(
                f"--scheduling must be one of {', '.join(SCHEDULING_CHOICES)}, "
                f"not {self['scheduling']!r}"
            )
        if self["max-requests"] and self["scheduling"] == "shared":
            from txcluster._policy import MAX_REQUESTS_SHARED

            raise usage.UsageError(MAX_REQUESTS_SHARED)
        if self["no-fair-accept"] and self["scheduling"] != "shared":
            raise usage.UsageError("--no-fair-accept is for --scheduling shared; the other modes are fair by dispatch")
        if self["proxy-allow-from"] and not self["proxy-protocol"]:
            raise usage.UsageError("--proxy-allow-from is for --proxy-protocol, which is not given")
        from txcluster._proxy import AllowList

        for network in self["proxy-allow-from"]:
            try:
                AllowList.fromStrings([network])
            except ValueError as e:
                raise usage.UsageError(f"--proxy-allow-from {e}")
        self["app"] = checkApp(self["app"])
        if self["agent"] is not None:
            self["agent"] = checkApp(self["agent"], "--agent")
        from txcluster._access import BadListenDescription, parseDeclared, parsePattern

        for option, parse in (("listen", parseDeclared), ("allow-listen", parsePattern)):
            for value in self[option]:
                try:
                    declared = parse(value)
                except BadListenDescription as e:
                    raise usage.UsageError(f"--{option} {e}")
                if option == "listen" and self["max-requests"] and not declared.isStream:
                    from txcluster._policy import MAX_REQUESTS_DATAGRAMS

                    raise usage.UsageError(f"--listen {value}: {MAX_REQUESTS_DATAGRAMS}")
                if option == "listen":
                    checkInherited(value, declared)
        from txcluster._access import workerIdentity

        try:
            workerIdentity(self["user"], self["group"])
        except ValueError as e:
            raise usage.UsageError(str(e))


def checkApp(path, option: str = "--app") -> str:
    """
    The absolute path of a readable application file.

    @raise usage.UsageError: naming C{option} and what is wrong.
    """
    if not path:
        raise usage.UsageError(f"{option} is required: the .tac or .py file that defines `application`")
    absolute = os.path.abspath(path)
    if not os.path.exists(absolute):
        raise usage.UsageError(f"{option} {path!r}: no such file")
    if not os.path.isfile(absolute):
        raise usage.UsageError(f"{option} {path!r}: not a file")
    if not os.access(absolute, os.R_OK):
        raise usage.UsageError(f"{option} {path!r}: not readable")
    return absolute


def checkInherited(description: str, declared) -> None:
    """
    A C{--listen systemd:...} must name a socket systemd passed.

    @raise usage.UsageError: naming C{--listen} and what is wrong.
    """
    from txcluster._access import Inherited

    if not isinstance(declared, Inherited):
        return
    from txcluster._systemd import InheritedSocketError, inheritSocket

    try:
        # (No reactor: twistd installs --reactor after the options.)
        inheritSocket(None, declared, os.environ).sock.detach()
    except InheritedSocketError as e:
        raise usage.UsageError(str(e))


def checkControlPath(path: str) -> str:
    """
    The absolute path of the control socket, in a directory that exists.

    @raise usage.UsageError: naming C{--control} and what is wrong.
    """
    absolute = os.path.abspath(path)
    directory = os.path.dirname(absolute)
    if not os.path.isdir(directory):
        raise usage.UsageError(f"--control {path!r}: no such directory {directory!r}")
    if os.path.isdir(absolute):
        raise usage.UsageError(f"--control {path!r}: is a directory")
    if len(os.fsencode(absolute)) > 107:
        raise usage.UsageError(f"--control {path!r}: a UNIX socket path is at most 107 bytes long")
    if os.path.lexists(absolute) and not stat.S_ISSOCK(os.lstat(absolute).st_mode):
        raise usage.UsageError(f"--control {path!r}: exists and is not a socket (it is left alone)")
    return absolute


def checkEndpoint(description: str) -> str:
    """
    A server endpoint description that parses (C{tcp:9100}).

    @raise usage.UsageError: naming C{--metrics} and what is wrong.
    """
    from twisted.internet import endpoints

    class _Checker:
        # serverFromString only parses with this; nothing listens.
        def __getattr__(self, name):
            raise AttributeError(name)

    try:
        endpoints.serverFromString(_Checker(), description)
    except ImportError:
        raise usage.UsageError(
            f"--metrics {description!r}: the master does not load TLS; serve plain HTTP "
            "(tcp:...) behind a TLS proxy"
        )
    except Exception as e:
        raise usage.UsageError(f"--metrics {description!r}: not an endpoint description ({e})")
    return description


def configFromOptions(options: Options):
    from txcluster._master import ClusterConfig
    from txcluster._proxy import DEFAULT_ALLOW

    return ClusterConfig(
        app=options["app"],
        workers=options["workers"],
        scheduling=options["scheduling"],
        gracefulTimeout=options["graceful-timeout"],
        startTimeout=options["start-timeout"],
        maxRestarts=options["max-restarts"],
        restartWindow=options["restart-window"],
        workerTimeout=options["worker-timeout"],
        reloadConcurrency=options["reload-concurrency"],
        maxRequests=options["max-requests"],
        maxRequestsJitter=options["max-requests-jitter"],
        maxMemory=options["max-memory"],
        memoryInterval=options["memory-interval"],
        maxLifetime=options["max-lifetime"],
        maxLifetimeJitter=options["max-lifetime-jitter"],
        agent=options["agent"],
        proxyProtocol=bool(options["proxy-protocol"]),
        fairAccept=not options["no-fair-accept"],
        proxyAllowFrom=options["proxy-allow-from"] or DEFAULT_ALLOW,
        proxyTimeout=options["proxy-timeout"],
        agentTimeout=options["agent-timeout"],
        listens=options["listen"],
        allowListen=options["allow-listen"],
        user=options["user"],
        group=options["group"],
        drainDelay=options["drain-delay"],
        minReady=options["min-ready"],
    )


class SignalControl(service.Service):
    """
    The master's operator signals: SIGHUP reloads, SIGTTIN adds a worker,
    SIGTTOU removes one, and SIGTERM and SIGINT stop gracefully.

    twistd would make the process die by the stop signal once the reactor
    stops; a graceful stop of the cluster is a normal exit, so the master
    exits 0 instead (non-zero only when it gave up).
    """

    #: The signals it handles.
    SIGNALS = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGTERM, signal.SIGINT)

    def __init__(self, cluster) -> None:
        self._cluster = cluster
        self._previous: dict = {}
        self._stopRequested = False
        self._early: list = []

    def keepEarlySignals(self) -> None:
        """
        From now until the reactor runs, keep these signals and act on them
        once it does, instead of letting one kill the master (SIGTERM,
        SIGHUP), raise C{KeyboardInterrupt} (SIGINT) or suspend it
        (SIGTTIN): twistd starts the services, and so the workers, before
        it runs the reactor, and Twisted installs its own handlers only as
        the reactor starts.
        """
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, lambda s, f: self._early.append(s))

    def startService(self) -> None:
        super().startService()
        from twisted.internet import reactor

        reactor.callWhenRunning(self._install, reactor)

    def _install(self, reactor) -> None:
        if not self.running:
            return
        handlers = {
            signal.SIGHUP: self._cluster.reload,
            signal.SIGTTIN: lambda: self._cluster.scale(self._cluster.workerCount() + 1),
            signal.SIGTTOU: lambda: self._cluster.scale(max(1, self._cluster.workerCount() - 1)),
            signal.SIGTERM: lambda: self._stop(reactor, "SIGTERM"),
            signal.SIGINT: lambda: self._stop(reactor, "SIGINT"),
        }
        for signum, action in handlers.items():
            previous = signal.signal(signum, lambda s, f, action=action: reactor.callFromThread(self._run, action))
            self._previous.setdefault(signum, previous)
        early, self._early = self._early, []
        for signum in early:
            self._run(handlers[signum])

    def _stop(self, reactor, name):
        from twisted.internet import defer
        from twisted.logger import Logger

        log = Logger(namespace="txcluster.master")
        if self._stopRequested:
            log.info("{signal}: already stopping; waiting for the workers to finish", signal=name)
            self._cluster.stopNow()
        else:
            self._stopRequested = True
            log.info("{signal}: stopping gracefully", signal=name)
            if reactor.running:
                from twisted.internet.error import ReactorNotRunning

                try:
                    reactor.stop()
                except ReactorNotRunning:
                    # A give-up stopped it already.
                    pass
        return defer.succeed(None)

    def stopFromControl(self) -> None:
        """
        What the control socket's C{stop} does: as C{SIGTERM}.
        """
        from twisted.internet import reactor

        self._stop(reactor, "txcluster stop")

    def _run(self, action) -> None:
        from twisted.logger import Logger

        from txcluster._lifecycle import ClusterStopped

        log = Logger(namespace="txcluster.master")

        def failed(f):
            if f.check(ClusterStopped):
                log.info("signal not acted on: {why}", why=f.getErrorMessage())
            else:
                log.warn("{why}", why=f.getErrorMessage())

        action().addErrback(failed)

    def stopService(self) -> None:
        # The handlers stay: a SIGHUP, SIGTTIN or SIGTTOU during the stop
        # (its drain delay, the workers' drain) is logged and not acted on,
        # where the default action would kill or suspend the master.
        super().stopService()


class _Master(service.MultiService):
    """
    The master's top service: names the process once it really starts.
    """

    def __init__(self, appPath: str) -> None:
        super().__init__()
        self._appPath = appPath
        self._privileged = False

    def privilegedStartService(self) -> None:
        from txcluster._workermain import setProcessTitle

        self._privileged = True
        setProcessTitle(f"txcluster master [{os.path.basename(self._appPath)}]")
        super().privilegedStartService()

    def startService(self) -> None:
        # twist (unlike twistd) starts services without their privileged
        # start: binding --listen first keeps the same order (a bind
        # error before the control socket exists) and names the process.
        if not self._privileged:
            self.privilegedStartService()
        super().startService()


def logResources(options: Options) -> None:
    """
    Log where C{--workers} came from when it was C{auto}, and the memory
    the cgroup allows.
    """
    from twisted.logger import Logger

    from txcluster._cgroups import memoryLimit

    log = Logger(namespace="txcluster.master")
    if options.get("workers-source"):
        log.info(
            "--workers auto: {count} ({source})", count=options["workers"], source=options["workers-source"]
        )
    limit = memoryLimit()
    if limit is not None:
        log.info("the cgroup allows {limit:.0f} MiB of memory for the master and all its workers", limit=limit / 2**20)


def leaveOutTLS() -> None:
    """
    Keep pyOpenSSL out of this process unless something loaded it already.

    The master never terminates TLS (workers do, on the connections they
    adopt), yet Twisted loads pyOpenSSL, and with it about 30 MB, as soon as
    AMP or the TCP transport is imported.  Both work without it.
    """
    import sys

    if "OpenSSL" not in sys.modules:
        sys.modules["OpenSSL"] = None  # type: ignore[assignment]


def makeService(options: Options) -> service.IService:
    """
    The master: a L{ClusterService} plus its operator signals.
    """
    leaveOutTLS()
    from txcluster._master import ClusterService

    cluster = ClusterService(configFromOptions(options))
    top = _Master(options["app"])
    signals = SignalControl(cluster)
    logResources(options)
    # The control socket, the metrics endpoint and systemd's notify start
    # before the cluster (one that cannot be served fails the start before
    # a worker forks) and stop once its stop is over.
    if not options["no-control"]:
        from txcluster._control import ControlServer, defaultControlPath

        path = options["control"] or defaultControlPath()
        ControlServer(cluster, path, stopMaster=signals.stopFromControl).setServiceParent(top)
    if options["metrics"] is not None:
        from txcluster._health import MetricsServer

        MetricsServer(cluster, options["metrics"]).setServiceParent(top)
    from txcluster._systemd import notifyAddress

    address = notifyAddress(os.environ)
    if address is not None:
        from txcluster._systemd import Notifier, SystemdNotify

        SystemdNotify(cluster, Notifier(address), dict(os.environ)).setServiceParent(top)
    cluster.setServiceParent(top)
    signals.setServiceParent(top)
    signals.keepEarlySignals()
    return top
