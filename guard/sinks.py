"""Session events to `mnn_guard_*` series, written once; a `Sink` is where the series go.

A sink is one backend's store of the families (`guard.metrics.GuardMetrics` for a Prometheus
registry, `guard.integrations.ray_metrics.RaySink` for Ray's metrics); `MetricsListener`
turns one session's listener events into its series, the same for every sink.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Protocol

from guard.families import (
    CANARY_CHECKS,
    CANARY_SNR_DB,
    HEALTHY,
    INFO,
    INIT_SECONDS,
    INITS,
    LOADED_STATIC,
    RECOVERIES,
    RUN_SECONDS,
    RUNG,
    RUNG_INDEX,
    RUNS,
    STATE,
    Family,
)
from guard.ladder import Action, Attempt, Outcome, Rung
from guard.listeners import CALL_OK, Call, Listener
from guard.state import SessionStatus, State

__all__ = ["FamilyRuns", "MetricsListener", "RunSink", "Series", "Sink"]

Series = tuple[Family, tuple[str, ...]]
"""One series: its family and its label values, in the family's label order."""

_OUTCOMES = tuple(o.value for o in Outcome)
_ACTIONS = tuple(a.value for a in Action)


class RunSink(Protocol):
    """Where one session name's `run()` calls go (the hot path: one call per `run()`)."""

    def add_rung(self, rung: str) -> None:
        """Start the rung's series at 0 (kept if they exist)."""

    def add(self, rung: str, result: Call, seconds: float) -> None:
        """Count one call; a served one by its duration."""


class Sink(Protocol):
    """A backend's series of the families, with the owner of each session name's gauges.

    `owners` (guarded by `lock`) maps a session name to the listener whose gauges are
    published: a newer session of a name takes its series over, and closing an older one
    must not remove them.
    """

    lock: threading.Lock
    owners: dict[str, object]

    def declare(self, family: Family, labels: tuple[str, ...]) -> None:
        """Make a counter or histogram series exist at 0, where the backend can."""

    def inc(self, family: Family, labels: tuple[str, ...]) -> None:
        """Add 1 to a counter series."""

    def set(self, family: Family, labels: tuple[str, ...], value: float) -> None:
        """Set a gauge series."""

    def observe(self, family: Family, labels: tuple[str, ...], value: float) -> None:
        """Observe one value on a histogram series."""

    def runs(self, session: str) -> RunSink:
        """Where the session's `run()` calls go."""

    def drop(self, family: Family, labels: tuple[str, ...]) -> None:
        """Stop publishing a gauge series (removed, or NaN where the backend cannot remove)."""

    def forget(self, session: str) -> None:
        """The session name was closed: remove what is left of its series, if the backend can."""


class FamilyRuns:
    """A session's `run()` calls as plain counter and histogram calls on a sink."""

    def __init__(self, sink: Sink, session: str) -> None:
        self.sink = sink
        self.session = session

    def add_rung(self, rung: str) -> None:
        """Start the rung's series at 0 (where the sink can)."""
        self.sink.declare(RUN_SECONDS, (self.session, rung))
        for result in Call:
            self.sink.declare(RUNS, (self.session, rung, result.value))

    def add(self, rung: str, result: Call, seconds: float) -> None:
        """Count one call; a served one by its duration."""
        self.sink.inc(RUNS, (self.session, rung, result.value))
        if result is CALL_OK:
            self.sink.observe(RUN_SECONDS, (self.session, rung), seconds)


