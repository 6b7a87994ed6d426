"""The Ray sink of the `mnn_guard_*` families: Ray's metrics, re-published while the process lives.

Ray exports them with its prefix (`ray_mnn_guard_healthy`) and, inside a Serve replica, its
`deployment`, `replica` and `application` labels. Ray keeps a gauge only while it is set
again (its agent drops one not reported for two report intervals: a gauge set once at start
is gone about 30 s later), so a daemon thread sets every live gauge again each half interval.
Ray cannot create a counter at 0 (it refuses `inc(0)`): counter series appear at their first
event. A closed session's gauges are set NaN once and no longer re-published.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

from guard.errors import MissingExtra
from guard.families import FAMILIES, Family, Kind
from guard.ladder import Rung
from guard.metrics import Buckets
from guard.sinks import FamilyRuns, MetricsListener

try:
    from ray.serve import metrics as ray_metrics
except ImportError as exc:  # pragma: no cover - the extra is installed in CI
    raise MissingExtra(
        "guard.integrations.ray_metrics needs Ray (the ray extra): "
        f"pip install 'ray[serve]>=2.40' ({exc})"
    ) from exc

__all__ = ["RayListener", "RaySink", "ray_sink", "republish_seconds"]

REPORT_SECONDS = 10.0  # Ray's metrics_report_interval_ms default, when it cannot be read


def republish_seconds() -> float:
    """How often the sink sets its gauges again: half of Ray's metrics report interval."""
    try:
        import ray

        interval = max(int(ray._config.metrics_report_interval_ms()), 1000) / 1000
    except Exception:  # Ray's private config moved: assume its default
        interval = REPORT_SECONDS
    return interval / 2


def _metric(family: Family, buckets: Buckets) -> Any:
    """The Ray (Serve) metric of a family; Serve adds its replica's labels inside a replica."""
    keys: Any = family.labels  # Ray annotates tag_keys as tuple[str] but takes any tuple
    if family.kind is Kind.COUNTER:
        return ray_metrics.Counter(family.name, family.help, tag_keys=keys)
    if family.kind is Kind.GAUGE:
        return ray_metrics.Gauge(family.name, family.help, tag_keys=keys)
    bounds = list(getattr(buckets, family.buckets))
    return ray_metrics.Histogram(family.name, family.help, boundaries=bounds, tag_keys=keys)


class RaySink:
    """The families as Ray metrics, created once per process (Ray registers a name once)."""

    def __init__(self, buckets: Buckets, *, every: float) -> None:
        self.lock = threading.Lock()
        self.owners: dict[str, list[MetricsListener]] = {}
        self._metrics = {f.name: _metric(f, buckets) for f in FAMILIES}
        self._live: dict[tuple[Family, tuple[str, ...]], float] = {}  # gauges to set again
        self._live_lock = threading.Lock()
        self.every = every
        threading.Thread(
            target=_republish_forever,
            args=(weakref.ref(self), every),
            name="mnn-guard-ray-metrics",
            daemon=True,
        ).start()

    @staticmethod
    def _tags(family: Family, labels: tuple[str, ...]) -> dict[str, str]:
        return dict(zip(family.labels, labels, strict=True))

    def declare(self, family: Family, labels: tuple[str, ...]) -> None:
        """Nothing: Ray creates counter and histogram series at their first event."""

    def inc(self, family: Family, labels: tuple[str, ...]) -> None:
        """Add 1 to a counter series."""
        self._metrics[family.name].inc(1, self._tags(family, labels))

    def set(self, family: Family, labels: tuple[str, ...], value: float) -> None:
        """Set a gauge series, and keep setting it while it is live."""
        with self._live_lock:
            self._live[(family, labels)] = value
            self._metrics[family.name].set(value, self._tags(family, labels))

    def observe(self, family: Family, labels: tuple[str, ...], value: float) -> None:
        """Observe one value on a histogram series."""
        self._metrics[family.name].observe(value, self._tags(family, labels))

    def runs(self, session: str) -> FamilyRuns:
        """A session's `run()` calls as counter and histogram events."""
        return FamilyRuns(self, session)

    def drop(self, family: Family, labels: tuple[str, ...]) -> None:
        """Set the gauge NaN once (Ray cannot remove a series) and stop re-publishing it."""
        with self._live_lock:
            self._live.pop((family, labels), None)
            self._metrics[family.name].set(math.nan, self._tags(family, labels))

    def forget(self, session: str) -> None:
        """Nothing more: Ray keeps counters for the process's life."""

    def republish(self) -> None:
        """Set every live gauge again to its value, so that Ray keeps exporting it."""
        with self._live_lock:
            for (family, labels), value in self._live.items():
                self._metrics[family.name].set(value, self._tags(family, labels))


def _republish_forever(ref: weakref.ref[RaySink], every: float) -> None:
    """Re-publish the sink's gauges every `every` seconds while it exists."""
    while True:
        time.sleep(every)
        sink = ref()
        if sink is None:
            return
        sink.republish()
        del sink


_sink: RaySink | None = None
_lock = threading.Lock()


def ray_sink() -> RaySink:
    """This process's Ray sink, created on first use (inside a replica: with Serve's labels)."""
    global _sink
    with _lock:
        if _sink is None:
            _sink = RaySink(Buckets(), every=republish_seconds())
        return _sink


class RayListener(MetricsListener):
    """One session's events as Ray metrics, under the same names and labels as Prometheus's."""

    def __init__(
        self,
        session: str,
        ladder: Sequence[Rung],
        info: tuple[str, str, str] = ("", "", ""),
        *,
        standby: bool = False,
        shadow: bool = False,
    ) -> None:
        super().__init__(session, ladder, ray_sink(), info=info, standby=standby, shadow=shadow)
