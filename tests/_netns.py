"""
"Hosts" for the multi-host tests: each a network namespace of its own
(C{ip netns}) joined to the test's namespace by a veth pair, so that a
master in it binds its fixed ports (8080, 9100) on an address no other test
or program holds, and a balancer in the test's namespace reaches it over a
real link.

Without the privilege to create namespaces, the hosts are loopback
addresses of the test's own namespace instead (127.0.0.2, 127.0.0.3, ...),
on free ports; that is said on stderr and in the test's log, since the
test then proves less (one network stack for every host).

Every namespace and veth made here is removed by the test's cleanups, even
when the test fails; a process still inside a namespace then (the test
started it: the namespace's name is unique to the test) is killed first,
by pid.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
from typing import Optional

from twisted.logger import Logger

_log = Logger(namespace="tests._netns")

#: Seconds any one C{ip} command may take.
IP_TIMEOUT = 10.0

IP = shutil.which("ip") or "/usr/sbin/ip"


class Host:
    """
    One host: where its master listens and how to run a command on it.

    @ivar name: C{"a"}, C{"b"}, ...
    @ivar address: the host's own address (the master's listens bind it).
    @ivar peer: the address the test's namespace reaches the host from (what
        a balancer in the test's namespace is seen as, by the host).
    @ivar namespace: the network namespace, or L{None} on the loopback
        fallback.
    @ivar appPort: the application's port on C{address}.
    @ivar metricsPort: the master's C{--metrics} port on C{address}.
    """

    def __init__(
        self, name: str, address: str, peer: str, namespace: Optional[str], appPort: int, metricsPort: int
    ) -> None:
        self.name = name
        self.address = address
        self.peer = peer
        self.namespace = namespace
        self.appPort = appPort
        self.metricsPort = metricsPort

    @property
    def launcher(self) -> tuple:
        """
        The prefix that runs a command line on this host (it C{exec}s the
        rest, so the pid spawned is the command's own).
        """
        return () if self.namespace is None else (IP, "netns", "exec", self.namespace)

    def command(self, argv: list) -> list:
        return list(self.launcher) + list(argv)

    def run(self, argv: list, timeout: float = IP_TIMEOUT) -> subprocess.CompletedProcess:
        """
        Run C{argv} on this host to its end (at most C{timeout} seconds).
        """
        return subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout)

    def __repr__(self) -> str:
        where = f"namespace {self.namespace}" if self.namespace else "loopback fallback"
        return f"<host {self.name} at {self.address} ({where}), reached from {self.peer}>"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([IP, *args], capture_output=True, text=True, timeout=IP_TIMEOUT)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _usedSecondOctets() -> set:
    """
    The C{x} of every 10.x.0.0/16 an address or route of the test's
    namespace already touches.
    """
    text = _ip("-o", "addr", check=False).stdout + _ip("route", check=False).stdout
    return {int(x) for x in re.findall(r"\b10\.(\d+)\.", text)}


def _freePortOn(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def hosts(testCase, count: int = 2, appPort: int = 8080, metricsPort: int = 9100) -> list:
    """
    C{count} hosts for C{testCase}, each a network namespace of its own
    (C{txc-<random>-a}, C{-b}, ...) with a veth pair: 10.x.N.1/24 on the
    test's side, 10.x.N.2/24 inside (N = 1, 2, ...), C{lo} up inside.
    Removed by C{testCase}'s cleanups.

    Falls back to 127.0.0.2, 127.0.0.3, ... (free ports) when C{ip netns
    add} fails, and says so.
    """
    tag = "%06x" % random.getrandbits(24)
    probe = f"txc-{tag}-a"
    try:
        added = _ip("netns", "add", probe, check=False)
        reason = added.stderr.strip() or f"exit status {added.returncode}"
        ok = added.returncode == 0
    except (OSError, subprocess.SubprocessError) as e:
        ok, reason = False, repr(e)
    if not ok:
        return _loopbackHosts(testCase, count, reason)
    testCase.addCleanup(_removeNamespace, probe)

    used = _usedSecondOctets()
    free = [x for x in range(64, 255) if x not in used]
    if not free:
        raise RuntimeError("no 10.x.0.0/16 is free in the test's namespace for the hosts' links")
    x = random.choice(free)
    made = []
    for index in range(count):
        name = chr(ord("a") + index)
        namespace = f"txc-{tag}-{name}"
        if index > 0:
            _ip("netns", "add", namespace)
            testCase.addCleanup(_removeNamespace, namespace)
        # Interface names have at most 15 bytes.
        outside, inside = f"txc{tag}{name}", f"txc{tag}{name}p"
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        testCase.addCleanup(_ip, "link", "del", outside, check=False)
        _ip("link", "set", inside, "netns", namespace)
        peer, address = f"10.{x}.{index + 1}.1", f"10.{x}.{index + 1}.2"
        _ip("addr", "add", f"{peer}/24", "dev", outside)
        _ip("link", "set", outside, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", namespace, "link", "set", inside, "name", "eth0")
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        host = Host(name, address, peer, namespace, appPort, metricsPort)
        _log.info("{host!r}: veth {outside} <-> eth0", host=host, outside=outside)
        made.append(host)
    return made


def _loopbackHosts(testCase, count: int, reason: str) -> list:
    message = (
        f"tests._netns: cannot create network namespaces (ip netns add: {reason}); "
        f"falling back to {count} hosts on loopback addresses of this namespace "
        f"(127.0.0.2...), on free ports: one network stack for every host"
    )
    sys.stderr.write(message + "\n")
    _log.warn("{message}", message=message)
    made = []
    for index in range(count):
        address = f"127.0.0.{index + 2}"
        made.append(
            Host(chr(ord("a") + index), address, "127.0.0.1", None, _freePortOn(address), _freePortOn(address))
        )
    return made


def _namespacePids(namespace: str) -> list:
    result = _ip("netns", "pids", namespace, check=False)
    return [int(p) for p in result.stdout.split() if p.isdigit()]


def _removeNamespace(namespace: str) -> None:
    """
    Kill what still runs in C{namespace} (only the test's processes can:
    the name is the test's own), then delete it.
    """
    leftovers = _namespacePids(namespace)
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if leftovers:
        _log.warn("killed {pids} still running in {namespace}", pids=leftovers, namespace=namespace)
    result = _ip("netns", "del", namespace, check=False)
    if result.returncode != 0:
        _log.error("could not delete {namespace}: {error}", namespace=namespace, error=result.stderr.strip())
