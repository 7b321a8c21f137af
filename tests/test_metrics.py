"""
Tests for L{txcluster._metrics}: the applications' metrics added up per
worker id across its processes, and txcluster's own metrics.  Expositions
are made by prometheus_client from private registries, the snapshot is a
fake and the time a plain number: no processes, no clock.
"""

from __future__ import annotations

import math
from typing import Optional

from attrs import frozen
from attrs.exceptions import FrozenInstanceError
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import Counter, Enum, Gauge, Histogram, Info, Summary
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from txcluster._metrics import (
    HANDOFF_BUCKETS,
    HEARTBEAT_BUCKETS,
    RELOAD_OUTCOMES,
    RESTART_REASONS,
    WORKER_STATES,
    BadMetrics,
    ClusterCollector,
    ClusterRecorder,
    WorkerMetricsStore,
    makeRegistry,
)

_settings = settings(max_examples=150, derandomize=True, deadline=None, database=None)


@frozen
class FakeWorker:
    """
    One worker process as the master's snapshot shows it.
    """

    workerId: int
    state: str = "ready"
    pid: Optional[int] = 100
    connections: Optional[int] = None
    rss: Optional[int] = None
    memory: Optional[int] = None
    uptime: float = 1.0


@frozen
class FakeSnapshot:
    """
    The master's snapshot: its workers and its queue.
    """

    workers: tuple = ()
    pending: int = 0


