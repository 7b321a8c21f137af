"""
Tests for L{txcluster._deferreds.observe}: one result, many waiters.
"""

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from txcluster._deferreds import observe


class ObserveTests(SynchronousTestCase):
    def test_everyoneGetsTheSuccess(self) -> None:
        """
        Every observer, before or after the result, gets it.
        """
        d = defer.Deferred()
        early = [observe(d), observe(d)]
        d.callback("done")
        late = observe(d)
        self.assertEqual([self.successResultOf(o) for o in early + [late]], ["done"] * 3)

    def test_everyoneGetsTheFailure(self) -> None:
        """
        Every observer, before or after it, gets the failure (not L{None}
        after the first), and nothing is left unhandled.
        """
        d = defer.Deferred()
        early = [observe(d), observe(d)]
        d.errback(ValueError("no"))
        late = observe(d)
        for o in early + [late]:
            self.failureResultOf(o, ValueError)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_callbacksAddedBeforeRunFirst(self) -> None:
        """
        What was added to the Deferred before the first observer still sees
        its result.
        """
        d = defer.Deferred()
        seen = []
        d.addCallback(lambda r: seen.append(r) or r)
        o = observe(d)
        d.callback(3)
        self.assertEqual((seen, self.successResultOf(o)), ([3], 3))
