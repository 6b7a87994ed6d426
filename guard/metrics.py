"""The Prometheus sink of the `mnn_guard_*` families: one per registry (multiprocess-safe).

`run()` calls, the hot path, are counted as plain numbers. In one process a collector reads
them at scrape time. In prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR), where
another process reads this one's files, they are written to the files at most FLUSH_SECONDS
apart: the first call after a quiet interval at once, the others by a flusher thread at the
interval's end, and all that is left when the session closes, when this process serves a scrape
itself, and at exit. A scrape is so at most FLUSH_SECONDS behind the calls (docs/ops.md).
"""

from __future__ import annotations

import atexit
import itertools
import math
import os
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import metrics as _client_metrics
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from guard.errors import ConfigError
from guard.families import FAMILIES, RUN_SECONDS, RUNS, Family, Kind
from guard.ladder import Rung
from guard.listeners import CALL_OK, Call
from guard.sinks import MetricsListener

__all__ = [
    "FLUSH_SECONDS",
    "Buckets",
    "GuardMetrics",
    "PrometheusListener",
    "RunTally",
    "flush_runs",
    "metrics_for",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_SECONDS = 1.0  # in multiprocess mode, how far a scrape may lag behind run() calls


def _multiprocess() -> bool:
    """True when prometheus_client writes values to files for a multiprocess collector."""
    return bool(os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower()))


@dataclass(frozen=True, slots=True, kw_only=True)
class Buckets:
    """Histogram bucket bounds in seconds: `run()` calls, and init + canary."""

    run: tuple[float, ...] = (
        1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    )  # fmt: skip
    init: tuple[float, ...] = (
        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    )  # fmt: skip

    def __post_init__(self) -> None:
        for name in ("run", "init"):
            bounds = getattr(self, name)
            ok = bool(bounds) and all(
                isinstance(b, int | float) and math.isfinite(b) and b > 0 for b in bounds
            )
            if not ok or list(bounds) != sorted(set(bounds)):
                raise ConfigError(
                    f"Buckets.{name} must be increasing, finite, positive seconds; got {bounds!r}"
                )


_REFUSED: tuple[Call, ...] = tuple(c for c in Call if c is not Call.OK)


class _RungRuns:
    """One rung's calls: served ones by duration bucket (+Inf last) with their sum; refused ones
    by result. The served count is the buckets' total."""

    __slots__ = ("buckets", "refused", "seconds")

    def __init__(self, size: int) -> None:
        self.buckets = [0] * size
        self.seconds = 0.0
        self.refused: dict[Call, int] = dict.fromkeys(_REFUSED, 0)


class RunTally:
    """One session name's `run()` calls by rung and result, and durations, as plain numbers."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.created = time.time()
        self.lock = threading.Lock()
        self.rungs: dict[str, _RungRuns] = {}

    def add_rung(self, rung: str) -> None:
        """Start the rung's series at 0 (kept if they exist)."""
        with self.lock:
            self.rungs.setdefault(rung, _RungRuns(len(self.bounds) + 1))

    def add(self, rung: str, result: Call, seconds: float) -> None:
        """Count one call; a served one by its duration."""
        runs = self.rungs[rung]
        with self.lock:
            if result is CALL_OK:
                runs.buckets[bisect_left(self.bounds, seconds)] += 1
                runs.seconds += seconds
            else:
                runs.refused[result] += 1

    def snapshot(self) -> dict[str, tuple[dict[Call, int], list[int], float]]:
        """Rung -> (calls by result, served calls per bucket, their seconds), read together."""
        with self.lock:
            return {
                rung: ({CALL_OK: sum(r.buckets), **r.refused}, list(r.buckets), r.seconds)
                for rung, r in self.rungs.items()
            }


