"""The guarded session on the real demo vocoder: canary, re-init, fallback, exhaustion, serving,
run()'s error paths and what callers are told."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import pytest
from conftest import FakeClock, quiet_policy, reference
from plans import CANARY_FORWARDS, HangingReference, Plan, Turning, plan_session, raising, sample
from polling import until
from prometheus_client import CollectorRegistry

import guard
import probes
from guard.testing import CapturingListener, Fault, FaultyFactory
from guard.tools import demo
from probes import measures, signature

Array = np.ndarray[Any, Any]


def test_clean_init_passes_first_try(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe
) -> None:
    """A clean init passes its canary on the first attempt and serves the static rung."""
    listener = CapturingListener()
    s = guard.wrap(
        demo_factory,
        demo_probe,
        policy=quiet_policy(),
        name="t",
        metrics=False,
        listeners=[listener],
    )
    assert (s.status.mode, s.status.rung_index, s.status.healthy, s.status.attempts) == (
        "static",
        0,
        True,
        1,
    )
    assert s.status.verdict is not None and s.status.verdict.passed
    assert listener.of("recover") == []
    assert [e.outcome for e in listener.of("attempt")] == ["pass"]


def test_degraded_init_is_reinitialised(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe
) -> None:
    """A degraded first init fails its canary, is re-initialised, and the second init serves."""
    faulty = FaultyFactory(demo_factory, fault=Fault.NOISE, schedule=[True])
    listener = CapturingListener()
    s = guard.wrap(
        faulty, demo_probe, policy=quiet_policy(), name="t", metrics=False, listeners=[listener]
    )
    assert (s.status.mode, s.status.attempts, s.status.healthy) == ("static", 2, True)
    assert [e.outcome for e in listener.of("attempt")] == ["fail", "pass"]
    assert [e.action for e in listener.of("recover")] == ["reinit"]
    first = s.status.history[0]
    assert first.verdict is not None and not first.verdict.passed
    assert any("snr_db" in r for r in first.verdict.reasons)


def test_all_static_degraded_falls_back_to_dynamic(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe
) -> None:
    """When every static init is degraded the session ends on the dynamic rung."""
    faulty = FaultyFactory(demo_factory, fault=Fault.NOISE, rate=1.0, affects="static")
    listener = CapturingListener()
    s = guard.wrap(
        faulty,
        demo_probe,
        policy=quiet_policy(reinit_attempts=2),
        name="t",
        metrics=False,
        listeners=[listener],
    )
    assert (s.status.mode, s.status.rung_index, s.status.attempts) == ("dynamic", 1, 4)
    assert [e.action for e in listener.of("recover")] == ["reinit", "reinit", "fallback"]
    assert faulty.degraded_inits == 3


def test_everything_degraded_raises_recovery_exhausted(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe
) -> None:
    """Every rung failing raises RecoveryExhausted carrying every attempt's failed verdict."""
    faulty = FaultyFactory(demo_factory, fault=Fault.ZEROS, rate=1.0, affects="all")
    with pytest.raises(guard.RecoveryExhausted) as info:
        guard.wrap(
            faulty, demo_probe, policy=quiet_policy(reinit_attempts=1), name="t", metrics=False
        )
    err = info.value
    assert isinstance(err, guard.GuardError)
    assert [a.rung.name for a in err.attempts] == ["static", "static", "dynamic", "dynamic"]
    assert len(err.verdicts) == 4 and not any(v.passed for v in err.verdicts if v is not None)
    assert all(v is not None for v in err.verdicts)
    assert "every rung" in str(err) and "snr_db" in str(err)


def test_probe_that_fails_its_own_goldens_is_refused_before_any_init(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe
) -> None:
    """Thresholds no output can meet raise ConfigError up front, without calling the factory."""
    calls: list[dict[str, Any]] = []

    def counting(**overrides: Any) -> Any:
        calls.append(overrides)
        return demo_factory(**overrides)

    impossible = demo_probe.with_thresholds(probes.Thresholds(min_cosine=1.5))
    with pytest.raises(guard.ConfigError, match=r"case 0's golden outputs fail.*cosine"):
        guard.wrap(counting, impossible, policy=quiet_policy(), name="t", metrics=False)
    assert calls == []


