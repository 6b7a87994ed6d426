"""Prometheus metrics for guarded sessions, emitted by a listener (multiprocess-safe)."""

from __future__ import annotations

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
from guard.ladder import Action, Attempt, Outcome, Rung
from guard.listeners import CALL_OK, Call, Listener
from guard.state import SessionStatus, State

__all__ = ["Buckets", "GuardMetrics", "PrometheusListener", "RunTally", "metrics_for"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
RUNS = (
    "mnn_guard_runs",
    "run() calls by result (ok, error, invalid, unavailable, failed, closed).",
)
RUN_SECONDS = ("mnn_guard_run_seconds", "run() time.")


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


class _WrittenRuns:
    """One session's `run()` calls written through to prometheus_client (multiprocess mode)."""

    def __init__(self, written: tuple[Counter, Histogram], session: str) -> None:
        self.counter, self.histogram = written
        self.session = session
        self.children: dict[tuple[str, Call], tuple[Any, Any]] = {}

    def add_rung(self, rung: str) -> None:
        """Start the rung's series at 0."""
        self.histogram.labels(self.session, rung)
        for result in Call:
            self.counter.labels(self.session, rung, result.value)

    def add(self, rung: str, result: Call, seconds: float) -> None:
        """Count one call; a served one by its duration."""
        children = self.children.get((rung, result))
        if children is None:
            children = self.children[(rung, result)] = (
                self.counter.labels(self.session, rung, result.value),
                self.histogram.labels(self.session, rung),
            )
        children[0].inc()
        if result is CALL_OK:
            children[1].observe(seconds)


class _RunCollector(Collector):
    """Serves `mnn_guard_runs_total` and `mnn_guard_run_seconds` from the tallies at scrape time."""

    def __init__(self, tallies: dict[str, RunTally], bounds: tuple[float, ...]) -> None:
        self._tallies = tallies
        self._le = [*(floatToGoString(b) for b in bounds), "+Inf"]  # type: ignore[no-untyped-call]

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, HistogramMetricFamily]:
        return (
            CounterMetricFamily(*RUNS, labels=["session", "rung", "result"]),
            HistogramMetricFamily(*RUN_SECONDS, labels=["session", "rung"]),
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
                    seconds.samples.append(Sample(f"{RUN_SECONDS[0]}_created", labels, since))
        return [runs, seconds]


class GuardMetrics:
    """Every mnn-guard metric, registered once in one registry."""

    def __init__(self, registry: CollectorRegistry, buckets: Buckets) -> None:
        self.buckets = buckets
        r = registry
        self.info = Gauge(
            "mnn_guard_session_info",
            "1 per guarded session: versions and the model file's sha256.",
            ["session", "guard_version", "mnn_version", "model_sha256"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.inits = Counter(
            "mnn_guard_inits", "Module initialisations (factory calls).", ["session", "rung"],
            registry=r,
        )  # fmt: skip
        self.canary_checks = Counter(
            "mnn_guard_canary_checks",
            "Canary judgements by result (pass, fail, error, timeout).",
            ["session", "rung", "result"],
            registry=r,
        )
        self.recoveries = Counter(
            "mnn_guard_recoveries", "Recovery actions (reinit, fallback, promote).",
            ["session", "action"], registry=r,
        )  # fmt: skip
        self.healthy = Gauge(
            "mnn_guard_healthy", "1 while the session serves a module whose canary passed.",
            ["session"], registry=r, multiprocess_mode="liveall",
        )  # fmt: skip
        self.rung = Gauge(
            "mnn_guard_rung", "1 for the rung the session is on, 0 for its other rungs.",
            ["session", "rung"], registry=r, multiprocess_mode="liveall",
        )  # fmt: skip
        self.state = Gauge(
            "mnn_guard_state", "1 for the session's state, 0 for the others.",
            ["session", "state"], registry=r, multiprocess_mode="liveall",
        )  # fmt: skip
        self.loaded_static = Gauge(
            "mnn_guard_rung_loaded_static",
            "1 when the rung asked for dynamic=True and MNN loaded it statically (the model has "
            "control flow): that rung is no real fallback.",
            ["session", "rung"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.canary_snr_db = Gauge(
            "mnn_guard_canary_snr_db", "Worst SNR of the last canary judgement, in dB.",
            ["session"], registry=r, multiprocess_mode="liveall",
        )  # fmt: skip
        self.init_seconds = Histogram(
            "mnn_guard_init_seconds", "Init + canary time.", ["session", "rung"],
            registry=r, buckets=buckets.init,
        )  # fmt: skip
        # run() calls, the hot path: in one process, plain per-session tallies that a collector
        # reads at scrape time; in multiprocess mode, written through to this process's files
        # (another process serves the scrape, so nothing may wait in memory)
        self.written: tuple[Counter, Histogram] | None = None  # multiprocess: (runs, seconds)
        self.tallies: dict[str, RunTally] | None = None
        if _multiprocess():
            self.written = (
                Counter(*RUNS, ["session", "rung", "result"], registry=r),
                Histogram(*RUN_SECONDS, ["session", "rung"], registry=r, buckets=buckets.run),
            )
        else:
            self.tallies = {}
            registry.register(_RunCollector(self.tallies, buckets.run))
        self.gauges = (
            self.info,
            self.healthy,
            self.rung,
            self.state,
            self.loaded_static,
            self.canary_snr_db,
        )
        self.counters = (self.inits, self.canary_checks, self.recoveries)
        self.histograms = (self.init_seconds,)
        self.lock = threading.Lock()
        # session name -> the listener of the session that last published it: a newer session
        # of a name owns its series; closing an older one must not remove them
        self.owners: dict[str, PrometheusListener] = {}

    def runs_for(self, session: str) -> RunTally | _WrittenRuns:
        """Where a session's `run()` calls go: its name's tally, or straight to the files."""
        if self.written is not None:
            return _WrittenRuns(self.written, session)
        assert self.tallies is not None
        # a name's tally is shared by every session of the name, like series are
        return self.tallies.setdefault(session, RunTally(self.buckets.run))


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


_OUTCOMES = tuple(o.value for o in Outcome)
_ACTIONS = tuple(a.value for a in Action)


class PrometheusListener(Listener):
    """Turns one session's events into the `mnn_guard_*` metrics of one registry.

    Every series the session can have exists from the start (counters at 0), so the first
    fallback or failure is an increase Prometheus sees; closing the session removes them
    (in multiprocess mode, where series cannot be removed, its gauges become NaN).
    """

    def __init__(
        self,
        session: str,
        ladder: Sequence[Rung],
        *,
        registry: CollectorRegistry | None = None,
        buckets: Buckets | None = None,
        info: tuple[str, str, str] = ("", "", ""),
    ) -> None:
        self.metrics = m = metrics_for(registry, buckets)
        self.session = session
        self._rungs = tuple(r.name for r in ladder)
        with m.lock:
            m.owners[session] = self
            self._runs = m.runs_for(session)
            self._info = info
            m.info.labels(session, *info).set(1)
            for rung in self._rungs:
                m.inits.labels(session, rung)
                m.rung.labels(session, rung).set(0)
                m.loaded_static.labels(session, rung).set(0)
                m.init_seconds.labels(session, rung)
                for outcome in _OUTCOMES:
                    m.canary_checks.labels(session, rung, outcome)
                self._runs.add_rung(rung)
            for action in _ACTIONS:
                m.recoveries.labels(session, action)
            for state in State:
                m.state.labels(session, state.value).set(0)
            m.healthy.labels(session).set(0)

    def on_init(self, session: str, rung: Rung) -> None:
        self.metrics.inits.labels(session, rung.name).inc()

    def _judged(self, session: str, attempt: Attempt) -> None:
        result = attempt.outcome.value
        self.metrics.canary_checks.labels(session, attempt.rung.name, result).inc()
        snr = attempt.verdict.worst_snr_db if attempt.verdict is not None else -math.inf
        self.metrics.canary_snr_db.labels(session).set(snr)

    def on_attempt(self, session: str, attempt: Attempt) -> None:
        self._judged(session, attempt)
        self.metrics.init_seconds.labels(session, attempt.rung.name).observe(attempt.seconds)
        if attempt.verdict is not None:  # the module was loaded: MNN said how
            static = 1 if attempt.turned_static else 0
            self.metrics.loaded_static.labels(session, attempt.rung.name).set(static)

    def on_check(self, session: str, attempt: Attempt) -> None:
        self._judged(session, attempt)

    def on_recover(self, session: str, action: Action, from_rung: Rung, to_rung: Rung) -> None:
        self.metrics.recoveries.labels(session, action.value).inc()

    def on_status(self, session: str, status: SessionStatus) -> None:
        m = self.metrics
        with m.lock:
            if m.owners.get(session) is not self:
                return  # a newer session of this name owns the series
            m.healthy.labels(session).set(1 if status.healthy else 0)
            for rung in self._rungs:
                m.rung.labels(session, rung).set(1 if rung == status.mode else 0)
            for state in State:
                m.state.labels(session, state.value).set(1 if state is status.state else 0)

    def on_run(self, session: str, rung: Rung, seconds: float, result: Call) -> None:
        self._runs.add(rung.name, result, seconds)

    def on_close(self, session: str) -> None:
        m = self.metrics
        with m.lock:
            if m.owners.get(session) is not self:
                return
            del m.owners[session]
            if _multiprocess():  # series stay in this process's files: make gauges say nothing
                for gauge in (m.healthy, m.canary_snr_db):
                    gauge.labels(session).set(math.nan)
                for rung in self._rungs:
                    m.rung.labels(session, rung).set(math.nan)
                    m.loaded_static.labels(session, rung).set(math.nan)
                for state in State:
                    m.state.labels(session, state.value).set(math.nan)
                m.info.labels(session, *self._info).set(math.nan)
                return
            for metric in (*m.gauges, *m.counters, *m.histograms):
                metric.remove_by_labels({"session": session})
            if m.tallies is not None:
                del m.tallies[session]
