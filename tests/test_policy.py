"""
Tests for L{txcluster._policy}: respawn backoff, the failure window and the
per-worker request limit.  Randomness is injected, so results are exact.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from txcluster._policy import FailureWindow, requestLimit, restartDelay


def noJitter() -> float:
    return 0.0


def forbidden(*args):
    raise AssertionError(f"should not be called (with {args!r})")


class RestartDelayTests(SynchronousTestCase):
    """
    L{restartDelay}: exponential backoff for workers that keep dying soon
    after they start.
    """

    def test_stableWorkerRespawnsAtOnce(self):
        """
        A worker that had stayed up (no quick deaths) is respawned at once,
        without any jitter.
        """
        self.assertEqual(restartDelay(0, jitter=forbidden), 0.0)
        self.assertEqual(restartDelay(-3, jitter=forbidden), 0.0)

    def test_doublesUpToTheMaximum(self):
        """
        The first quick death waits C{minimum}, each further one twice as
        long, up to C{maximum}.
        """
        self.assertEqual(
            [restartDelay(n, jitter=noJitter) for n in range(1, 10)],
            [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0],
        )

    def test_customBounds(self):
        """
        C{minimum} and C{maximum} set the first delay and the cap.
        """
        self.assertEqual(
            [restartDelay(n, minimum=3, maximum=10, jitter=noJitter) for n in range(1, 5)],
            [3.0, 6.0, 10.0, 10.0],
        )

    def test_jitterStretches(self):
        """
        Each delay is stretched by C{jitter()} of itself.
        """
        self.assertEqual(restartDelay(1, jitter=lambda: 0.25), 0.625)
        self.assertEqual(restartDelay(4, jitter=lambda: 0.5), 6.0)

    def test_jitterCalledOncePerDelay(self):
        """
        The jitter is drawn once for each delay.
        """
        calls = []

        def jitter():
            calls.append(None)
            return 0.0

        restartDelay(3, jitter=jitter)
        self.assertEqual(len(calls), 1)

    def test_jitterAtTheMaximum(self):
        """
        The doubling stops at C{maximum}, and the jitter still stretches the
        capped delay, so that workers that all reached the cap do not come
        back in lockstep.
        """
        self.assertAlmostEqual(restartDelay(6, jitter=lambda: 0.1), 17.6)
        self.assertAlmostEqual(restartDelay(7, jitter=lambda: 0.1), 33.0)
        self.assertAlmostEqual(restartDelay(7, maximum=17.0, jitter=lambda: 0.1), 18.7)
        self.assertEqual(restartDelay(7, jitter=lambda: 0.0), 30.0)

    def test_manyQuickDeaths(self):
        """
        However many times in a row a worker died, the delay is the maximum
        (the doubling does not overflow).
        """
        self.assertEqual(restartDelay(1025, jitter=noJitter), 30.0)
        self.assertEqual(restartDelay(10**6, jitter=noJitter), 30.0)
        self.assertEqual(restartDelay(5000, minimum=1e10, maximum=1e12, jitter=noJitter), 1e12)

    def test_defaultJitter(self):
        """
        The default jitter stretches a delay by at most a tenth.
        """
        for _ in range(20):
            delay = restartDelay(2)
            self.assertTrue(1.0 <= delay <= 1.1, delay)


class FailureWindowTests(SynchronousTestCase):
    """
    L{FailureWindow}: more than C{maxFailures} failures within C{window}
    seconds means giving up.
    """

    def test_tooManyFailures(self):
        """
        Failures up to C{maxFailures} within the window are tolerated; one
        more gives up, and so does every further one.
        """
        failures = FailureWindow(maxFailures=2, window=10)
        self.assertEqual(
            [failures.record(t) for t in (0, 1, 2, 3)], [False, False, True, True]
        )

    def test_oldFailuresExpire(self):
        """
        Failures that lie a whole window or more in the past no longer
        count.
        """
        failures = FailureWindow(maxFailures=2, window=10)
        self.assertFalse(failures.record(0))
        self.assertFalse(failures.record(5))
        self.assertFalse(failures.record(10))
        self.assertEqual(failures.count(10), 2)
        self.assertTrue(failures.record(14))

    def test_boundary(self):
        """
        A failure exactly C{window} seconds old is outside the window; one
        just younger is inside.
        """
        failures = FailureWindow(maxFailures=1, window=10)
        failures.record(0)
        self.assertFalse(failures.record(10))
        failures = FailureWindow(maxFailures=1, window=10)
        failures.record(0.5)
        self.assertTrue(failures.record(10))

    def test_zeroTolerance(self):
        """
        With C{maxFailures=0} the first failure gives up.
        """
        self.assertTrue(FailureWindow(maxFailures=0, window=60).record(100))

    def test_count(self):
        """
        C{count(now)} is how many failures lie within the window ending at
        C{now}, and asking does not forget any.
        """
        failures = FailureWindow(maxFailures=10, window=10)
        for t in (0, 4, 8):
            failures.record(t)
        self.assertEqual(failures.count(8), 3)
        self.assertEqual(failures.count(12), 2)
        self.assertEqual(failures.count(18), 0)
        self.assertEqual(failures.count(9), 3)

    def test_empty(self):
        """
        A new window counts no failures.
        """
        self.assertEqual(FailureWindow(maxFailures=3, window=60).count(0), 0)

    def test_configuration(self):
        """
        The limits it was created with are visible.
        """
        failures = FailureWindow(maxFailures=5, window=60.0)
        self.assertEqual((failures.maxFailures, failures.window), (5, 60.0))


class RequestLimitTests(SynchronousTestCase):
    """
    L{requestLimit}: how many connections a worker serves before it is
    recycled.
    """

    def test_unlimited(self):
        """
        C{maxRequests} of zero or less means never recycle, whatever the
        jitter.
        """
        self.assertEqual(requestLimit(0, 10, randint=forbidden), 0)
        self.assertEqual(requestLimit(-1, 10, randint=forbidden), 0)

    def test_noJitter(self):
        """
        Without jitter the limit is C{maxRequests} exactly.
        """
        self.assertEqual(requestLimit(1000, 0, randint=forbidden), 1000)
        self.assertEqual(requestLimit(1000, -5, randint=forbidden), 1000)

    def test_jitterAdded(self):
        """
        The jitter adds a number drawn from 0 to C{jitter} inclusive.
        """
        calls = []

        def randint(low, high):
            calls.append((low, high))
            return 7

        self.assertEqual(requestLimit(1000, 50, randint=randint), 1007)
        self.assertEqual(calls, [(0, 50)])

    def test_defaultRandint(self):
        """
        The default draw stays within C{maxRequests} to C{maxRequests +
        jitter}.
        """
        for _ in range(20):
            self.assertIn(requestLimit(100, 3), {100, 101, 102, 103})
