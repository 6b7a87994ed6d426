"""Behaviours a regression could break silently (issue 16): each test fails when its breaks.

Real demo-vocoder modules throughout; faults wrap them; only time is faked (FakeClock).
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import MNN
import numpy as np
import pytest
from conftest import FakeClock, reference
from prometheus_client import CollectorRegistry

import guard
import probes
from guard import mnn
from guard.health import Entry, HealthListener
from guard.ladder import Action, Attempt
from guard.testing import CapturingListener, Fault, FaultyFactory
from guard.tools import demo
from probes import judges, measures, signature

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
    has run; "bad": degraded (all zeros) from the start; "noisy": 29 dB noise from the start;
    "exit": the factory raises SystemExit.
    """

    def __init__(self, *steps: str) -> None:
        real = demo.demo_factory(threads=1)
        zeros: dict[str, Any] = {"fault": Fault.ZEROS, "rate": 1.0, "affects": "all"}
        self.makers: dict[str, Callable[..., Any]] = {
            "clean": real,
            "turns": FaultyFactory(real, degrade_after=CANARY_FORWARDS, **zeros),
            "bad": FaultyFactory(real, **zeros),
            "noisy": FaultyFactory(real, fault=Fault.NOISE, rate=1.0, affects="all"),
        }
        self.steps = steps
        self.inits = 0

    def __call__(self, **overrides: Any) -> Any:
        step = self.steps[min(self.inits, len(self.steps) - 1)]
        self.inits += 1
        if step == "exit":
            raise SystemExit(3)
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
    return bool(measures.snr_db(reference(x), session.run({"mel": x})["wav"]) > 45)


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
    assert first.outputs[1]["wav"].shape == demo_probe.cases[1].outputs["wav"].shape
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
    verdict, since = s.status.verdict, s.status.since
    assert s.maintain(force_recheck=True) == ["recheck"]
    assert s.status.since > since  # it left SERVING and came back
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
    """A session FAILED after a re-check retries every promote_after seconds, not before."""
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
    """The call completing recheck_every wakes the thread: no wait for its 1 s idle tick."""
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
        policy=guard.Policy(recheck_every=1, promote_after=None),
    )
    built = time.monotonic()  # the thread started inside wrap: its first idle tick is 1 s on
    s.run({"mel": demo.demo_mel(4)})
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
    expected = r"returned 0 outputs, expected \['wav'\]"
    with pytest.raises(guard.errors.OutputMismatch, match=expected):
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
    """A forward raising after the canary: ForwardFailed chained to it, counted error, serving."""
    s = plan_session(
        lambda **kw: Turning(raising, after=CANARY_FORWARDS, **kw),
        demo_probe,
        FakeClock(),
        registry=registry,
    )
    for _ in range(2):
        with pytest.raises(guard.errors.ForwardFailed, match="session 'p': forward failed") as info:
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
        raise guard.errors.SessionClosed("inner session closed")

    s = plan_session(
        lambda **kw: Turning(closed, after=CANARY_FORWARDS, **kw), demo_probe, FakeClock()
    )
    with pytest.raises(guard.errors.SessionClosed, match=r"^inner session closed$"):
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
    hung = [t for t in threading.enumerate() if t.name == "mnn-guard-init"]
    assert hung and all(t.daemon for t in hung)  # a hung init never blocks the process's exit
    assert gauges.seen[0] == ("attempt", "timeout", None, -math.inf)
    timed_out = s.status.history[0]
    assert str(timed_out.error) == (
        "init + canary of session 'p' on rung 'static' did not finish within 0.3 s "
        "(Policy.init_timeout)"
    )
    assert (timed_out.notes, timed_out.turned_static, timed_out.outputs) == ((), False, {})
    assert 0.3 <= timed_out.seconds < 30
    assert gauges.seen[1][1] == "pass" and gauges.seen[1][3] == gauges.seen[1][2]
    assert sample(registry, "mnn_guard_canary_checks_total", rung="static", result="timeout") == 1
    s.close()


