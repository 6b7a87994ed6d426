"""Prometheus metrics for guarded sessions, emitted by a listener (multiprocess-safe)."""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from guard.ladder import Action, Attempt, Rung
from guard.listeners import Listener
from guard.state import SessionStatus

__all__ = ["GuardMetrics", "PrometheusListener", "metrics_for"]

INIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RUN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True, slots=True)
class GuardMetrics:
    """Every mnn-guard metric, registered once per registry, and who owns each session's gauges."""

    inits: Counter
    canary_checks: Counter
    recoveries: Counter
    runs: Counter
    healthy: Gauge
    rung: Gauge
    canary_snr_db: Gauge
    init_seconds: Histogram
    run_seconds: Histogram
    # session name -> the listener that last published its status (a newer session of a name
    # owns its gauges; closing an older one must not zero them); guarded by its own lock
    owners: weakref.WeakValueDictionary[str, PrometheusListener] = field(
        default_factory=weakref.WeakValueDictionary, compare=False, repr=False
    )

    @classmethod
    def create(cls, registry: CollectorRegistry) -> GuardMetrics:
        """Register the metrics in `registry`; gauges keep one series per live process."""
        r = registry
        return cls(
            inits=Counter(
                "mnn_guard_inits",
                "Module initialisations (factory calls).",
                ["session", "rung"],
                registry=r,
            ),
            canary_checks=Counter(
                "mnn_guard_canary_checks",
                "Canary judgements by result (pass, fail, error, timeout).",
                ["session", "rung", "result"],
                registry=r,
            ),
            recoveries=Counter(
                "mnn_guard_recoveries",
                "Recovery actions (reinit, fallback, promote).",
                ["session", "action"],
                registry=r,
            ),
            runs=Counter(
                "mnn_guard_runs",
                "run() calls by result (ok, error).",
                ["session", "rung", "result"],
                registry=r,
            ),
            healthy=Gauge(
                "mnn_guard_healthy",
                "1 while the session serves a rung whose canary passed.",
                ["session"],
                registry=r,
                multiprocess_mode="liveall",
            ),
            rung=Gauge(
                "mnn_guard_rung",
                "Index of the rung in use (0 = fastest).",
                ["session"],
                registry=r,
                multiprocess_mode="liveall",
            ),
            canary_snr_db=Gauge(
                "mnn_guard_canary_snr_db",
                "Worst SNR of the last canary judgement, in dB.",
                ["session"],
                registry=r,
                multiprocess_mode="liveall",
            ),
            init_seconds=Histogram(
                "mnn_guard_init_seconds",
                "Init + canary time.",
                ["session", "rung"],
                registry=r,
                buckets=INIT_BUCKETS,
            ),
            run_seconds=Histogram(
                "mnn_guard_run_seconds",
                "run() time.",
                ["session", "rung"],
                registry=r,
                buckets=RUN_BUCKETS,
            ),
        )


_lock = threading.Lock()
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, GuardMetrics] = (
    weakref.WeakKeyDictionary()
)


def metrics_for(registry: CollectorRegistry | None = None) -> GuardMetrics:
    """The metrics registered in `registry` (default: the global one), created on first use."""
    registry = REGISTRY if registry is None else registry
    with _lock:
        found = _by_registry.get(registry)
        if found is None:
            found = _by_registry[registry] = GuardMetrics.create(registry)
        return found


class PrometheusListener(Listener):
    """Turns session events into the `mnn_guard_*` metrics of one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.metrics = metrics_for(registry)
        self._run_children: dict[tuple[str, str, bool], tuple[Any, Any]] = {}

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

    def on_check(self, session: str, attempt: Attempt) -> None:
        self._judged(session, attempt)

    def on_recover(self, session: str, action: Action, from_rung: Rung, to_rung: Rung) -> None:
        self.metrics.recoveries.labels(session, action.value).inc()

    def on_status(self, session: str, status: SessionStatus) -> None:
        self.metrics.owners[session] = self
        self.metrics.healthy.labels(session).set(1 if status.healthy else 0)
        self.metrics.rung.labels(session).set(status.rung_index)

    def on_run(self, session: str, rung: Rung, seconds: float, ok: bool) -> None:
        key = (session, rung.name, ok)
        children = self._run_children.get(key)
        if children is None:
            children = (
                self.metrics.runs.labels(session, rung.name, "ok" if ok else "error"),
                self.metrics.run_seconds.labels(session, rung.name),
            )
            self._run_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def on_close(self, session: str) -> None:
        if self.metrics.owners.get(session, self) is self:
            self.metrics.healthy.labels(session).set(0)
