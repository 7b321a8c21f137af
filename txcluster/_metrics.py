# -*- test-case-name: tests.test_metrics -*-
"""
What the master's C{/metrics} serves: the applications' own metrics,
gathered from every worker process and added up per worker id, and
txcluster's metrics of the cluster itself.

Both are prometheus_client collectors fed by plain calls.  Nothing here
touches a socket, a process or the reactor, and nothing reads a clock: the
time is passed in.

  - L{WorkerMetricsStore} takes each worker process's exposition (the text
    of C{generate_latest()} on the worker's default registry) and serves
    each sample once per worker id, with a C{worker} label.  A worker id is
    served by one process after another (a reload, a recycle, a respawn);
    what a process had counted is kept when it ends, so that a worker id's
    counters never go backwards.
  - L{ClusterRecorder} counts what the master does as it does it (cheaply:
    it is on the dispatch path), and L{ClusterCollector} serves that with
    the master's snapshot of its workers.
  - L{makeRegistry} puts both in a fresh C{CollectorRegistry}.

A scrape never fails because of a worker: a family a worker got wrong is
left out, and logged.  C{collect()} may run on a thread of the reactor's
pool (prometheus_client's Twisted resource serves from one), so the store
locks and the recorder's collector copies before it reads.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left, bisect_right
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Optional, Protocol, Sequence, Union

from attrs import field, frozen, mutable
from twisted.logger import Logger

if TYPE_CHECKING:
    # prometheus_client is imported where it is used: a master without
    # --metrics never needs it.
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

_log = Logger(namespace="txcluster.master")

#: A sample's labels, sorted by name.
Labels = tuple[tuple[str, str], ...]

#: The most samples one process may report at once.
MAX_SAMPLES = 10_000

#: The longest exposition one process may report, in bytes (or characters).
MAX_BYTES = 8 * 1024 * 1024

#: Families whose names start so are txcluster's own: an application's
#: family of that name would clash with the master's, and is left out.
RESERVED_PREFIXES = ("txcluster_",)

#: txcluster's own families that the workers report (with the
#: application's): they are not the master's, and so pass.
WORKER_FAMILIES = frozenset({"txcluster_proxy_rejected_connections"})

#: The states of a worker process in the master's snapshot.
WORKER_STATES = ("starting", "online", "ready", "draining", "leaving", "failing", "waiting")

#: Why a worker id got a new process.
RESTART_REASONS = ("failure", "left", "reload", "recycle", "memory", "lifetime", "hung")

#: How a rolling reload ended.
RELOAD_OUTCOMES = ("succeeded", "failed", "stopped")

#: Bounds of C{txcluster_handoff_seconds}: 10 microseconds to 5 seconds.
HANDOFF_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005)
HANDOFF_BUCKETS += (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: Bounds of C{txcluster_heartbeat_round_trip_seconds}: 1 ms to 30 s.
HEARTBEAT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# The kind a parsed family's type stands for.  The text format has no
# info, stateset or gauge histogram: prometheus_client writes those as
# gauges (a gauge histogram as a histogram without _count and _sum, next to
# gauges named _gcount and _gsum; see _parseExposition).
_KINDS = {
    "counter": "counter",
    "gauge": "gauge",
    "histogram": "histogram",
    "summary": "summary",
    "unknown": "unknown",
    "untyped": "unknown",
    "info": "gauge",
    "stateset": "gauge",
    "gaugehistogram": "gauge",
}

# The type each kind is served as.
_SERVED = {"gaugehistogram": "histogram"}


class BadMetrics(ValueError):
    """
    A worker process sent metrics the master will not take: text that does
    not parse, or that is too large.  The application's (or the worker's)
    fault; the process's previous report stands.

    @ivar workerId: the worker id of the process.
    @ivar serial: the process's serial.
    @ivar reason: what is wrong with what it sent.
    """

    def __init__(self, workerId: int, serial: int, reason: str) -> None:
        super().__init__(f"worker {workerId} (process {serial}) sent metrics that were refused: {reason}")
        self.workerId = workerId
        self.serial = serial
        self.reason = reason


class _Invalid(Exception):
    """
    Why an exposition is refused (L{BadMetrics} says whose).
    """


@frozen
class _Family:
    """
    A metric family as one source describes it.

    @ivar kind: C{counter}, C{gauge}, C{histogram}, C{gaugehistogram},
        C{summary} or C{unknown}.
    """

    name: str
    kind: str
    documentation: str
    unit: str


@frozen(eq=False)
class _Samples:
    """
    One family's samples from one source (a process's report, or a worker
    id's offset), keyed by C{(sample name, labels)}.

    @ivar cumulative: the samples that add up across processes.
    @ivar gauges: the samples served from the newest live process.
    @ivar buckets: a histogram's buckets, by the labels other than C{le}:
        C{(bound, le text, count)}, in increasing bounds.
    """

    family: _Family
    cumulative: Mapping = field(factory=dict)
    gauges: Mapping = field(factory=dict)
    buckets: Mapping = field(factory=dict)

    def size(self) -> int:
        return len(self.cumulative) + len(self.gauges) + sum(len(b) for b in self.buckets.values())


@frozen
class _Exposition:
    """
    A parsed report: its families by name, and the names it used that are
    txcluster's (left out).
    """

    families: Mapping
    reserved: tuple


@mutable(eq=False)
class _Process:
    """
    One live worker process: its last report, when it came, and in which
    order the process first reported (the older source's type wins).
    """

    serial: int
    order: int
    reportedAt: float
    families: Mapping
    warned: set = field(factory=set)


@mutable(eq=False)
class _WorkerRecord:
    """
    One worker id: its live processes, what its ended processes had
    counted (the offset), which serials ended, and whether it was scaled
    away.
    """

    processes: dict = field(factory=dict)
    offset: dict = field(factory=dict)
    ended: set = field(factory=set)
    forgotten: bool = False


def _exportedLabels(labels: Mapping[str, str]) -> Labels:
    """
    An application's labels, with its own C{worker} label renamed
    C{exported_worker} (C{exported_exported_worker} if that is taken too,
    and so on, as Prometheus does), so that txcluster's can be added.
    """
    if "worker" in labels:
        labels = dict(labels)
        value = labels.pop("worker")
        name = "exported_worker"
        while name in labels:
            name = "exported_" + name
        labels[name] = value
    return tuple(sorted(labels.items()))


def _descriptions(families: Mapping[str, _Samples]) -> dict[str, _Family]:
    return {name: samples.family for name, samples in families.items()}


def _claims(family: _Family) -> tuple:
    """
    The names printed for C{family}: two families claiming one would make
    the exposition ambiguous.
    """
    name = family.name
    if family.kind == "counter":
        return (name, name + "_total")
    if family.kind in ("histogram", "gaugehistogram"):
        return (name, name + "_bucket", name + "_count", name + "_sum")
    if family.kind == "summary":
        return (name, name + "_count", name + "_sum")
    return (name,)


def _bound(le: Optional[str]) -> float:
    if le is None:
        raise _Invalid("a histogram bucket has no le label")
    try:
        bound = float(le)
    except ValueError:
        raise _Invalid(f"a histogram bucket has le={le!r}") from None
    if math.isnan(bound):
        raise _Invalid("a histogram bucket has le=NaN")
    return bound


def _familySamples(metric: Metric, kind: str) -> _Samples:
    """
    Sort the samples of one parsed family into cumulative ones, gauges and
    buckets, and check its histograms.
    """
    name = metric.name
    family = _Family(name, kind, metric.documentation, metric.unit)
    cumulative: dict = {}
    gauges: dict = {}
    groups: dict = {}
    sums = (name + "_count", name + "_sum")
    for sample in metric.samples:
        if sample.name == name + "_created":
            continue
        if kind == "histogram" and sample.name == name + "_bucket":
            labels = dict(sample.labels)
            le = labels.pop("le", None)
            group = groups.setdefault(_exportedLabels(labels), {})
            bound = _bound(le)
            if bound in group:
                raise _Invalid(f"{name} has two buckets le={le}")
            group[bound] = (bound, le, float(sample.value))
        elif kind == "counter" or (kind in ("histogram", "summary") and sample.name in sums):
            cumulative[(sample.name, _exportedLabels(sample.labels))] = float(sample.value)
        else:
            gauges[(sample.name, _exportedLabels(sample.labels))] = float(sample.value)
    buckets = {}
    for labels, group in groups.items():
        ordered = tuple(group[bound] for bound in sorted(group))
        if ordered[-1][0] != math.inf:
            raise _Invalid(f"{name}{dict(labels)} has no +Inf bucket")
        if any(later[2] < earlier[2] for earlier, later in zip(ordered, ordered[1:])):
            raise _Invalid(f"{name}{dict(labels)} has buckets that are not cumulative")
        buckets[labels] = ordered
    return _Samples(family, cumulative, gauges, buckets)


def _parseExposition(
    text: Union[bytes, str], maxSamples: int, maxBytes: int, reserved: Sequence[str]
) -> _Exposition:
    """
    Parse one process's exposition.

    A C{NAME_created} family next to a counter, histogram or summary
    C{NAME} is left out (a creation time means nothing once processes are
    added up), and so is a C{_created} sample in any family.  A histogram
    next to a C{NAME_gcount} or C{NAME_gsum} family is a gauge histogram
    (as C{generate_latest} writes one): its buckets are a gauge's.

    @raise _Invalid: it is not an exposition, or too large.
    """
    if not isinstance(text, (bytes, str)):
        raise _Invalid(f"not text but {type(text).__name__}")
    if len(text) > maxBytes:
        raise _Invalid(f"{len(text)} bytes, more than {maxBytes}")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Invalid(f"not UTF-8 ({e})") from None
    from prometheus_client.parser import text_string_to_metric_families

    metrics = []
    count = 0
    try:
        for metric in text_string_to_metric_families(text):
            count += len(metric.samples)
            if count > maxSamples:
                raise _Invalid(f"more than {maxSamples} samples")
            metrics.append(metric)
    except _Invalid:
        raise
    except Exception as e:
        # The parser is lax, and says so with more than ValueError.
        raise _Invalid(f"it does not parse ({e!r})") from None
    names = {m.name for m in metrics}
    gaugeHistograms = {
        m.name
        for m in metrics
        if m.type == "histogram" and (m.name + "_gcount" in names or m.name + "_gsum" in names)
    }
    created = {
        m.name + "_created"
        for m in metrics
        if m.type in ("counter", "histogram", "summary") and m.name not in gaugeHistograms
    }
    families: dict = {}
    skipped = []
    for metric in metrics:
        if metric.name in created:
            continue
        if metric.name.startswith(tuple(reserved)) and metric.name not in WORKER_FAMILIES:
            skipped.append(metric.name)
            continue
        kind = "gaugehistogram" if metric.name in gaugeHistograms else _KINDS.get(metric.type, "unknown")
        samples = _familySamples(metric, kind)
        earlier = families.get(metric.name)
        if earlier is None:
            families[metric.name] = samples
        elif earlier.family.kind != kind:
            raise _Invalid(f"{metric.name} is both a {earlier.family.kind} and a {kind}")
        else:
            # The lax parser splits a family whose lines are not together.
            families[metric.name] = _Samples(
                earlier.family,
                {**earlier.cumulative, **samples.cumulative},
                {**earlier.gauges, **samples.gauges},
                {**earlier.buckets, **samples.buckets},
            )
    return _Exposition(families, tuple(dict.fromkeys(skipped)))


def _mergeBuckets(layouts: Sequence[tuple]) -> tuple:
    """
    Add up the buckets of one histogram from several sources.

    Sources that disagree on the bounds (an application whose buckets
    changed across a reload) are added up on the union of the bounds, each
    source counting at a bound what it had at its own largest bound not
    above it: a lower bound of the truth, and still cumulative.
    """
    first = layouts[0]
    if len(layouts) == 1:
        return first
    bounds = [b[0] for b in first]
    if all([b[0] for b in layout] == bounds for layout in layouts[1:]):
        return tuple((b[0], b[1], sum(layout[i][2] for layout in layouts)) for i, b in enumerate(first))
    texts: dict = {}
    for layout in layouts:
        for bound, text, _ in layout:
            texts.setdefault(bound, text)
    own = [[b[0] for b in layout] for layout in layouts]
    merged = []
    for bound in sorted(texts):
        total = 0.0
        for layout, theirs in zip(layouts, own):
            i = bisect_right(theirs, bound) - 1
            if i >= 0:
                total += layout[i][2]
        merged.append((bound, texts[bound], total))
    return tuple(merged)


def _fold(offset: Optional[_Samples], ended: _Samples, room: int) -> tuple:
    """
    Add an ended process's cumulative samples of one family to a worker
    id's offset.  Series the offset does not have yet take room; those
    that do not fit are left out.

    @return: the new offset, the room left, and how many samples were left
        out.
    """
    cumulative = dict(offset.cumulative) if offset is not None else {}
    buckets = dict(offset.buckets) if offset is not None else {}
    dropped = 0
    droppedGroups = set()
    for labels, layout in ended.buckets.items():
        if labels in buckets:
            buckets[labels] = _mergeBuckets([buckets[labels], layout])
        elif len(layout) <= room:
            buckets[labels] = layout
            room -= len(layout)
        else:
            dropped += len(layout)
            droppedGroups.add(labels)
    name = ended.family.name
    for key, value in ended.cumulative.items():
        if key in cumulative:
            cumulative[key] += value
        elif key[1] in droppedGroups and key[0] in (name + "_count", name + "_sum"):
            dropped += 1
        elif room > 0:
            cumulative[key] = value
            room -= 1
        else:
            dropped += 1
    return _Samples(ended.family, cumulative, {}, buckets), room, dropped


def _addSamples(metric: Metric, family: _Family, worker: str, sources: Sequence[_Samples]) -> None:
    """
    Add to C{metric} one worker id's samples of C{family}, from its offset
    and its live processes (C{sources}, the oldest first): cumulative
    samples and buckets added up, gauges from the newest process.
    """
    cumulative: dict = {}
    gauges: dict = {}
    groups: dict = {}
    for source in sources:
        for key, value in source.cumulative.items():
            cumulative[key] = cumulative.get(key, 0.0) + value
        gauges.update(source.gauges)
        for labels, layout in source.buckets.items():
            groups.setdefault(labels, []).append(layout)
    name = family.name
    for group, layouts in groups.items():
        labels = dict(group, worker=worker)
        for _, le, value in _mergeBuckets(layouts):
            metric.add_sample(name + "_bucket", dict(labels, le=le), value)
        for suffix in ("_count", "_sum"):
            value = cumulative.pop((name + suffix, group), None)
            if value is not None:
                metric.add_sample(name + suffix, labels, value)
    for samples in (cumulative, gauges):
        for (sample, labels), value in samples.items():
            metric.add_sample(sample, dict(labels, worker=worker), value)


class WorkerMetricsStore:
    """
    The applications' metrics, as the worker processes last reported them,
    served per worker id with a C{worker} label: a prometheus_client
    collector.

    What a worker id serves:

      - A cumulative sample (a counter; a histogram's buckets, C{_count}
        and C{_sum}; a summary's C{_count} and C{_sum}) is its offset (what
        its ended processes had counted) plus the last value of each of its
        live processes: it never goes backwards across a reload, a recycle
        or a respawn, and while an old and a new process both run, both
        count.
      - Any other sample (a gauge, an info, a state set, an enum, a gauge
        histogram, a summary's quantiles, an untyped sample) comes from its
        live processes only, from the one with the highest serial that
        has it.
      - C{_created} samples are left out, and so are the families named
        C{txcluster_*} (the master's own).

    A family's type is that of its oldest source: the offsets first, then
    the live processes in the order they first reported.  A source that
    disagrees is left out of that family (and logged once per process);
    a family whose printed names clash with an older one's (a gauge
    C{a_total} and a counter C{a}) is left out as a whole.  A worker id
    whose ended processes counted more than C{maxSamples} distinct series
    keeps no more in its offset.

    @ivar maxSamples: the most samples a process may report at once.
    @ivar maxBytes: the longest exposition a process may report.
    """

    def __init__(
        self,
        maxSamples: int = MAX_SAMPLES,
        maxBytes: int = MAX_BYTES,
        reservedPrefixes: Sequence[str] = RESERVED_PREFIXES,
    ) -> None:
        self.maxSamples = maxSamples
        self.maxBytes = maxBytes
        self._reserved = tuple(reservedPrefixes)
        self._workers: dict[int, _WorkerRecord] = {}
        self._order = 0
        self._lock = threading.Lock()
        # What _precedence() found, until a source's families change.
        self._families: Optional[dict[str, _Family]] = None

    def report(self, workerId: int, serial: int, text: Union[bytes, str], now: float) -> None:
        """
        Process C{serial} of worker C{workerId} sent its exposition at
        C{now}: it replaces the process's previous one.  A report from a
        process that is gone (or whose worker id was forgotten while it
        ran) is ignored: what it had counted is in the offset already.

        @param text: the text of C{generate_latest()}, as bytes or str.
        @raise BadMetrics: C{text} does not parse, or is over
            C{maxSamples} samples or C{maxBytes} long; the previous report
            stands.
        """
        try:
            exposition = _parseExposition(text, self.maxSamples, self.maxBytes, self._reserved)
        except _Invalid as e:
            raise BadMetrics(workerId, serial, str(e)) from None
        with self._lock:
            worker = self._workers.setdefault(workerId, _WorkerRecord())
            if serial in worker.ended:
                return
            worker.forgotten = False
            process = worker.processes.get(serial)
            if process is None:
                self._order += 1
                process = _Process(serial, self._order, now, exposition.families)
                worker.processes[serial] = process
                self._families = None
            else:
                if _descriptions(process.families) != _descriptions(exposition.families):
                    self._families = None
                process.families = exposition.families
                process.reportedAt = now
            self._warn(workerId, process, exposition.reserved)

    def gone(self, workerId: int, serial: int) -> None:
        """
        Process C{serial} of worker C{workerId} ended: its last report is
        final, and its cumulative samples go to the worker id's offset.
        """
        with self._lock:
            worker = self._workers.setdefault(workerId, _WorkerRecord())
            worker.ended.add(serial)
            if serial in worker.processes:
                self._retire(workerId, worker, [serial])

    def forget(self, workerId: int) -> None:
        """
        Worker id C{workerId} was scaled away: its live processes are
        folded into its offset as if they had ended, and it is no longer
        served.  The offset is kept: if the id comes back (its next
        process reports), its counters go on from where they were.
        """
        with self._lock:
            worker = self._workers.get(workerId)
            if worker is None:
                return
            worker.ended.update(worker.processes)
            self._retire(workerId, worker, sorted(worker.processes))
            worker.forgotten = True

    def ages(self, now: float) -> dict[int, float]:
        """
        How stale each worker id's metrics are at C{now}.

        @return: for each worker id with a live process that reported,
            the seconds since the least recent last report of its live
            processes (so that one process no longer reporting shows).
        """
        with self._lock:
            return {
                workerId: max(0.0, now - min(p.reportedAt for p in worker.processes.values()))
                for workerId, worker in sorted(self._workers.items())
                if worker.processes
            }

    def describe(self) -> list:
        """
        Nothing: what the workers report is not known in advance, and a
        registry must not collect to find out.
        """
        return []

    def collect(self) -> list[Metric]:
        """
        The families of every worker id served, in the order their oldest
        source had them, each sample with a C{worker} label.
        """
        with self._lock:
            families = self._precedence()
            # Each worker id served: its label, then its sources, the
            # offset first and the live processes by serial.
            shown = [
                (str(i), [w.offset] + [w.processes[s].families for s in sorted(w.processes)])
                for i, w in sorted(self._workers.items())
                if not w.forgotten
            ]
            present: set = set()
            for _, sources in shown:
                for source in sources:
                    present.update(source)
            claimed: set = set()
            collected = []
            for name, family in families.items():
                claims = _claims(family)
                if name not in present or claimed.intersection(claims):
                    continue
                claimed.update(claims)
                try:
                    collected.append(self._collectFamily(family, shown))
                except Exception:
                    _log.failure("the workers' family {name} could not be collected", name=name)
            return collected

    def _collectFamily(self, family: _Family, shown: Sequence[tuple]) -> Metric:
        served = _SERVED.get(family.kind, family.kind)
        from prometheus_client.metrics_core import Metric

        metric = Metric(family.name, family.documentation, served, family.unit)
        for worker, sources in shown:
            found = [source.get(family.name) for source in sources]
            found = [s for s in found if s is not None and s.family.kind == family.kind]
            if found:
                _addSamples(metric, family, worker, found)
        return metric

    def _precedence(self) -> dict[str, _Family]:
        """
        Each family's served description: the kind of its oldest source,
        with the help text of its newest source of that kind.  Kept until
        a process starts or ends or its families change, because reports
        come often and rarely change them.
        """
        if self._families is not None:
            return self._families
        families: dict[str, _Family] = {}
        for _, worker in sorted(self._workers.items()):
            for name, samples in worker.offset.items():
                families.setdefault(name, samples.family)
        live = [p for worker in self._workers.values() for p in worker.processes.values()]
        for process in sorted(live, key=lambda p: p.order):
            for name, samples in process.families.items():
                known = families.get(name)
                if known is None or known.kind == samples.family.kind:
                    families[name] = samples.family
        self._families = families
        return families

    def _retire(self, workerId: int, worker: _WorkerRecord, serials: Sequence[int]) -> None:
        """
        Fold the cumulative samples of C{worker}'s processes C{serials}
        into its offset, and drop them.
        """
        families = self._precedence()
        self._families = None
        room = self.maxSamples - sum(s.size() for s in worker.offset.values())
        dropped = 0
        for serial in serials:
            process = worker.processes.pop(serial)
            for name, samples in process.families.items():
                known = families.get(name)
                if known is None or known.kind != samples.family.kind:
                    continue
                if samples.cumulative or samples.buckets:
                    worker.offset[name], room, lost = _fold(worker.offset.get(name), samples, room)
                    dropped += lost
        if dropped:
            _log.warn(
                "worker {workerId}: {dropped} samples of its ended processes were left out of its "
                "totals, which already hold {limit}",
                workerId=workerId,
                dropped=dropped,
                limit=self.maxSamples,
            )

    def _warn(self, workerId: int, process: _Process, reserved: Sequence[str]) -> None:
        """
        Log, once per process and family, what of its report is left out.
        """
        for name in reserved:
            if name not in process.warned:
                process.warned.add(name)
                _log.warn(
                    "worker {workerId} (process {serial}) reports {name}, a name txcluster keeps "
                    "for its own metrics: it is left out",
                    workerId=workerId,
                    serial=process.serial,
                    name=name,
                )
        families = self._precedence()
        for name, samples in process.families.items():
            served = families[name]
            if served.kind != samples.family.kind and name not in process.warned:
                process.warned.add(name)
                _log.warn(
                    "worker {workerId} (process {serial}) reports {name} as a {kind}, but it is a "
                    "{served}: its samples are left out",
                    workerId=workerId,
                    serial=process.serial,
                    name=name,
                    kind=samples.family.kind,
                    served=served.kind,
                )


@frozen
class HistogramSnapshot:
    """
    A histogram at one moment.

    @ivar bounds: the upper bounds of its buckets, increasing, without
        C{+Inf}.
    @ivar counts: the cumulative count of each bucket, then of C{+Inf} (the
        total weight observed).
    @ivar sum: the sum of the observations, each times its weight.
    """

    bounds: tuple
    counts: tuple
    sum: float

    def buckets(self) -> list:
        """
        C{(le, cumulative count)} pairs, as C{HistogramMetricFamily} takes
        them.
        """
        les = [_goFloat(b) for b in self.bounds] + ["+Inf"]
        return list(zip(les, self.counts))


def _goFloat(value: float) -> str:
    """
    C{value} as Prometheus prints a bound.
    """
    if value == math.inf:
        return "+Inf"
    return repr(float(value))


class _Histogram:
    """
    Weighted observations in fixed buckets: plain numbers, cheap to update.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(float(b) for b in bounds if b != math.inf))
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float, weight: int) -> None:
        if weight < 0:
            raise ValueError(f"a negative weight: {weight}")
        if value != value:  # NaN would poison the sum forever.
            return
        self.counts[bisect_left(self.bounds, value)] += weight
        self.total += value * weight

    def snapshot(self) -> HistogramSnapshot:
        counts = list(self.counts)
        cumulative = []
        running = 0
        for count in counts:
            running += count
            cumulative.append(running)
        return HistogramSnapshot(self.bounds, tuple(cumulative), self.total)


