"""
Helpers for the tests that drive real transports by hand, in a memory
reactor: the test calls C{doRead} and C{doWrite} itself.
"""

from __future__ import annotations

import os
import select

from twisted.internet.protocol import Factory


class OneProtocol(Factory):
    """
    A factory that builds one given protocol.
    """

    def __init__(self, protocol) -> None:
        self.protocol = protocol

    def buildProtocol(self, addr):
        return self.protocol


def readable(fd) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def pump(clock, transports, rounds: int = 100_000) -> None:
    """
    Drive C{transports} (in the memory reactor C{clock}) until none has
    anything to write or to read.
    """
    for _ in range(rounds):
        busy = False
        for transport in transports:
            if transport in clock.getWriters():
                busy = True
                result = transport.doWrite()
                if result is not None:
                    raise AssertionError(f"{transport} doWrite() failed: {result!r}")
            while readable(transport.fileno()):
                busy = True
                result = transport.doRead()
                if result is not None:
                    raise AssertionError(f"{transport} doRead() failed: {result!r}")
        if not busy:
            return
    raise AssertionError(f"{transports} still busy after {rounds} rounds")


def pipeDescriptors(testCase, count: int) -> list:
    """
    C{count} distinct file descriptors (read ends of pipes, each its own
    inode), closed after the test.
    """
    fds = []
    for _ in range(count):
        r, w = os.pipe()
        os.close(w)
        testCase.addCleanup(os.close, r)
        fds.append(r)
    return fds
