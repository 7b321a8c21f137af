# -*- test-case-name: tests.test_systemd -*-
"""
Running under systemd: the notify protocol (C{Type=notify} and
C{Type=notify-reload}: C{READY=1} once the workers are ready,
C{RELOADING=1} around a rolling reload, C{STOPPING=1}, C{STATUS=} lines,
C{WATCHDOG=1}) and the listening sockets systemd passes (socket
activation, C{--listen systemd:...}).

See C{docs/deployment.md}.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import Callable, Mapping, Optional

from attrs import frozen
from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

from txcluster import _events
from txcluster._access import Inherited, normalizeAddress
from txcluster._sockets import ListenKey

_log = Logger(namespace="txcluster.master")

#: The variables systemd sets for the process it starts, which the
#: workers must not see: a worker that notified or adopted them would
#: speak for the master.
SYSTEMD_VARIABLES = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
)

#: Seconds between two refreshes of C{STATUS=} (the connection count moves
#: all the time; an event refreshes it at once).
STATUS_INTERVAL = 5.0


# The notify socket ------------------------------------------------------------


def notifyAddress(environ: Mapping[str, str]) -> Optional[str]:
    """
    The address of C{$NOTIFY_SOCKET}: a path, or an abstract name (written
    C{@name}) as a string starting with NUL; L{None} when not set.
    """
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        return None
    if address.startswith("@"):
        return "\0" + address[1:]
    return address


class Notifier:
    """
    Sends notify datagrams (C{READY=1}, C{STATUS=...}) to systemd's
    socket.  A datagram that cannot be sent is logged, once per reason, and
    dropped: systemd being gone or slow never blocks or stops the master.
    """

    def __init__(self, address: str, makeSocket: Callable[[], socket.socket] = None) -> None:
        self.address = address
        if makeSocket is None:
            makeSocket = lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket = makeSocket()
        self._socket.setblocking(False)
        self._complained: set = set()

    def send(self, **fields: object) -> bool:
        """
        Send one datagram of C{NAME=value} lines: C{send(READY=1,
        STATUS="4/4 workers ready")}.

        @return: whether it was sent.
        """
        text = "\n".join(f"{name}={value}" for name, value in fields.items())
        try:
            self._socket.sendto(text.encode("utf-8"), self.address)
        except OSError as e:
            reason = errno.errorcode.get(e.errno, str(e.errno))
            if reason not in self._complained:
                self._complained.add(reason)
                _log.warn(
                    "could not notify systemd on {address} ({why}); dropping {names} "
                    "(said once per reason)",
                    address=self.address.replace("\0", "@"),
                    why=e.strerror or e,
                    names=", ".join(fields),
                )
            return False
        return True

    def close(self) -> None:
        self._socket.close()


def watchdogInterval(environ: Mapping[str, str], pid: int) -> Optional[float]:
    """
    How often to send C{WATCHDOG=1}: half of C{$WATCHDOG_USEC}, when
    systemd asked for it for this process (C{$WATCHDOG_PID} unset or this
    pid); L{None} otherwise.
    """
    if not environ.get("WATCHDOG_USEC"):
        return None
    try:
        usec = int(environ["WATCHDOG_USEC"])
    except ValueError:
        _log.warn("ignoring WATCHDOG_USEC={value!r}: not a number of microseconds", value=environ["WATCHDOG_USEC"])
        return None
    watched = environ.get("WATCHDOG_PID")
    if usec <= 0 or (watched and watched != str(pid)):
        return None
    return usec / 2 / 1_000_000


def monotonicUsec() -> int:
    """
    C{CLOCK_MONOTONIC} in microseconds, as C{MONOTONIC_USEC=} wants it.
    """
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def describeStatus(cluster, stopping: bool = False, starting: Optional[int] = None) -> str:
    """
    The C{STATUS=} line for the cluster now: what C{systemctl status}
    shows.

    @param stopping: the cluster begins to stop (it may not say so yet).
    @param starting: a reload of this many workers begins (it may not
        run yet).
    """
    # Since the master started (a reload does not take it back).  Cheap
    # counts only: this runs on a timer (statistics() reads /proc).
    handed = sum(cluster.recorder.statistics().handed.values())
    connections = "connection" if handed == 1 else "connections"
    if stopping or cluster.stopping:
        running = sum(1 for w in cluster.statistics().workers if w.pid is not None)
        why = "giving up (too many failures; see the log)" if cluster.exitCode else "stopping"
        return f"{why}: {running} worker {'process' if running == 1 else 'processes'} to finish"
    progress = (0, starting) if starting is not None else cluster.reloadProgress()
    ready = f"{cluster.readyWorkers()}/{cluster.workerCount()} workers ready"
    if progress is not None:
        return f"reloading {progress[0]}/{progress[1]}; {ready}, {handed} {connections} handed"
    if not cluster.running:
        return "starting"
    return f"{ready}, {handed} {connections} handed"


class SystemdNotify(service.Service):
    """
    Tells systemd about the cluster through C{$NOTIFY_SOCKET}:

      - C{READY=1} (with C{MAINPID=}) once the cluster first is ready: its
        C{minReady} workers are listening on everything their app asked
        for;
      - C{RELOADING=1} (with C{MONOTONIC_USEC=}) when a rolling reload
        begins, and C{READY=1} when it ends (a failed one says why in
        C{STATUS=}; the old workers serve on);
      - C{STOPPING=1} when a stop begins;
      - C{STATUS=} lines on every change, and every L{STATUS_INTERVAL};
      - C{WATCHDOG=1} every half C{$WATCHDOG_USEC} while the reactor runs.

    @param cluster: the L{txcluster.ClusterService}.
    @param notifier: a L{Notifier}.
    """

    def __init__(self, cluster, notifier: Notifier, environ: Mapping[str, str], pid: Optional[int] = None) -> None:
        self._cluster = cluster
        self._notifier = notifier
        # The pid and the watchdog are known at start (twistd may fork
        # between this and then).
        self._pidArg = pid
        self._environ = dict(environ)
        self._pid = None
        self._watchdog = None
        self._loops: list[task.LoopingCall] = []
        self._announced = False
        self._reloading = False
        self._pendingStatus = None
        self._lastStatus: Optional[str] = None
        self._why: Optional[str] = None
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        self._pid = os.getpid() if self._pidArg is None else self._pidArg
        self._watchdog = watchdogInterval(self._environ, self._pid)
        clock = self._cluster.reactor
        self._cluster.addObserver(self._event)
        workers = self._cluster.config.workers
        self._notifier.send(MAINPID=self._pid, STATUS=f"starting {workers} worker{'' if workers == 1 else 's'}")
        _log.info(
            "telling systemd about the cluster on {address}{watchdog}",
            address=self._notifier.address.replace("\0", "@"),
            watchdog="" if self._watchdog is None else f" (watchdog every {self._watchdog:g}s)",
        )
        intervals = [(STATUS_INTERVAL, self._refresh)]
        if self._watchdog is not None:
            intervals.append((self._watchdog, lambda: self._notifier.send(WATCHDOG=1)))
        for interval, call in intervals:
            loop = task.LoopingCall(call)
            loop.clock = clock
            loop.start(interval, now=False)
            self._loops.append(loop)

    def stopService(self):
        """
        Keep telling systemd until the cluster's stop is over (C{STATUS}
        while the workers drain); systemd stops its watchdog once the stop
        begins.
        """
        super().stopService()
        return self._cluster.whenStopped().addBoth(lambda _: self._close())

    def _close(self) -> None:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        if self._pendingStatus is not None and self._pendingStatus.active():
            self._pendingStatus.cancel()
        self._cluster.removeObserver(self._event)
        self._notifier.close()

    def _event(self, event) -> None:
        cluster = self._cluster
        if isinstance(event, _events.ClusterStopping):
            self._stopping = True
            self._notifier.send(STOPPING=1, STATUS=self._status())
            return
        if isinstance(event, _events.ReloadStarted) and self._announced and not self._stopping:
            self._reloading = True
            self._why = None
            self._notifier.send(RELOADING=1, MONOTONIC_USEC=monotonicUsec(), STATUS=self._status(event.workers))
            return
        if isinstance(event, _events.ReloadFinished) and self._reloading:
            self._reloading = False
            if event.outcome == "stopped":
                return
            if event.outcome == "failed":
                self._why = f"reload failed: {event.why}; the old workers serve on"
            self._notifier.send(READY=1, STATUS=self._status())
            return
        if not self._announced and cluster.isReady():
            self._announced = True
            _log.info("cluster ready: telling systemd (READY=1)")
            self._notifier.send(READY=1, MAINPID=self._pid, STATUS=self._status())
            return
        self._scheduleStatus()

    def _status(self, reloading: Optional[int] = None) -> str:
        text = describeStatus(self._cluster, self._stopping, reloading)
        if self._why is not None and not self._reloading and not self._stopping:
            text = f"{self._why}; {text}"
        self._lastStatus = text
        return text

    def _scheduleStatus(self) -> None:
        # Events come in bursts (fork, online, listening, ready): one line.
        if self._pendingStatus is None or not self._pendingStatus.active():
            self._pendingStatus = self._cluster.reactor.callLater(0, self._refresh)

    def _refresh(self) -> None:
        previous = self._lastStatus
        text = self._status()
        if text != previous:
            self._notifier.send(STATUS=text)


# Socket activation ---------------------------------------------------------------


class InheritedSocketError(Exception):
    """
    A C{--listen systemd:...} names no socket systemd passed, or one the
    master cannot serve.
    """


@frozen
class InheritedSocket:
    """
    A listening socket systemd passed, ready for the L{HandleTable}.

    @ivar key: the address it is known by.
    @ivar aliases: other keys it serves (a dual-stack C{[::]} socket serves
        C{0.0.0.0}).
    """

    sock: socket.socket
    key: ListenKey
    aliases: tuple
    fileno: int


def _endpoint(reactor, description: str):
    # Twisted's own systemd: parser turns an index or name into the
    # descriptor (from LISTEN_FDS / LISTEN_FDNAMES, read when Twisted's
    # endpoints module was first imported).
    from twisted.internet import endpoints

    return endpoints.serverFromString(reactor, description)


def passedDescriptors(reactor, environ: Mapping[str, str]) -> list[tuple[int, str, str]]:
    """
    Every socket systemd passed to this process: C{(fileno, name,
    domain)}, the domain as C{--listen systemd:domain=} names it.
    """
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    passed = []
    for index in range(1024):
        try:
            endpoint = _endpoint(reactor, f"systemd:domain=INET:index={index}")
        except IndexError:
            break
        try:
            family = socket.socket(fileno=endpoint.fileno)
            domain = {socket.AF_INET6: "INET6", socket.AF_UNIX: "UNIX"}.get(family.family, "INET")
            family.detach()
        except OSError:
            domain = "INET"
        passed.append((endpoint.fileno, names[index] if index < len(names) and names[index] else "unknown", domain))
    return passed


def _missing(inherited: Inherited, passed: list) -> str:
    if not passed:
        return (
            "systemd passed no sockets to this process (LISTEN_FDS and LISTEN_PID are not set for "
            "it: start it from a .socket unit, or with systemd-socket-activate, and run twistd "
            "with --nodaemon; twist never daemonizes; Twisted also ignores the sockets when "
            "LISTEN_FDNAMES is missing: give systemd-socket-activate --fdname=NAME)"
        )
    which = ", ".join(f"index={i} name={name}" for i, (_, name, _) in enumerate(passed))
    return f"systemd passed no such socket; it passed {which}"


def inheritSocket(reactor, inherited: Inherited, environ: Mapping[str, str]) -> InheritedSocket:
    """
    The socket C{inherited} names, checked, non-blocking and close-on-exec.

    @raise InheritedSocketError: naming the C{--listen} and what is wrong.
    """
    prefix = f"--listen {inherited.description}"
    try:
        endpoint = _endpoint(reactor, inherited.description)
    except (IndexError, KeyError):
        raise InheritedSocketError(f"{prefix}: {_missing(inherited, passedDescriptors(reactor, environ))}") from None
    fileno = endpoint.fileno
    try:
        sock = socket.socket(fileno=fileno)
    except OSError as e:
        raise InheritedSocketError(f"{prefix}: descriptor {fileno} is not a socket ({e.strerror})") from None
    try:
        if sock.type != socket.SOCK_STREAM:
            raise InheritedSocketError(
                f"{prefix}: descriptor {fileno} is not a stream socket (txcluster serves "
                "ListenStream= sockets)"
            )
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise InheritedSocketError(f"{prefix}: descriptor {fileno} is not listening (Accept=no is needed)")
        family = sock.family
        expected = getattr(socket, "AF_" + inherited.domain)
        if family != expected and not (family == socket.AF_INET6 and expected == socket.AF_INET):
            raise InheritedSocketError(
                f"{prefix}: descriptor {fileno} is an {socket.AddressFamily(family).name} socket, "
                f"not AF_{inherited.domain}"
            )
        key, aliases = _keysOf(sock)
        sock.setblocking(False)
        sock.set_inheritable(False)
    except InheritedSocketError:
        sock.detach()
        raise
    return InheritedSocket(sock, key, aliases, fileno)


def _keysOf(sock: socket.socket) -> tuple[ListenKey, tuple]:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        path = name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name
        return ListenKey("unix", path, 0, 0), ()
    host, port = name[0], name[1]
    if sock.family == socket.AF_INET:
        return ListenKey("tcp4", normalizeAddress("tcp4", host), port, 0), ()
    key = ListenKey("tcp6", normalizeAddress("tcp6", host), port, 0)
    dualStack = not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    if key.address == "::" and dualStack:
        # systemd's ListenStream=8080 is [::]:8080 taking IPv4 too: an
        # app's listenTCP(8080) (0.0.0.0) is served by it.
        return key, (ListenKey("tcp4", "0.0.0.0", port, 0),)
    return key, ()


def removeFromEnvironment(environ: dict) -> dict:
    """
    C{environ} without the variables systemd set for the master.
    """
    for name in SYSTEMD_VARIABLES:
        environ.pop(name, None)
    return environ
