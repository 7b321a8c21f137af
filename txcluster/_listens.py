# -*- test-case-name: tests.test_master,tests.test_hostile -*-
"""
The listen broker: what the master answers when a worker listens
(L{QueryServer}), says it takes connections (L{Listening}) or stops
(L{Close}), checked against what a worker may ask and the
C{--allow-listen} policy, carried out on the L{HandleTable}.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.logger import Logger

from txcluster._access import ListenPolicy, normalizeAddress
from txcluster._commands import BindFailed, ListenRefused, UnknownListen, WorkerLeaving
from txcluster._handles import HandleTable
from txcluster._lifecycle import SERVING_PHASES, WorkerProcess
from txcluster._sockets import KINDS, ListenKey

_log = Logger(namespace="txcluster.master")


class ListenBroker:
    """
    Answers the listen commands of every worker, and remembers what each
    worker listens on.

    @param datagramsRefused: why UDP listens are refused (C{--max-requests}
        cannot count datagrams), or L{None}.
    @param listening: called with C{(process, handle)} the first time a
        process says it takes connections on a handle.
    """

    def __init__(
        self,
        table: HandleTable,
        policy: ListenPolicy,
        listening: Callable[[WorkerProcess, object], None] = lambda process, handle: None,
        datagramsRefused: Optional[str] = None,
    ) -> None:
        self.table = table
        self.policy = policy
        self._onListening = listening
        self._datagramsRefused = datagramsRefused
        self._listens: dict[WorkerProcess, dict[int, str]] = {}
        self._listening: dict[WorkerProcess, set] = {}

    def _samePort(self, key: ListenKey) -> str:
        # The usual cause: the app listens on all interfaces where the
        # --listen (or systemd's socket) names one, or the other way round.
        for handle in self.table.handles():
            if handle.declared and handle.key.kind[:3] == key.kind[:3] and handle.port == key.port and key.port:
                return (
                    f" (the master serves {handle.describe()}: for the app's listen to share it, "
                    "it must name that same interface)"
                )
        return ""

    def listensOf(self, process: WorkerProcess) -> tuple:
        """
        The addresses C{process} listens on, sorted.
        """
        return tuple(sorted(self._listens.get(process, {}).values()))

    def forget(self, process: WorkerProcess) -> None:
        """
        C{process} is gone.
        """
        self._listens.pop(process, None)
        self._listening.pop(process, None)

    def queryServer(self, process: WorkerProcess, kind, address, port, index, backlog, mode) -> dict:
        problem = checkQuery(kind, address, port, index, backlog, mode)
        if problem is not None:
            _log.warn(
                "{worker} asked for an invalid listen: {problem}",
                worker=process.describe(),
                problem=problem,
                workerId=process.workerId,
                pid=process.pid,
            )
            raise ListenRefused(problem)
        if process.phase not in SERVING_PHASES:
            # Quietly: a worker told to leave while its application starts
            # exits without calling that a failure.
            raise WorkerLeaving("this worker is leaving the cluster")
        if not self.table.accepting:
            raise WorkerLeaving("the master is stopping")
        key = ListenKey(kind, normalizeAddress(kind, address), port, index)
        if not key.isStream and self._datagramsRefused is not None:
            self._refuse(process, key, self._datagramsRefused)
        if not self.policy.permits(key):
            self._refuse(process, key, self.policy.explain())
        try:
            handle = self.table.query(process, key, backlog, mode)
        except OSError as e:
            _log.warn(
                "{worker} cannot listen on {address}: {error}{hint}",
                worker=process.describe(),
                address=key.describe(),
                error=e.strerror or str(e),
                hint=self._samePort(key),
                workerId=process.workerId,
                pid=process.pid,
            )
            raise BindFailed(f"{e.errno or 0} {e.strerror or e}")
        if handle.sock is None:
            raise WorkerLeaving("the master is stopping")
        self._listens.setdefault(process, {})[handle.listenId] = handle.describe()
        return {
            "listenId": handle.listenId,
            "scheduling": handle.scheduling,
            "host": handle.host,
            "port": handle.port,
            "fd": handle.sock.fileno() if handle.dispatcher is None else None,
            "kind": handle.key.kind,
        }

    def _refuse(self, process: WorkerProcess, key: ListenKey, reason: str) -> None:
        why = f"{key.describe()}: {reason}"
        _log.warn(
            "{worker} may not listen on {why}",
            worker=process.describe(),
            why=why,
            workerId=process.workerId,
            pid=process.pid,
        )
        raise ListenRefused(why)

    def listening(self, process: WorkerProcess, listenId: int) -> None:
        handle = self.table.get(listenId)
        if handle is None or process not in handle.members:
            raise UnknownListen(f"listen {listenId} is not one of this worker's")
        seen = self._listening.setdefault(process, set())
        if listenId in seen:
            return
        seen.add(listenId)
        if process.phase in SERVING_PHASES:
            # A worker that was told to leave (or is being killed) may
            # still report a listen that crossed the Disconnect: it stays
            # out of rotation.
            self.table.listening(process, listenId, process.allowance)
        _log.info(
            "{worker} listening on {address}",
            worker=process.describe(),
            address=handle.describe(),
            workerId=process.workerId,
            pid=process.pid,
        )
        self._onListening(process, handle)

    def close(self, process: WorkerProcess, listenId: int) -> None:
        self._listening.get(process, set()).discard(listenId)
        address = self._listens.get(process, {}).pop(listenId, None)
        if address is None:
            raise UnknownListen(f"listen {listenId} is not one of this worker's")
        _log.info(
            "{worker} stopped listening on {address}",
            worker=process.describe(),
            address=address,
            workerId=process.workerId,
            pid=process.pid,
        )
        self.table.close(process, listenId)


def checkQuery(kind, address, port, index, backlog, mode) -> Optional[str]:
    """
    What is wrong with a L{QueryServer}'s arguments, or L{None}.  Every
    value is the worker's: quoted text is cut short, for the log.
    """
    if kind not in KINDS:
        return f"unknown kind {_quote(kind)}"
    if not 0 <= port <= 65535:
        return f"port {port} is out of range"
    if not 0 <= index <= 1024:
        return f"index {index} is out of range"
    if not 0 <= backlog <= 65535:
        return f"backlog {backlog} is out of range"
    if not 0 <= mode <= 0o7777:
        return f"mode {mode:o} is out of range"
    if len(address) > 1024:
        return f"address is too long ({len(address)} characters)"
    if kind == "unix":
        # The worker makes a relative path absolute; a NUL may only start
        # an abstract name.
        if not address.startswith(("/", "\0")) or "\0" in address[1:] or len(address.encode()) > 107:
            return f"bad UNIX socket path {_quote(address)}"
    elif not (address.isascii() and address.isprintable()):
        # bind() raises TypeError, not OSError, for these.
        return f"bad interface address {_quote(address)}"
    elif address and not _isNumericAddress(address):
        # A name would make the master resolve it (blocking its reactor);
        # workers resolve names before they ask.
        return f"interface {_quote(address)} is not a numeric address"
    return None


def _isNumericAddress(address: str) -> bool:
    from twisted.internet.abstract import isIPAddress, isIPv6Address

    return isIPAddress(address) or isIPv6Address(address)


def _quote(text: str, limit: int = 80) -> str:
    quoted = repr(text)
    return quoted if len(quoted) <= limit else f"{quoted[:limit]}... ({len(text)} characters)"


def declareListens(table: HandleTable, declared: list, reactor, environ) -> list[ListenKey]:
    """
    Bind every C{--listen} (a L{txcluster._access.Declared}) and serve
    every socket systemd passed (an L{txcluster._access.Inherited}), before
    any worker exists.  A passed socket no C{--listen} names is logged.

    @return: the keys they serve, for the L{ListenPolicy}.
    @raise CannotListenError: a listen could not be bound; nothing stays
        bound.
    @raise InheritedSocketError: a passed socket is missing or unusable.
    """
    from twisted.internet.error import CannotListenError

    from txcluster._access import Inherited
    from txcluster._systemd import inheritSocket, passedDescriptors

    keys: list[ListenKey] = []
    used: set[int] = set()
    for d in declared:
        try:
            if isinstance(d, Inherited):
                inherited = inheritSocket(reactor, d, environ)
                if inherited.fileno in used:
                    continue
                used.add(inherited.fileno)
                handle = table.inherit(inherited.key, inherited.sock, inherited.aliases)
                keys.extend((inherited.key,) + inherited.aliases)
                _log.info(
                    "serving {address} passed by systemd (descriptor {fileno}, --listen {description})",
                    address=handle.describe(),
                    fileno=inherited.fileno,
                    description=d.description,
                )
                continue
            handle = table.declare(d.key, d.backlog, d.mode)
        except OSError as e:
            table.closeAll()
            raise CannotListenError(d.key.address, d.key.port, e) from None
        except Exception:
            table.closeAll()
            raise
        keys.append(d.key)
        _log.info("declared {address} (--listen {description})", address=handle.describe(), description=d.description)
    # Twisted's endpoint parser loads every plugin (megabytes): only when
    # systemd may have passed something (it always names what it passes).
    mayHave = environ.get("LISTEN_FDNAMES") or any(isinstance(d, Inherited) for d in declared)
    for fileno, name, domain in passedDescriptors(reactor, environ) if mayHave else ():
        if fileno not in used:
            _log.warn(
                "systemd passed descriptor {fileno} (name {name}) and no --listen names it: "
                "it is not served (add --listen systemd:domain={domain}:name={name})",
                fileno=fileno,
                name=name,
                domain=domain,
            )
    return keys