class _FlushedRuns:
    """One session's `run()` calls in multiprocess mode: a tally in memory, whose growth is
    written to prometheus_client's metrics (this process's files) by `flush`."""

    def __init__(self, written: tuple[Counter, Histogram], session: str, bounds: tuple[float, ...]):
        self.counter, self.histogram = written
        self.session = session
        self.tally = RunTally(bounds)
        self.lock = threading.Lock()  # one flush at a time
        self.written: dict[str, tuple[dict[Call, int], list[int], float]] = {}
        self.due = 0.0  # time.monotonic() from which a call flushes at once
        self.dirty = False
        _FLUSHER.watch(self)

    def add_rung(self, rung: str) -> None:
        """Start the rung's series at 0."""
        self.tally.add_rung(rung)
        self.histogram.labels(self.session, rung)
        for result in Call:
            self.counter.labels(self.session, rung, result.value)

    def add(self, rung: str, result: Call, seconds: float) -> None:
        """Count one call; the first after a quiet FLUSH_SECONDS is written at once."""
        self.tally.add(rung, result, seconds)
        self.dirty = True
        if time.monotonic() >= self.due:
            self.flush()

    def flush(self) -> None:
        """Write what the tally gained since the last flush."""
        with self.lock:
            self.dirty = False
            self.due = time.monotonic() + FLUSH_SECONDS
            now = self.tally.snapshot()
            for rung, (calls, buckets, seconds) in now.items():
                before = self.written.get(rung)
                old_calls, old_buckets, old_seconds = before or ({}, [0] * len(buckets), 0.0)
                for result, count in calls.items():
                    if count > old_calls.get(result, 0):
                        self.counter.labels(self.session, rung, result.value).inc(
                            count - old_calls.get(result, 0)
                        )
                if seconds != old_seconds or buckets != old_buckets:
                    _add_observed(
                        self.histogram.labels(self.session, rung),
                        [b - a for a, b in zip(old_buckets, buckets, strict=True)],
                        seconds - old_seconds,
                    )
            self.written = now


def _add_observed(child: Any, counts: list[int], seconds: float) -> None:
    """Add `counts` observations per bucket (+Inf last) and their `seconds` to a histogram's
    series, as that many `observe` calls would (prometheus_client keeps each bucket's own
    count and the sum as values of the child)."""
    child._sum.inc(seconds)
    for bucket, count in zip(child._buckets, counts, strict=True):
        if count:
            bucket.inc(count)