class MetricsListener(Listener):
    """Turns one session's events into the `mnn_guard_*` series of one sink.

    Every series the session can have exists from the start where the sink allows it
    (counters at 0), so the first fallback or failure is an increase a scraper sees. The
    listener owns its name's gauges from its creation; with `standby=True` only from
    `go_live()` (a hot swap's new session, built while the old one still serves and
    publishes). Closing the owner stops its gauges (`Sink.drop`) and forgets the name.
    """

    def __init__(
        self,
        session: str,
        ladder: Sequence[Rung],
        sink: Sink,
        *,
        info: tuple[str, str, str] = ("", "", ""),
        standby: bool = False,
    ) -> None:
        self.metrics = sink
        self.session = session
        self._rungs = tuple(r.name for r in ladder)
        self._info = info
        self._standby = standby
        self._held: SessionStatus | None = None  # the latest status while on standby
        self._gauges: tuple[Series, ...] = (
            (INFO, (session, *info)),
            (HEALTHY, (session,)),
            (CANARY_SNR_DB, (session,)),
            (RUNG_INDEX, (session,)),
            *((RUNG, (session, rung)) for rung in self._rungs),
            *((LOADED_STATIC, (session, rung)) for rung in self._rungs),
            *((STATE, (session, state.value)) for state in State),
        )
        with sink.lock:
            self._runs = sink.runs(session)
            for rung in self._rungs:
                sink.declare(INITS, (session, rung))
                sink.declare(INIT_SECONDS, (session, rung))
                for outcome in _OUTCOMES:
                    sink.declare(CANARY_CHECKS, (session, rung, outcome))
                self._runs.add_rung(rung)
            for action in _ACTIONS:
                sink.declare(RECOVERIES, (session, action))
            if not standby:
                self._claim()

    def _claim(self) -> None:
        """Own the name's gauges and start them at 0 (the caller holds the sink's lock)."""
        sink = self.metrics
        previous = sink.owners.get(self.session)
        sink.owners[self.session] = self
        if isinstance(previous, MetricsListener) and previous is not self:
            mine = set(self._gauges)  # e.g. the old model's info series: it serves no more
            for family, labels in previous._gauges:
                if (family, labels) not in mine:
                    sink.drop(family, labels)
        sink.set(INFO, (self.session, *self._info), 1)
        for rung in self._rungs:
            sink.set(RUNG, (self.session, rung), 0)
            sink.set(LOADED_STATIC, (self.session, rung), 0)
        for state in State:
            sink.set(STATE, (self.session, state.value), 0)
        sink.set(HEALTHY, (self.session,), 0)
        sink.set(RUNG_INDEX, (self.session,), 0)

    def go_live(self) -> None:
        """Take the name's gauges over now (a standby listener) and publish the latest status."""
        with self.metrics.lock:
            if not self._standby:
                return
            self._standby = False
            self._claim()
            held, self._held = self._held, None
        if held is not None:
            self.on_status(self.session, held)

    def on_init(self, session: str, rung: Rung) -> None:
        self.metrics.inc(INITS, (session, rung.name))

    def _judged(self, session: str, attempt: Attempt) -> None:
        self.metrics.inc(CANARY_CHECKS, (session, attempt.rung.name, attempt.outcome.value))
        snr = attempt.verdict.worst_snr_db if attempt.verdict is not None else -math.inf
        with self.metrics.lock:
            if self.metrics.owners.get(session) is self:
                self.metrics.set(CANARY_SNR_DB, (session,), snr)

    def on_attempt(self, session: str, attempt: Attempt) -> None:
        self._judged(session, attempt)
        self.metrics.observe(INIT_SECONDS, (session, attempt.rung.name), attempt.seconds)
        if attempt.verdict is not None:  # the module was loaded: MNN said how
            static = 1 if attempt.turned_static else 0
            with self.metrics.lock:
                if self.metrics.owners.get(session) is self:
                    self.metrics.set(LOADED_STATIC, (session, attempt.rung.name), static)

    def on_check(self, session: str, attempt: Attempt) -> None:
        self._judged(session, attempt)

    def on_recover(self, session: str, action: Action, from_rung: Rung, to_rung: Rung) -> None:
        self.metrics.inc(RECOVERIES, (session, action.value))

    def on_status(self, session: str, status: SessionStatus) -> None:
        m = self.metrics
        with m.lock:
            if self._standby:
                self._held = status
                return
            if m.owners.get(session) is not self:
                return  # a newer session of this name owns the series
            m.set(HEALTHY, (session,), 1 if status.healthy else 0)
            m.set(RUNG_INDEX, (session,), status.rung_index)
            for rung in self._rungs:
                m.set(RUNG, (session, rung), 1 if rung == status.mode else 0)
            for state in State:
                m.set(STATE, (session, state.value), 1 if state is status.state else 0)

    def on_run(self, session: str, rung: Rung, seconds: float, result: Call) -> None:
        self._runs.add(rung.name, result, seconds)

    def on_close(self, session: str) -> None:
        m = self.metrics
        with m.lock:
            self._standby = False  # a closed session never goes live
            if m.owners.get(session) is not self:
                return
            del m.owners[session]
            for family, labels in self._gauges:
                m.drop(family, labels)
            m.forget(session)