def scrape(registry) -> dict:
    """
    What C{registry} serves, parsed back: the families by name.
    """
    text = generate_latest(registry).decode("utf-8")
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(registry) -> dict:
    """
    Every sample C{registry} serves: C{(name, labels)} to value, the
    labels as a sorted tuple of pairs.
    """
    found = {}
    for family in scrape(registry).values():
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def storeRegistry(store: WorkerMetricsStore) -> CollectorRegistry:
    """
    A registry of C{store} and nothing else.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(store)
    return registry


def counterText(value: float, name: str = "app_requests", labels: str = "") -> str:
    """
    A one-counter exposition.
    """
    return f"# HELP {name}_total Requests.\n# TYPE {name}_total counter\n{name}_total{labels} {value}\n"


def gaugeText(value: float, name: str = "app_inflight") -> str:
    """
    A one-gauge exposition.
    """
    return f"# HELP {name} In flight.\n# TYPE {name} gauge\n{name} {value}\n"


def histogramText(buckets: dict, total: float, name: str = "app_seconds") -> str:
    """
    A one-histogram exposition: C{buckets} maps C{le} to cumulative counts.
    """
    lines = [f"# HELP {name} Latency.", f"# TYPE {name} histogram"]
    lines += [f'{name}_bucket{{le="{le}"}} {count}' for le, count in buckets.items()]
    lines += [f"{name}_count {list(buckets.values())[-1]}", f"{name}_sum {total}"]
    return "\n".join(lines) + "\n"


def served(store: WorkerMetricsStore, name: str, workerId: int, **labels) -> Optional[float]:
    """
    The value C{store} serves for sample C{name} of worker C{workerId}.
    """
    key = (name, tuple(sorted(dict(labels, worker=str(workerId)).items())))
    return samples(storeRegistry(store)).get(key)


class Logged:
    """
    The log events emitted while a test runs, formatted.
    """

    def __init__(self, testCase: SynchronousTestCase) -> None:
        self.lines: list = []
        globalLogPublisher.addObserver(self)
        testCase.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event) -> None:
        self.lines.append(formatEvent(event))


def appRegistry() -> tuple:
    """
    An application's registry with one metric of each kind, and the
    metrics.
    """
    registry = CollectorRegistry()
    requests = Counter("app_requests", "Requests served.", ["method"], registry=registry)
    requests.labels("GET").inc(5)
    requests.labels("POST").inc(2)
    inflight = Gauge("app_inflight", "Requests in flight.", registry=registry)
    inflight.set(3)
    latency = Histogram(
        "app_latency_seconds", "Request latency.", ["path"], buckets=(0.1, 1.0), registry=registry
    )
    latency.labels("/").observe(0.05)
    latency.labels("/").observe(0.5)
    latency.labels("/api").observe(2)
    size = Summary("app_response_bytes", "Response sizes.", registry=registry)
    size.observe(100)
    Info("app_build", "The build.", registry=registry).info({"version": "1.2"})
    Enum("app_mode", "The mode.", states=["normal", "degraded"], registry=registry).state("normal")
    return registry, requests, latency


class RoundTripTests(SynchronousTestCase):
    """
    An application's exposition, reported and served again.
    """

    def test_sameSamplesWithWorker(self):
        """
        Every sample of an application's registry is served under its own
        name and labels, plus C{worker}; its creation times are not.
        """
        app, _, _ = appRegistry()
        store = WorkerMetricsStore()
        store.report(1, 7, generate_latest(app), 10.0)
        expected = {}
        for (name, labels), value in samples(app).items():
            if not name.endswith("_created"):
                expected[(name, tuple(sorted(labels + (("worker", "1"),))))] = value
        self.assertEqual(samples(storeRegistry(store)), expected)
        self.assertIn(("app_requests_total", (("method", "GET"), ("worker", "1"))), expected)

    def test_typesAndHelp(self):
        """
        Each family keeps its type and help text.
        """
        app, _, _ = appRegistry()
        store = WorkerMetricsStore()
        store.report(1, 7, generate_latest(app).decode("utf-8"), 10.0)
        mine = scrape(app)
        theirs = scrape(storeRegistry(store))
        self.assertEqual(
            {n: (f.type, f.documentation) for n, f in theirs.items()},
            {n: (f.type, f.documentation) for n, f in mine.items() if not n.endswith("_created")},
        )
        self.assertEqual(theirs["app_requests"].type, "counter")
        self.assertEqual(theirs["app_latency_seconds"].type, "histogram")

    def test_printedNames(self):
        """
        The served text names the samples as the application's does.
        """
        app, _, _ = appRegistry()
        store = WorkerMetricsStore()
        store.report(1, 7, generate_latest(app), 10.0)
        text = generate_latest(storeRegistry(store)).decode("utf-8")
        self.assertIn('app_requests_total{method="GET",worker="1"} 5.0\n', text)
        self.assertIn("# TYPE app_requests_total counter\n", text)
        self.assertIn('app_latency_seconds_bucket{le="+Inf",path="/",worker="1"} 2.0\n', text)
        self.assertIn('app_latency_seconds_count{path="/",worker="1"} 2.0\n', text)
        self.assertIn('app_build_info{version="1.2",worker="1"} 1.0\n', text)
        self.assertNotIn("_created", text)

    def test_histogramStaysCumulative(self):
        """
        A histogram's buckets keep their C{le} and come out in order, ending
        with C{+Inf}, followed by its C{_count} and C{_sum}.
        """
        app, _, _ = appRegistry()
        store = WorkerMetricsStore()
        store.report(1, 7, generate_latest(app), 10.0)
        family = scrape(storeRegistry(store))["app_latency_seconds"]
        root = [s for s in family.samples if s.labels.get("path") == "/"]
        self.assertEqual(
            [(s.name, s.labels.get("le"), s.value) for s in root],
            [
                ("app_latency_seconds_bucket", "0.1", 1.0),
                ("app_latency_seconds_bucket", "1.0", 2.0),
                ("app_latency_seconds_bucket", "+Inf", 2.0),
                ("app_latency_seconds_count", None, 2.0),
                ("app_latency_seconds_sum", None, 0.55),
            ],
        )

    def test_twoWorkersAddUpToTheTotal(self):
        """
        Summed over the C{worker} label, what two worker ids serve is what
        they counted together.
        """
        first, requests1, _ = appRegistry()
        second, requests2, _ = appRegistry()
        requests2.labels("GET").inc(10)
        store = WorkerMetricsStore()
        store.report(1, 1, generate_latest(first), 10.0)
        store.report(2, 2, generate_latest(second), 10.0)
        family = scrape(storeRegistry(store))["app_requests"]
        gets = [s for s in family.samples if s.labels["method"] == "GET"]
        self.assertEqual(sorted(s.labels["worker"] for s in gets), ["1", "2"])
        self.assertEqual(sum(s.value for s in gets), 5 + 15)

    def test_emptyExposition(self):
        """
        An application with no metrics reports an empty text, and nothing
        is served for it.
        """
        store = WorkerMetricsStore()
        store.report(1, 1, b"", 10.0)
        self.assertEqual(samples(storeRegistry(store)), {})

    def test_workerLabelRenamed(self):
        """
        An application's own C{worker} label is served as
        C{exported_worker} (and an C{exported_worker} it has too as
        C{exported_exported_worker}), so that txcluster's C{worker} is the
        worker id.
        """
        store = WorkerMetricsStore()
        store.report(1, 1, counterText(4, labels='{worker="alice"}'), 10.0)
        store.report(2, 2, counterText(6, labels='{worker="bob",exported_worker="x"}'), 10.0)
        self.assertEqual(
            {k: v for k, v in samples(storeRegistry(store)).items()},
            {
                ("app_requests_total", (("exported_worker", "alice"), ("worker", "1"))): 4.0,
                (
                    "app_requests_total",
                    (("exported_exported_worker", "bob"), ("exported_worker", "x"), ("worker", "2")),
                ): 6.0,
            },
        )

    def test_reservedNamesLeftOut(self):
        """
        An application's family named C{txcluster_*} would clash with the
        master's own: it is left out, and the worker is named in the log.
        """
        logged = Logged(self)
        store = WorkerMetricsStore()
        store.report(3, 9, counterText(1) + gaugeText(2, name="txcluster_workers"), 10.0)
        self.assertEqual(set(scrape(storeRegistry(store))), {"app_requests"})
        self.assertEqual(len([line for line in logged.lines if "txcluster_workers" in line]), 1)
        self.assertIn("worker 3 (process 9)", "\n".join(logged.lines))

    def test_gaugeHistogram(self):
        """
        A gauge histogram (written by C{generate_latest} as a histogram
        without C{_count} and C{_sum}, next to C{_gcount} and C{_gsum}
        gauges) is served as it came, and is not added up across processes.
        """
        text = (
            "# HELP app_queue q\n# TYPE app_queue histogram\n"
            'app_queue_bucket{le="1.0"} 2.0\napp_queue_bucket{le="+Inf"} 3.0\n'
            "# HELP app_queue_gcount q\n# TYPE app_queue_gcount gauge\napp_queue_gcount 3.0\n"
            "# HELP app_queue_gsum q\n# TYPE app_queue_gsum gauge\napp_queue_gsum 4.0\n"
        )
        store = WorkerMetricsStore()
        store.report(1, 1, text, 10.0)
        servedText = generate_latest(storeRegistry(store)).decode("utf-8")
        self.assertEqual(servedText.replace(',worker="1"', "").replace('{worker="1"}', ""), text)
        store.report(1, 2, text, 11.0)
        store.gone(1, 1)
        self.assertEqual(served(store, "app_queue_bucket", 1, le="+Inf"), 3.0)
        self.assertEqual(served(store, "app_queue_gcount", 1), 3.0)


class AcrossProcessesTests(SynchronousTestCase):
    """
    A worker id served by successive processes.
    """

    def test_countersNeverGoBackwards(self):
        """
        While an old and a new process of one worker id both run, their
        counts add up; when the old one ends, its last count stays in the
        worker id's total.
        """
        store = WorkerMetricsStore()
        store.report(1, 7, counterText(5), 10.0)
        self.assertEqual(served(store, "app_requests_total", 1), 5.0)
        store.report(1, 12, counterText(2), 11.0)
        self.assertEqual(served(store, "app_requests_total", 1), 7.0)
        store.report(1, 7, counterText(7), 12.0)
        self.assertEqual(served(store, "app_requests_total", 1), 9.0)
        store.gone(1, 7)
        self.assertEqual(served(store, "app_requests_total", 1), 9.0)
        store.report(1, 12, counterText(3), 13.0)
        self.assertEqual(served(store, "app_requests_total", 1), 10.0)

    def test_countsKeptBetweenProcesses(self):
        """
        Between the end of a worker id's process and the first report of
        the next, its counters are still served, its gauges are not.
        """
        store = WorkerMetricsStore()
        store.report(1, 7, counterText(5) + gaugeText(3), 10.0)
        store.gone(1, 7)
        self.assertEqual(
            samples(storeRegistry(store)), {("app_requests_total", (("worker", "1"),)): 5.0}
        )

    def test_histogramsNeverGoBackwards(self):
        """
        A histogram's buckets, C{_count} and C{_sum} add up the same way,
        and its buckets stay cumulative.
        """
        store = WorkerMetricsStore()
        store.report(1, 7, histogramText({"0.1": 1, "1.0": 3, "+Inf": 4}, 2.5), 10.0)
        store.report(1, 12, histogramText({"0.1": 0, "1.0": 1, "+Inf": 1}, 0.5), 11.0)
        store.report(1, 7, histogramText({"0.1": 2, "1.0": 4, "+Inf": 6}, 8.0), 12.0)
        store.gone(1, 7)
        store.report(1, 12, histogramText({"0.1": 1, "1.0": 2, "+Inf": 3}, 1.0), 13.0)
        family = scrape(storeRegistry(store))["app_seconds"]
        self.assertEqual(
            [(s.name, s.labels.get("le"), s.value) for s in family.samples],
            [
                ("app_seconds_bucket", "0.1", 3.0),
                ("app_seconds_bucket", "1.0", 6.0),
                ("app_seconds_bucket", "+Inf", 9.0),
                ("app_seconds_count", None, 9.0),
                ("app_seconds_sum", None, 9.0),
            ],
        )

    def test_summaryCountsAddUp(self):
        """
        A summary's C{_count} and C{_sum} add up across processes; its
        quantiles come from the newest live process.
        """

        def summary(count, total, median):
            return (
                "# HELP app_size s\n# TYPE app_size summary\n"
                f'app_size{{quantile="0.5"}} {median}\napp_size_count {count}\napp_size_sum {total}\n'
            )

        store = WorkerMetricsStore()
        store.report(1, 7, summary(2, 10, 5), 10.0)
        store.report(1, 12, summary(1, 3, 3), 11.0)
        self.assertEqual(served(store, "app_size_count", 1), 3.0)
        self.assertEqual(served(store, "app_size", 1, quantile="0.5"), 3.0)
        store.gone(1, 12)
        self.assertEqual(served(store, "app_size_count", 1), 3.0)
        self.assertEqual(served(store, "app_size_sum", 1), 13.0)
        self.assertEqual(served(store, "app_size", 1, quantile="0.5"), 5.0)

    def test_gaugesFromTheNewestProcess(self):
        """
        A gauge both live processes of a worker id report comes from the one
        with the higher serial; one that ended is not added in.
        """
        store = WorkerMetricsStore()
        store.report(1, 12, gaugeText(4), 10.0)
        store.report(1, 7, gaugeText(9), 11.0)
        self.assertEqual(served(store, "app_inflight", 1), 4.0)
        store.gone(1, 12)
        self.assertEqual(served(store, "app_inflight", 1), 9.0)
        store.gone(1, 7)
        self.assertIsNone(served(store, "app_inflight", 1))

    def test_workerIdsApart(self):
        """
        What one worker id's processes counted does not go to another's.
        """
        store = WorkerMetricsStore()
        store.report(1, 1, counterText(5), 10.0)
        store.report(2, 2, counterText(1), 10.0)
        store.gone(1, 1)
        store.report(1, 3, counterText(2), 11.0)
        self.assertEqual(served(store, "app_requests_total", 1), 7.0)
        self.assertEqual(served(store, "app_requests_total", 2), 1.0)

    def test_lateReportIgnored(self):
        """
        A report from a process that is gone (delivered late) is ignored: its
        counts are already in the total.
        """
        store = WorkerMetricsStore()
        store.report(1, 7, counterText(5), 10.0)
        store.gone(1, 7)
        store.report(1, 7, counterText(6), 11.0)
        self.assertEqual(served(store, "app_requests_total", 1), 5.0)
        store.gone(2, 8)
        store.report(2, 8, counterText(6), 11.0)
        self.assertIsNone(served(store, "app_requests_total", 2))
        self.assertEqual(store.ages(12.0), {})

    def test_goneUnknown(self):
        """
        The end of a process that never reported changes nothing.
        """
        store = WorkerMetricsStore()
        store.report(1, 7, counterText(5), 10.0)
        store.gone(1, 8)
        store.gone(4, 9)
        self.assertEqual(served(store, "app_requests_total", 1), 5.0)

    def test_changedBuckets(self):
        """
        Processes whose buckets differ (buckets changed across a reload)
        are added up on all the bounds, each counting at a bound what it
        had at its own largest bound not above it: the buckets stay
        cumulative.
        """
        store = WorkerMetricsStore()
        store.report(1, 7, histogramText({"1.0": 5, "+Inf": 10}, 20), 10.0)
        store.report(1, 12, histogramText({"0.5": 1, "2.0": 2, "+Inf": 3}, 4), 11.0)
        expected = [("0.5", 1.0), ("1.0", 6.0), ("2.0", 7.0), ("+Inf", 13.0)]
        family = scrape(storeRegistry(store))["app_seconds"]
        self.assertEqual(
            [(s.labels["le"], s.value) for s in family.samples if s.name == "app_seconds_bucket"], expected
        )
        store.gone(1, 7)
        family = scrape(storeRegistry(store))["app_seconds"]
        self.assertEqual(
            [(s.labels["le"], s.value) for s in family.samples if s.name == "app_seconds_bucket"], expected
        )

    def test_forgetKeepsTheTotals(self):
        """
        A worker id scaled away is no longer served; when it comes back, its
        counters go on from where they were.
        """
        store = WorkerMetricsStore()
        store.report(3, 7, counterText(5), 10.0)
        store.forget(3)
        self.assertEqual(samples(storeRegistry(store)), {})
        self.assertEqual(store.ages(11.0), {})
        store.report(3, 7, counterText(6), 11.0)
        self.assertEqual(samples(storeRegistry(store)), {})
        store.report(3, 20, counterText(1), 12.0)
        self.assertEqual(served(store, "app_requests_total", 3), 6.0)
        store.forget(99)

    def test_offsetBounded(self):
        """
        A worker id keeps at most C{maxSamples} series of its ended
        processes: one whose label values churn cannot grow the master
        without bound.  The left out samples are logged.
        """
        logged = Logged(self)
        store = WorkerMetricsStore(maxSamples=3)
        for serial in range(5):
            store.report(1, serial, counterText(1, labels=f'{{n="{serial}"}}'), 10.0)
            store.gone(1, serial)
        self.assertEqual(len(samples(storeRegistry(store))), 3)
        self.assertEqual(len([line for line in logged.lines if "left out of its totals" in line]), 2)


class AgesTests(SynchronousTestCase):
    """
    L{WorkerMetricsStore.ages}: how stale each worker id's metrics are.
    """

    def test_ages(self):
        """
        Each worker id's age is the time since the least recent last report
        of its live processes; a worker id none of whose processes reported
        is left out.
        """
        store = WorkerMetricsStore()
        store.report(1, 7, counterText(1), 10.0)
        store.report(1, 12, counterText(1), 14.0)
        store.report(2, 8, counterText(1), 13.0)
        self.assertEqual(store.ages(15.0), {1: 5.0, 2: 2.0})
        store.report(1, 7, counterText(2), 15.0)
        self.assertEqual(store.ages(16.0), {1: 2.0, 2: 3.0})
        store.gone(2, 8)
        self.assertEqual(store.ages(16.0), {1: 2.0})

    def test_refusedReportDoesNotRefresh(self):
        """
        A refused report leaves the age growing.
        """
        store = WorkerMetricsStore()
        store.report(1, 7, counterText(1), 10.0)
        self.assertRaises(BadMetrics, store.report, 1, 7, "not { metrics", 20.0)
        self.assertEqual(store.ages(21.0), {1: 11.0})


class HostileWorkerTests(SynchronousTestCase):
    """
    What a misbehaving worker sends is refused or left out, and a scrape
    never fails.
    """

    def assertRefused(self, store: WorkerMetricsStore, text, why: str) -> BadMetrics:
        """
        C{store} refuses C{text} from process 7 of worker 1, saying C{why},
        and still serves that process's previous report.
        """
        store.report(1, 7, counterText(5), 10.0)
        e = self.assertRaises(BadMetrics, store.report, 1, 7, text, 11.0)
        self.assertEqual((e.workerId, e.serial), (1, 7))
        self.assertIn("worker 1 (process 7)", str(e))
        self.assertIn(why, e.reason)
        self.assertIsInstance(e, ValueError)
        self.assertEqual(served(store, "app_requests_total", 1), 5.0)
        return e

    def test_garbage(self):
        """
        Text that does not parse is refused.
        """
        self.assertRefused(WorkerMetricsStore(), "app_requests_total{method=GET 1\n", "does not parse")
        self.assertRefused(WorkerMetricsStore(), "# TYPE app_x nonsense\napp_x 1\n", "does not parse")
        self.assertRefused(WorkerMetricsStore(), "app_x one\n", "does not parse")

    def test_notText(self):
        """
        Bytes that are not UTF-8, and what is not text at all, are refused.
        """
        self.assertRefused(WorkerMetricsStore(), b"app_x 1 \xff\n", "UTF-8")
        self.assertRefused(WorkerMetricsStore(), 42, "not text")

    def test_tooManySamples(self):
        """
        A report of more than C{maxSamples} samples is refused.
        """
        store = WorkerMetricsStore(maxSamples=10)
        text = "".join(f"app_x{{n=\"{n}\"}} 1\n" for n in range(11))
        self.assertRefused(store, text, "more than 10 samples")
        store.report(1, 7, "".join(f"app_x{{n=\"{n}\"}} 1\n" for n in range(10)), 12.0)

    def test_tooLong(self):
        """
        A report longer than C{maxBytes} is refused before it is parsed.
        """
        self.assertRefused(WorkerMetricsStore(maxBytes=100), counterText(1) * 3, "more than 100")

    def test_badHistograms(self):
        """
        A histogram without a C{+Inf} bucket, with a bucket whose C{le} is
        not a number, or whose buckets decrease, is refused.
        """
        self.assertRefused(WorkerMetricsStore(), histogramText({"1.0": 1}, 1), "no +Inf bucket")
        self.assertRefused(WorkerMetricsStore(), histogramText({"x": 1, "+Inf": 1}, 1), "le='x'")
        self.assertRefused(WorkerMetricsStore(), histogramText({"NaN": 1, "+Inf": 1}, 1), "NaN")
        self.assertRefused(
            WorkerMetricsStore(), histogramText({"1": 2, "+Inf": 1}, 1), "not cumulative"
        )
        self.assertRefused(
            WorkerMetricsStore(), histogramText({"1": 1, "1.0": 1, "+Inf": 1}, 1), "two buckets"
        )

    def test_contradictsItself(self):
        """
        A report in which one name is two kinds of family is refused.
        """
        self.assertRefused(
            WorkerMetricsStore(), counterText(1, name="app_x") + gaugeText(2, name="app_x"), "both"
        )

    def test_typeConflictBetweenProcesses(self):
        """
        A process that reports a family as another type than the older
        processes did is left out of that family (and logged, once), and
        the scrape still succeeds.
        """
        logged = Logged(self)
        store = WorkerMetricsStore()
        store.report(1, 7, counterText(5) + gaugeText(1), 10.0)
        store.report(2, 8, gaugeText(9, name="app_requests") + gaugeText(2), 10.0)
        store.report(2, 8, gaugeText(9, name="app_requests") + gaugeText(3), 11.0)
        self.assertEqual(
            samples(storeRegistry(store)),
            {
                ("app_requests_total", (("worker", "1"),)): 5.0,
                ("app_inflight", (("worker", "1"),)): 1.0,
                ("app_inflight", (("worker", "2"),)): 3.0,
            },
        )
        warnings = [line for line in logged.lines if "app_requests as a gauge" in line]
        self.assertEqual(len(warnings), 1)
        self.assertIn("worker 2 (process 8)", warnings[0])

    def test_olderTypeGone(self):
        """
        When the last source of the older type ends (a gauge is not kept),
        the newer type is served.
        """
        store = WorkerMetricsStore()
        store.report(1, 7, gaugeText(1, name="app_x"), 10.0)
        store.report(1, 12, counterText(4, name="app_x"), 10.0)
        self.assertEqual(served(store, "app_x", 1), 1.0)
        store.gone(1, 7)
        self.assertEqual(served(store, "app_x_total", 1), 4.0)
        self.assertEqual(scrape(storeRegistry(store))["app_x"].type, "counter")

    def test_familyChangesKind(self):
        """
        A process alone in reporting a family may change its type from one
        report to the next; the newest help text of a family is served.
        """
        store = WorkerMetricsStore()
        store.report(1, 7, gaugeText(1, name="app_x"), 10.0)
        self.assertEqual(scrape(storeRegistry(store))["app_x"].type, "gauge")
        store.report(1, 7, counterText(2, name="app_x").replace("Requests.", "Things."), 11.0)
        family = scrape(storeRegistry(store))["app_x"]
        self.assertEqual((family.type, family.documentation), ("counter", "Things."))
        store.report(1, 12, counterText(1, name="app_x").replace("Requests.", "New things."), 12.0)
        family = scrape(storeRegistry(store))["app_x"]
        self.assertEqual((family.documentation, family.samples[0].value), ("New things.", 3.0))

    def test_conflictNotFolded(self):
        """
        The counts of a process left out of a family for its type are not
        kept when it ends either.
        """
        store = WorkerMetricsStore()
        store.report(1, 7, histogramText({"+Inf": 1}, 1, name="app_x"), 10.0)
        store.report(1, 12, counterText(4, name="app_x"), 10.0)
        store.gone(1, 12)
        store.gone(1, 7)
        family = scrape(storeRegistry(store))["app_x"]
        self.assertEqual(family.type, "histogram")
        self.assertEqual([s.name for s in family.samples], ["app_x_bucket", "app_x_count", "app_x_sum"])

    def test_clashingNames(self):
        """
        Two families whose printed names would clash (a counter C{app_a},
        printed C{app_a_total}, and a gauge C{app_a_total}) are not both
        served: the older one is.
        """
        store = WorkerMetricsStore()
        store.report(1, 7, counterText(4, name="app_a"), 10.0)
        store.report(2, 8, gaugeText(9, name="app_a_total"), 10.0)
        text = generate_latest(storeRegistry(store)).decode()
        self.assertEqual(text.count("# TYPE app_a_total"), 1)
        self.assertEqual(samples(storeRegistry(store)), {("app_a_total", (("worker", "1"),)): 4.0})

    def test_describeIsEmpty(self):
        """
        The store describes nothing, so that registering it with a registry
        that checks names neither collects nor clashes.
        """
        store = WorkerMetricsStore()
        self.assertEqual(store.describe(), [])
        CollectorRegistry(auto_describe=True).register(store)


def clusterRegistry(recorder=None, store=None, snapshot=None, now=lambda: 100.0):
    """
    A registry made by L{makeRegistry}, with a fixed snapshot.
    """
    recorder = recorder if recorder is not None else ClusterRecorder()
    store = store if store is not None else WorkerMetricsStore()
    snapshot = snapshot if snapshot is not None else FakeSnapshot()
    return makeRegistry(recorder, store, lambda: snapshot, now)


def byWorker(registry, name: str) -> dict:
    """
    The values of family C{name} by the C{worker} label.
    """
    return {s.labels["worker"]: s.value for s in scrape(registry)[name].samples}


class ClusterMetricsTests(SynchronousTestCase):
    """
    L{ClusterRecorder} and L{ClusterCollector}: txcluster's own metrics.
    """

    def test_namesAndTypes(self):
        """
        The collector serves the families the product names, with their
        types and one-line help texts.
        """
        families = scrape(clusterRegistry())
        self.assertEqual(
            {name: family.type for name, family in families.items()},
            {
                "txcluster_connections_handed": "counter",
                "txcluster_connections_open": "gauge",
                "txcluster_workers": "gauge",
                "txcluster_worker_restarts": "counter",
                "txcluster_dispatch_queue_connections": "gauge",
                "txcluster_handoff_seconds": "histogram",
                "txcluster_worker_resident_memory_bytes": "gauge",
                "txcluster_worker_unique_memory_bytes": "gauge",
                "txcluster_worker_cpu_seconds": "counter",
                "txcluster_heartbeat_round_trip_seconds": "histogram",
                "txcluster_reloads": "counter",
                "txcluster_metrics_collection_age_seconds": "gauge",
            },
        )
        for family in families.values():
            self.assertTrue(family.documentation)
            self.assertNotIn("\n", family.documentation)

    def test_registeringTakesNoSnapshot(self):
        """
        L{makeRegistry} neither takes a snapshot nor reads the time: the
        master may make it before it has any.
        """

        def forbidden():
            raise AssertionError("called")

        makeRegistry(ClusterRecorder(), WorkerMetricsStore(), forbidden, forbidden)

    def test_handed(self):
        """
        Connections handed are counted per worker id; a worker id in the
        snapshot that was handed none is served as 0.
        """
        recorder = ClusterRecorder()
        recorder.handed(1, 3)
        recorder.handed(2, 1)
        recorder.handed(1, 250)
        snapshot = FakeSnapshot((FakeWorker(1), FakeWorker(3)))
        self.assertEqual(
            byWorker(clusterRegistry(recorder, snapshot=snapshot), "txcluster_connections_handed"),
            {"1": 253.0, "2": 1.0, "3": 0.0},
        )

    def test_restarts(self):
        """
        Restarts are counted per worker id and reason, every known reason
        served (0 if none); an unknown reason is counted as given.
        """
        recorder = ClusterRecorder()
        recorder.restarted(1, "failure")
        recorder.restarted(1, "failure")
        recorder.restarted(1, "reload")
        recorder.restarted(2, "cosmic ray")
        found = {
            (s.labels["worker"], s.labels["reason"]): s.value
            for s in scrape(clusterRegistry(recorder))["txcluster_worker_restarts"].samples
        }
        expected = {(w, r): 0.0 for w in ("1", "2") for r in RESTART_REASONS}
        expected.update({("1", "failure"): 2.0, ("1", "reload"): 1.0, ("2", "cosmic ray"): 1.0})
        self.assertEqual(found, expected)
        self.assertEqual(
            set(RESTART_REASONS), {"failure", "left", "reload", "recycle", "memory", "lifetime", "hung"}
        )

    def test_reloads(self):
        """
        Finished reloads are counted by outcome, every known outcome served.
        """
        recorder = ClusterRecorder()
        recorder.reloadFinished("succeeded")
        recorder.reloadFinished("succeeded")
        recorder.reloadFinished("stopped")
        family = scrape(clusterRegistry(recorder))["txcluster_reloads"]
        self.assertEqual(
            {s.labels["outcome"]: s.value for s in family.samples},
            {"succeeded": 2.0, "failed": 0.0, "stopped": 1.0},
        )
        self.assertEqual(RELOAD_OUTCOMES, ("succeeded", "failed", "stopped"))

    def test_cpuNeverGoesBackwards(self):
        """
        A worker id's CPU seconds are those of its ended processes plus the
        last sample of each live one; a lower sample (a misread) or a
        sample of an ended process does not lower them.
        """
        recorder = ClusterRecorder()
        recorder.cpu(1, 7, 2.0)
        recorder.cpu(1, 12, 0.5)
        recorder.cpu(1, 7, 3.0)
        self.assertEqual(byWorker(clusterRegistry(recorder), "txcluster_worker_cpu_seconds"), {"1": 3.5})
        recorder.gone(1, 7)
        recorder.cpu(1, 7, 0.1)
        recorder.cpu(1, 12, 0.25)
        self.assertEqual(byWorker(clusterRegistry(recorder), "txcluster_worker_cpu_seconds"), {"1": 3.5})
        recorder.cpu(1, 12, 1.0)
        recorder.cpu(2, 8, 4.0)
        self.assertEqual(
            byWorker(clusterRegistry(recorder), "txcluster_worker_cpu_seconds"), {"1": 4.0, "2": 4.0}
        )

    def test_forget(self):
        """
        A worker id the recorder forgot is not served until it comes back,
        and then goes on from its counts.
        """
        recorder = ClusterRecorder()
        recorder.handed(4, 10)
        recorder.cpu(4, 7, 2.0)
        recorder.forget(4)
        recorder.cpu(4, 7, 5.0)
        registry = clusterRegistry(recorder)
        self.assertEqual(byWorker(registry, "txcluster_connections_handed"), {})
        self.assertEqual(byWorker(registry, "txcluster_worker_cpu_seconds"), {})
        recorder.handed(4, 1)
        self.assertEqual(byWorker(registry, "txcluster_connections_handed"), {"4": 11.0})
        self.assertEqual(byWorker(registry, "txcluster_worker_cpu_seconds"), {"4": 2.0})
        recorder.forget(5)

    def test_handoffWeighted(self):
        """
        Each handoff latency counts as many times as connections took it:
        the buckets are cumulative, C{_count} is the sum of the weights and
        C{_sum} the weighted sum.  A value on a bound falls in that bound's
        bucket.
        """
        recorder = ClusterRecorder()
        recorder.handoffLatency(0.0001, 3)
        recorder.handoffLatency(0.002)
        recorder.handoffLatency(10.0, 2)
        recorder.handoffLatency(0.5, 0)
        family = scrape(clusterRegistry(recorder))["txcluster_handoff_seconds"]
        buckets = [(float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")]
        self.assertEqual([b for b, _ in buckets], list(HANDOFF_BUCKETS) + [math.inf])
        counts = dict(buckets)
        self.assertEqual(counts[0.00005], 0.0)
        self.assertEqual(counts[0.0001], 3.0)
        self.assertEqual(counts[0.0025], 4.0)
        self.assertEqual(counts[5.0], 4.0)
        self.assertEqual(counts[math.inf], 6.0)
        values = [v for _, v in buckets]
        self.assertEqual(values, sorted(values))
        [count] = [s.value for s in family.samples if s.name == "txcluster_handoff_seconds_count"]
        [total] = [s.value for s in family.samples if s.name == "txcluster_handoff_seconds_sum"]
        self.assertEqual(count, 6.0)
        self.assertAlmostEqual(total, 0.0003 + 0.002 + 20.0)
        self.assertEqual((HANDOFF_BUCKETS[0], HANDOFF_BUCKETS[-1]), (0.00001, 5.0))

    def test_handoffRefusesNegativeWeights(self):
        """
        A negative count is the caller's bug, and ignored NaNs do not poison
        the sum.
        """
        recorder = ClusterRecorder()
        self.assertRaises(ValueError, recorder.handoffLatency, 0.1, -1)
        recorder.handoffLatency(math.nan, 2)
        snapshot = recorder.statistics().handoff
        self.assertEqual((snapshot.counts[-1], snapshot.sum), (0, 0.0))

    def test_statisticsIsASnapshot(self):
        """
        L{ClusterRecorder.statistics} is a frozen snapshot: later counts do
        not change it.
        """
        recorder = ClusterRecorder()
        recorder.handed(1, 2)
        recorder.restarted(1, "hung")
        before = recorder.statistics()
        recorder.handed(1, 2)
        recorder.restarted(1, "hung")
        recorder.handoffLatency(0.1)
        self.assertEqual((before.handed, before.restarts), ({1: 2}, {1: {"hung": 1}}))
        self.assertEqual(before.handoff.counts[-1], 0)
        self.assertRaises(FrozenInstanceError, setattr, before, "handed", {})

    def test_heartbeat(self):
        """
        Heartbeat round trips go to their own histogram, 1 ms to 30 s.
        """
        recorder = ClusterRecorder()
        recorder.heartbeat(0.003)
        recorder.heartbeat(45.0)
        snapshot = recorder.statistics().heartbeat
        self.assertEqual(snapshot.bounds, HEARTBEAT_BUCKETS)
        self.assertEqual((HEARTBEAT_BUCKETS[0], HEARTBEAT_BUCKETS[-1]), (0.001, 30.0))
        self.assertEqual(snapshot.counts[1], 0)
        self.assertEqual(snapshot.counts[2], 1)
        self.assertEqual(snapshot.counts[-2:], (1, 2))
        family = scrape(clusterRegistry(recorder))["txcluster_heartbeat_round_trip_seconds"]
        [count] = [s for s in family.samples if s.name.endswith("_count")]
        self.assertEqual(count.value, 2.0)

    def test_workersByState(self):
        """
        Worker processes are counted by state, every state served (0 if
        none); an unknown state is counted as given.
        """
        snapshot = FakeSnapshot(
            (FakeWorker(1, "ready"), FakeWorker(1, "draining"), FakeWorker(2, "ready"), FakeWorker(3, "odd"))
        )
        family = scrape(clusterRegistry(snapshot=snapshot))["txcluster_workers"]
        expected = dict.fromkeys(WORKER_STATES, 0.0)
        expected.update(ready=2.0, draining=1.0, odd=1.0)
        self.assertEqual({s.labels["state"]: s.value for s in family.samples}, expected)
        self.assertEqual(
            WORKER_STATES, ("starting", "online", "ready", "draining", "leaving", "failing", "waiting")
        )

    def test_connectionsAndMemory(self):
        """
        Open connections and resident memory are added up over each worker
        id's processes that know them; a worker id with none known is left
        out.
        """
        snapshot = FakeSnapshot(
            (
                FakeWorker(1, "draining", connections=5, rss=1000),
                FakeWorker(1, "ready", connections=2, rss=None),
                FakeWorker(2, "starting", connections=None, rss=300),
                FakeWorker(3, "waiting", pid=None),
            ),
            pending=7,
        )
        registry = clusterRegistry(snapshot=snapshot)
        self.assertEqual(byWorker(registry, "txcluster_connections_open"), {"1": 7.0})
        self.assertEqual(
            byWorker(registry, "txcluster_worker_resident_memory_bytes"), {"1": 1000.0, "2": 300.0}
        )
        [queue] = scrape(registry)["txcluster_dispatch_queue_connections"].samples
        self.assertEqual((queue.labels, queue.value), ({}, 7.0))

    def test_collectionAge(self):
        """
        The age of each worker id's application metrics comes from the
        store, at the collector's time.
        """
        store = WorkerMetricsStore()
        store.report(1, 7, counterText(1), 90.0)
        store.report(2, 8, counterText(1), 97.5)
        registry = clusterRegistry(store=store, now=lambda: 100.0)
        self.assertEqual(
            byWorker(registry, "txcluster_metrics_collection_age_seconds"), {"1": 10.0, "2": 2.5}
        )
        self.assertEqual(served(store, "app_requests_total", 1), 1.0)
        self.assertEqual(samples(registry)[("app_requests_total", (("worker", "2"),))], 1.0)

    def test_snapshotFails(self):
        """
        If the snapshot cannot be taken, the failure is logged and the
        families that need it are left out; the scrape succeeds.
        """

        def broken():
            raise ZeroDivisionError()

        recorder = ClusterRecorder()
        recorder.handed(1, 2)
        registry = makeRegistry(recorder, WorkerMetricsStore(), broken, lambda: 0.0)
        families = scrape(registry)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertNotIn("txcluster_workers", families)
        self.assertEqual(byWorker(registry, "txcluster_connections_handed"), {"1": 2.0})
        self.flushLoggedErrors(ZeroDivisionError)

    def test_collectorDescribesNothing(self):
        """
        The collector describes nothing, so that registering it takes no
        snapshot even on a registry that checks names.
        """
        collector = ClusterCollector(ClusterRecorder(), WorkerMetricsStore(), None, None)
        self.assertEqual(collector.describe(), [])
        CollectorRegistry(auto_describe=True).register(collector)


# Operations on a store: a report of a counter grown by a step, or an end.
_operations = st.lists(
    st.tuples(
        st.sampled_from(["report", "report", "report", "gone", "forget"]),
        st.integers(1, 2),
        st.integers(0, 3),
        st.integers(0, 5),
    ),
    min_size=5,
    max_size=40,
)

_layouts = st.lists(st.sets(st.sampled_from(["0.1", "0.5", "1.0", "5.0"])), min_size=4, max_size=4)


class PropertyTests(SynchronousTestCase):
    """
    Whatever the order of reports and ends, what is served never goes
    backwards.
    """

    @_settings
    @given(_operations)
    def test_countersNeverGoBackwards(self, operations):
        """
        For any sequence of reports (each process's counter not decreasing)
        and ends, each worker id's served counter never decreases.
        """
        store = WorkerMetricsStore()
        counts: dict = {}
        highest: dict = {}
        for operation, workerId, serial, step in operations:
            serial = workerId * 10 + serial
            if operation == "report":
                counts[serial] = counts.get(serial, 0) + step
                store.report(workerId, serial, counterText(counts[serial]), 0.0)
            elif operation == "gone":
                store.gone(workerId, serial)
            else:
                store.forget(workerId)
            for (name, labels), value in samples(storeRegistry(store)).items():
                worker = dict(labels)["worker"]
                self.assertGreaterEqual(value, highest.get(worker, 0.0))
                highest[worker] = value

    @_settings
    @given(_operations, _layouts)
    def test_bucketsNeverGoBackwards(self, operations, layouts):
        """
        With processes whose bucket bounds differ, each worker id's served
        buckets stay cumulative, and none decreases.
        """
        store = WorkerMetricsStore()
        counts: dict = {}
        highest: dict = {}
        for operation, workerId, serial, step in operations:
            layout = sorted(layouts[serial], key=float) + ["+Inf"]
            serial = workerId * 10 + serial
            if operation == "report":
                # Each bucket grows by step, and by its position: cumulative.
                previous = counts.get(serial, [0] * len(layout))
                counts[serial] = [c + step * (i + 1) for i, c in enumerate(previous)]
                buckets = dict(zip(layout, counts[serial]))
                store.report(workerId, serial, histogramText(buckets, 1.0), 0.0)
            elif operation == "gone":
                store.gone(workerId, serial)
            else:
                store.forget(workerId)
            families = scrape(storeRegistry(store))
            if "app_seconds" not in families:
                continue
            byWorkerId: dict = {}
            for sample in families["app_seconds"].samples:
                if sample.name == "app_seconds_bucket":
                    key = (sample.labels["worker"], float(sample.labels["le"]))
                    byWorkerId.setdefault(key[0], []).append(sample.value)
                    self.assertGreaterEqual(sample.value, highest.get(key, 0.0))
                    highest[key] = sample.value
            for values in byWorkerId.values():
                self.assertEqual(values, sorted(values))