class _Flusher:
    """The process's flusher thread: writes every multiprocess tally with calls pending, each
    FLUSH_SECONDS; the same at exit (spawned workers exit through multiprocessing's finalizers,
    not atexit)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: weakref.WeakSet[_FlushedRuns] = weakref.WeakSet()
        self.thread: threading.Thread | None = None

    def watch(self, runs: _FlushedRuns) -> None:
        """Flush these tallies from now on."""
        with self.lock:
            self.runs.add(runs)
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self.loop, name="mnn-guard-metrics-flush", daemon=True
                )
                self.thread.start()
                atexit.register(self.flush)
                from multiprocessing import util

                util.Finalize(None, self.flush, exitpriority=10)

    def loop(self) -> None:
        """Flush what is pending every FLUSH_SECONDS."""
        while True:
            time.sleep(FLUSH_SECONDS)
            self.flush(pending_only=True)

    def flush(self, *, pending_only: bool = False) -> None:
        """Write every tally (those with calls pending)."""
        with self.lock:
            runs = list(self.runs)
        for each in runs:
            if each.dirty or not pending_only:
                each.flush()


_FLUSHER = _Flusher()


def flush_runs() -> None:
    """Write this process's pending `run()` counts to its multiprocess files now (a process
    that serves the scrape itself calls this first)."""
    _FLUSHER.flush(pending_only=True)


class _FlushBeforeCollect(Collector):
    """Registered before the run families: a scrape of this registry in this process sees every
    call counted so far."""

    def __init__(self, metrics: GuardMetrics) -> None:
        self._metrics = weakref.ref(metrics)

    def collect(self) -> list[Metric]:
        metrics = self._metrics()
        if metrics is not None:
            for runs in list(metrics.flushed.values()):
                runs.flush()
        return []


class _RunCollector(Collector):
    """Serves `mnn_guard_runs_total` and `mnn_guard_run_seconds` from the tallies at scrape time."""

    def __init__(self, tallies: dict[str, RunTally], bounds: tuple[float, ...]) -> None:
        self._tallies = tallies
        self._le = [*(floatToGoString(b) for b in bounds), "+Inf"]  # type: ignore[no-untyped-call]

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, HistogramMetricFamily]:
        return (
            CounterMetricFamily(RUNS.name, RUNS.help, labels=RUNS.labels),
            HistogramMetricFamily(RUN_SECONDS.name, RUN_SECONDS.help, labels=RUN_SECONDS.labels),
        )

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> list[Metric]:
        runs, seconds = self._families()
        created = getattr(_client_metrics, "_use_created", True)  # the library's own switch
        for session, tally in list(self._tallies.items()):
            since = tally.created if created else None
            for rung, (calls, buckets, total) in tally.snapshot().items():
                for result, count in calls.items():
                    runs.add_metric([session, rung, result.value], count, created=since)
                cumulative = zip(self._le, itertools.accumulate(buckets), strict=True)
                seconds.add_metric([session, rung], list(cumulative), total)
                if since is not None:
                    labels = {"session": session, "rung": rung}
                    seconds.samples.append(Sample(f"{RUN_SECONDS.name}_created", labels, since))
        return [runs, seconds]


class GuardMetrics:
    """Every mnn-guard metric, registered once in one registry: the Prometheus sink."""

    def __init__(self, registry: CollectorRegistry, buckets: Buckets) -> None:
        self.buckets = buckets
        self.families: dict[str, Counter | Gauge | Histogram] = {
            f.name: _metric(f, registry, buckets) for f in FAMILIES if f not in (RUNS, RUN_SECONDS)
        }
        # run() calls, the hot path: plain per-session tallies that a collector reads at scrape
        # time; in multiprocess mode (another process reads the files) written to this
        # process's files at most FLUSH_SECONDS apart
        self.written: tuple[Counter, Histogram] | None = None  # multiprocess: (runs, seconds)
        self.flushed: dict[str, _FlushedRuns] = {}
        self.tallies: dict[str, RunTally] | None = None
        if _multiprocess():
            registry.register(_FlushBeforeCollect(self))
            self.written = (
                Counter(RUNS.name, RUNS.help, RUNS.labels, registry=registry),
                Histogram(
                    RUN_SECONDS.name, RUN_SECONDS.help, RUN_SECONDS.labels,
                    registry=registry, buckets=buckets.run,
                ),
            )  # fmt: skip
        else:
            self.tallies = {}
            registry.register(_RunCollector(self.tallies, buckets.run))
        self.children: dict[tuple[str, tuple[str, ...]], Any] = {}  # (family, labels) -> series
        self.lock = threading.Lock()
        # session name -> the listeners of its live sessions: the name's gauges show them all,
        # and closing one must not remove what the others publish
        self.owners: dict[str, list[MetricsListener]] = {}

    def _series(self, family: Family, labels: tuple[str, ...]) -> Any:
        """The series' child, looked up once (a start sets about 80 series)."""
        key = (family.name, labels)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = self.families[family.name].labels(*labels)
        return child

    def declare(self, family: Family, labels: tuple[str, ...]) -> None:
        """Make the series exist (a counter or histogram at 0)."""
        self._series(family, labels)

    def inc(self, family: Family, labels: tuple[str, ...]) -> None:
        """Add 1 to a counter series."""
        assert family.kind is Kind.COUNTER
        self._series(family, labels).inc()

    def set(self, family: Family, labels: tuple[str, ...], value: float) -> None:
        """Set a gauge series."""
        assert family.kind is Kind.GAUGE
        self._series(family, labels).set(value)

    def observe(self, family: Family, labels: tuple[str, ...], value: float) -> None:
        """Observe one value on a histogram series."""
        assert family.kind is Kind.HISTOGRAM
        self._series(family, labels).observe(value)

    def drop(self, family: Family, labels: tuple[str, ...]) -> None:
        """Remove a gauge series; in multiprocess mode (series stay in this process's files)
        make it NaN, which says nothing."""
        if _multiprocess():
            self.set(family, labels, math.nan)
        else:
            self.children.pop((family.name, labels), None)
            self.families[family.name].remove(*labels)

    def forget(self, session: str) -> None:
        """Remove every series of a closed session (in one process; files keep theirs, and get
        its last calls)."""
        flushed = self.flushed.pop(session, None)
        if flushed is not None:
            flushed.flush()
        if _multiprocess() or self.tallies is None:
            return
        self.children.clear()  # rare: looked up again as they are used
        for metric in self.families.values():
            metric.remove_by_labels({"session": session})
        del self.tallies[session]

    def runs(self, session: str) -> RunTally | _FlushedRuns:
        """Where a session's `run()` calls go: its name's tally (flushed to the files in
        multiprocess mode)."""
        if self.written is not None:
            found = self.flushed.get(session)
            if found is None:
                found = self.flushed[session] = _FlushedRuns(
                    self.written, session, self.buckets.run
                )
            return found
        assert self.tallies is not None
        # a name's tally is shared by every session of the name, like series are
        return self.tallies.setdefault(session, RunTally(self.buckets.run))


