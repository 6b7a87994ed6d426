"""Behaviours a regression could break silently (issue 16): each test fails when its breaks.

Real demo-vocoder modules throughout; faults wrap them; only time is faked (FakeClock).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from conftest import FakeClock, reference
from prometheus_client import CollectorRegistry

import guard
import probes
from guard import mnn
from guard.health import HealthListener
from guard.ladder import Action, Attempt
from guard.testing import CapturingListener, Fault, FaultyFactory
from guard.tools import demo

Array = np.ndarray[Any, Any]
CANARY_FORWARDS = 4  # Policy.canary_runs (2) x the demo probe's cases (2)


def sample(registry: CollectorRegistry, name: str, session: str = "p", **labels: str) -> Any:
    """One sample of session `session`, None when the series does not exist."""
    return registry.get_sample_value(name, {"session": session, **labels})


class Turning:
    """A real demo-vocoder module whose forwards after the first `after` go through `fault`."""

    def __init__(self, fault: Callable[[list[Array]], list[Array]], after: int, **kw: Any):
        self.runner = mnn.adapt(demo.demo_factory(threads=1)(**kw))
        self.fault = fault
        self.after = after
        self.forwards = 0

    def run(self, arrays: Sequence[Array]) -> list[Array]:
        """Run the real module; degrade what it returns once `after` forwards are done."""
        outputs = self.runner.run(arrays)
        self.forwards += 1
        return outputs if self.forwards <= self.after else self.fault(outputs)


def raising(outputs: list[Array]) -> list[Array]:
    """A forward that fails inside the module."""
    raise RuntimeError("injected forward failure")


class Plan:
    """A factory whose n-th init does what `steps[n]` says (the last step repeats).

    "clean": a real module; "turns": a real module that degrades (all zeros) once its canary
    has run; "bad": degraded (all zeros) from the start.
    """

    def __init__(self, *steps: str) -> None:
        real = demo.demo_factory(threads=1)
        zeros: dict[str, Any] = {"fault": Fault.ZEROS, "rate": 1.0, "affects": "all"}
        self.makers: dict[str, Callable[..., Any]] = {
            "clean": real,
            "turns": FaultyFactory(real, degrade_after=CANARY_FORWARDS, **zeros),
            "bad": FaultyFactory(real, **zeros),
        }
        self.steps = steps
        self.inits = 0

    def __call__(self, **overrides: Any) -> Any:
        step = self.steps[min(self.inits, len(self.steps) - 1)]
        self.inits += 1
        return self.makers[step](**overrides)


def plan_session(
    factory: Callable[..., Any],
    probe: probes.Probe,
    clock: FakeClock,
    *,
    listeners: Sequence[guard.Listener] = (),
    registry: CollectorRegistry | None = None,
    **policy: Any,
) -> guard.GuardedSession:
    """A session without a background thread, on a fake clock, named "p"."""
    settings: dict[str, Any] = {"background": False, "reinit_attempts": 0, **policy}
    return guard.wrap(
        factory,
        probe,
        name="p",
        clock=clock,
        listeners=listeners,
        registry=registry,
        metrics=registry is not None,
        policy=guard.Policy(**settings),
    )


def served_clean(session: guard.GuardedSession, seed: int = 5) -> bool:
    """True when run() serves this input's clean reference output."""
    x = demo.demo_mel(8, seed=seed)
    return bool(probes.snr_db(reference(x), session.run({"mel": x})["wav"]) > 45)


# ------------------------------------------------------------------ canary and re-check


def test_canary_judges_every_run_of_every_case(demo_probe: probes.Probe) -> None:
    """A module degraded only on the canary's last forward (run 2, case 1) fails its canary."""
    faulty = FaultyFactory(
        demo.demo_factory(threads=1), fault=Fault.NOISE, schedule=[True], degrade_after=3
    )
    s = plan_session(faulty, demo_probe, FakeClock(), reinit_attempts=1)
    first, second = s.status.history
    assert (first.outcome, second.outcome) == (guard.ladder.Outcome.FAIL, guard.ladder.Outcome.PASS)
    assert first.verdict is not None
    assert first.verdict.reasons[0].startswith("canary run 2 case 1: output 'wav': snr_db")
    assert "1 of 4 canary runs failed" in first.verdict.reasons
    assert sorted(first.outputs) == [1]  # the failing case's outputs, for a diagnosis
    s.close()