def test_an_older_session_of_the_same_name_cannot_touch_the_newer_ones_gauges(
    demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """An older session of the same name, publishing or closing, leaves the newer one's series."""
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
    """One healthy and one exhausted session: not ready until the exhausted one is closed."""
    table = guard.health.HealthTable()
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
    """Nothing published after a close (or in CLOSED) is recorded; a close forgets only its own."""
    table = guard.health.HealthTable()
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


# ------------------------------------------------------------------ judges and thresholds


def scaled_noise(golden: Array, snr: float, seed: int = 0) -> Array:
    """`golden` plus white noise at exactly `snr` dB (float64)."""
    g = golden.astype(np.float64)
    n = np.random.default_rng(seed).standard_normal(g.shape)
    return g + n * math.sqrt(float(np.sum(g**2)) / float(np.sum(n**2))) * 10 ** (-snr / 20)


def tone(seconds_samples: int = 4096, hz: float = 440.0, amplitude: float = 1.0) -> Array:
    """A sine of `hz` at 22,050 Hz, shaped (1, 1, n) like the demo vocoder's output."""
    t = np.arange(seconds_samples) / 22050
    return (amplitude * np.sin(2 * np.pi * hz * t)).reshape(1, 1, -1)


def test_default_thresholds() -> None:
    """SNR 45 dB, cosine 0.99995, LSD 1 dB, no max_abs: the limits every probe starts from."""
    assert probes.Thresholds() == probes.Thresholds(
        min_snr_db=45.0, min_cosine=0.99995, max_lsd_db=1.0, max_abs=None
    )


@pytest.mark.parametrize(
    ("make", "passes", "failing"),
    [
        (lambda g: g * 0.98, False, ["snr_db"]),  # a 2% gain fault: 34 dB
        (lambda g: scaled_noise(g, 44.0), False, ["snr_db"]),
        (lambda g: scaled_noise(g, 46.0), True, []),
        (lambda g: g + 10 ** (-50 / 20) * tone(g.size, 9000), False, ["lsd_db"]),
    ],
    ids=["gain 0.98", "noise 44 dB", "noise 46 dB", "tone in a silent band"],
)
def test_each_default_limit_decides(
    make: Callable[[Array], Array], passes: bool, failing: list[str], demo_probe: probes.Probe
) -> None:
    """The SNR limit lies between 44 and 46 dB, fails a 2% gain; LSD alone fails a quiet tone."""
    golden = demo_probe.cases[0].outputs["wav"] if passes or failing == ["snr_db"] else tone()
    golden = golden.astype(np.float32)
    score = judges.judge_output("y", golden, make(golden).astype(np.float32), probes.Thresholds())
    assert score.passed is passes
    assert [c.judge for c in score.checks if not c.passed] == failing
    if failing == ["lsd_db"]:
        assert score.values["lsd_db"] is not None and 2 < score.values["lsd_db"] < 4
        assert score.reasons == [
            f"output 'y': lsd_db {score.values['lsd_db']:.6g} dB is above the limit 1 dB"
        ]


def test_cosine_limit_decides_only_below_the_default_snr_limit() -> None:
    """Cosine never decides alone at 45 dB SNR; with min_snr_db 30 it alone fails 35 dB noise."""
    golden = tone().astype(np.float32)
    worst = max(  # the lowest cosine of 45 dB noise over a few draws: above the default limit
        1 - measures.cosine_similarity(golden, scaled_noise(golden, 45.0, seed=k)) for k in range(8)
    )
    assert worst <= 10**-4.5 / 2 * 1.01 and 1 - worst > probes.Thresholds().min_cosine
    loose = probes.Thresholds(min_snr_db=30.0, max_lsd_db=None)
    noisy = scaled_noise(golden, 35.0).astype(np.float32)
    score = judges.judge_output("y", golden, noisy, loose)
    assert [c.judge for c in score.checks if not c.passed] == ["cosine"]
    assert score.reasons == [
        f"output 'y': cosine {score.values['cosine']:.6g} is below the limit 0.99995"
    ]


@pytest.mark.parametrize(
    ("delta", "passes"), [(0.0, True), (0.25, True), (0.5, True), (0.5000001, False), (-0.6, False)]
)
def test_max_abs_judge_allows_up_to_its_limit(delta: float, passes: bool) -> None:
    """max_abs(0.5) passes a difference of exactly 0.5 and fails anything larger, either sign."""
    golden = np.zeros((1, 8))
    actual = golden.copy()
    actual[0, 3] = delta
    check = judges.max_abs(0.5)(golden, actual)
    assert (check.judge, check.passed, check.value, check.limit) == (
        "max_abs",
        passes,
        abs(delta),
        0.5,
    )
    assert check.reason == ("" if passes else f"max_abs {abs(delta):.6g} is above the limit 0.5")


def test_max_abs_threshold_fails_one_outlier_that_snr_passes(demo_probe: probes.Probe) -> None:
    """Thresholds(max_abs=...) adds the judge: one sample off by 0.01 fails it, SNR still passes
    (the loose limits: the calibrated ones catch the spike by SNR too)."""
    golden = demo_probe.cases[0].outputs["wav"]
    spiked = golden.copy()
    spiked.flat[1000] += 0.01
    assert demo_probe.judge({"wav": spiked}, tier="loose").passed
    assert not demo_probe.judge({"wav": spiked}).passed
    strict = demo_probe.with_thresholds(wav=probes.Thresholds(max_abs=0.005))
    verdict = strict.judge({"wav": spiked})
    assert not verdict.passed
    score = verdict.scores["wav"]
    assert [c.judge for c in score.checks if not c.passed] == ["max_abs"]
    assert score.snr_db > 45 and score.values["max_abs"] == pytest.approx(0.01, rel=1e-3)


def test_silent_golden_passes_only_silence() -> None:
    """Against an all-zero golden, zeros pass (SNR +inf) and any sound fails (SNR -inf)."""
    golden = np.zeros((1, 1, 256), np.float32)
    same = judges.judge_output("y", golden, golden.copy(), probes.Thresholds())
    assert same.passed and same.snr_db == math.inf and same.values["cosine"] == 1.0
    sound = golden.copy()
    sound[0, 0, 7] = 1e-6
    score = judges.judge_output("y", golden, sound, probes.Thresholds())
    assert not score.passed
    assert (score.snr_db, score.values["cosine"]) == (-math.inf, 0.0)
    assert score.reasons[0] == "output 'y': snr_db -inf dB is below the limit 45 dB"


@pytest.mark.parametrize(
    ("golden", "actual", "expected"),
    [
        ([1.0, 2.0], [1.0, 2.0], math.inf),
        ([1.0, 1.0], [0.5, 0.5], 20 * math.log10(2)),
        ([3.0, 4.0], [3.0, 4.5], 10 * math.log10(25 / 0.25)),
        ([0.0, 0.0], [0.0, 1.0], -math.inf),
        ([1.0, 1.0], [np.inf, 1.0], -math.inf),
    ],
)
def test_snr_db_values(golden: list[float], actual: list[float], expected: float) -> None:
    """snr_db is 10 log10(signal / error) in dB; +inf when equal, -inf against silence or inf."""
    assert measures.snr_db(np.array(golden), np.array(actual)) == pytest.approx(expected)


def test_snr_and_cosine_of_nan_are_nan() -> None:
    """A NaN anywhere gives NaN, which fails every limit."""
    nan = np.array([1.0, np.nan])
    assert math.isnan(measures.snr_db(np.ones(2), nan))
    assert math.isnan(measures.snr_db(nan, np.ones(2)))
    assert not judges.snr(-1000.0)(np.ones(2), nan).passed


@pytest.mark.parametrize(
    ("golden", "actual", "expected"),
    [
        ([1.0, 0.0], [0.0, 1.0], 0.0),
        ([1.0, 2.0], [-1.0, -2.0], -1.0),
        ([1.0, 2.0], [2.0, 4.0], 1.0),
        ([0.0, 0.0], [0.0, 0.0], 1.0),
        ([0.0, 0.0], [1.0, 0.0], 0.0),
        ([1.0, 0.0], [0.0, 0.0], 0.0),
        ([1.0, 1.0], [1.0, 0.0], math.sqrt(0.5)),
    ],
)
def test_cosine_similarity_values(
    golden: list[float], actual: list[float], expected: float
) -> None:
    """Cosine of the angle between the arrays; 1 for two silences, 0 against one silence."""
    value = measures.cosine_similarity(np.array(golden), np.array(actual))
    assert value == pytest.approx(expected) and -1.0 <= value <= 1.0


@pytest.mark.parametrize(
    "shape", [(1, 1, 63), (2, 64), (64, 1, 2), (8, 8)], ids=["short", "2-d", "3-d", "square"]
)
def test_lsd_is_only_for_one_dimensional_signals(shape: tuple[int, ...]) -> None:
    """LSD is None (and its judge passes with no value) unless one axis of 64+ samples."""
    golden = np.random.default_rng(0).standard_normal(shape)
    assert measures.log_spectral_distance(golden, golden * 2) is None
    check = judges.lsd(1.0)(golden, golden * 2)
    assert (check.passed, check.value, check.limit, check.reason) == (True, None, 1.0, "")


def test_lsd_of_equal_signals_is_zero_and_grows_with_noise() -> None:
    """Identical signals: 0 dB. 64 samples already count as a signal; more noise, larger LSD."""
    golden = tone(64).ravel()
    assert measures.log_spectral_distance(golden, golden.copy()) == 0.0
    values = [
        measures.log_spectral_distance(tone(), scaled_noise(tone(), snr)) for snr in (60, 40, 20)
    ]
    assert all(v is not None for v in values) and values == sorted(values)
    assert measures.log_spectral_distance(tone(), tone(4095)) is None  # sizes differ


@pytest.mark.parametrize(
    ("actual", "judge"),
    [
        (np.array(["a", "b"]), "dtype"),
        (np.array([True, False]), "dtype"),
        (np.array([1 + 1j, 2]), "dtype"),
        (np.array([1.0, np.nan]), "finite"),
        (np.array([1.0, 2.0, 3.0]), "shape"),
    ],
    ids=["strings", "bools", "complex", "nan", "longer"],
)
def test_outputs_that_are_not_real_finite_numbers_fail_first(actual: Array, judge: str) -> None:
    """Shape, then a real numeric dtype, then finiteness: each failure is the only check."""
    score = judges.judge_output("y", np.array([1.0, 2.0]), actual, probes.Thresholds())
    assert not score.passed and [c.judge for c in score.checks] == [judge]
    assert math.isnan(score.snr_db) and score.values["lsd_db"] is None


def test_scores_measure_what_no_judge_checks() -> None:
    """With cosine and max_abs off, the score still reports both; a switched-off judge is absent."""
    golden = tone(256).astype(np.float32)
    actual = golden * np.float32(1.001)
    score = judges.judge_output(
        "y", golden, actual, probes.Thresholds(min_cosine=None, max_lsd_db=None)
    )
    assert [c.judge for c in score.checks] == ["finite", "snr_db"]
    assert score.values["cosine"] == pytest.approx(1.0) and score.values["cosine"] > 0.99
    assert score.values["max_abs"] == pytest.approx(0.001, rel=1e-2)
    assert score.values["lsd_db"] is not None and score.values["lsd_db"] < 0.01
    assert score.snr_db == pytest.approx(60.0, abs=0.01)


# ------------------------------------------------------------------ verdicts


def test_verdict_merge_keeps_the_first_failure_and_the_worst_scores(
    demo_probe: probes.Probe,
) -> None:
    """A merged verdict: all must pass; first failure's reasons plus a count; the worst scores."""
    golden = demo_probe.cases[0].outputs["wav"]
    good = demo_probe.judge({"wav": golden})
    worse = demo_probe.judge({"wav": scaled_noise(golden, 30.0).astype(np.float32)})
    worst = demo_probe.judge({"wav": scaled_noise(golden, 20.0).astype(np.float32)})
    merged = probes.Verdict.merge([good, worse, worst], ["a", "b", "c"])
    assert not merged.passed and merged.scores == worst.scores
    assert merged.reasons == (*(f"b: {r}" for r in worse.reasons), "2 of 3 canary runs failed")
    assert probes.Verdict.merge([good, good]).passed
    assert probes.Verdict.merge([good, good]).reasons == ()
    assert probes.Verdict.merge([worse]).reasons == tuple(f"run 1: {r}" for r in worse.reasons)
    empty = probes.Verdict.merge([])
    assert (empty.passed, empty.reasons, empty.worst_snr_db) == (
        False,
        ("no canary run was judged",),
        -math.inf,
    )
    assert worst.worst_snr_db == pytest.approx(20.0, abs=0.01)


def test_verdict_describe_names_result_snr_and_reasons(demo_probe: probes.Probe) -> None:
    """One line: PASSED or FAILED, the worst SNR when finite, and the reasons of a failure."""
    golden = demo_probe.cases[0].outputs["wav"]
    noisy = demo_probe.judge({"wav": scaled_noise(golden, 30.0).astype(np.float32)})
    assert noisy.describe().startswith("FAILED worst SNR 30.0 dB: output 'wav': snr_db 30 dB")
    assert demo_probe.judge({"wav": golden}).describe() == "PASSED"  # SNR +inf: not shown
    assert demo_probe.judge({}).describe() == "FAILED: output 'wav' is missing"
    assert demo_probe.judge({}).worst_snr_db == -math.inf


# ------------------------------------------------------------------ inputs


INT32 = [signature.InputSpec(name="ids", dtype="int32", shape=((1, 8),))]


@pytest.mark.parametrize(
    "values",
    [
        np.array([0, 2**31 - 1, -(2**31)], np.int64),
        np.array([1, 2], np.uint8),
        np.array([True, False]),
        np.array([7], np.int16),
    ],
    ids=["int64 at the limits", "uint8", "bool", "int16"],
)
def test_integers_within_range_are_cast(values: Array) -> None:
    """Integers (and bools) that fit the input's int32 are cast without changing a value."""
    (out,) = guard.inputs.prepare_inputs(INT32, {"ids": values})
    assert out.dtype == np.int32 and np.array_equal(out, values.astype(np.int64))
    (fast,) = guard.inputs.InputChecker(INT32)({"ids": values})
    assert fast.dtype == np.int32 and np.array_equal(fast, out)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.array([1, 2**40], np.int64), "int64 values outside the int32 range"),
        (np.array([2**31], np.int64), "int64 values outside the int32 range"),
        (np.array([-(2**31) - 1], np.int64), "int64 values outside the int32 range"),
        (np.array([2**63], np.uint64), "uint64 values outside the int32 range"),
        (np.array([1.0]), "dtype float64 cannot be cast safely to int32"),
    ],
    ids=["2**40", "2**31", "-2**31-1", "uint64", "float"],
)
def test_integers_outside_the_range_are_refused(values: Array, message: str) -> None:
    """An integer the input's int32 cannot hold is refused, never wrapped around."""
    with pytest.raises(guard.InputMismatch, match=message) as info:
        guard.inputs.InputChecker(INT32)({"ids": values})
    assert info.value.input == "ids"
    assert "-2147483648..2147483647" in str(info.value) or "float64" in str(info.value)