@mutable(eq=False)
class _Tally:
    """
    What the master counted of one worker id.

    @ivar cpu: the last CPU seconds of each live process, by serial.
    @ivar cpuOffset: the CPU seconds of its ended processes.
    @ivar ended: the serials of its ended processes.
    @ivar shown: whether it is served (L{False} once forgotten).
    """

    handed: int = 0
    restarts: dict = field(factory=dict)
    cpu: dict = field(factory=dict)
    cpuOffset: float = 0.0
    ended: set = field(factory=set)
    shown: bool = True


@frozen
class RecorderStatistics:
    """
    A snapshot of a L{ClusterRecorder}.

    @ivar handed: connections handed, by worker id.
    @ivar restarts: restarts, by worker id, then by reason.
    @ivar cpuSeconds: CPU seconds, by worker id (only those sampled).
    @ivar reloads: finished reloads, by outcome.
    @ivar handoff: the latencies from accept to adoption.
    @ivar heartbeat: the heartbeat round trips.
    @ivar workerIds: the worker ids served.
    """

    handed: Mapping
    restarts: Mapping
    cpuSeconds: Mapping
    reloads: Mapping
    handoff: HistogramSnapshot
    heartbeat: HistogramSnapshot
    workerIds: tuple


class ClusterRecorder:
    """
    Counts what the master does, as it does it, for L{ClusterCollector}.

    L{handed} and L{handoffLatency} are on the dispatch path: they update
    plain numbers, in constant time.  Counts never go backwards; the worker
    ids C{handed}, C{restarted} or C{cpu} name are served (until
    L{forget}).
    """

    def __init__(
        self,
        handoffBuckets: Sequence[float] = HANDOFF_BUCKETS,
        heartbeatBuckets: Sequence[float] = HEARTBEAT_BUCKETS,
    ) -> None:
        """
        @param handoffBuckets: the bounds of C{txcluster_handoff_seconds}.
        @param heartbeatBuckets: the bounds of
            C{txcluster_heartbeat_round_trip_seconds}.
        """
        self._tallies: dict[int, _Tally] = {}
        self._reloads: dict[str, int] = dict.fromkeys(RELOAD_OUTCOMES, 0)
        self._handoff = _Histogram(handoffBuckets)
        self._heartbeat = _Histogram(heartbeatBuckets)

    def _tally(self, workerId: int) -> _Tally:
        tally = self._tallies.get(workerId)
        if tally is None:
            tally = self._tallies[workerId] = _Tally()
        return tally

    def handed(self, workerId: int, count: int) -> None:
        """
        C{count} connections were handed to worker C{workerId}.
        """
        tally = self._tally(workerId)
        tally.handed += count
        tally.shown = True

    def handoffLatency(self, seconds: float, count: int = 1) -> None:
        """
        C{count} connections took C{seconds} from their accept to their
        adoption by a worker: one observation, weighted C{count} times.
        A NaN is ignored.

        @raise ValueError: C{count} is negative.
        """
        self._handoff.observe(seconds, count)

    def heartbeat(self, seconds: float) -> None:
        """
        A heartbeat took C{seconds} to come back: a worker reactor's lag.
        """
        self._heartbeat.observe(seconds, 1)

    def restarted(self, workerId: int, reason: str) -> None:
        """
        A new process was started for worker C{workerId}.

        @param reason: one of L{RESTART_REASONS}: C{failure} (its
            predecessor failed), C{left} (its predecessor left on its own,
            not failing: an operator's SIGTERM), C{reload}, C{recycle}
            (C{--max-requests}, or an operator's recycle), C{memory}
            (C{--max-memory}), C{lifetime} (C{--max-lifetime}) or C{hung}
            (the heartbeat killed its predecessor).  Another string is counted
            as given.
        """
        tally = self._tally(workerId)
        tally.restarts[reason] = tally.restarts.get(reason, 0) + 1
        tally.shown = True

    def reloadFinished(self, outcome: str) -> None:
        """
        A rolling reload ended.

        @param outcome: one of L{RELOAD_OUTCOMES}: C{succeeded}, C{failed}
            or C{stopped}.  Another string is counted as given.
        """
        self._reloads[outcome] = self._reloads.get(outcome, 0) + 1

    def cpu(self, workerId: int, serial: int, seconds: float) -> None:
        """
        Process C{serial} of worker C{workerId} has used C{seconds} of CPU
        (user and system) so far.  A lower sample than the last one (a
        misread) does not lower it; a sample of an ended process is
        ignored.
        """
        tally = self._tally(workerId)
        if serial in tally.ended:
            return
        tally.cpu[serial] = max(seconds, tally.cpu.get(serial, 0.0))
        tally.shown = True

    def gone(self, workerId: int, serial: int) -> None:
        """
        Process C{serial} of worker C{workerId} ended: its CPU time counts
        for the worker id for good.
        """
        tally = self._tally(workerId)
        tally.ended.add(serial)
        tally.cpuOffset += tally.cpu.pop(serial, 0.0)

    def forget(self, workerId: int) -> None:
        """
        Worker id C{workerId} was scaled away: it is not served any more
        unless it comes back (it is in the snapshot, or is counted again),
        and then goes on from its counts.
        """
        tally = self._tallies.get(workerId)
        if tally is not None:
            tally.ended.update(tally.cpu)
            tally.cpuOffset += sum(tally.cpu.values())
            tally.cpu.clear()
            tally.shown = False

    def statistics(self) -> RecorderStatistics:
        """
        A snapshot of the counts.
        """
        # Copied first: a scrape may run on another thread.
        tallies = sorted((w, t) for w, t in list(self._tallies.items()) if t.shown)
        return RecorderStatistics(
            handed={w: t.handed for w, t in tallies},
            restarts={w: dict(t.restarts) for w, t in tallies},
            cpuSeconds={
                w: t.cpuOffset + sum(dict(t.cpu).values()) for w, t in tallies if t.cpu or t.cpuOffset
            },
            reloads=dict(self._reloads),
            handoff=self._handoff.snapshot(),
            heartbeat=self._heartbeat.snapshot(),
            workerIds=tuple(w for w, _ in tallies),
        )