def test_factory_exception_is_chained(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe
) -> None:
    """A factory that always raises ends in RecoveryExhausted with the original error chained."""
    faulty = FaultyFactory(demo_factory, fault=Fault.RAISE, rate=1.0, affects="all")
    with pytest.raises(guard.RecoveryExhausted) as info:
        guard.wrap(
            faulty, demo_probe, policy=quiet_policy(reinit_attempts=0), name="t", metrics=False
        )
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "injected factory failure" in str(info.value.__cause__)
    assert [a.outcome for a in info.value.attempts] == [guard.ladder.Outcome.ERROR] * 2


def test_outputs_are_distinct_owned_and_correct(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe
) -> None:
    """Outputs kept across calls stay distinct and equal their own reference (no view reuse)."""
    s = guard.wrap(demo_factory, demo_probe, policy=quiet_policy(), name="t", metrics=False)
    xs = [demo.demo_mel(50, seed=k) for k in range(4)]
    outs = [s.run({"mel": x})["wav"] for x in xs]
    for x, out in zip(xs, outs, strict=True):
        assert out.flags.owndata and out.flags.writeable
        assert measures.snr_db(reference(x), out) > 60
    assert not np.array_equal(outs[0], outs[-1])


def test_list_inputs_in_model_order(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, mel: Array
) -> None:
    """A list in input order gives the same result as a dict by name."""
    s = guard.wrap(demo_factory, demo_probe, policy=quiet_policy(), name="t", metrics=False)
    assert np.array_equal(s.run([mel])["wav"], s.run({"mel": mel})["wav"])


OUTPUT_FAULTS = [
    (Fault.NOISE, "snr_db"),
    (Fault.ZEROS, "snr_db"),
    (Fault.NAN, "NaN"),
    (Fault.STALE, "snr_db"),
    (Fault.SHAPE, "shape"),
    (Fault.MISSING, "got 0 outputs"),
]


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("fault", "reason"), OUTPUT_FAULTS, ids=[f.value for f, _ in OUTPUT_FAULTS]
)
def test_degraded_outputs_are_caught_by_the_canary(
    fault: Fault, reason: str, demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe
) -> None:
    """Each output fault fails the canary with a reason that names it; the re-init serves."""
    faulty = FaultyFactory(demo_factory, fault=fault, schedule=[True], affects="all")
    s = guard.wrap(faulty, demo_probe, policy=quiet_policy(), name="t", metrics=False)
    first = s.status.history[0]
    assert first.outcome is guard.ladder.Outcome.FAIL
    assert first.verdict is not None and any(reason in r for r in first.verdict.reasons)
    assert s.status.healthy and s.status.attempts == 2


FACTORY_FAULTS = [
    (Fault.RAISE, guard.ladder.Outcome.ERROR, "injected factory failure"),
    (Fault.NO_FORWARD, guard.ladder.Outcome.ERROR, "without a forward() method"),
    (Fault.HANG, guard.ladder.Outcome.TIMEOUT, "did not finish within"),
]


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("fault", "outcome", "message"), FACTORY_FAULTS, ids=[f.value for f, _, _ in FACTORY_FAULTS]
)
def test_factory_faults_count_as_failed_attempts(
    fault: Fault,
    outcome: guard.ladder.Outcome,
    message: str,
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
) -> None:
    """A factory that raises, returns no module, or hangs is a failed attempt, then recovered."""
    faulty = FaultyFactory(
        demo_factory, fault=fault, schedule=[True], affects="all", hang_seconds=5
    )
    policy = quiet_policy(init_timeout=2.0)  # a hang's bound, far above a clean init + canary
    s = guard.wrap(faulty, demo_probe, policy=policy, name="t", metrics=False)
    first = s.status.history[0]
    assert first.outcome is outcome
    assert message in str(first.error)
    assert s.status.healthy and s.status.attempts == 2


def test_intermittent_factory_eventually_serves(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe
) -> None:
    """A factory that fails on alternate inits still yields a healthy session."""
    faulty = FaultyFactory(
        demo_factory, fault=Fault.RAISE, schedule=[True, False, True], affects="all"
    )
    s = guard.wrap(faulty, demo_probe, policy=quiet_policy(), name="t", metrics=False)
    assert s.status.healthy and s.status.attempts == 2