def test_float_inputs_that_overflow_the_target_are_refused() -> None:
    """float32 70,000 does not fit float16 (it would become inf); 60,000 does."""
    spec = [signature.InputSpec(name="x", dtype="float16", shape=(2,))]
    with pytest.raises(guard.InputMismatch, match="float32 values overflow float16"):
        guard.inputs.InputChecker(spec)({"x": np.array([1.0, 7e4], np.float32)})
    (out,) = guard.inputs.InputChecker(spec)({"x": np.array([1.0, 6e4], np.float32)})
    assert out.dtype == np.float16 and out.tolist() == [1.0, 6e4]
    nan = np.array([np.nan, 1.0], np.float32)  # non-finite in, non-finite out: not an overflow
    with pytest.raises(guard.InputMismatch, match="1 NaN/Inf values"):
        guard.inputs.InputChecker(spec)({"x": nan})
    (kept,) = guard.inputs.InputChecker(spec, check_finite=False)({"x": nan})
    assert kept.dtype == np.float16 and math.isnan(kept[0])


def test_many_shapes_do_not_wear_out_the_shape_check() -> None:
    """After more distinct valid shapes than the checker remembers, a wrong one is refused."""
    checker = guard.inputs.InputChecker(
        [signature.InputSpec(name="x", dtype="float32", shape=(1, (1, 200)))]
    )
    for n in range(1, 101):
        (out,) = checker({"x": np.zeros((1, n), np.float32)})
        assert out.shape == (1, n)
    for bad in (np.zeros((1, 201), np.float32), np.zeros((2, 5), np.float32)):
        with pytest.raises(guard.InputMismatch, match="dimension"):
            checker({"x": bad})
    with pytest.raises(guard.InputMismatch, match="the array is empty"):
        checker({"x": np.zeros((1, 0), np.float32)})


def test_two_inputs_are_checked_and_ordered_by_the_signature() -> None:
    """Inputs come back in signature order whatever the dict's order; each one is checked."""
    specs = [
        signature.InputSpec(name="a", dtype="float32", shape=(2,)),
        signature.InputSpec(name="b", dtype="int32", shape=(3,)),
    ]
    checker = guard.inputs.InputChecker(specs)
    a, b = np.ones(2, np.float32), np.arange(3, dtype=np.int32)
    out = checker({"b": b, "a": a})
    assert [o.dtype for o in out] == [np.float32, np.int32] and out[0] is a and out[1] is b
    assert checker([a, b])[1] is b
    with pytest.raises(guard.InputMismatch, match="input 'b'"):
        checker({"a": a, "b": np.arange(4, dtype=np.int32)})
    with pytest.raises(guard.InputMismatch, match=r"missing input\(s\) \['b'\]"):
        checker({"a": a, "c": b})
    inf = np.array([1.0, np.inf], np.float32)
    with pytest.raises(guard.InputMismatch, match="input 'a': 1 NaN/Inf values"):
        checker({"a": inf, "b": b})
    assert guard.inputs.InputChecker(specs, check_finite=False)({"a": inf, "b": b})[0] is inf


# ------------------------------------------------------------------ probes


def small_probe(golden: Any) -> probes.Probe:
    """A one-case probe whose golden output is `golden`."""
    return probes.Probe(
        cases=(probes.Case(inputs={"x": np.zeros(2, np.float32)}, outputs={"y": golden}),),
        inputs=(signature.InputSpec(name="x", dtype="float32", shape=(2,)),),
        outputs=(signature.OutputSpec(name="y", dtype="float32", shape=(2,)),),
    )


@pytest.mark.parametrize(
    "golden",
    [np.array(["a", "b"]), np.array([1 + 1j, 2]), np.array([True, False]), np.array([1.0, np.inf])],
    ids=["strings", "complex", "bools", "inf"],
)
def test_a_golden_that_is_not_finite_real_numbers_is_a_probe_error(golden: Array) -> None:
    """Goldens of strings, complex numbers, bools or non-finite values raise ProbeError."""
    with pytest.raises(probes.ProbeError, match="golden output 'y'"):
        small_probe(golden)


def test_manifest_must_name_arrays_npz(demo_paths: tuple[Any, Any], tmp_path: Any) -> None:
    """A manifest naming another arrays file is refused, even with a matching checksum."""
    import json
    import shutil

    folder = shutil.copytree(demo_paths[1], tmp_path / "p")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["arrays"]["file"] = "other.npz"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(probes.ProbeError, match="'arrays' must be"):
        probes.load(folder)


# ------------------------------------------------------------------ readiness across processes


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_health_files_answer_for_every_live_worker(demo_probe: probes.Probe, tmp_path: Any) -> None:
    """Health files: this process's kept current, live workers read, dead reaped, junk skipped."""
    import json
    import os
    import subprocess

    from guard import health

    table = guard.health.HealthTable(tmp_path)
    s = guard.wrap(
        demo.demo_factory(threads=1), demo_probe, name="a", metrics=False, health=table,
        policy=guard.Policy(background=False),
    )  # fmt: skip
    ours = tmp_path / f"mnn_guard_health_{os.getpid()}.json"
    doc = json.loads(ours.read_text())
    assert doc == {"pid": os.getpid(), "sessions": table.entries()}
    assert [e["name"] for e in doc["sessions"]] == ["a"]
    gone = dead_pid()
    (tmp_path / f"mnn_guard_health_{gone}.json").write_text(
        json.dumps({"pid": gone, "sessions": [{**doc["sessions"][0], "healthy": False}]})
    )
    (tmp_path / "mnn_guard_health_0a.json").write_text("{not json")  # read first, skipped
    assert health.worker_entries(tmp_path) == [{"pid": os.getpid(), "sessions": doc["sessions"]}]
    assert not (tmp_path / f"mnn_guard_health_{gone}.json").exists()
    ready, details = health.worker_readiness(tmp_path)
    assert (ready, details) == (True, [{**doc["sessions"][0], "pid": os.getpid()}])
    ready, details = health.worker_readiness(tmp_path, expect=["a", "b"])
    assert ready is False
    assert details[1:] == [
        {
            "name": "b",
            "pid": os.getpid(),
            "state": "missing",
            "healthy": False,
            "reasons": ["no such session in this worker yet"],
        },
    ]
    assert table.readiness(expect=["b"])[1][1:] == [
        {"name": "b", "state": "missing", "healthy": False, "reasons": ["no such session yet"]}
    ]
    other = subprocess.Popen(["sleep", "60"])  # a second live worker, with a session "z"
    try:
        entry = {**doc["sessions"][0], "name": "z"}
        (tmp_path / f"mnn_guard_health_{other.pid}.json").write_text(
            json.dumps({"pid": other.pid, "sessions": [entry]})
        )
        ready, details = health.worker_readiness(tmp_path)
        assert ready is True
        assert [(e["name"], e["pid"]) for e in details] == [("a", os.getpid()), ("z", other.pid)]
    finally:
        other.kill()
        other.wait()
    s.close()
    assert json.loads(ours.read_text()) == {"pid": os.getpid(), "sessions": []}
    assert health.worker_readiness(tmp_path) == (False, [])
    health.mark_process_dead(os.getpid(), tmp_path)
    assert not ours.exists()


def test_a_session_still_starting_is_listed_not_ready(demo_probe: probes.Probe) -> None:
    """While the first init runs the session is listed as starting, unhealthy, with no reasons."""
    table = guard.health.HealthTable()
    seen: list[tuple[bool, list[dict[str, Any]]]] = []

    table_starting: list[guard.SessionStatus] = []

    class Peek(guard.Listener):
        def on_init(self, session: str, rung: guard.Rung) -> None:
            seen.append(table.readiness())

        def on_status(self, session: str, status: guard.SessionStatus) -> None:
            if status.state is guard.State.STARTING:
                table_starting.append(status)

    s = guard.wrap(
        demo.demo_factory(threads=1), demo_probe, name="a", metrics=False, health=table,
        listeners=[Peek()], policy=guard.Policy(background=False),
    )  # fmt: skip
    ((ready, (entry,)),) = seen
    serving = "<GuardedSession 'a' serving on rung 'static' (0) after 1 attempt(s); PASSED"
    assert re.fullmatch(
        re.escape(serving) + r"( worst SNR \d+\.\d dB)?>", repr(s)
    )  # bit-exact: none
    (starting,) = table_starting
    assert starting.describe() == "starting on rung 'static' (0) after 0 attempt(s); no verdict"
    assert 0 < starting.since <= s.status.since
    assert ready is False
    assert (entry["state"], entry["healthy"], entry["reasons"], entry["rung"]) == (
        "starting",
        False,
        [],
        "static",
    )
    s.close()


def test_stuck_lists_sessions_failed_for_longer_than_the_bound() -> None:
    """stuck() names FAILED entries older than `after` seconds, never others or untimed ones."""
    from guard.health import stuck

    now = time.time()
    entries = [
        {"name": "old", "state": "failed", "since": now - 100},
        {"name": "new", "state": "failed", "since": now - 1},
        {"name": "up", "state": "serving", "since": now - 1000},
        {"name": "untimed", "state": "failed"},
    ]
    assert [e["name"] for e in stuck(entries, 50)] == ["old"]
    assert [e["name"] for e in stuck(entries, 0.5)] == ["old", "new"]


# ------------------------------------------------------------------ what callers and operators read


