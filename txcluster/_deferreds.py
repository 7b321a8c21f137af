# -*- test-case-name: tests.test_worker,tests.test_master -*-
"""
Deferreds that several callers wait on.
"""

from twisted.internet import defer
from twisted.python.failure import Failure


def observe(d: defer.Deferred) -> defer.Deferred:
    """
    A new Deferred with C{d}'s result (a failure too), leaving C{d}'s own
    callback chain as it was, so that many callers can wait on one C{d}.
    """
    result = defer.Deferred()

    def done(value):
        if isinstance(value, Failure):
            result.errback(value)
            return None
        result.callback(value)
        return value

    d.addBoth(done)
    return result