def test_threads_get_their_own_outputs(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe
) -> None:
    """8 threads x 120 calls with distinct inputs: every output equals its own input's reference.

    (500 calls each took 2.6 s on an idle 2-core machine and 8 minutes with one core kept busy:
    the session lock and the GIL hand over through a single free core.)
    """
    s = guard.wrap(demo_factory, demo_probe, policy=quiet_policy(), name="t", metrics=False)
    xs = [demo.demo_mel(2, seed=k) for k in range(40)]
    refs = [s.run({"mel": x})["wav"].copy() for x in xs]
    wrong: list[tuple[int, int]] = []

    def worker(t: int) -> None:
        for i in range(120):
            k = (t * 7 + i) % len(xs)
            if not np.array_equal(s.run({"mel": xs[k]})["wav"], refs[k]):
                wrong.append((t, i))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"8 threads x 120 calls, {len(wrong)} wrong outputs")
    assert wrong == []


def test_close_is_idempotent_and_run_after_close_raises(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, mel: Array
) -> None:
    """close() releases the module, can be called twice, and run() afterwards says so."""
    s = guard.wrap(demo_factory, demo_probe, policy=quiet_policy(), name="t", metrics=False)
    s.close()
    s.close()
    assert s.status.closed and not s.status.healthy
    with pytest.raises(guard.errors.SessionClosed, match="closed"):
        s.run({"mel": mel})


def test_session_logs_every_init(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, caplog: pytest.LogCaptureFixture
) -> None:
    """Every init, verdict and recovery is logged on the mnn_guard logger."""
    faulty = FaultyFactory(demo_factory, fault=Fault.ZEROS, schedule=[True])
    with caplog.at_level("INFO", logger="mnn_guard"):
        guard.wrap(faulty, demo_probe, policy=quiet_policy(), name="logged", metrics=False)
    text = caplog.text
    assert "session logged: init rung 'static': fail" in text
    assert "reinit from rung 'static' to rung 'static'" in text
    assert "session logged: init rung 'static': pass" in text


class CheckTimeline(guard.Listener):
    """When each re-check finished and passed, and when the module was taken out of service."""

    def __init__(self) -> None:
        self.checks: list[tuple[float, bool]] = []
        self.unhealthy: list[float] = []

    def on_check(self, session: str, attempt: guard.ladder.Attempt) -> None:
        self.checks.append((time.perf_counter(), attempt.passed))

    def on_status(self, session: str, status: guard.SessionStatus) -> None:
        if status.state is guard.State.REPLACING:
            self.unhealthy.append(time.perf_counter())


@pytest.mark.hostile
def test_failed_recheck_under_load_fails_no_call(demo_probe: probes.Probe) -> None:
    """8 threads keep calling while a module degrades, a re-check fails and recovers: no call
    fails, and no call that began after the guard took the module out gets a degraded output.

    Between the degradation and the failing re-check, calls are served degraded: a re-check
    that was already running may pass on forwards made just before the module turned, so the
    one after it is the first that must fail; that is the bound asserted here.
    """
    # The first module turns noisy (29 dB) after 300 forwards; its replacements stay clean.
    factory = FaultyFactory(demo.demo_factory(), schedule=[True], degrade_after=300, seed=3)
    timeline = CheckTimeline()
    s = guard.wrap(
        factory,
        demo_probe,
        name="recheck",
        metrics=False,
        listeners=[timeline],
        policy=guard.Policy(recheck_every=40, promote_after=None),
    )
    xs = [demo.demo_mel(2, seed=k) for k in range(16)]
    refs = [reference(x) for x in xs]
    calls: list[tuple[float, float, bool]] = []  # (began, ended, whether the output was clean)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        for i in range(150):
            k = (t + i) % len(xs)
            began = time.perf_counter()
            try:
                ok = measures.snr_db(refs[k], s.run({"mel": xs[k]})["wav"]) > 45
            except BaseException as exc:  # any failure is a test failure
                errors.append(exc)
                return
            calls.append((began, time.perf_counter(), ok))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.close()
    bad = sorted((began, ended) for began, ended, ok in calls if not ok)
    print(f"recheck under load: {len(calls)} calls, {len(bad)} degraded before a re-check failed")
    assert errors == []
    assert len(calls) == 8 * 150
    # the module degraded and one failing re-check took it out (usually after some calls were
    # served degraded: a re-check under way as it turned may catch it before any call)
    assert len(timeline.unhealthy) == 1
    assert factory.inits >= 2
    taken_out = timeline.unhealthy[0]
    assert all(began < taken_out for began, _ in bad)  # nothing degraded after the guard knew
    # a re-check that passed after the first degraded output had to start before the module
    # turned: only the one already under way can
    first_bad_ended = min((ended for _, ended in bad), default=taken_out)
    passed_after = [t for t, ok in timeline.checks if ok and first_bad_ended < t < taken_out]
    assert len(passed_after) <= 1
    assert s.status.history[-1].rung.name == "static"