def _metric(
    family: Family, registry: CollectorRegistry, buckets: Buckets
) -> Counter | Gauge | Histogram:
    """The prometheus_client metric of a family, registered in `registry`."""
    if family.kind is Kind.COUNTER:
        return Counter(family.name, family.help, family.labels, registry=registry)
    if family.kind is Kind.GAUGE:
        # liveall: in multiprocess mode a dead worker's gauges leave the merged scrape
        return Gauge(
            family.name, family.help, family.labels, registry=registry,
            multiprocess_mode="liveall",
        )  # fmt: skip
    bounds = getattr(buckets, family.buckets)
    return Histogram(family.name, family.help, family.labels, registry=registry, buckets=bounds)


_lock = threading.Lock()
# the metrics objects of each registry: prometheus_client allows one of each name per registry
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, GuardMetrics] = (
    weakref.WeakKeyDictionary()
)


def metrics_for(
    registry: CollectorRegistry | None = None, buckets: Buckets | None = None
) -> GuardMetrics:
    """The metrics registered in `registry` (default: the global one), created on first use."""
    registry = REGISTRY if registry is None else registry
    with _lock:
        found = _by_registry.get(registry)
        if found is None:
            found = _by_registry[registry] = GuardMetrics(registry, buckets or Buckets())
        elif buckets is not None and buckets != found.buckets:
            raise ConfigError(
                f"this registry's mnn-guard histograms already use {found.buckets}; "
                "buckets are set once per registry, by its first session"
            )
        return found


class PrometheusListener(MetricsListener):
    """Turns one session's events into the `mnn_guard_*` metrics of one registry.

    Every series the session can have exists from the start (counters at 0), so the first
    fallback or failure is an increase Prometheus sees; closing the session removes them
    (in multiprocess mode, where series cannot be removed, its gauges become NaN).
    """

    metrics: GuardMetrics

    def __init__(
        self,
        session: str,
        ladder: Sequence[Rung],
        *,
        registry: CollectorRegistry | None = None,
        buckets: Buckets | None = None,
        info: tuple[str, str, str] = ("", "", ""),
        standby: bool = False,
        shadow: bool = False,
    ) -> None:
        sink = metrics_for(registry, buckets)
        super().__init__(session, ladder, sink, info=info, standby=standby, shadow=shadow)