def test_exhaustion_names_the_session_and_numbers_every_attempt(demo_probe: probes.Probe) -> None:
    """RecoveryExhausted names the session, numbers each attempt; status shows the last one."""
    factory = Plan("turns", "noisy", "noisy", "noisy", "bad")
    s = plan_session(factory, demo_probe, FakeClock(), reinit_attempts=1)
    assert s.maintain(force_recheck=True) == ["recheck"]
    status = s.status
    assert [(a.rung.name, a.outcome.value) for a in status.history] == [
        ("static", "fail"),
        ("static", "fail"),
        ("dynamic", "fail"),
        ("dynamic", "fail"),
    ]
    last = status.history[-1].verdict
    assert last is not None and status.verdict is not None
    assert status.verdict.worst_snr_db == last.worst_snr_db < 1  # all zeros: 0 dB, not 29 dB
    assert (status.rung_index, status.mode) == (1, "dynamic")
    with pytest.raises(guard.RecoveryExhausted) as info:
        s.run({"mel": demo.demo_mel(8)})
    text = str(info.value)
    assert text.startswith("session 'p': every rung of the ladder failed its canary:\n  1. rung")
    assert "\n  2. rung 'static': fail" in text and "\n  4. rung 'dynamic': fail" in text
    assert "\n  5." not in text and len(info.value.attempts) == 4
    s.close()


def test_waiting_callers_are_told_to_try_again(demo_probe: probes.Probe) -> None:
    """A caller that waited wait_timeout for a replacement is told which setting bounded it."""
    gate = threading.Event()
    entered = threading.Event()

    def factory(**overrides: Any) -> Any:
        if factory.inits:  # type: ignore[attr-defined]
            entered.set()
            assert gate.wait(30)
        factory.inits += 1  # type: ignore[attr-defined]
        return FaultyFactory(
            demo.demo_factory(threads=1), fault=Fault.ZEROS, rate=1.0, affects="all",
            degrade_after=CANARY_FORWARDS,
        )(**overrides)  # fmt: skip

    factory.inits = 0  # type: ignore[attr-defined]
    s = plan_session(factory, demo_probe, FakeClock(), wait_timeout=0.2, promote_after=None)
    worker = threading.Thread(target=s.maintain, kwargs={"force_recheck": True})
    worker.start()
    assert entered.wait(30)
    with pytest.raises(guard.Unavailable) as info:
        s.run({"mel": demo.demo_mel(8)})
    gate.set()
    worker.join(30)
    assert str(info.value) == (
        "session 'p': no healthy module within 0.2 s while it was replacing "
        "(Policy.wait_timeout); try again later"
    )
    s.close()


def test_close_stops_the_maintenance_thread_at_once(demo_probe: probes.Probe) -> None:
    """close() wakes and ends the background thread: it returns well within its 5 s join."""
    s = guard.wrap(
        demo.demo_factory(threads=1), demo_probe, name="stop", metrics=False,
        policy=guard.Policy(recheck_every=30.0, promote_after=None),
    )  # fmt: skip
    (thread,) = [t for t in threading.enumerate() if t.name == "mnn-guard-stop"]
    assert thread.daemon  # a session never closed cannot keep the process from exiting
    started = time.monotonic()
    s.close()
    assert time.monotonic() - started < 2.0
    assert "mnn-guard-stop" not in [t.name for t in threading.enumerate()]


def test_a_failing_background_pass_is_logged_and_maintenance_goes_on(
    demo_probe: probes.Probe,
) -> None:
    """SystemExit from the factory in the maintenance thread is logged with the session's name."""
    import logging

    logged = threading.Event()
    messages: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info is not None:
                messages.append(record.getMessage())
                logged.set()

    handler = Catch()
    logging.getLogger("mnn_guard").addHandler(handler)
    try:
        s = guard.wrap(
            Plan("turns", "exit", "clean"), demo_probe, name="bg", metrics=False,
            policy=guard.Policy(recheck_every=2, promote_after=None, reinit_attempts=0),
        )  # fmt: skip
        x = demo.demo_mel(4)
        for _ in range(2):
            s.run({"mel": x})
        assert logged.wait(10)
        s.close()
    finally:
        logging.getLogger("mnn_guard").removeHandler(handler)
    assert messages == ["session bg: maintenance failed"]


def test_input_errors_name_the_input_and_only_what_is_wrong() -> None:
    """Input errors name the offending input (its `input` attribute) and only what is wrong."""
    specs = [signature.InputSpec(name="mel", dtype="float32", shape=(1, 4))]
    x = np.zeros((1, 4), np.float32)
    cases: list[tuple[Any, str, str | None]] = [
        (
            {"mel": x, "pitch": x},
            "unknown input(s) ['pitch']; the model takes ['mel']",
            "pitch",
        ),
        ({}, "missing input(s) ['mel']; the model takes ['mel']", "mel"),
        (x, "inputs must be a dict by input name or a list in input order ['mel'], got ndarray",
         None),
        ("mel", "inputs must be a dict by input name or a list in input order ['mel'], got str",
         None),
    ]  # fmt: skip
    for inputs, message, name in cases:
        with pytest.raises(guard.InputMismatch) as info:
            guard.inputs.InputChecker(specs)(inputs)
        assert (str(info.value), info.value.input) == (message, name)
    with pytest.raises(guard.InputMismatch, match="4 NaN/Inf values"):
        guard.inputs.prepare_inputs(specs, {"mel": np.full((1, 4), np.nan, np.float32)})