def test_a_listener_that_raises_on_run_fails_no_call(
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
    mel: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broken on_run listener is logged; the call still returns its outputs, and others hear."""

    class Broken(guard.Listener):
        def on_run(self, session: str, rung: guard.Rung, seconds: float, result: Any) -> None:
            raise RuntimeError("listener bug")

    heard: list[tuple[str, str, Any]] = []

    class Counting(guard.Listener):
        def on_run(self, session: str, rung: guard.Rung, seconds: float, result: Any) -> None:
            heard.append((session, rung.name, result))

    policy = guard.Policy(background=False)
    broken = Broken()
    with guard.wrap(
        demo_factory, demo_probe, name="loud", metrics=False, policy=policy,
        listeners=[broken, Counting()],
    ) as s:  # fmt: skip
        out = s.run({"mel": mel})
    assert set(out) == set(demo_probe.output_names)
    assert heard == [("loud", "static", guard.listeners.Call.OK)]
    (record,) = [r for r in caplog.records if "on_run" in r.getMessage()]
    assert record.getMessage() == f"listener {broken!r} failed on on_run"
    assert record.exc_info is not None and str(record.exc_info[1]) == "listener bug"


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


# ------------------------------------------------------------------ what callers are told


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


def test_a_session_made_directly_raises_when_every_rung_fails(demo_probe: probes.Probe) -> None:
    """GuardedSession itself raises RecoveryExhausted by default, as guard.wrap does."""
    with pytest.raises(guard.RecoveryExhausted):
        guard.GuardedSession(
            Plan("bad"), demo_probe, name="p",
            policy=guard.Policy(background=False, reinit_attempts=0),
        )  # fmt: skip


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


def test_a_forward_with_no_outputs_says_what_mnn_said(converted: dict[str, Any]) -> None:
    """A shape MNN cannot compute at run time (50 px where cells are 32 px): OutputMismatch
    carries MNN's own reason, which MNN prints only on stderr; the next good call is served."""
    factory = guard.mnn_factory(converted["stride32"], ["image"], ["mask"], threads=1)
    image = np.random.default_rng(2).standard_normal((1, 1, 64, 96)).astype(np.float32)
    probe = probes.record(factory, {"image": image}, dynamic={"image": {2: (1, 512), 3: (1, 512)}})
    with guard.wrap(factory, probe, name="cells", metrics=False, policy=quiet_policy()) as s:
        with pytest.raises(guard.errors.OutputMismatch) as info:
            s.run({"image": image[..., :50, :50]})
        served = s.run({"image": image})["mask"]
    message = str(info.value)
    assert message.startswith("session 'cells': the module returned 0 outputs, expected ['mask']")
    assert "; MNN said: " in message and "Broad cast error" in message
    assert served.shape == image.shape


class DropLast:
    """A real module of the roles model that, once `drop` is set, returns all outputs but the
    last (a result shorter than the probe's names, not an empty one)."""

    def __init__(self, module: Any) -> None:
        from test_real_models import ROLES_NAMES

        self.runner = guard.mnn.adapt(module, *ROLES_NAMES)
        self.drop = False

    def run(self, arrays: Any) -> list[Array]:
        outputs = self.runner.run(arrays)
        return outputs[:-1] if self.drop else outputs


def test_a_result_with_fewer_outputs_than_the_probe_names_is_refused(
    converted: dict[str, Any], registry: Any
) -> None:
    """One output of two, after a clean canary: OutputMismatch naming both, counted as an
    error; never a dict with one output missing."""
    from test_real_models import roles_factory, roles_inputs

    factory = roles_factory(converted)
    probe = probes.record(factory, roles_inputs())
    modules: list[DropLast] = []
    s = guard.wrap(
        lambda **kw: modules.append(DropLast(factory(**kw))) or modules[-1], probe,
        name="roles", registry=registry, policy=quiet_policy(),
    )  # fmt: skip
    modules[-1].drop = True
    with pytest.raises(guard.errors.OutputMismatch) as info:
        s.run(roles_inputs())
    counted = registry.get_sample_value(
        "mnn_guard_runs_total", {"session": "roles", "rung": "static", "result": "error"}
    )
    s.close()
    assert str(info.value).startswith(
        "session 'roles': the module returned 1 outputs, expected ['y', 'new_state']"
    )
    assert counted == 1.0


# ------------------------------------------------------------ init thread, served outputs, errors


def test_init_work_runs_on_a_named_daemon_thread_and_raises_what_it_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """call_with_timeout runs its call on the mnn-guard-init daemon thread (a hung init never
    blocks the interpreter's exit), returns its value, and raises its error as itself."""
    import guard.session
    from guard.session import call_with_timeout

    # no idle thread kept from earlier tests: this call starts one (and mutmut sees its loop)
    monkeypatch.setattr(guard.session, "_IDLE", [])

    seen: dict[str, Any] = {}

    def failing() -> None:
        thread = threading.current_thread()
        seen.update(name=thread.name, daemon=thread.daemon, main=thread is threading.main_thread())
        raise ZeroDivisionError("raised inside the init")

    with pytest.raises(ZeroDivisionError, match="raised inside the init"):
        call_with_timeout(failing, 30.0, "the init")
    assert seen == {"name": "mnn-guard-init", "daemon": True, "main": False}
    assert call_with_timeout(lambda: 7, 30.0, "the init") == 7


class Serving:
    """A runner that can copy out only its first outputs (`serve`), and counts how it was asked."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.served: list[int] = []

    def run(self, arrays: Any) -> Any:
        return self.runner.run(arrays)

    def serve(self, arrays: Any, count: int) -> Any:
        self.served.append(count)
        return self.runner.run(arrays)[:count]


def test_a_probe_with_sentinels_has_only_its_served_outputs_copied_out(
    demo_probe: probes.Probe,
) -> None:
    """A session whose probe has sentinel outputs asks the module for the served outputs alone
    (`serve`, when the runner has it) and returns only them."""
    base = demo.demo_factory(threads=1)
    case = demo_probe.cases[0].inputs
    probe = probes.record(base, case, sentinels="auto")
    assert probe.sentinel_names
    made: list[Serving] = []

    class Factory:
        outputs = base.outputs  # it loads extra outputs when asked (`outputs=`)

        def __call__(self, **overrides: Any) -> Serving:
            made.append(Serving(guard.mnn.adapt(base(**overrides))))
            return made[-1]

    with guard.wrap(Factory(), probe, policy=quiet_policy(), metrics=False) as s:
        mel = demo.demo_mel(100, seed=8)  # the recorded shape
        out = s.run({"mel": mel})
        assert list(out) == ["wav"]
        assert measures.snr_db(reference(mel), out["wav"]) > 100.0
        assert made[-1].served[-1:] == [1]


class Plain:
    """A runner with `run` alone (no `serve`), as a user's own runner may be."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    def run(self, arrays: Any) -> Any:
        return self.runner.run(arrays)


def test_a_probe_with_sentinels_on_a_runner_without_serve_returns_the_served_outputs(
    demo_probe: probes.Probe,
) -> None:
    """A runner without `serve` runs the whole forward; the session returns the served outputs."""
    base = demo.demo_factory(threads=1)
    probe = probes.record(base, demo_probe.cases[0].inputs, sentinels="auto")
    assert probe.sentinel_names

    class Factory:
        outputs = base.outputs  # it loads extra outputs when asked (`outputs=`)

        def __call__(self, **overrides: Any) -> Plain:
            return Plain(guard.mnn.adapt(base(**overrides)))

    with guard.wrap(Factory(), probe, policy=quiet_policy(), metrics=False) as s:
        mel = demo.demo_mel(100, seed=8)  # the recorded shape
        out = s.run({"mel": mel})
    assert list(out) == ["wav"]
    assert measures.snr_db(reference(mel), out["wav"]) > 100.0


class Fading:
    """A runner that serves until `broken` is set, then returns no outputs; `said` is what MNN
    would print on the forward that explains it."""

    def __init__(self, runner: Any, said: tuple[str, ...]) -> None:
        self.runner, self.said, self.broken = runner, said, False

    def run(self, arrays: Any) -> Any:
        return [] if self.broken else self.runner.run(arrays)

    def diagnose(self, arrays: Any) -> tuple[str, ...]:
        return self.said


@pytest.mark.parametrize(
    ("said", "ending"),
    [
        (("shape error", "at op 3"), "; MNN said: shape error; at op 3"),
        ((), "(MNN returns [] on an internal shape error)"),
    ],
)
def test_a_forward_with_too_few_outputs_is_refused_with_what_mnn_said(
    demo_probe: probes.Probe, said: tuple[str, ...], ending: str
) -> None:
    """OutputMismatch names the outputs expected and, when MNN said why on one more forward,
    what it said (lines joined with '; '); nothing more when it said nothing."""
    from guard.errors import OutputMismatch

    made: list[Fading] = []

    def factory(**overrides: Any) -> Fading:
        made.append(Fading(guard.mnn.adapt(demo.demo_factory(threads=1)(**overrides)), said))
        return made[-1]

    with guard.wrap(factory, demo_probe, policy=quiet_policy(), metrics=False) as s:
        made[-1].broken = True
        with pytest.raises(OutputMismatch) as raised:
            s.run({"mel": demo.demo_mel(30, seed=9)})
    message = str(raised.value)
    assert "returned 0 outputs, expected ['wav']" in message and message.endswith(ending)


def test_a_collected_probe_leaves_no_self_check_entry(demo_probe: probes.Probe) -> None:
    """self_check remembers a probe only while it lives: a collected copy's entry goes (its id
    may come back as another probe's)."""
    import dataclasses
    import gc

    from guard import session

    copy = dataclasses.replace(demo_probe)
    session.self_check(copy)
    key = id(copy)
    assert key in session._SELF_CHECKED
    del copy
    gc.collect()
    assert key not in session._SELF_CHECKED


def test_self_check_judges_a_probes_goldens_once(
    demo_probe: probes.Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A probe's goldens are judged against themselves at its first self_check only; a later
    session of the same probe object starts without judging them again."""
    import dataclasses

    from guard import session

    copy = dataclasses.replace(demo_probe)
    judged: list[int] = []
    real = probes.Probe.judge

    def counting(self: probes.Probe, *args: Any, **kw: Any) -> Any:
        judged.append(id(self))
        return real(self, *args, **kw)

    monkeypatch.setattr(probes.Probe, "judge", counting)
    session.self_check(copy)
    assert judged.count(id(copy)) == len(copy.cases)
    session.self_check(copy)
    assert judged.count(id(copy)) == len(copy.cases)


# ------------------------------------------------------------------------- shadow sampling


def test_a_shadowed_session_judges_every_nth_call_as_served_against_its_reference(
    demo_probe: probes.Probe,
) -> None:
    """shadow_every=2: the 2nd and 4th calls, their inputs and the outputs the caller got, are
    judged on the session's named shadow thread against a reference built in a process of its
    own before wrap returned; the status shows the worst SNR of the module in use."""
    from guard.reference import Where
    from guard.shadow import Reference

    listener = CapturingListener()
    policy = quiet_policy(shadow_every=2)
    quiet = FaultyFactory(demo.demo_factory(threads=1), rate=1.0, snr_db=120.0)  # passes
    with guard.wrap(
        quiet, demo_probe, policy=policy, listeners=[listener], metrics=False, name="sampled"
    ) as s:
        ready = s.status.shadow
        assert ready is not None and (ready.reference, ready.where) == (
            Reference.DYNAMIC,
            Where.PROCESS,
        )
        assert "mnn-guard-shadow-sampled" in {t.name for t in threading.enumerate()}
        mels = [demo.demo_mel(20 + k, seed=40 + k) for k in range(4)]
        wavs = [s.run({"mel": mel})["wav"] for mel in mels]
        until("shadow checks", lambda: len(listener.of("shadow")) == 2)
        shadow = s.status.shadow
    checks = [e.check for e in listener.of("shadow")]
    assert [c.result.value for c in checks] == ["pass", "pass"]
    for check, k in zip(checks, (1, 3), strict=True):
        assert check.sample is not None
        assert np.array_equal(check.sample.inputs[0], mels[k])
        assert np.array_equal(check.sample.served[0], wavs[k])
        assert (check.sample.rung_index, check.sample.rung) == (0, policy.ladder[0])
    assert shadow is not None and (shadow.every, shadow.checks, shadow.failed) == (2, 2, 0)
    assert demo_probe.limits_for("wav")["snr_db"] < shadow.worst_snr_db < float("inf")


def test_a_shadow_reference_not_built_within_init_timeout_is_logged(
    demo_probe: probes.Probe, caplog: pytest.LogCaptureFixture
) -> None:
    """wrap waits Policy.init_timeout for the shadow's reference, then serves and says so in one
    warning naming the session and the wait."""
    hanging = HangingReference(demo.demo_factory(threads=1))
    policy = quiet_policy(shadow_every=1, shadow_process=False, init_timeout=2.0)  # as above
    try:
        with caplog.at_level(logging.WARNING, logger="mnn_guard"):
            session = guard.wrap(hanging, demo_probe, policy=policy, metrics=False, name="slow")
        said = [r.getMessage() for r in caplog.records if "shadow" in r.getMessage()]
        assert said == [
            "session slow: the shadow's reference was not built within 2 s; serving, and "
            "checking sampled calls once it is"
        ]
        assert session.status.healthy
    finally:
        hanging.gate.set()
    session.close()


def test_status_listeners_are_told_the_sessions_name(demo_probe: probes.Probe) -> None:
    """Every on_status a listener gets names the session it is about."""
    listener = CapturingListener()
    with guard.wrap(
        demo.demo_factory(threads=1), demo_probe, policy=quiet_policy(), listeners=[listener],
        metrics=False, name="told",
    ):  # fmt: skip
        pass
    statuses = listener.of("status")
    assert statuses and {e.session for e in statuses} == {"told"}


class NoisyStatic:
    """A factory whose n-th static init carries output noise at `snrs[n]` dB (the last one for
    every later init); dynamic inits are clean."""

    def __init__(self, snrs: list[float]) -> None:
        self.factory, self.snrs, self.inits = demo.demo_factory(threads=1), snrs, 0
        self.inputs, self.outputs, self.path = (
            self.factory.inputs,
            self.factory.outputs,
            self.factory.path,
        )

    def __call__(self, **overrides: Any) -> Any:
        module = self.factory(**overrides)
        if overrides.get("dynamic"):
            return module
        self.inits += 1
        snr = self.snrs[min(self.inits, len(self.snrs)) - 1]
        return guard.testing.DegradedModule(module, Fault.NOISE, seed=self.inits, snr_db=snr)


def test_a_first_init_is_judged_at_the_plain_limits(demo_probe: probes.Probe) -> None:
    """A first init 0.5 dB above a 50 dB limit serves at once: the retry margin raises the limits
    for re-inits only."""
    probe = demo_probe.with_thresholds({"snr_db": 50.0})
    with guard.wrap(NoisyStatic([50.5]), probe, policy=quiet_policy(), metrics=False) as s:
        assert (s.status.mode, s.status.attempts) == ("static", 1)


def test_a_promotion_is_judged_at_the_plain_limits(demo_probe: probes.Probe) -> None:
    """After a failed static init, a promotion back to static 0.5 dB above the limit succeeds:
    the retry margin is for re-inits within one recovery, not for a later promotion."""
    probe = demo_probe.with_thresholds({"snr_db": 50.0})
    clock = FakeClock()
    policy = guard.Policy(background=False, promote_after=60.0, reinit_attempts=0)
    with guard.wrap(
        NoisyStatic([30.0, 50.5]), probe, policy=policy, metrics=False, clock=clock
    ) as s:
        assert s.status.mode == "dynamic"
        clock.advance(61.0)
        s.maintain()
        assert s.status.mode == "static"


def test_a_reinit_must_beat_the_limits_by_the_retry_margin(demo_probe: probes.Probe) -> None:
    """After a failed static init, a re-init 5 dB above a 50 dB limit falls short of the 10 dB
    retry margin: the session falls back to dynamic."""
    probe = demo_probe.with_thresholds({"snr_db": 50.0})
    policy = quiet_policy(reinit_attempts=1, retry_margin_db=10.0)
    with guard.wrap(NoisyStatic([30.0, 55.0]), probe, policy=policy, metrics=False) as s:
        assert [a.rung.name for a in s.status.history] == ["static", "static", "dynamic"]
