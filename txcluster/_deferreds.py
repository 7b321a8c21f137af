# -*- test-case-name: tests.test_deferreds -*-
"""
Deferreds that several callers wait on.
"""

from __future__ import annotations

import weakref

from twisted.internet import defer
from twisted.python.failure import Failure

_NOTHING = object()


class _Shared:
    """
    The result of one Deferred, kept for everyone who waits on it.
    """

    def __init__(self, d: defer.Deferred) -> None:
        self._result = _NOTHING
        self._waiters: list = []
        d.addBoth(self._fired)

    def _fired(self, result):
        self._result = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._deliver(waiter)
        # The result is everyone's now: nothing is left unhandled here.
        return None

    def _deliver(self, waiter: defer.Deferred) -> None:
        if isinstance(self._result, Failure):
            waiter.errback(self._result)
        else:
            waiter.callback(self._result)

    def observe(self) -> defer.Deferred:
        waiter = defer.Deferred()
        if self._result is _NOTHING:
            self._waiters.append(waiter)
        else:
            self._deliver(waiter)
        return waiter


_shared: "weakref.WeakKeyDictionary[defer.Deferred, _Shared]" = weakref.WeakKeyDictionary()


def observe(d: defer.Deferred) -> defer.Deferred:
    """
    A new Deferred with C{d}'s result (a failure too), so that many callers
    can wait on one C{d}: each gets the result, success or failure.

    The first call takes C{d}'s result from its chain (callbacks added to
    C{d} after it get L{None}); add C{d}'s own callbacks first.
    """
    shared = _shared.get(d)
    if shared is None:
        shared = _shared[d] = _Shared(d)
    return shared.observe()