def test_recheck_judges_the_second_case_after_a_passing_first(demo_probe: probes.Probe) -> None:
    """A module that turns between a re-check's two cases fails that re-check and is replaced."""
    faulty = FaultyFactory(
        demo.demo_factory(threads=1),
        fault=Fault.NOISE,
        schedule=[True],
        degrade_after=CANARY_FORWARDS + 1,
    )
    listener = CapturingListener()
    s = plan_session(faulty, demo_probe, FakeClock(), listeners=[listener], promote_after=None)
    assert s.maintain(force_recheck=True) == ["recheck"]
    assert [e.outcome for e in listener.of("check")] == ["fail"]
    assert [(e.action, e.rung, e.to_rung) for e in listener.of("recover")] == [
        ("reinit", "static", "static")
    ]
    assert (s.status.state, s.status.rung_index, faulty.inits) == (guard.State.SERVING, 0, 2)
    assert served_clean(s)
    s.close()


def test_passing_recheck_changes_nothing(demo_probe: probes.Probe) -> None:
    """A re-check that passes keeps the module (no init), publishes CHECKING then SERVING."""
    listener = CapturingListener()
    s = plan_session(Plan("clean"), demo_probe, FakeClock(), listeners=[listener])
    verdict = s.status.verdict
    assert s.maintain(force_recheck=True) == ["recheck"]
    assert [e.outcome for e in listener.of("check")] == ["pass"]
    assert [e.state for e in listener.of("status")] == [
        "starting",
        "serving",
        "checking",
        "serving",
    ]
    assert listener.of("recover") == [] and len(listener.of("init")) == 1
    assert s.status.verdict is not None and s.status.verdict is not verdict
    assert s.status.verdict.passed and s.status.history[-1].passed
    s.close()


def test_wrong_shape_of_the_right_size_fails(demo_probe: probes.Probe) -> None:
    """An output with the golden's size but another shape fails: in a judgement and a canary."""
    golden = demo_probe.cases[0].outputs["wav"]
    verdict = demo_probe.judge({"wav": golden.reshape(1, 160, 160)})
    assert not verdict.passed
    assert verdict.reasons == (
        "output 'wav': shape [1, 160, 160] differs from the golden shape [1, 1, 25600]",
    )
    assert verdict.worst_snr_db == -math.inf

    def reshape(outputs: list[Array]) -> list[Array]:
        return [o.reshape(o.shape[0], -1, 1) for o in outputs]

    calls = [0]

    def factory(**overrides: Any) -> Turning:
        calls[0] += 1
        return Turning(reshape, after=0 if calls[0] == 1 else 10**9, **overrides)

    s = plan_session(factory, demo_probe, FakeClock(), reinit_attempts=1)
    first = s.status.history[0]
    assert first.outcome is guard.ladder.Outcome.FAIL and first.verdict is not None
    assert any("differs from the golden shape" in r for r in first.verdict.reasons)
    assert s.status.attempts == 2 and s.status.healthy
    s.close()


def test_failed_session_is_retried_every_promote_after(demo_probe: probes.Probe) -> None:
    """Every rung failing after a re-check leaves FAILED; a retry each promote_after seconds
    (not before) tries the ladder again, and the first that passes serves."""
    factory = Plan("turns", "bad", "bad", "bad", "bad", "clean")
    clock = FakeClock()
    listener = CapturingListener()
    s = plan_session(factory, demo_probe, clock, listeners=[listener], promote_after=60.0)
    assert s.maintain(force_recheck=True) == ["recheck"]
    assert (s.status.state, factory.inits) == (guard.State.FAILED, 3)
    with pytest.raises(guard.RecoveryExhausted, match="every rung of the ladder failed"):
        s.run({"mel": demo.demo_mel(8)})
    clock.advance(59)
    assert s.maintain() == [] and factory.inits == 3
    clock.advance(2)
    assert s.maintain() == ["retry"]
    assert (s.status.state, factory.inits) == (guard.State.FAILED, 5)  # both rungs again
    clock.advance(59)
    assert s.maintain() == [] and factory.inits == 5  # the failed retry restarted the period
    clock.advance(2)
    assert s.maintain() == ["retry"]
    assert (s.status.state, s.status.rung_index, factory.inits) == (guard.State.SERVING, 0, 6)
    assert s.status.attempts == 1 and s.status.history[0].passed
    assert served_clean(s)
    # the re-check's recovery: reinit, fallback; the first retry's dynamic try: fallback
    assert [e.action for e in listener.of("recover")] == ["reinit", "fallback", "fallback"]
    s.close()


