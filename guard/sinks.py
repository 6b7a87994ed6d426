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
    BASIS,
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
    SHADOW_CHECKS,
    SHADOW_SNR_DB,
    STATE,
    Family,
)
from guard.ladder import Action, Attempt, Basis, Outcome, Rung
from guard.listeners import CALL_OK, Call, Listener
from guard.shadow import ShadowCheck, ShadowResult
from guard.state import SEVERITY, SessionStatus, State

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
    """A backend's series of the families, with the live sessions of each session name.

    `owners` (guarded by `lock`) maps a session name to the listeners of its live sessions,
    in the order they went live: the name's gauges show all of them, and closing one must
    not remove what the others publish.
    """

    lock: threading.Lock
    owners: dict[str, list[MetricsListener]]

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
    (counters at 0), so the first fallback or failure is an increase a scraper sees. A name's
    gauges show every live session of the name (`Sink.owners`): healthy only while all of
    them are, the worst one's state and rung, the lowest canary SNR, one info series per
    model. A listener joins them at its creation; with `standby=True` only at `go_live()` (a
    hot swap's new session, built while the old one still serves and publishes). With
    `shadow=True` (the session has `Policy.shadow_every`) its shadow series exist too. Closing
    one leaves the others' gauges; closing the last stops the name's gauges (`Sink.drop`)
    and forgets the name.
    """

    def __init__(
        self,
        session: str,
        ladder: Sequence[Rung],
        sink: Sink,
        *,
        info: tuple[str, str, str] = ("", "", ""),
        standby: bool = False,
        shadow: bool = False,
    ) -> None:
        self.metrics = sink
        self.session = session
        self._rungs = tuple(r.name for r in ladder)
        self._info = info
        self._standby = standby
        self._joined = False  # among the name's live sessions (Sink.owners)
        self._abandoned = False  # never handed out: shown until another session of it joins
        # what this session shows, kept while on standby too
        self._status: SessionStatus | None = None
        self._snr: float | None = None  # worst SNR of the last canary judgement
        self._static: dict[str, int] = {}  # rung -> 1 when MNN loaded it statically
        self._shadow_snr: float | None = math.inf if shadow else None  # the module in use's
        self._gauges: tuple[Series, ...] = (
            (INFO, (session, *info)),
            (HEALTHY, (session,)),
            (CANARY_SNR_DB, (session,)),
            (RUNG_INDEX, (session,)),
            *((RUNG, (session, rung)) for rung in self._rungs),
            *((LOADED_STATIC, (session, rung)) for rung in self._rungs),
            *((STATE, (session, state.value)) for state in State),
            *((BASIS, (session, basis.value)) for basis in Basis),
            *(((SHADOW_SNR_DB, (session,)),) if shadow else ()),
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
            if shadow:
                for result in ShadowResult:
                    sink.declare(SHADOW_CHECKS, (session, result.value))
            if not standby:
                self._join()

    def _join(self) -> None:
        """Join the name's live sessions and show them (the caller holds the sink's lock); an
        abandoned session of the name leaves them."""
        live = self.metrics.owners.setdefault(self.session, [])
        live.append(self)
        self._joined = True
        for other in [x for x in live if x._abandoned]:
            other._leave()
        self.metrics.set(INFO, (self.session, *self._info), 1)
        self._show()

    def abandon(self) -> None:
        """The session was never handed out (`guard.wrap` raised): it stays among the name's
        live sessions, with its last state, until another session of the name joins them."""
        with self.metrics.lock:
            if self._status is None:  # it never said anything: nothing to keep
                self._leave()
            self._abandoned = True

    def _leave(self) -> None:
        """Leave the name's live sessions (the caller holds the sink's lock): the others keep
        the name's gauges; the last one stops them and forgets the name."""
        if not self._joined:
            return
        self._joined = False
        sink = self.metrics
        live = sink.owners[self.session]
        live.remove(self)
        kept = {series for other in live for series in other._gauges}
        for family, labels in self._gauges:
            if (family, labels) not in kept:
                sink.drop(family, labels)
        if not live:
            del sink.owners[self.session]
            sink.forget(self.session)
            return
        if self._snr is not None and all(other._snr is None for other in live):
            sink.drop(CANARY_SNR_DB, (self.session,))
        if self._shadow_snr is not None and all(other._shadow_snr is None for other in live):
            sink.drop(SHADOW_SNR_DB, (self.session,))
        live[0]._show()

    def _badness(self) -> tuple[bool, int, int]:
        """How bad this session is (unhealthy, then its state, then a slower rung)."""
        status = self._status
        if status is None:  # no status yet: starting
            return True, SEVERITY[State.STARTING], 0
        return not status.healthy, SEVERITY[status.state], status.rung_index

    def _show(self) -> None:
        """Set the name's gauges from every live session of it (the caller holds the lock)."""
        sink, name = self.metrics, self.session
        live = sink.owners[name]
        status = max(live, key=MetricsListener._badness)._status
        healthy = all(other._status is not None and other._status.healthy for other in live)
        sink.set(HEALTHY, (name,), 1 if healthy else 0)
        sink.set(RUNG_INDEX, (name,), status.rung_index if status is not None else 0)
        worst = status.state if status is not None else None  # none yet: every state 0
        for state in State:
            sink.set(STATE, (name, state.value), 1 if state is worst else 0)
        basis = status.basis if status is not None else None
        for kind in Basis:
            sink.set(BASIS, (name, kind.value), 1 if kind is basis else 0)
        for rung in dict.fromkeys(r for other in live for r in other._rungs):
            on = status is not None and rung == status.mode
            sink.set(RUNG, (name, rung), 1 if on else 0)
            static = max(other._static.get(rung, 0) for other in live)
            sink.set(LOADED_STATIC, (name, rung), static)
        snrs = [other._snr for other in live if other._snr is not None]
        if snrs:
            sink.set(CANARY_SNR_DB, (name,), min(snrs))
        shadows = [other._shadow_snr for other in live if other._shadow_snr is not None]
        if shadows:
            sink.set(SHADOW_SNR_DB, (name,), min(shadows))

    def go_live(self) -> None:
        """Join the name's live sessions now (a standby listener), with the latest status."""
        with self.metrics.lock:
            if not self._standby:
                return
            self._standby = False
            self._join()

    def on_init(self, session: str, rung: Rung) -> None:
        self.metrics.inc(INITS, (session, rung.name))

    def _judged(self, session: str, attempt: Attempt, *, init: bool) -> None:
        self.metrics.inc(CANARY_CHECKS, (session, attempt.rung.name, attempt.outcome.value))
        snr = attempt.verdict.worst_snr_db if attempt.verdict is not None else -math.inf
        with self.metrics.lock:
            self._snr = snr
            if init and attempt.verdict is not None:  # the module was loaded: MNN said how
                self._static[attempt.rung.name] = 1 if attempt.turned_static else 0
            if self._joined:
                self._show()

    def on_attempt(self, session: str, attempt: Attempt) -> None:
        self._judged(session, attempt, init=True)
        self.metrics.observe(INIT_SECONDS, (session, attempt.rung.name), attempt.seconds)

    def on_check(self, session: str, attempt: Attempt) -> None:
        self._judged(session, attempt, init=False)

    def on_recover(self, session: str, action: Action, from_rung: Rung, to_rung: Rung) -> None:
        self.metrics.inc(RECOVERIES, (session, action.value))

    def on_status(self, session: str, status: SessionStatus) -> None:
        with self.metrics.lock:
            self._status = status
            if self._shadow_snr is not None and status.shadow is not None:
                self._shadow_snr = status.shadow.worst_snr_db  # +Inf again after an install
            if self._joined:
                self._show()

    def on_run(self, session: str, rung: Rung, seconds: float, result: Call) -> None:
        self._runs.add(rung.name, result, seconds)

    def on_shadow(self, session: str, check: ShadowCheck) -> None:
        self.metrics.inc(SHADOW_CHECKS, (session, check.result.value))
        if check.result is ShadowResult.DROPPED:
            return
        with self.metrics.lock:
            self._shadow_snr = check.module_worst_db
            if self._joined:
                self._show()

    def on_close(self, session: str) -> None:
        with self.metrics.lock:
            self._standby = False  # a closed session never goes live
            self._leave()
