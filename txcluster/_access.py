# -*- test-case-name: tests.test_access -*-
"""
Which listens the master makes for workers: declared listens (bound at
start-up, before any privilege is dropped) and the C{--allow-listen} policy
for what workers may ask for later.  Pure: parsing and matching only.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Iterable, Optional

from attrs import frozen

from txcluster._sockets import ListenKey, tcpKind, udpKind

_STREAM_PREFIXES = {"tcp": "tcp", "tcp6": "tcp", "ssl": "tcp", "unix": "unix"}


class BadListenDescription(ValueError):
    """
    A C{--listen} or C{--allow-listen} value cannot be understood.
    """


def normalizeAddress(kind: str, address: str) -> str:
    """
    The interface as the master keys it: "all interfaces" has one spelling.
    """
    if kind in ("tcp4", "udp4") and address in ("", "0.0.0.0"):
        return "0.0.0.0"
    if kind in ("tcp6", "udp6") and address in ("", "::", "::0"):
        return "::"
    return address


def _fields(description: str) -> tuple[str, list[str], dict]:
    # strports syntax: kind:positional...:key=value, with "\:" escaping.
    parts, current, escaped = [], "", False
    for char in description:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    kind = parts[0].lower()
    positional = [p for p in parts[1:] if "=" not in p]
    keywords = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    return kind, positional, keywords


@frozen
class Declared:
    """
    A listen the master binds at start-up.

    @ivar key: the key a worker's matching listen asks for.
    @ivar backlog: the listen backlog.
    @ivar mode: the permissions of a UNIX socket file.
    @ivar description: as the user wrote it.
    """

    key: ListenKey
    backlog: int
    mode: int
    description: str

    @property
    def isStream(self) -> bool:
        return self.key.isStream


@frozen
class Inherited:
    """
    A C{--listen systemd:...}: a listening socket systemd passed to the
    master (socket activation), in Twisted's C{systemd:} endpoint syntax.

    @ivar domain: C{INET}, C{INET6} or C{UNIX}, as the description says.
    @ivar index: its place among the passed sockets, or L{None}.
    @ivar name: its C{FileDescriptorName=}, or L{None}.
    """

    domain: str
    index: Optional[int]
    name: Optional[str]
    description: str

    #: systemd passes stream sockets here (Twisted's endpoint adopts only those).
    isStream = True


_DOMAINS = ("INET", "INET6", "UNIX")


def _parseInherited(description: str, keywords: dict) -> Inherited:
    domain = keywords.get("domain")
    if domain not in _DOMAINS:
        raise BadListenDescription(
            f"{description!r}: a systemd listen needs domain=INET, INET6 or UNIX (the family of the socket systemd passes)"
        )
    index, name = keywords.get("index"), keywords.get("name")
    if (index is None) == (name is None):
        raise BadListenDescription(
            f"{description!r}: a systemd listen needs exactly one of index=N (its place among the "
            "sockets systemd passes) or name=NAME (its FileDescriptorName=)"
        )
    if index is not None:
        if not index.isdigit():
            raise BadListenDescription(f"{description!r}: index must be a whole number, not {index!r}")
        return Inherited(domain, int(index), None, description)
    return Inherited(domain, None, name, description)


def parseDeclared(description: str):
    """
    Parse a C{--listen} value: a server endpoint description in the syntax
    of C{strports} (C{tcp:80}, C{tcp:8443:interface=127.0.0.1},
    C{tcp6:80}, C{ssl:443:...}, C{unix:/run/app.sock:mode=660},
    C{udp:53}), or a socket systemd passed
    (C{systemd:domain=INET:index=0}, C{systemd:domain=INET:name=web}).
    The worker's own listen must name the same address for it to be shared
    (an C{ssl:} listen is a TCP socket to the master).

    @return: a L{Declared} (the master binds it) or an L{Inherited}.
    @raise BadListenDescription: naming what is wrong.
    """
    kind, positional, keywords = _fields(description)
    if kind == "systemd":
        return _parseInherited(description, keywords)
    try:
        backlog = int(keywords.get("backlog", "50"))
        if kind == "unix":
            if not positional or not positional[0]:
                raise BadListenDescription(f"{description!r}: a unix listen needs a path")
            mode = int(keywords.get("mode", "666"), 8)
            key = ListenKey("unix", positional[0], 0, 0)
            return Declared(key, backlog, mode, description)
        if kind in ("tcp", "tcp6", "ssl", "udp"):
            if not positional:
                raise BadListenDescription(f"{description!r}: a port is required")
            port = int(positional[0])
            if not 0 < port <= 65535:
                raise BadListenDescription(f"{description!r}: port {port} is out of range (1-65535)")
            interface = keywords.get("interface", "::" if kind == "tcp6" else "")
            if kind == "udp":
                keyKind = udpKind(interface)
            else:
                keyKind = "tcp6" if kind == "tcp6" else tcpKind(interface)
            key = ListenKey(keyKind, normalizeAddress(keyKind, interface), port, 0)
            return Declared(key, backlog, 0o666, description)
    except ValueError as e:
        if isinstance(e, BadListenDescription):
            raise
        raise BadListenDescription(f"{description!r}: {e}") from None
    raise BadListenDescription(
        f"{description!r}: unknown kind {kind!r} (use tcp, tcp6, ssl, unix, udp or systemd)"
    )


@frozen
class Pattern:
    """
    One C{--allow-listen} rule: a family (C{tcp}, C{udp}, C{unix}) and a
    port range or path glob; C{*} matches anything.
    """

    family: str
    low: int = 0
    high: int = 65535
    glob: str = "*"
    interface: Optional[str] = None

    def matches(self, key: ListenKey) -> bool:
        if self.family == "*":
            return True
        if key.kind == "unix":
            return self.family == "unix" and fnmatch.fnmatchcase(key.address, self.glob)
        if self.family != key.kind[:3]:
            return False
        if self.interface is not None and normalizeAddress(key.kind, self.interface) != key.address:
            return False
        return self.low <= key.port <= self.high


def parsePattern(text: str) -> Pattern:
    """
    Parse a C{--allow-listen} value: C{*} (anything), C{tcp:8080},
    C{tcp:8000-8099}, C{tcp:*}, C{tcp:0} (ephemeral ports only), C{udp:53},
    C{unix:/run/app/*}; a C{:interface=ADDRESS} suffix restricts a TCP or
    UDP rule to one interface.

    @raise BadListenDescription: naming what is wrong.
    """
    if text.strip() == "*":
        return Pattern("*")
    kind, positional, keywords = _fields(text)
    if kind == "unix":
        if not positional or not positional[0]:
            raise BadListenDescription(f"{text!r}: a unix rule needs a path or glob")
        return Pattern("unix", glob=positional[0])
    family = {"tcp": "tcp", "tcp6": "tcp", "ssl": "tcp", "udp": "udp"}.get(kind)
    if family is None or not positional:
        raise BadListenDescription(
            f"{text!r}: expected tcp:PORTS, udp:PORTS, unix:GLOB or * (PORTS: 8080, 8000-8099, *)"
        )
    spec = positional[0]
    try:
        if spec == "*":
            low, high = 0, 65535
        elif "-" in spec:
            low, high = (int(part) for part in spec.split("-", 1))
        else:
            low = high = int(spec)
    except ValueError:
        raise BadListenDescription(f"{text!r}: {spec!r} is not a port, a range or *") from None
    if not 0 <= low <= high <= 65535:
        raise BadListenDescription(f"{text!r}: the port range {spec} is not within 0-65535")
    return Pattern(family, low, high, interface=keywords.get("interface"))


class ListenPolicy:
    """
    Decides whether a worker may have the master bind C{key}.

    Declared listens are always allowed.  With no patterns, everything is
    allowed unless C{declaredOnly} (the master is privileged and its workers
    are not): then only declared listens are.
    """

    def __init__(
        self,
        patterns: Iterable[Pattern] = (),
        declared: Iterable[ListenKey] = (),
        declaredOnly: bool = False,
    ) -> None:
        self.patterns = tuple(patterns)
        self.declared = frozenset(declared)
        self.declaredOnly = declaredOnly and not self.patterns

    def permits(self, key: ListenKey) -> bool:
        if key in self.declared:
            return True
        if self.patterns:
            return any(p.matches(key) for p in self.patterns)
        return not self.declaredOnly

    def explain(self) -> str:
        """
        Why a key was refused, for the log and the worker's error.
        """
        if self.patterns:
            return "it is not allowed by --allow-listen"
        return (
            "the master is privileged and the workers are not, so only the "
            "listens declared with --listen are allowed (see --allow-listen)"
        )


def workerIdentity(user, group) -> tuple:
    """
    The C{(uid, gid)} to spawn workers with for C{--user}/C{--group} (names
    or numbers); L{None} for what stays the master's own.

    @raise ValueError: naming the option, for an unknown user or group.
    """
    import grp
    import pwd

    uid = gid = None
    if user is not None:
        try:
            entry = pwd.getpwuid(int(user)) if str(user).isdigit() else pwd.getpwnam(user)
        except KeyError:
            raise ValueError(f"--user {user!r}: no such user") from None
        uid, gid = entry.pw_uid, entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if str(group).isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"--group {group!r}: no such group") from None
    if uid == os.getuid():
        uid = None
    if gid == os.getgid():
        gid = None
    return uid, gid