class WorkerView(Protocol):
    """
    What L{ClusterCollector} reads of one worker process in the master's
    snapshot (C{WorkerStatistics} is one).
    """

    @property
    def workerId(self) -> int: ...

    @property
    def pid(self) -> Optional[int]: ...

    @property
    def state(self) -> str:
        """
        One of L{WORKER_STATES}.
        """

    @property
    def connections(self) -> Optional[int]:
        """
        Its open connections (L{None}: not known).
        """

    @property
    def rss(self) -> Optional[int]:
        """
        Its resident memory in bytes (L{None}: not known).
        """

    @property
    def memory(self) -> Optional[int]:
        """
        Its unique memory in bytes (L{None}: not known).
        """


class ClusterView(Protocol):
    """
    What L{ClusterCollector} reads of the master's snapshot
    (C{ClusterStatistics} is one).
    """

    @property
    def workers(self) -> Sequence[WorkerView]:
        """
        Each worker process, or worker id waiting for one; several may
        share a worker id (the old and new process of a reload).
        """

    @property
    def pending(self) -> int:
        """
        Accepted connections waiting for a worker.
        """


class ClusterCollector:
    """
    txcluster's own metrics: the recorder's counts and the master's
    snapshot, as a prometheus_client collector.
    """

    def __init__(
        self,
        recorder: ClusterRecorder,
        store: WorkerMetricsStore,
        snapshot: Callable[[], ClusterView],
        now: Callable[[], float],
    ) -> None:
        """
        @param snapshot: returns the master's current snapshot; called on
            each scrape (not when registered).
        @param now: the time, for the age of the workers' metrics.
        """
        self._recorder = recorder
        self._store = store
        self._snapshot = snapshot
        self._now = now

    def describe(self) -> list:
        """
        Nothing: registering must not take a snapshot.
        """
        return []

    def collect(self) -> list[Metric]:
        """
        The families, in a fixed order.  If the snapshot cannot be taken
        (it is logged), those that need it are left out.
        """
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        stats = self._recorder.statistics()
        try:
            snapshot: Optional[ClusterView] = self._snapshot()
            workers = list(snapshot.workers) if snapshot is not None else []
        except Exception:
            _log.failure("the cluster's snapshot could not be taken for its metrics")
            snapshot, workers = None, []
        workerIds = sorted(set(stats.workerIds) | {w.workerId for w in workers})
        families: list[Metric] = []

        handed = CounterMetricFamily(
            "txcluster_connections_handed_total", "Connections handed to a worker.", labels=["worker"]
        )
        for workerId in workerIds:
            handed.add_metric([str(workerId)], stats.handed.get(workerId, 0))
        families.append(handed)
        if snapshot is not None:
            families.append(
                _byWorker(
                    "txcluster_connections_open",
                    "Connections open in a worker, as it last said.",
                    workers,
                    "connections",
                )
            )
            states = dict.fromkeys(WORKER_STATES, 0)
            for worker in workers:
                states[worker.state] = states.get(worker.state, 0) + 1
            byState = GaugeMetricFamily(
                "txcluster_workers", "Worker processes, by state.", labels=["state"]
            )
            for state, count in states.items():
                byState.add_metric([str(state)], count)
            families.append(byState)

        restarts = CounterMetricFamily(
            "txcluster_worker_restarts_total",
            "New processes started for a worker, by reason.",
            labels=["worker", "reason"],
        )
        for workerId in workerIds:
            reasons = dict.fromkeys(RESTART_REASONS, 0)
            reasons.update(stats.restarts.get(workerId, {}))
            for reason, count in reasons.items():
                restarts.add_metric([str(workerId), str(reason)], count)
        families.append(restarts)

        if snapshot is not None:
            families.append(
                GaugeMetricFamily(
                    "txcluster_dispatch_queue_connections",
                    "Accepted connections waiting for a worker.",
                    value=snapshot.pending,
                )
            )
        families.append(
            HistogramMetricFamily(
                "txcluster_handoff_seconds",
                "Seconds from a connection's accept to its adoption by a worker.",
                buckets=stats.handoff.buckets(),
                sum_value=stats.handoff.sum,
            )
        )
        if snapshot is not None:
            families.append(
                _byWorker(
                    "txcluster_worker_resident_memory_bytes",
                    "Resident memory of a worker's processes, in bytes.",
                    workers,
                    "rss",
                )
            )
            families.append(
                _byWorker(
                    "txcluster_worker_unique_memory_bytes",
                    "Unique memory (USS) of a worker's processes, in bytes: what --max-memory limits.",
                    workers,
                    "memory",
                )
            )
        cpu = CounterMetricFamily(
            "txcluster_worker_cpu_seconds_total",
            "CPU seconds (user and system) of a worker's processes.",
            labels=["worker"],
        )
        for workerId, seconds in stats.cpuSeconds.items():
            cpu.add_metric([str(workerId)], seconds)
        families.append(cpu)
        families.append(
            HistogramMetricFamily(
                "txcluster_heartbeat_round_trip_seconds",
                "Seconds a heartbeat took to come back from a worker.",
                buckets=stats.heartbeat.buckets(),
                sum_value=stats.heartbeat.sum,
            )
        )
        reloads = CounterMetricFamily(
            "txcluster_reloads_total", "Rolling reloads, by outcome.", labels=["outcome"]
        )
        for outcome, count in stats.reloads.items():
            reloads.add_metric([str(outcome)], count)
        families.append(reloads)
        age = GaugeMetricFamily(
            "txcluster_metrics_collection_age_seconds",
            "Seconds since the least recent report of a worker's application metrics.",
            labels=["worker"],
        )
        try:
            ages = self._store.ages(self._now())
        except Exception:
            _log.failure("the age of the workers' metrics could not be taken")
            ages = {}
        for workerId, seconds in ages.items():
            age.add_metric([str(workerId)], seconds)
        families.append(age)
        return families


def _byWorker(name: str, documentation: str, workers: Iterable[WorkerView], attribute: str) -> Metric:
    """
    A gauge of C{attribute} added up over each worker id's processes that
    know it; a worker id none of whose processes does is left out.
    """
    from prometheus_client.core import GaugeMetricFamily

    totals: dict[int, int] = {}
    for worker in workers:
        value = getattr(worker, attribute)
        if value is not None:
            totals[worker.workerId] = totals.get(worker.workerId, 0) + value
    family = GaugeMetricFamily(name, documentation, labels=["worker"])
    for workerId, total in sorted(totals.items()):
        family.add_metric([str(workerId)], total)
    return family


def makeRegistry(
    recorder: ClusterRecorder,
    store: WorkerMetricsStore,
    snapshot: Callable[[], ClusterView],
    now: Callable[[], float],
) -> CollectorRegistry:
    """
    A fresh registry serving C{store} and a L{ClusterCollector} of
    C{recorder}: what C{/metrics} serves.  Registering collects nothing.
    """
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(store)
    registry.register(ClusterCollector(recorder, store, snapshot, now))
    return registry