def test_fallback_after_a_failed_recheck_waits_before_promoting(demo_probe: probes.Probe) -> None:
    """A fallback caused by a failed re-check restarts the promotion period: no init churn."""
    factory = Plan("turns", "bad", "clean")
    clock = FakeClock()
    s = plan_session(factory, demo_probe, clock, promote_after=300.0)
    clock.advance(10_000)  # long past the first period: only a fresh one may hold promotion
    assert s.maintain(force_recheck=True) == ["recheck"]
    assert (s.status.mode, factory.inits) == ("dynamic", 3)
    assert s.maintain() == []
    clock.advance(299)
    assert s.maintain() == [] and factory.inits == 3
    clock.advance(2)
    assert s.maintain() == [Action.PROMOTE]
    assert (s.status.mode, s.status.rung_index, factory.inits) == ("static", 0, 4)
    assert served_clean(s)
    s.close()


def test_recheck_by_calls_wakes_the_background_thread_at_once(demo_probe: probes.Probe) -> None:
    """The call that completes recheck_every calls wakes the maintenance thread: the re-check
    runs long before the thread's 1 s idle tick."""
    checked = threading.Event()

    class OnCheck(guard.Listener):
        def on_check(self, session: str, attempt: Attempt) -> None:
            checked.set()

    s = guard.wrap(
        demo.demo_factory(threads=1),
        demo_probe,
        name="wake",
        metrics=False,
        listeners=[OnCheck()],
        policy=guard.Policy(recheck_every=3, promote_after=None),
    )
    built = time.monotonic()  # the thread started inside wrap: its first idle tick is 1 s on
    x = demo.demo_mel(4)
    for _ in range(3):
        s.run({"mel": x})
    assert checked.wait(10)
    elapsed = time.monotonic() - built
    s.close()
    assert elapsed < 0.9, f"the re-check came {elapsed:.2f} s after the session was built"


# ------------------------------------------------------------------ run() error paths


def test_module_returning_no_outputs_after_its_canary(
    demo_probe: probes.Probe, registry: CollectorRegistry, mel: Array
) -> None:
    """A forward returning [] (MNN's internal shape error) raises OutputMismatch, counted error."""
    faulty = FaultyFactory(
        demo.demo_factory(threads=1),
        fault=Fault.MISSING,
        schedule=[True],
        affects="all",
        degrade_after=CANARY_FORWARDS,
    )
    s = plan_session(faulty, demo_probe, FakeClock(), registry=registry)
    with pytest.raises(guard.OutputMismatch, match=r"returned 0 outputs, expected \['wav'\]"):
        s.run({"mel": mel})
    runs = {
        r: sample(registry, "mnn_guard_runs_total", rung="static", result=r)
        for r in ("ok", "error")
    }
    assert runs == {"ok": 0.0, "error": 1.0}
    assert sample(registry, "mnn_guard_run_seconds_count", rung="static") == 0.0
    s.close()


def test_forward_that_raises_after_its_canary(
    demo_probe: probes.Probe, registry: CollectorRegistry, mel: Array
) -> None:
    """A forward raising after the canary gives ForwardFailed (a GuardError) chained to the
    module's error, counted as error; the module stays in service for the next call."""
    s = plan_session(
        lambda **kw: Turning(raising, after=CANARY_FORWARDS, **kw),
        demo_probe,
        FakeClock(),
        registry=registry,
    )
    for _ in range(2):
        with pytest.raises(guard.ForwardFailed, match="session 'p': forward failed") as info:
            s.run({"mel": mel})
        assert isinstance(info.value, guard.GuardError)
        assert isinstance(info.value.__cause__, RuntimeError)
        assert str(info.value.__cause__) == "injected forward failure"
    runs = {
        r: sample(registry, "mnn_guard_runs_total", rung="static", result=r)
        for r in ("ok", "error", "invalid")
    }
    assert runs == {"ok": 0.0, "error": 2.0, "invalid": 0.0}
    assert s.status.state is guard.State.SERVING
    s.close()


