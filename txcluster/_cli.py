# -*- test-case-name: tests.test_cli_control -*-
"""
The C{txcluster} command: talks to a running master over its control
socket (see L{txcluster._control}).

    txcluster [--control PATH] status [--json]
    txcluster [--control PATH] reload | scale N | recycle ID | stop
    txcluster [--control PATH] stacks ID
    txcluster [--control PATH] watch [--json]

Exit codes: L{EXIT_OK}, L{EXIT_FAILED} (the master refused or the
operation failed; the reason is printed), L{EXIT_USAGE}, L{EXIT_NO_MASTER}
(nothing answers on the socket).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import stat
import sys
import time
from typing import Optional, TextIO

from txcluster._controlcommands import (
    BadRequest,
    Event,
    NoSuchWorker,
    NotRunning,
    OperationFailed,
    Recycle,
    Reload,
    Scale,
    Stacks,
    Status,
    Stop,
    Watch,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_MASTER = 3

#: How long C{status}, C{stacks} and C{watch} wait for the master to answer.
QUICK_TIMEOUT = 10.0


def parser() -> argparse.ArgumentParser:
    from txcluster._control import defaultControlPath

    top = argparse.ArgumentParser(
        prog="txcluster",
        description="Control a running txcluster master through its control socket.",
        epilog=f"Exit codes: {EXIT_OK} done, {EXIT_FAILED} the operation failed or was refused, "
        f"{EXIT_USAGE} bad usage, {EXIT_NO_MASTER} no master answers on the control socket.",
    )
    top.add_argument(
        "--control",
        metavar="PATH",
        default=None,
        help=f"the master's control socket [default: {defaultControlPath()}]",
    )
    top.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=None,
        help=f"give up on a master that does not answer within this long [default: {QUICK_TIMEOUT:g} for status, "
        "stacks and watch; reload, scale, recycle and stop wait until the work is done]",
    )
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    status = commands.add_parser("status", help="the master and one row per worker process")
    status.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    reload = commands.add_parser("reload", help="replace every worker, one by one, without dropping a connection")
    reload.add_argument(
        "--agent", action="store_true", help="restart the agent (--agent) first: the old one leaves, then a new one starts"
    )
    scale = commands.add_parser("scale", help="run N workers")
    scale.add_argument("count", type=int, metavar="N")
    recycle = commands.add_parser("recycle", help="replace one worker (its replacement is ready first)")
    recycle.add_argument("workerId", type=int, metavar="ID")
    commands.add_parser("stop", help="stop the master gracefully and wait until it has")
    stacks = commands.add_parser("stacks", help="print a worker's current Python stacks")
    stacks.add_argument("workerId", type=int, metavar="ID")
    watch = commands.add_parser("watch", help="print lifecycle events as they happen, until interrupted")
    watch.add_argument("--json", action="store_true", help="one JSON object per line")
    return top


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _size(value: Optional[int]) -> str:
    if value is None:
        return "-"
    return f"{value / (1024 * 1024):.1f}M"


def _cell(value) -> str:
    return "-" if value is None else str(value)


def formatStatus(status: dict) -> str:
    """
    The L{Status} answer as the table C{txcluster status} prints.
    """
    head = (
        f"master pid {status['pid']}, up {_duration(status['uptime'])}, {status['app']}, "
        f"{status['scheduling']} scheduling\n"
        f"workers: {status['ready']}/{status['workerCount']} ready (ready at {status['minReady']})"
        f"{', STOPPING' if status['stopping'] else ''}; "
        f"queue: {status['queue']} connections waiting for a worker; "
        f"{status['failures']} {'failure' if status['failures'] == 1 else 'failures'} in the restart window"
    )
    columns = ["ID", "PID", "STATE", "UPTIME", "RESTARTS", "HANDED", "OPEN", "RSS", "USS", "CPU%", "LAG", "LISTENS"]
    rows = [columns]
    for w in status["workers"]:
        rows.append(
            [
                "agent" if w.get("role") == "agent" else str(w["id"]),
                _cell(w["pid"]),
                w["state"] + (f" (recycling: {w['recycling']})" if w.get("recycling") else ""),
                _duration(w["uptime"]) if w["pid"] is not None else "-",
                str(w["restarts"]),
                str(w["handed"]),
                _cell(w["connections"]),
                _size(w["rss"]),
                _size(w.get("memory")),
                "-" if w["cpuPercent"] is None else f"{w['cpuPercent']:.1f}",
                "-" if w["lag"] is None else f"{w['lag'] * 1000:.1f}ms",
                ", ".join(w["listens"]) or "-",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]
    return head + "\n\n" + "\n".join(line.rstrip() for line in lines)


def formatEvent(event: dict) -> str:
    """
    One L{Event} as the line C{txcluster watch} prints.
    """
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(event.get("time", 0)))
    name = event.get("event", "?")
    if "workerId" not in event:
        who = "master"
    elif event["workerId"] == 0:
        who = f"agent (pid {event.get('pid')})"
    else:
        who = f"worker {event['workerId']} (pid {event.get('pid')})"
    rest = {k: v for k, v in event.items() if k not in ("event", "time", "workerId", "pid")}
    details = " ".join(f"{k}={json.dumps(v)}" for k, v in rest.items())
    return f"{when} {name:<10} {who}{' ' + details if details else ''}"


class _Client:
    """
    One command's conversation with the master.
    """

    def __init__(self, options, out: TextIO, err: TextIO) -> None:
        self.options = options
        self.out = out
        self.err = err
        self.code = EXIT_OK
        self.sawStopping = False
        self.interrupted = False
        self.late: Optional[float] = None

    def _interrupted(self) -> None:
        # Ctrl-C or SIGTERM: the watch ends there, as asked.
        self.interrupted = True

    async def run(self, reactor) -> None:
        from twisted.internet import defer, endpoints
        from twisted.internet.error import ConnectError, ConnectionClosed
        from twisted.protocols import amp

        from txcluster._control import defaultControlPath

        client = self
        path = self.options.control or defaultControlPath()

        class Protocol(amp.AMP):
            lost = defer.Deferred()

            @Event.responder
            def event(self, event: str) -> dict:
                client.printEvent(json.loads(event))
                return {}

            def connectionLost(self, reason) -> None:
                super().connectionLost(reason)
                if not Protocol.lost.called:
                    Protocol.lost.callback(None)

        try:
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                self.fail(EXIT_NO_MASTER, f"txcluster: no master answers on {path}: it is not a socket")
                return
        except OSError:
            pass
        endpoint = endpoints.UNIXClientEndpoint(reactor, path, timeout=5)
        try:
            protocol = await endpoints.connectProtocol(endpoint, Protocol())
        except ConnectError as e:
            self.fail(EXIT_NO_MASTER, f"txcluster: no master answers on {path}: {_reason(e)}")
            return
        command = self.options.command
        reactor.addSystemEventTrigger("before", "shutdown", self._interrupted)
        timeout = self.options.timeout
        if timeout is None:
            timeout = QUICK_TIMEOUT if command in ("status", "stacks", "watch") else 0
        timer = None
        if timeout > 0:

            def late():
                self.late = timeout
                if protocol.transport is not None:
                    protocol.transport.abortConnection()

            timer = reactor.callLater(timeout, late)
        try:
            if command == "status":
                answer = await protocol.callRemote(Status)
                status = json.loads(answer["status"])
                print(json.dumps(status, indent=2) if self.options.json else formatStatus(status), file=self.out)
            elif command == "reload":
                arguments = {"agent": True} if self.options.agent else {}
                print((await protocol.callRemote(Reload, **arguments))["summary"], file=self.out)
            elif command == "scale":
                print((await protocol.callRemote(Scale, count=self.options.count))["summary"], file=self.out)
            elif command == "recycle":
                print((await protocol.callRemote(Recycle, workerId=self.options.workerId))["summary"], file=self.out)
            elif command == "stop":
                print((await protocol.callRemote(Stop))["summary"], file=self.out)
            elif command == "stacks":
                answer = await protocol.callRemote(Stacks, workerId=self.options.workerId)
                who = "agent" if self.options.workerId == 0 else f"worker {self.options.workerId}"
                print(f"{who} (pid {answer['pid']}):", file=self.out)
                print(answer["stacks"].rstrip("\n"), file=self.out)
            elif command == "watch":
                await protocol.callRemote(Watch)
                if timer is not None and timer.active():
                    timer.cancel()
                if not self.options.json:
                    print(f"watching the master on {path} (Ctrl-C to stop)", file=self.err)
                await Protocol.lost
                if self.interrupted:
                    return
                if self.sawStopping:
                    print("the master stopped", file=self.err)
                else:
                    self.fail(EXIT_NO_MASTER, f"txcluster: the master on {path} went away")
        except (NotRunning, OperationFailed, NoSuchWorker, BadRequest) as e:
            self.fail(EXIT_FAILED, f"txcluster {command}: {e}")
        except amp.RemoteAmpError as e:
            self.fail(EXIT_FAILED, f"txcluster {command}: the master answered {e.errorCode.decode('ascii', 'replace')}: {e.description}")
        except amp.UnhandledCommand:
            self.fail(EXIT_FAILED, f"txcluster {command}: this master does not know the command (an older txcluster?)")
        except ConnectionClosed:
            if self.late is not None:
                self.fail(EXIT_NO_MASTER, f"txcluster {command}: the master on {path} did not answer within {self.late:g} s")
            elif self.interrupted:
                self.fail(EXIT_FAILED, f"txcluster {command}: interrupted; the master carries on with it")
            else:
                self.fail(EXIT_NO_MASTER, f"txcluster {command}: the master on {path} closed the connection before it answered")
        finally:
            if timer is not None and timer.active():
                timer.cancel()
            if protocol.transport is not None:
                protocol.transport.loseConnection()

    def printEvent(self, event: dict) -> None:
        if event.get("event") == "stopping":
            self.sawStopping = True
        print(json.dumps(event) if self.options.json else formatEvent(event), file=self.out, flush=True)

    def fail(self, code: int, message: str) -> None:
        self.code = code
        print(message, file=self.err)


_CONNECT_ERRORS = {
    errno.ENOENT: "no such socket (is the master running, with this --control?)",
    errno.ECONNREFUSED: "connection refused (the socket is stale: its master is gone)",
    errno.EACCES: "permission denied (the socket is for root and the master's user)",
    errno.ENOTSOCK: "not a socket",
}


def _reason(error: Exception) -> str:
    code = getattr(error, "osError", None)
    if isinstance(code, int) and code in _CONNECT_ERRORS:
        return _CONNECT_ERRORS[code]
    if isinstance(code, int):
        return os.strerror(code)
    text = str(code) if code else ""
    if not text:
        text = (error.args[0] if error.args else "") or type(error).__name__
    return str(text).strip().rstrip(".")


def main(argv=None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """
    Run the C{txcluster} command.

    @return: its exit code.
    """
    try:
        options = parser().parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    from twisted.internet import defer, task

    client = _Client(options, out, err)

    def run(reactor):
        return defer.ensureDeferred(client.run(reactor))

    try:
        task.react(run)
    except SystemExit as e:
        if client.interrupted:
            return client.code
        if e.code not in (0, None):
            return client.code or EXIT_FAILED
    except KeyboardInterrupt:
        pass
    return client.code


def script() -> None:
    """
    The console script's entry point.
    """
    if hasattr(signal, "SIGPIPE"):
        # "txcluster status | head -1": end quietly, as command-line tools do.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
