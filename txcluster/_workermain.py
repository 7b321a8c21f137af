# -*- test-case-name: tests.test_integration -*-
"""
C{python -m txcluster._workermain WORKER_ID APP}: a worker process.

It ignores the terminal's Ctrl-C (the master drains the workers), dies
with its master (C{PR_SET_PDEATHSIG} on Linux), installs the master's kind
of reactor, logs to the master, connects the AMP channel, routes listens
through the master, then loads and starts the application the way
C{twistd -y} would, and tells the master it is ready.

Exit codes: 0 after a normal stop (also when the master asked it to leave
while its application was starting), 3 when the application failed to
start (for example a listen failed), 4 when the application could not be
loaded.
"""

import signal

if __name__ == "__main__":
    # First of all: a terminal's Ctrl-C reaches the whole process group,
    # and the master then drains the workers.  The master spawns workers
    # with SIGINT blocked, so that one still starting its interpreter
    # cannot die of it either; from here on it is ignored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

import faulthandler  # noqa: E402
import importlib  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from txcluster import _commands  # noqa: E402

EXIT_START_FAILED = 3
EXIT_LOAD_FAILED = 4

#: Linux's prctl(2) option that sends a signal when the parent dies.
PR_SET_PDEATHSIG = 1


def dieWithMaster(masterPid) -> bool:
    """
    Have the kernel kill this process when its parent (the master) dies,
    whatever its reactor is doing (Linux only; elsewhere the worker exits
    when it sees its channel close).  Exits at once if the master is gone
    already.

    @return: whether the kernel will.
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if masterPid is not None and os.getppid() != masterPid:
        os._exit(1)
    return armed


def installReactor(moduleName: str):
    """
    Install the reactor C{moduleName} names (what the master runs), or the
    default one if that module cannot install itself.
    """
    if moduleName:
        try:
            module = importlib.import_module(moduleName)
            install = getattr(module, "install", None)
            if install is not None:
                install()
        except Exception as e:
            print(f"txcluster: cannot install reactor {moduleName}: {e}; using the default", file=sys.stderr)
    from twisted.internet import reactor

    return reactor


def setProcessTitle(title: str) -> None:
    """
    Name this process in C{ps} and C{top} (needs C{setproctitle}; on Linux
    without it, the 15-character command name is set instead).
    """
    try:
        import setproctitle
    except ImportError:
        try:
            import ctypes

            libc = ctypes.CDLL(None)
            libc.prctl(15, title.encode()[:15], 0, 0, 0)  # PR_SET_NAME
        except Exception:
            pass
    else:
        setproctitle.setproctitle(title)


def relayable(observer):
    """
    Wrap a JSON log observer so that a failure's traceback survives the
    trip to the master as text (JSON keeps a failure's frames but not its
    exception value).
    """

    def relay(event):
        failure = event.get("log_failure")
        if failure is not None:
            event = dict(event)
            try:
                event["workerTraceback"] = failure.getTraceback()
            except Exception:
                event["workerTraceback"] = repr(failure)
            del event["log_failure"]
        observer(event)

    return relay


def main(argv=None, environ=None) -> None:
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    workerId = int(argv[1])
    appPath = argv[2]
    masterPid = int(environ.get(_commands.ENV_MASTER_PID, "0")) or None
    dieWithMaster(masterPid)
    reactor = installReactor(environ.get(_commands.ENV_REACTOR, ""))

    from twisted.application import service
    from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver

    from txcluster import _worker
    from txcluster._intercept import interceptListens

    logFile = os.fdopen(int(environ.get(_commands.ENV_LOG_FD, _commands.LOG_FD)), "w", buffering=1)
    globalLogBeginner.beginLoggingTo([relayable(jsonFileLogObserver(logFile))], redirectStandardIO=False)
    log = Logger(namespace="txcluster.worker")

    # The master sends SIGUSR1 to a worker whose reactor stopped answering:
    # the stack goes to the master, which logs it, before the kill.
    # The same signal is how an operator's "txcluster stacks" asks.
    stacksFD = environ.get(_commands.ENV_STACKS_FD)
    stacksFile = sys.stderr
    if stacksFD:
        try:
            stacksFile = os.fdopen(int(stacksFD), "w")
        except (OSError, ValueError):
            pass
    faulthandler.register(signal.SIGUSR1, file=stacksFile, all_threads=True)
    isAgent = environ.get(_commands.ENV_ROLE) == "agent"
    if isAgent:
        setProcessTitle(f"txcluster agent [{os.path.basename(appPath)}]")
    else:
        setProcessTitle(f"txcluster worker {workerId} [{os.path.basename(appPath)}]")
    gracefulTimeout = float(environ.get(_commands.ENV_GRACEFUL_TIMEOUT, "30"))
    worker = _worker.Worker(
        reactor,
        workerId,
        int(environ.get(_commands.ENV_WORKER_COUNT, "1")),
        masterPid,
        gracefulTimeout,
    )
    worker.connect(int(environ.get(_commands.ENV_CHANNEL_FD, _commands.CHANNEL_FD)))
    log.info(
        "{who} (pid {pid}) loading {app} with {reactor}",
        who=_commands.describeWorkerId(workerId),
        workerId=workerId,
        pid=os.getpid(),
        app=appPath,
        reactor=type(reactor).__name__,
    )
    if isAgent:
        # The agent's listens are its own (never shared with the workers):
        # they bind here, as under plain twistd.
        from txcluster._agentapi import Agent, setCurrentAgent

        worker.agent = Agent(worker)
        setCurrentAgent(worker.agent)
    else:
        from txcluster._proxy import ProxySettings

        worker.proxy = ProxySettings.fromEnvironment(environ.get(_commands.ENV_PROXY), reactor)
        from txcluster._loadboard import WorkerBoard

        worker.board = WorkerBoard.fromEnvironment(environ, lambda: worker.tracker.open)
        _worker.setCurrentWorker(worker)
        interceptListens(reactor, worker)

    def onTerm(signum, frame):
        if masterPid is not None and os.getppid() != masterPid:
            _worker.exitSoon(_worker.ORPHAN_EXIT_SECONDS)
            reactor.callFromThread(worker.disconnect, _worker.ORPHAN_EXIT_SECONDS)
        else:
            reactor.callFromThread(worker.disconnect, gracefulTimeout, "SIGTERM")

    def installSignals():
        # Twisted's own handlers are installed as the reactor starts: SIGINT
        # stays the master's, and SIGTERM makes this worker leave gracefully.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, onTerm)

    try:
        cwd = os.getcwd()
    except OSError:  # a directory this worker's user may not enter
        cwd = None
    for directory in (cwd, os.path.dirname(os.path.abspath(appPath))):
        if directory is None:
            continue
        if directory not in sys.path:
            sys.path.insert(0, directory)

    def exitNow(code: int) -> None:
        logFile.flush()
        os._exit(code)

    def bootFailed(doing: str, code: int) -> None:
        # Called from an except clause: the traceback goes with the event.
        if worker.leaveRequested:
            log.info(
                "worker {workerId} (pid {pid}) was asked to leave while it started {app}; exiting",
                workerId=workerId,
                pid=os.getpid(),
                app=appPath,
            )
            exitNow(0)
        log.failure(
            "{who} (pid {pid}) could not {doing} {app}",
            who=_commands.describeWorkerId(workerId),
            workerId=workerId,
            pid=os.getpid(),
            doing=doing,
            app=appPath,
        )
        exitNow(code)

    try:
        application = service.loadApplication(appPath, "python")
        root = service.IService(application)
    except BaseException:
        bootFailed("load", EXIT_LOAD_FAILED)

    try:
        root.privilegedStartService()
        root.startService()
    except BaseException:
        bootFailed("start", EXIT_START_FAILED)

    reactor.addSystemEventTrigger("before", "shutdown", root.stopService)
    reactor.addSystemEventTrigger("before", "shutdown", worker.beforeShutdown)
    reactor.callWhenRunning(installSignals)
    reactor.callWhenRunning(worker.ready)
    reactor.run()
    log.info(
        "{who} (pid {pid}) stopped", who=_commands.describeWorkerId(workerId), workerId=workerId, pid=os.getpid()
    )
    logFile.flush()
    sys.exit(0)


if __name__ == "__main__":
    main()