def test_guard_errors_from_a_forward_pass_through_unwrapped(demo_probe: probes.Probe) -> None:
    """A GuardError raised inside the forward reaches the caller as it is, not re-wrapped."""

    def closed(outputs: list[Array]) -> list[Array]:
        raise guard.SessionClosed("inner session closed")

    s = plan_session(
        lambda **kw: Turning(closed, after=CANARY_FORWARDS, **kw), demo_probe, FakeClock()
    )
    with pytest.raises(guard.SessionClosed, match=r"^inner session closed$"):
        s.run({"mel": demo.demo_mel(8)})
    s.close()


# ------------------------------------------------------------------ metrics, unhappy paths


class GaugeAtEvent(guard.Listener):
    """Reads the SNR gauge and canary counters right after the Prometheus listener's update."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.seen: list[tuple[str, str, float | None, Any]] = []

    def _read(self, kind: str, attempt: Attempt) -> None:
        snr = attempt.verdict.worst_snr_db if attempt.verdict is not None else None
        gauge = sample(self.registry, "mnn_guard_canary_snr_db")
        self.seen.append((kind, attempt.outcome.value, snr, gauge))

    def on_attempt(self, session: str, attempt: Attempt) -> None:
        self._read("attempt", attempt)

    def on_check(self, session: str, attempt: Attempt) -> None:
        self._read("check", attempt)


def test_failing_recheck_is_counted_and_sets_the_snr_gauge(
    demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """A failing re-check counts canary_checks{result=fail} and sets the SNR gauge to its SNR."""
    faulty = FaultyFactory(
        demo.demo_factory(threads=1),
        fault=Fault.NOISE,
        schedule=[True],
        degrade_after=CANARY_FORWARDS,
    )
    gauges = GaugeAtEvent(registry)
    s = plan_session(faulty, demo_probe, FakeClock(), registry=registry, listeners=[gauges])
    assert s.maintain(force_recheck=True) == ["recheck"]
    (check,) = [g for g in gauges.seen if g[0] == "check"]
    assert check[1] == "fail" and check[2] is not None and 20 < check[2] < 45
    assert check[3] == check[2]
    counts = {
        r: sample(registry, "mnn_guard_canary_checks_total", rung="static", result=r)
        for r in ("pass", "fail")
    }
    assert counts == {"pass": 2.0, "fail": 1.0}  # the first init, the re-check, the replacement
    assert sample(registry, "mnn_guard_recoveries_total", action="reinit") == 1.0
    assert sample(registry, "mnn_guard_inits_total", rung="static") == 2.0
    s.close()


def test_timeout_sets_the_snr_gauge_to_minus_infinity(
    demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """An init that times out counts canary_checks{result=timeout} and reads -inf dB."""
    faulty = FaultyFactory(
        demo.demo_factory(threads=1),
        fault=Fault.HANG,
        schedule=[True],
        affects="all",
        hang_seconds=2.0,
    )
    gauges = GaugeAtEvent(registry)
    s = plan_session(
        faulty,
        demo_probe,
        FakeClock(),
        registry=registry,
        listeners=[gauges],
        init_timeout=0.3,
        reinit_attempts=1,
    )
    assert gauges.seen[0] == ("attempt", "timeout", None, -math.inf)
    assert gauges.seen[1][1] == "pass" and gauges.seen[1][3] == gauges.seen[1][2]
    assert sample(registry, "mnn_guard_canary_checks_total", rung="static", result="timeout") == 1
    s.close()


def test_an_older_session_of_the_same_name_cannot_touch_the_newer_ones_gauges(
    demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """A healthy older session still publishing does not mark a newer failed one healthy, and
    closing the older one leaves the newer one's series."""
    clock = FakeClock()
    older = plan_session(Plan("clean"), demo_probe, clock, registry=registry)
    newer = guard.wrap(
        Plan("bad"),
        demo_probe,
        name="p",
        registry=registry,
        raise_exhausted=False,
        policy=guard.Policy(background=False, reinit_attempts=0),
    )
    assert sample(registry, "mnn_guard_healthy") == 0.0
    assert older.maintain(force_recheck=True) == ["recheck"]  # publishes CHECKING, SERVING
    assert sample(registry, "mnn_guard_healthy") == 0.0
    assert sample(registry, "mnn_guard_state", state="failed") == 1.0
    older.close()
    assert sample(registry, "mnn_guard_state", state="failed") == 1.0
    newer.close()
    assert sample(registry, "mnn_guard_state", state="failed") is None