def test_refusing_an_overflowing_input_warns_nothing() -> None:
    """A float64 input beyond float32 is refused quietly: no RuntimeWarning from the cast."""
    import warnings

    checker = guard.inputs.InputChecker(
        [signature.InputSpec(name="x", dtype="float32", shape=(2,))]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(guard.InputMismatch, match="float64 values overflow float32"):
            checker({"x": np.array([1.0, 1e300])})


def test_the_same_buckets_may_be_passed_again(
    demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """A second session passing the registry's own buckets again is accepted."""
    buckets = guard.metrics.Buckets(run=(0.001, 0.01))
    for name in ("a", "b"):
        guard.wrap(
            demo.demo_factory(threads=1), demo_probe, name=name, registry=registry,
            buckets=buckets, policy=guard.Policy(background=False),
        ).close()  # fmt: skip
    assert guard.metrics.metrics_for(registry).buckets == buckets
    with pytest.raises(guard.ConfigError) as info:
        guard.metrics.metrics_for(registry, guard.metrics.Buckets(run=(0.5,)))
    assert str(info.value).endswith("; buckets are set once per registry, by its first session")


def test_sessions_report_to_the_global_registry_by_default(demo_probe: probes.Probe) -> None:
    """Without a registry, series go to the global REGISTRY and leave it at close."""
    from prometheus_client import REGISTRY

    assert guard.metrics.metrics_for() is guard.metrics.metrics_for(REGISTRY)
    s = guard.wrap(
        demo.demo_factory(threads=1), demo_probe, name="global-16",
        policy=guard.Policy(background=False),
    )  # fmt: skip
    assert REGISTRY.get_sample_value("mnn_guard_healthy", {"session": "global-16"}) == 1.0
    s.close()
    assert REGISTRY.get_sample_value("mnn_guard_healthy", {"session": "global-16"}) is None


FAMILIES = {
    "mnn_guard_session_info": "1 per guarded session: versions and the model file's sha256.",
    "mnn_guard_inits": "Module initialisations (factory calls).",
    "mnn_guard_canary_checks": "Canary judgements by result (pass, fail, error, timeout).",
    "mnn_guard_recoveries": "Recovery actions (reinit, fallback, promote).",
    "mnn_guard_runs": "run() calls by result (ok, error, invalid, unavailable, failed, closed).",
    "mnn_guard_healthy": "1 while the session serves a module whose canary passed.",
    "mnn_guard_rung": "1 for the rung the session is on, 0 for its other rungs.",
    "mnn_guard_state": "1 for the session's state, 0 for the others.",
    "mnn_guard_rung_loaded_static": (
        "1 when the rung asked for dynamic=True and MNN loaded it statically (the model has "
        "control flow): that rung is no real fallback."
    ),
    "mnn_guard_canary_snr_db": "Worst SNR of the last canary judgement, in dB.",
    "mnn_guard_init_seconds": "Init + canary time.",
    "mnn_guard_run_seconds": "run() time.",
}


def test_every_family_says_what_it_counts(registry: CollectorRegistry) -> None:
    """The HELP line of each mnn_guard family, as dashboards and docs/ops.md quote it."""
    guard.metrics.metrics_for(registry)
    helps = {m.name: m.documentation for m in registry.collect()}
    assert helps == FAMILIES


def test_lowercase_multiprocess_variable_counts_too(
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
) -> None:
    """Lowercase prometheus_multiproc_dir counts too: closing leaves NaN gauges, info included."""
    s = plan_session(Plan("clean"), demo_probe, FakeClock(), registry=registry)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setenv("prometheus_multiproc_dir", str(tmp_path))
    s.close()
    (info,) = [
        x.value
        for m in registry.collect()
        for x in m.samples
        if x.name == "mnn_guard_session_info" and x.labels["session"] == "p"
    ]
    assert math.isnan(info) and math.isnan(sample(registry, "mnn_guard_healthy"))


def test_mnns_own_words_on_a_failed_canary_forward_are_kept(
    converted: dict[str, Any], tmp_path: Any
) -> None:
    """A build that returns no output on the canary's input: the attempt carries what MNN said."""
    factory = guard.mnn_factory(converted["stride32"], ["image"], ["mask"], threads=1)
    image = np.random.default_rng(2).standard_normal((1, 1, 64, 96)).astype(np.float32)
    probe = probes.record(factory, {"image": image}, model=converted["stride64"])
    s = guard.wrap(
        guard.mnn_factory(converted["stride64"], ["image"], ["mask"], threads=1), probe,
        name="cells", metrics=False, raise_exhausted=False,
        policy=guard.Policy(background=False, reinit_attempts=0, ladder=(guard.STATIC,)),
    )  # fmt: skip
    (attempt,) = s.status.history
    assert any(n.startswith("MNN on a canary forward: Broad cast error") for n in attempt.notes)
    s.close()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_float16_inputs_are_checked_value_by_value_when_their_sum_overflows() -> None:
    """float16 inputs: finite values whose sum overflows pass; an inf or NaN is refused."""
    spec = signature.InputSpec(name="h", dtype="float16", shape=(2, 3))
    checker = guard.inputs.InputChecker([spec])
    loud = np.array([[6e4, 6e4, -1.0], [1.0, 2.0, 3.0]], np.float16)
    (out,) = checker({"h": loud})
    assert out is loud
    for bad in (
        np.array([[np.inf, 1, 2], [1, 2, 3]], np.float16),
        np.array([[1, 2, 3], [1, np.nan, 2]], np.float16),
    ):
        with pytest.raises(guard.InputMismatch, match="input 'h': 1 NaN/Inf values"):
            checker({"h": bad})


def test_every_series_of_a_new_session_and_nothing_else(
    demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """After one clean init: every series of the session with its value, and no other's."""
    s = plan_session(Plan("clean"), demo_probe, FakeClock(), registry=registry)
    got = {
        (x.name, tuple(sorted((k, v) for k, v in x.labels.items() if k != "session"))): x.value
        for m in registry.collect()
        for x in m.samples
        if not x.name.endswith(("_created", "_bucket", "_sum"))
        and x.name != "mnn_guard_session_info"
    }
    assert {x.labels["session"] for m in registry.collect() for x in m.samples} == {"p"}
    want: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for rung in ("static", "dynamic"):
        up = float(rung == "static")
        want[("mnn_guard_inits_total", (("rung", rung),))] = up
        want[("mnn_guard_rung", (("rung", rung),))] = up
        want[("mnn_guard_rung_loaded_static", (("rung", rung),))] = 0.0
        want[("mnn_guard_init_seconds_count", (("rung", rung),))] = up
        want[("mnn_guard_run_seconds_count", (("rung", rung),))] = 0.0
        for result in ("pass", "fail", "error", "timeout"):
            key = ("mnn_guard_canary_checks_total", (("result", result), ("rung", rung)))
            want[key] = float(up and result == "pass")
        for call in ("ok", "error", "invalid", "unavailable", "failed", "closed"):
            want[("mnn_guard_runs_total", (("result", call), ("rung", rung)))] = 0.0
    for action in ("reinit", "fallback", "promote"):
        want[("mnn_guard_recoveries_total", (("action", action),))] = 0.0
    for state in guard.State:
        want[("mnn_guard_state", (("state", state.value),))] = float(state is guard.State.SERVING)
    want[("mnn_guard_healthy", ())] = 1.0
    snr = s.status.verdict.worst_snr_db if s.status.verdict is not None else None
    want[("mnn_guard_canary_snr_db", ())] = snr  # type: ignore[assignment]
    assert got == want
    (info,) = [
        x for m in registry.collect() for x in m.samples if x.name == "mnn_guard_session_info"
    ]
    assert info.value == 1.0
    s.close()


def test_a_dynamic_rung_mnn_loads_statically_is_flagged(
    converted: dict[str, Any], registry: CollectorRegistry
) -> None:
    """rung_loaded_static is 1 for a control-flow model's dynamic rung only."""
    import warnings

    from test_real_models import cf_factory, cf_inputs

    probe = probes.record(cf_factory(converted), cf_inputs())
    faulty = FaultyFactory(cf_factory(converted), fault=Fault.RAISE, schedule=[True])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", guard.mnn.DynamicIgnoredWarning)
        s = guard.wrap(
            faulty, probe, name="p", registry=registry,
            policy=guard.Policy(background=False, reinit_attempts=0),
        )  # fmt: skip
    assert [a.outcome.value for a in s.status.history] == ["error", "pass"]
    loaded = {
        r: sample(registry, "mnn_guard_rung_loaded_static", rung=r) for r in ("static", "dynamic")
    }
    assert loaded == {"static": 0.0, "dynamic": 1.0}
    assert any(mnn.STATIC_LOAD_NOTE in n for n in s.status.history[-1].notes)
    said = s.status.describe()
    assert said.startswith(f"serving on rung 'dynamic' (1) [{guard.ladder.STATIC_LOAD}] after 2 ")
    s.close()


# ------------------------------------------------------------------ maintenance, in detail


class Counting:
    """A real demo-vocoder module that counts its forwards and how many ran at once; `hook`
    runs inside each forward with the forward's number."""

    def __init__(self, hook: Callable[[int], None] = lambda n: None, **kw: Any) -> None:
        self.runner = mnn.adapt(demo.demo_factory(threads=1)(**kw))
        self.hook = hook
        self.forwards = 0
        self.inside = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def run(self, arrays: Sequence[Array]) -> list[Array]:
        """Run the real module, counting."""
        with self._lock:
            self.forwards += 1
            self.inside += 1
            self.most_at_once = max(self.most_at_once, self.inside)
            number = self.forwards
        try:
            self.hook(number)
            return self.runner.run(arrays)
        finally:
            with self._lock:
                self.inside -= 1


class Checks(guard.Listener):
    """Keeps every re-check's Attempt."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []

    def on_check(self, session: str, attempt: Attempt) -> None:
        self.attempts.append(attempt)


def test_a_failing_recheck_stops_at_its_first_failing_judgement(demo_probe: probes.Probe) -> None:
    """A failing re-check stops at its first failing forward; its event says what it judged."""
    modules: list[Any] = []
    faulty = FaultyFactory(
        lambda **kw: modules.append(Counting(**kw)) or modules[-1],
        fault=Fault.NOISE, schedule=[True], affects="all", degrade_after=CANARY_FORWARDS,
    )  # fmt: skip
    checks = Checks()
    s = plan_session(faulty, demo_probe, FakeClock(), listeners=[checks])
    assert s.maintain(force_recheck=True) == ["recheck"]
    assert modules[0].forwards == CANARY_FORWARDS + 1
    (check,) = checks.attempts
    assert (check.rung.name, check.rung_index, check.outcome, check.error) == (
        "static",
        0,
        guard.ladder.Outcome.FAIL,
        None,
    )
    assert check.verdict is not None and not check.verdict.passed
    assert check.verdict.reasons[0].startswith("canary run 1 case 0: output 'wav': snr_db")
    assert not any("canary runs failed" in r for r in check.verdict.reasons)  # one judgement
    assert sorted(check.outputs) == [0] and 0 < check.seconds < 30
    s.close()


def test_a_recheck_that_raises_is_an_error_and_the_module_is_replaced(
    demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """A re-check whose forward raises is an error (no verdict, SNR -inf); it is replaced."""
    calls = [0]

    def factory(**kw: Any) -> Turning:
        calls[0] += 1
        return Turning(raising, after=CANARY_FORWARDS if calls[0] == 1 else 10**9, **kw)

    checks = Checks()
    gauges = GaugeAtEvent(registry)
    s = plan_session(
        factory, demo_probe, FakeClock(), registry=registry, listeners=[checks, gauges]
    )
    assert s.maintain(force_recheck=True) == ["recheck"]
    assert gauges.seen[-2] == ("check", "error", None, -math.inf)
    (check,) = checks.attempts
    assert (check.outcome, check.verdict, check.rung_index) == (guard.ladder.Outcome.ERROR, None, 0)
    assert isinstance(check.error, RuntimeError) and check.outputs == {}
    assert sample(registry, "mnn_guard_canary_checks_total", rung="static", result="error") == 1
    assert (s.status.state, calls[0]) == (guard.State.SERVING, 2)
    assert s.maintain(force_recheck=True) == ["recheck"]
    assert checks.attempts[-1].passed and checks.attempts[-1].error is None
    assert checks.attempts[-1].outputs == {}
    s.close()


def test_a_recheck_interrupted_by_systemexit_leaves_failed(demo_probe: probes.Probe) -> None:
    """SystemExit in a re-check: maintain() re-raises it, FAILED, callers told why, chained."""

    def exiting(outputs: list[Array]) -> list[Array]:
        raise SystemExit(3)

    s = plan_session(
        lambda **kw: Turning(exiting, after=CANARY_FORWARDS, **kw), demo_probe, FakeClock()
    )
    with pytest.raises(SystemExit):
        s.maintain(force_recheck=True)
    assert (s.status.state, s.status.attempts) == (guard.State.FAILED, 0)
    with pytest.raises(guard.RecoveryExhausted) as info:
        s.run({"mel": demo.demo_mel(8)})
    assert str(info.value) == "session 'p': a re-check was interrupted by SystemExit: 3:\n  "
    assert isinstance(info.value.__cause__, SystemExit)
    s.close()


def test_a_recheck_holds_the_module_one_forward_at_a_time(demo_probe: probes.Probe) -> None:
    """A caller's forward waits for a re-check's forward: never two forwards at once."""
    caller_waiting = threading.Event()
    modules: list[Counting] = []

    def hold(number: int) -> None:
        if number == CANARY_FORWARDS + 1:  # the re-check's first forward
            caller_waiting.wait(0.5)  # a caller that could enter would do so now

    s = plan_session(
        lambda **kw: modules.append(Counting(hold, **kw)) or modules[-1],
        demo_probe, FakeClock(),
    )  # fmt: skip
    x = demo.demo_mel(4)

    def caller() -> None:
        while modules[0].forwards < CANARY_FORWARDS + 1:
            time.sleep(0.001)
        caller_waiting.set()
        s.run({"mel": x})

    thread = threading.Thread(target=caller)
    thread.start()
    assert s.maintain(force_recheck=True) == ["recheck"]
    thread.join(30)
    assert modules[0].most_at_once == 1
    assert modules[0].forwards == 2 * CANARY_FORWARDS + 1
    s.close()


def test_a_second_maintenance_pass_during_one_does_nothing(demo_probe: probes.Probe) -> None:
    """maintain() while another pass builds a promotion returns [] at once (no second pass)."""
    building = threading.Event()
    release = threading.Event()
    plan = Plan("bad", "clean")

    def factory(**kw: Any) -> Any:
        if plan.inits == 2:  # the promotion's init
            building.set()
            assert release.wait(30)
        return plan(**kw)

    clock = FakeClock()
    s = plan_session(factory, demo_probe, clock)
    clock.advance(301)
    done: list[Any] = []
    first = threading.Thread(target=lambda: done.append(s.maintain()))
    first.start()
    assert building.wait(30)
    assert s.maintain(force_recheck=True) == []
    release.set()
    first.join(30)
    assert done == [[Action.PROMOTE]]
    s.close()


def test_promotion_is_due_at_exactly_promote_after(demo_probe: probes.Probe) -> None:
    """promote_after seconds to the tick after a fallback, the promotion runs."""
    clock = FakeClock()
    s = plan_session(Plan("bad", "clean"), demo_probe, clock)
    clock.advance(299.5)
    assert s.maintain() == []
    clock.advance(0.5)
    assert s.maintain() == [Action.PROMOTE]
    s.close()


def test_a_pass_rechecks_and_then_promotes(demo_probe: probes.Probe) -> None:
    """A re-check and a promotion both due: one pass does both, the passing re-check first."""
    clock = FakeClock()
    s = plan_session(Plan("bad", "clean"), demo_probe, clock, recheck_every=60.0)
    clock.advance(301)
    assert s.maintain() == ["recheck", Action.PROMOTE]
    assert s.status.mode == "static"
    s.close()


def test_work_finishing_after_close_changes_nothing(demo_probe: probes.Probe) -> None:
    """A promotion whose init finishes after close() installs nothing and reports nothing."""
    plan = Plan("bad", "clean")
    holder: list[guard.GuardedSession] = []

    def factory(**kw: Any) -> Any:
        if plan.inits == 2:
            holder[0].close()
        return plan(**kw)

    clock = FakeClock()
    s = plan_session(factory, demo_probe, clock)
    holder.append(s)
    clock.advance(301)
    assert s.maintain() == []
    assert s.status.state is guard.State.CLOSED and plan.inits == 3
    with pytest.raises(guard.errors.SessionClosed):
        s.run({"mel": demo.demo_mel(8)})


def test_run_seconds_are_the_calls_own(
    demo_probe: probes.Probe, registry: CollectorRegistry, mel: Array
) -> None:
    """run_seconds observes each call's own duration (milliseconds here, not the clock's time)."""
    s = plan_session(Plan("clean"), demo_probe, FakeClock(), registry=registry)
    for _ in range(3):
        s.run({"mel": mel})
    total = sample(registry, "mnn_guard_run_seconds_sum", rung="static")
    assert 0 < total < 5
    assert sample(registry, "mnn_guard_run_seconds_bucket", rung="static", le="5.0") == 3
    s.close()


def test_forgetting_a_dead_process_removes_its_files(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mark_process_dead drops a pid's health and live gauge files; none to drop is no error."""
    from guard import health

    gone = dead_pid()
    files = [tmp_path / f"mnn_guard_health_{gone}.json", tmp_path / f"gauge_liveall_{gone}.db"]
    for f in files:
        f.write_text("{}")
    kept = tmp_path / f"counter_{gone}.db"
    kept.write_text("")
    health.mark_process_dead(gone, tmp_path)
    assert [f.exists() for f in (*files, kept)] == [False, False, True]
    health.mark_process_dead(gone, tmp_path)  # nothing left to remove
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    health.mark_process_dead(gone)  # no folder: nothing to do
    files[0].write_text("{}")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    health.mark_process_dead(gone)
    assert not files[0].exists()


def test_forgetting_an_unknown_session_is_no_error() -> None:
    """HealthTable.forget of a name it never had, with or without an owner, changes nothing."""
    table = guard.health.HealthTable()
    table.forget("nobody")
    table.forget("nobody", owner=object())
    assert table.sessions() == {} and table.readiness() == (False, [])


def test_a_listener_made_alone_starts_every_gauge_at_zero(registry: CollectorRegistry) -> None:
    """A PrometheusListener made by hand, before any event: healthy, rung and state read 0."""
    listener = guard.metrics.PrometheusListener("solo", guard.Policy().ladder, registry=registry)
    assert listener.session == "solo"
    gauges = [
        sample(registry, "mnn_guard_healthy", session="solo"),
        *(
            sample(registry, "mnn_guard_rung", session="solo", rung=r)
            for r in ("static", "dynamic")
        ),
        *(sample(registry, "mnn_guard_state", session="solo", state=x.value) for x in guard.State),
    ]
    assert gauges == [0.0] * 9


def test_buckets_reach_the_histograms_and_must_be_positive(
    demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """Custom bounds are the histograms' le labels (run and init); a bound of 0 is refused."""
    with pytest.raises(guard.ConfigError, match=r"Buckets\.init"):
        guard.metrics.Buckets(init=(0.0, 1.0))
    buckets = guard.metrics.Buckets(run=(0.001, 0.01), init=(0.5, 600.0))
    guard.wrap(
        demo.demo_factory(threads=1), demo_probe, name="b", registry=registry, buckets=buckets,
        policy=guard.Policy(background=False),
    ).close()  # fmt: skip
    guard.metrics.PrometheusListener("h", guard.Policy().ladder, registry=registry)
    bounds = {
        name: sorted(
            float(x.labels["le"])
            for m in registry.collect()
            for x in m.samples
            if x.name == f"{name}_bucket"
            and x.labels["session"] == "h"
            and x.labels["rung"] == "static"
        )
        for name in ("mnn_guard_run_seconds", "mnn_guard_init_seconds")
    }
    assert bounds == {
        "mnn_guard_run_seconds": [0.001, 0.01, math.inf],
        "mnn_guard_init_seconds": [0.5, 600.0, math.inf],
    }


def test_an_init_canary_judges_every_forward_even_after_a_failure(
    demo_probe: probes.Probe,
) -> None:
    """A module degraded from the start fails all four canary judgements, and says so."""
    s = plan_session(Plan("noisy", "clean"), demo_probe, FakeClock(), reinit_attempts=1)
    first = s.status.history[0].verdict
    assert first is not None and "4 of 4 canary runs failed" in first.reasons
    s.close()


def test_what_mnn_said_while_loading_stays_with_a_canary_that_raised(
    converted: dict[str, Any],
) -> None:
    """A canary forward that raises keeps its error and what MNN printed while loading."""
    import warnings

    from test_real_models import cf_factory, cf_inputs

    class Raising:
        def __init__(self, module: Any) -> None:
            self.runner = mnn.adapt(module)

        def run(self, arrays: Sequence[Array]) -> list[Array]:
            raise RuntimeError("injected forward failure")

    class RaisingFactory(mnn.Loader):  # passes the real factory's report of the load on
        def load(self, **kw: Any) -> tuple[Any, mnn.LoadReport]:
            module, report = cf_factory(converted).load(**kw)
            return Raising(module), report

    probe = probes.record(cf_factory(converted), cf_inputs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", guard.mnn.DynamicIgnoredWarning)
        s = guard.wrap(
            RaisingFactory(), probe, name="p", metrics=False,
            raise_exhausted=False,
            policy=guard.Policy(background=False, reinit_attempts=0, ladder=(guard.DYNAMIC,)),
        )  # fmt: skip
    (attempt,) = s.status.history
    assert isinstance(attempt.error, RuntimeError)
    assert str(attempt.error) == "injected forward failure"
    assert (attempt.turned_static, attempt.outputs) == (False, {})
    assert any(n.startswith("MNN while loading: ") for n in attempt.error.__notes__)
    assert any(mnn.STATIC_LOAD_NOTE in n for n in attempt.notes)
    s.close()


def test_a_probe_its_goldens_fail_names_every_reason(demo_probe: probes.Probe) -> None:
    """Thresholds no golden meets: ConfigError before any init, listing each output's reason."""
    two = probes.Probe(
        cases=(
            probes.Case(
                inputs={"x": np.zeros(2, np.float32)}, outputs={"a": np.ones(2), "b": np.ones(2)}
            ),
        ),
        inputs=(signature.InputSpec(name="x", dtype="float32", shape=(2,)),),
        outputs=(
            signature.OutputSpec(name="a", dtype="float64", shape=(2,)),
            signature.OutputSpec(name="b", dtype="float64", shape=(2,)),
        ),
        thresholds=probes.Thresholds(min_cosine=1.5),
    )
    with pytest.raises(guard.ConfigError) as info:
        guard.wrap(lambda **kw: None, two, name="p", metrics=False)
    assert str(info.value) == (
        "case 0's golden outputs fail the probe's own thresholds (output 'a': cosine 1 is below "
        "the limit 1.5; output 'b': cosine 1 is below the limit 1.5); loosen the thresholds or "
        "re-record the probe"
    )
    with pytest.raises(guard.errors.FactoryError, match=r"^factory must be callable, got int$"):
        guard.wrap(42, demo_probe, name="p", metrics=False)  # type: ignore[arg-type]


def test_a_session_made_directly_raises_when_every_rung_fails(demo_probe: probes.Probe) -> None:
    """GuardedSession itself raises RecoveryExhausted by default, as guard.wrap does."""
    with pytest.raises(guard.RecoveryExhausted):
        guard.GuardedSession(
            Plan("bad"), demo_probe, name="p",
            policy=guard.Policy(background=False, reinit_attempts=0),
        )  # fmt: skip


def test_status_says_since_when_in_wall_clock_time(demo_probe: probes.Probe) -> None:
    """status.since is the wall-clock time the session entered its state (what stuck() reads)."""
    before = time.time()
    s = plan_session(Plan("clean"), demo_probe, FakeClock())
    assert before <= s.status.since <= time.time()
    s.close()


def test_a_failed_recheck_on_a_slower_rung_retries_that_rung_first(
    demo_probe: probes.Probe,
) -> None:
    """On the dynamic rung, a failing re-check re-initialises dynamic, not the faster static."""
    listener = CapturingListener()
    factory = Plan("bad", "turns", "clean")
    s = plan_session(factory, demo_probe, FakeClock(), listeners=[listener], promote_after=None)
    assert s.status.mode == "dynamic"
    assert s.maintain(force_recheck=True) == ["recheck"]
    assert (s.status.mode, factory.inits) == ("dynamic", 3)
    recovered = [(e.action, e.rung, e.to_rung) for e in listener.of("recover")]
    assert recovered == [("fallback", "static", "dynamic"), ("reinit", "dynamic", "dynamic")]
    s.close()


def test_judging_extreme_values_warns_nothing() -> None:
    """Overflowing squares, inf minus inf, empty arrays: judged quietly, with exact reasons."""
    import warnings

    huge = np.array([1e200, 1.0, -1.7e308, np.inf])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(measures.cosine_similarity(huge[:2], huge[:2] * 2), float)  # squares inf
        assert not judges.max_abs(1.0)(huge, -huge).passed
        assert not judges.max_abs(1.0)(huge[3:], huge[3:]).passed  # inf - inf is NaN
        empty = judges.judge_output("y", np.zeros(0), np.zeros(0), probes.Thresholds(max_abs=1.0))
        assert empty.passed and empty.values["max_abs"] == 0.0
    check = judges.finite()(np.zeros(4), np.array([1.0, np.nan, np.inf, 2.0]))
    assert (check.passed, check.value, check.reason) == (False, 2.0, "2 of 4 values are NaN or Inf")


def two_outputs() -> probes.Probe:
    """A one-case probe with outputs a and b (64 samples each)."""
    rng = np.random.default_rng(3)
    return probes.Probe(
        cases=(
            probes.Case(
                inputs={"x": np.zeros(2, np.float32)},
                outputs={"a": rng.standard_normal(64), "b": rng.standard_normal(64)},
            ),
        ),
        inputs=(signature.InputSpec(name="x", dtype="float32", shape=(2,)),),
        outputs=(
            signature.OutputSpec(name="a", dtype="float64", shape=(64,)),
            signature.OutputSpec(name="b", dtype="float64", shape=(64,)),
        ),
    )


def test_judging_goes_on_past_a_missing_output() -> None:
    """A missing output is a reason and the next is still judged; a wrong count names both."""
    probe = two_outputs()
    golden = probe.cases[0].outputs
    verdict = probe.judge({"b": golden["b"]})
    assert verdict.passed is False and verdict.reasons == ("output 'a' is missing",)
    assert list(verdict.scores) == ["b"] and verdict.scores["b"].passed
    listed = probe.judge([golden["a"]])
    assert listed.reasons == ("got 1 outputs, expected 2 ['a', 'b']",)


def test_verdict_merge_counts_failures_from_two_runs_and_matches_labels(
    demo_probe: probes.Probe,
) -> None:
    """Two runs, one failing: counted, False itself, reasons joined by '; '; labels match 1:1."""
    golden = demo_probe.cases[0].outputs["wav"]
    good = demo_probe.judge({"wav": golden})
    bad = demo_probe.judge({"wav": scaled_noise(golden, 30.0).astype(np.float32)})
    merged = probes.Verdict.merge([good, bad], ["a", "b"])
    assert merged.passed is False
    assert merged.reasons[-1] == "1 of 2 canary runs failed"
    assert "; b: output 'wav': cosine" in merged.describe()
    with pytest.raises(ValueError, match="zip"):
        probes.Verdict.merge([good, bad], ["a"])


def test_scores_say_what_was_measured_on_every_path() -> None:
    """Each way judge_output ends fills the score's fields as documented (NaN where unmeasured)."""
    golden = np.ones((1, 4))

    def fields(score: judges.OutputScore) -> tuple[Any, ...]:
        unmeasured = [
            math.isnan(x) for x in (score.snr_db, score.values["cosine"], score.values["max_abs"])
        ]
        checks = [(c.judge, c.passed) for c in score.checks]
        head = (score.name, score.passed, score.shape_ok, score.finite, unmeasured)
        return (*head, score.values["lsd_db"], checks, score.checks[0].reason)

    limits = probes.Thresholds()
    assert fields(judges.judge_output("y", golden, np.ones((4, 1)), limits)) == (
        "y", False, False, False, [True] * 3, None, [("shape", False)],
        "shape [4, 1] differs from the golden shape [1, 4]",
    )  # fmt: skip
    assert fields(judges.judge_output("y", golden, golden.astype(np.complex64), limits)) == (
        "y", False, True, False, [True] * 3, None, [("dtype", False)],
        "dtype complex64 is not a real number type",
    )  # fmt: skip
    assert fields(judges.judge_output("y", golden, golden * np.nan, limits)) == (
        "y", False, True, False, [True] * 3, None, [("finite", False)],
        "4 of 4 values are NaN or Inf",
    )  # fmt: skip
    same = judges.judge_output("y", golden, golden.copy(), limits)
    measured = (same.values["max_abs"], same.values["cosine"])
    assert (same.passed, same.shape_ok, same.finite, *measured) == (
        True, True, True, 0.0, 1.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"min_snr_db": math.nan}, "threshold min_snr_db must be a finite number, got nan"),
        (
            {"min_cosine": "0.9"},
            "threshold min_cosine must be a finite number or None, got '0.9'",
        ),
        ({"max_abs": True}, "threshold max_abs must be a finite number or None, got True"),
    ],
)
def test_threshold_errors_say_what_is_allowed(limits: dict[str, Any], message: str) -> None:
    """Only min_snr_db cannot be None: the message says so, and quotes the value given."""
    with pytest.raises(probes.ProbeError) as info:
        probes.Thresholds(**limits)
    assert str(info.value) == message


def test_cosine_stays_within_minus_one_and_one() -> None:
    """Rounding never lifts a cosine above 1; opposite signals that overflow are NaN, not 1."""
    rng = np.random.default_rng(0)
    values = [measures.cosine_similarity(g, g * 3.0) for g in rng.standard_normal((50, 16))]
    assert max(values) == 1.0 and min(values) > 0.999999
    assert min(measures.cosine_similarity(g, g * -3.0) for g in rng.standard_normal((50, 16))) == -1
    assert math.isnan(measures.cosine_similarity(np.array([1e200, 1.0]), np.array([-1e200, 1.0])))


def test_snr_and_lsd_of_extreme_signals_warn_nothing() -> None:
    """Squares that overflow, inf against inf, loud or silent signals: judged without warnings."""
    import warnings

    loud = tone().ravel() * 1e300
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert measures.snr_db(np.array([1e200, 1.0]), np.array([-1e200, 1.0])) == -math.inf
        assert math.isnan(measures.snr_db(np.array([np.inf, 1.0]), np.array([np.inf, 1.0])))
        for golden, actual in ((loud, loud * 0.5), (np.zeros(512), tone(512).ravel())):
            assert isinstance(measures.log_spectral_distance(golden, actual), float)


# ------------------------------------------------------------------ probe files


def saved(probe: probes.Probe, folder: Any) -> dict[str, Any]:
    """Save `probe` into `folder` and return its manifest as JSON."""
    import json

    probe.save(folder)
    manifest: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
    return manifest


def test_saved_files_are_canonical(demo_probe: probes.Probe, tmp_path: Any) -> None:
    """manifest.json is indented, key-sorted JSON; arrays.npz does not depend on array layout."""
    import json

    manifest = saved(demo_probe, tmp_path / "c")
    text = (tmp_path / "c" / "manifest.json").read_text()
    assert text == json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    fortran = dataclasses_replace_cases(demo_probe, np.asfortranarray)
    saved(fortran, tmp_path / "f")
    assert (tmp_path / "f" / "arrays.npz").read_bytes() == (
        tmp_path / "c" / "arrays.npz"
    ).read_bytes()


def dataclasses_replace_cases(probe: probes.Probe, how: Callable[[Array], Array]) -> probes.Probe:
    """`probe` with every case array passed through `how`."""
    import dataclasses

    cases = tuple(
        probes.Case(
            inputs={k: how(v) for k, v in c.inputs.items()},
            outputs={k: how(v) for k, v in c.outputs.items()},
        )
        for c in probe.cases
    )
    return dataclasses.replace(probe, cases=cases)


def write_manifest(folder: Any, text: str) -> None:
    """Replace a saved probe's manifest.json with `text`."""
    (folder / "manifest.json").write_text(text)


def test_manifest_limits_are_inclusive_and_messages_exact(
    demo_probe: probes.Probe, tmp_path: Any
) -> None:
    """A manifest of exactly the size limit is read; each malformed one has its own message."""
    import json

    from probes import store

    folder = tmp_path / "p"
    manifest = saved(demo_probe, folder)
    body = json.dumps({"kind": "other", "pad": ""})
    pad = "x" * (store.MAX_MANIFEST_BYTES - len(body))
    write_manifest(folder, json.dumps({"kind": "other", "pad": pad}))
    assert (folder / "manifest.json").stat().st_size == store.MAX_MANIFEST_BYTES
    with pytest.raises(probes.ProbeError, match="is not an mnn-guard probe manifest"):
        probes.load(folder)
    cases: list[tuple[Any, str]] = [
        ({**manifest, "recorded": {**manifest["recorded"], "runs": 10**17}},
         "'recorded.runs' must be an integer in 0..10000, got 100000000000000000"),
        ("[" * 100_000, "manifest.json is nested too deeply to be a probe manifest"),
        ([], "manifest.json must hold a JSON object, got list"),
        ({**manifest, "arrays": "x"}, "'arrays' must be {'file': 'arrays.npz', 'sha256': 64 hex "
         "digits}, got 'x'"),
        ({**manifest, "arrays": {**manifest["arrays"], "extra": 1}}, "'arrays' must be"),
    ]  # fmt: skip
    for value, message in cases:
        write_manifest(folder, value if isinstance(value, str) else json.dumps(value))
        with pytest.raises(probes.ProbeError) as info:
            probes.load(folder)
        assert message in str(info.value), str(info.value)
    assert not store.is_sha256("X" * 64) and store.is_sha256("ab" * 32)


def test_a_probe_refuses_what_it_cannot_judge_with_exact_reasons() -> None:
    """Probe(...) refuses each malformed probe with a message naming what is wrong."""
    spec = signature.InputSpec(name="x", dtype="float32", shape=(2,))
    out = signature.OutputSpec(name="y", dtype="float64", shape=(2,))
    x, y = np.zeros(2, np.float32), np.ones(2)

    def make(**kw: Any) -> Any:
        args: dict[str, Any] = {
            "cases": (probes.Case(inputs={"x": x}, outputs={"y": y}),),
            "inputs": (spec,),
            "outputs": (out,),
            **kw,
        }
        return probes.Probe(**args)

    cases: list[tuple[dict[str, Any], str]] = [
        ({"cases": ()}, "a probe needs at least one canary case"),
        ({"per_output": {"z": probes.Thresholds()}},
         "per-output thresholds for unknown outputs ['z']; outputs are ['y']"),
        ({"cases": (probes.Case(inputs={"w": x}, outputs={"y": y}),)},
         "case 0: inputs ['w'] differ from the signature ['x']"),
        ({"cases": (probes.Case(inputs={"x": x}, outputs={"z": y}),)},
         "case 0: outputs ['z'] differ from ['y']"),
        ({"cases": (probes.Case(inputs={"x": np.zeros(3, np.float32)}, outputs={"y": y}),)},
         "case 0: input 'x' is float32[3], which the signature float32[2] does not accept"),
        ({"cases": (probes.Case(inputs={"x": x.astype(np.float64)}, outputs={"y": y}),)},
         "case 0: input 'x' is float64[2], which the signature float32[2] does not accept"),
        ({"cases": (probes.Case(inputs={"x": x}, outputs={"y": [1.0, 2.0]}),)},
         "case 0: golden output 'y' is a list of None, not an array of one of"),
    ]  # fmt: skip
    assert make().output_names == ["y"]
    for kw, message in cases:
        with pytest.raises(probes.ProbeError) as info:
            make(**kw)
        assert str(info.value).startswith(message), str(info.value)


def test_manifest_fields_at_their_limits(demo_probe: probes.Probe, tmp_path: Any) -> None:
    """runs 0 and 10,000 and a 1,000-character note load; one more is refused, with its reason."""
    import dataclasses

    for runs, note, ok in ((0, "n" * 1000, True), (10_000, "", True), (10_001, "", False)):
        meta = dataclasses.replace(demo_probe.meta, runs=runs, notes=(note,))
        folder = tmp_path / f"r{runs}"
        dataclasses.replace(demo_probe, meta=meta).save(folder)
        if ok:
            assert probes.load(folder).meta.runs == runs
        else:
            with pytest.raises(probes.ProbeError, match=r"'recorded.runs' must be an integer in"):
                probes.load(folder)
    long = dataclasses.replace(demo_probe.meta, notes=("n" * 1001,))
    dataclasses.replace(demo_probe, meta=long).save(tmp_path / "long")
    with pytest.raises(probes.ProbeError) as info:
        probes.load(tmp_path / "long")
    assert "each of 'recorded.notes' must be a string of at most 1000 characters, got" in str(
        info.value
    )
    assert " or null" not in str(info.value)


def test_prepare_inputs_can_let_non_finite_values_through() -> None:
    """prepare_inputs(check_finite=False) hands a NaN on, as the policy's opt-out does."""
    specs = [signature.InputSpec(name="x", dtype="float32", shape=(2,))]
    nan = np.array([np.nan, 1.0], np.float32)
    (out,) = guard.inputs.prepare_inputs(specs, {"x": nan}, check_finite=False)
    assert out is nan


def test_a_dropped_session_cleans_up_after_itself(demo_probe: probes.Probe) -> None:
    """A session dropped without close() is collected; its thread ends; all hear of a close."""
    import gc
    import weakref

    table = guard.health.HealthTable()
    listener = CapturingListener()
    s = guard.wrap(
        demo.demo_factory(threads=1), demo_probe, name="dropped", metrics=False, health=table,
        listeners=[listener], policy=guard.Policy(recheck_every=30.0, promote_after=None),
    )  # fmt: skip
    (thread,) = [t for t in threading.enumerate() if t.name == "mnn-guard-dropped"]
    ref = weakref.ref(s)
    del s
    gc.collect()
    assert ref() is None
    thread.join(0.5)  # woken at once by the finalizer, not at its next 1 s tick
    assert not thread.is_alive()
    assert table.sessions() == {} and [e.kind for e in listener.events][-1] == "close"


def test_an_unwritable_health_folder_never_breaks_serving(
    demo_probe: probes.Probe, tmp_path: Any
) -> None:
    """Health files that cannot be written are skipped, by the table itself: the session serves
    and is listed."""
    table = guard.health.HealthTable(tmp_path / "missing")
    s = guard.wrap(
        demo.demo_factory(threads=1), demo_probe, name="a", metrics=False, health=table,
        policy=guard.Policy(background=False),
    )  # fmt: skip
    assert served_clean(s) and table.readiness()[0] is True
    table.record(s, Entry.of(s.status))  # directly: a listener's errors would be logged
    assert list(table.sessions()) == ["a"]
    s.close()


def test_check_input_checks_and_casts_one_input_as_run_does() -> None:
    """check_input (used by probes.record) casts a fitting array, refuses NaN unless told not
    to, and names the input it refuses."""
    ids = signature.InputSpec(name="ids", dtype="int32", shape=(2,))
    cast = guard.inputs.check_input(ids, np.array([1, 2], np.int64))
    assert cast.dtype == np.int32 and cast.tolist() == [1, 2]
    spec = signature.InputSpec(name="x", dtype="float32", shape=(2,))
    nan = np.array([np.nan, 1.0], np.float32)
    with pytest.raises(guard.InputMismatch, match=r"^input 'x'"):
        guard.inputs.check_input(spec, nan)
    assert guard.inputs.check_input(spec, nan, check_finite=False) is nan


def test_table_entries_carry_each_sessions_detail(demo_probe: probes.Probe) -> None:
    """HealthTable.entries() is each session's readiness entry with the detail recorded for it."""
    with guard.wrap(
        demo.demo_factory(threads=1), demo_probe, name="e", metrics=False,
        policy=guard.Policy(background=False), health=guard.health.HealthTable(),
    ) as s:  # fmt: skip
        status = s.status
    table = guard.health.HealthTable()
    entry = dataclasses.replace(Entry.of(status), detail={"workers": [{"slot": 0}]})
    table.record(object(), entry)
    assert table.entries() == [
        {"name": "e", "state": "serving", "rung": "static", "rung_index": 0, "healthy": True,
         "since": status.since, "reasons": [], "workers": [{"slot": 0}]},
    ]  # fmt: skip


def test_a_bare_session_pair_is_bound_by_the_probes_names(converted: dict[str, Any]) -> None:
    """The canary binds a factory's bare (Interpreter, Session) pair by the probe's names: the
    mixed model's inputs and outputs in the model's order, not the session's own (sorted) one."""
    path = str(converted["mixed"])

    def make(**config: Any) -> tuple[Any, Any]:
        interpreter = MNN.Interpreter(path)
        return interpreter, interpreter.createSession({"numThread": 1, **config})

    x = np.random.default_rng(3).standard_normal((1, 4, 20)).astype(np.float32)
    inputs = {"x": x, "index": np.array([3, 1], np.int32), "bias": np.array([0.5], np.float32)}
    probe = probes.record(guard.mnn_session_factory(path, {"numThread": 1}), inputs, reference={})
    policy = guard.Policy(background=False, ladder=(guard.Rung("session"),))
    with guard.wrap(make, probe, name="bare", metrics=False, policy=policy) as session:
        out = session.run(inputs)
    np.testing.assert_allclose(out["picked"], x[:, [3, 1], :] + 0.5, rtol=1e-6)
    np.testing.assert_allclose(out["energy"], np.mean(x * x, axis=2, keepdims=True), rtol=1e-5)