def test_closing_in_multiprocess_mode_turns_gauges_to_nan(
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
) -> None:
    """Where series cannot be removed (multiprocess files), closing makes every gauge NaN."""
    s = plan_session(Plan("clean"), demo_probe, FakeClock(), registry=registry)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    s.close()
    gauges = [
        sample(registry, "mnn_guard_healthy"),
        sample(registry, "mnn_guard_canary_snr_db"),
        *(sample(registry, "mnn_guard_rung", rung=r) for r in ("static", "dynamic")),
        *(sample(registry, "mnn_guard_rung_loaded_static", rung=r) for r in ("static", "dynamic")),
        *(sample(registry, "mnn_guard_state", state=x.value) for x in guard.State),
    ]
    assert len(gauges) == 12 and all(math.isnan(g) for g in gauges), gauges
    assert sample(registry, "mnn_guard_inits_total", rung="static") == 1.0  # counters stay


def test_state_and_rung_gauges_follow_the_session(
    demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """mnn_guard_state has exactly one state at 1 and mnn_guard_rung one rung, as they change."""

    def ones(name: str, label: str) -> list[str]:
        return [
            s.labels[label]
            for m in registry.collect()
            for s in m.samples
            if s.name == name and s.labels["session"] == "p" and s.value == 1
        ]

    clock = FakeClock()
    s = plan_session(Plan("bad", "clean"), demo_probe, clock, registry=registry)
    assert (ones("mnn_guard_state", "state"), ones("mnn_guard_rung", "rung")) == (
        ["serving"],
        ["dynamic"],
    )
    clock.advance(301)
    assert s.maintain() == [Action.PROMOTE]
    assert (ones("mnn_guard_state", "state"), ones("mnn_guard_rung", "rung")) == (
        ["serving"],
        ["static"],
    )
    assert sample(registry, "mnn_guard_healthy") == 1.0
    s.close()


# ------------------------------------------------------------------ readiness


def test_readiness_needs_every_session_healthy(demo_probe: probes.Probe) -> None:
    """One healthy and one exhausted session: not ready, both listed; ready once the exhausted
    one is closed; not ready with none."""
    table = guard.HealthTable()
    assert table.readiness() == (False, [])
    healthy = guard.wrap(
        demo.demo_factory(threads=1), demo_probe, name="a", metrics=False, health=table,
        policy=guard.Policy(background=False),
    )  # fmt: skip
    failed = guard.wrap(
        Plan("bad"), demo_probe, name="b", metrics=False, health=table, raise_exhausted=False,
        policy=guard.Policy(background=False, reinit_attempts=0),
    )  # fmt: skip
    ready, details = guard.readiness(table)
    assert ready is False
    assert [(e["name"], e["state"], e["healthy"]) for e in details] == [
        ("a", "serving", True),
        ("b", "failed", False),
    ]
    assert any("snr_db" in r for r in details[1]["reasons"]) and details[0]["reasons"] == []
    assert (details[1]["rung"], details[1]["rung_index"]) == ("dynamic", 1)
    failed.close()
    assert table.readiness() == (True, [{**details[0], "since": healthy.status.since}])
    assert table.readiness(expect=["a", "c"])[0] is False
    healthy.close()
    assert table.readiness() == (False, [])


def test_nothing_published_after_close_reaches_the_table(demo_probe: probes.Probe) -> None:
    """A status published after its session's close (the close/publish race) is not recorded,
    nor a closed status; closing forgets only the entry this listener wrote."""
    table = guard.HealthTable()
    s = guard.wrap(
        demo.demo_factory(threads=1), demo_probe, name="a", metrics=False, health=table,
        policy=guard.Policy(background=False),
    )  # fmt: skip
    serving = s.status
    late, newer = HealthListener(table), HealthListener(table)
    late.on_status("a", serving)
    newer.on_status("a", serving)
    late.on_close("a")  # an older listener closing: the newer entry stays
    assert list(table.sessions()) == ["a"]
    late.on_status("a", serving)  # published after its close
    newer.on_close("a")
    assert table.sessions() == {}
    late.on_status("a", serving)
    s.close()
    HealthListener(table).on_status("a", s.status)  # CLOSED is never recorded
    assert table.sessions() == {}
