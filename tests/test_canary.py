"""The canary: every run of every case judged at init, a re-check stopping at its first failing
judgement, what MNN said kept with the attempt, outputs bound by the probe's names.

Real demo-vocoder modules and converted models; faults wrap them; only time is faked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import MNN
import numpy as np
from conftest import FakeClock
from plans import CANARY_FORWARDS, Checks, Counting, Plan, Turning, plan_session, served_clean

import guard
import probes
from guard import mnn
from guard.canary import init_and_check, run_canary
from guard.judgement import Judgement
from guard.ladder import Basis
from guard.testing import CapturingListener, Fault, FaultyFactory
from guard.tools import demo

Array = np.ndarray[Any, Any]

# ------------------------------------------------------------------ at init


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


def test_an_init_canary_judges_every_forward_even_after_a_failure(
    demo_probe: probes.Probe,
) -> None:
    """A module degraded from the start fails all four canary judgements, and says so."""
    s = plan_session(Plan("noisy", "clean"), demo_probe, FakeClock(), reinit_attempts=1)
    first = s.status.history[0].verdict
    assert first is not None and "4 of 4 canary runs failed" in first.reasons
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


# ------------------------------------------------------------------ on a re-check


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


# ------------------------------------------------------------------ MNN's words, names bound


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


def test_a_canary_stopped_at_its_first_failure_keeps_what_mnn_said(
    converted: dict[str, Any],
) -> None:
    """run_canary with stop_at_failure (and no gate) keeps MNN's words on the forward that
    returned no output, as a canary that runs to the end does."""
    factory = guard.mnn_factory(converted["stride32"], ["image"], ["mask"], threads=1)
    image = np.random.default_rng(2).standard_normal((1, 1, 64, 96)).astype(np.float32)
    probe = probes.record(factory, {"image": image}, model=converted["stride64"])
    runner = mnn.adapt(guard.mnn_factory(converted["stride64"], ["image"], ["mask"], threads=1)())
    canary = run_canary(runner, probe, 2, stop_at_failure=True)
    assert not canary.verdict.passed
    assert any(n.startswith("MNN on a canary forward: Broad cast error") for n in canary.notes)


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


# ------------------------------------------------------------------ run_canary itself


class Scaled:
    """A real module whose every output is scaled by `gain` (a deterministic weight fault)."""

    def __init__(self, module: Any, gain: float) -> None:
        self.runner, self.gain = mnn.adapt(module), gain

    def run(self, arrays: Sequence[Array]) -> list[Array]:
        return [(o * self.gain).astype(o.dtype) for o in self.runner.run(arrays)]


def noisy(snr: float) -> Any:
    """A clean demo module whose outputs carry noise at `snr` dB (seeded)."""
    return guard.testing.DegradedModule(
        demo.demo_factory(threads=1)(), Fault.NOISE, seed=5, snr_db=snr
    )


def test_run_canary_judges_with_the_judgement_it_is_given(demo_probe: probes.Probe) -> None:
    """Noise at 60 dB passes a probe at 30 dB, and fails the same canary judged by a judgement
    of a probe at 90 dB."""
    module = noisy(60.0)
    loose = demo_probe.with_thresholds({"snr_db": 30.0})
    strict = Judgement(demo_probe.with_thresholds({"snr_db": 90.0}), None)
    assert run_canary(module, loose, 1).verdict.passed
    assert not run_canary(module, loose, 1, judgement=strict).verdict.passed


def test_run_canary_holds_its_gate_for_each_forward_and_judges_outside_it(
    demo_probe: probes.Probe,
) -> None:
    """With a gate (a live module's lock), every forward runs inside it and every judgement
    outside it, so a caller waits one forward at most."""
    held = [False]
    seen: dict[str, list[bool]] = {"forward": [], "judge": []}

    class Gate:
        def __enter__(self) -> None:
            assert not held[0], "the gate was entered twice"
            held[0] = True

        def __exit__(self, *exc: object) -> None:
            held[0] = False

    class Watched(mnn.Runner):
        def run(self, arrays: Sequence[Array]) -> list[Array]:
            seen["forward"].append(held[0])
            return inner.run(arrays)

    class Watching(Judgement):
        def judge(self, outputs: Sequence[Array], case: int, **kw: Any) -> Any:
            seen["judge"].append(held[0])
            return super().judge(outputs, case, **kw)

    inner = mnn.adapt(demo.demo_factory(threads=1)())
    canary = run_canary(Watched(), demo_probe, 2, judgement=Watching(demo_probe, None), gate=Gate())
    assert canary.verdict.passed
    forwards = 2 * len(demo_probe.cases)
    assert seen == {"forward": [True] * forwards, "judge": [False] * forwards}


def test_run_canary_raises_the_limits_by_the_retry_margin(demo_probe: probes.Probe) -> None:
    """Noise 0.5 dB above a 50 dB limit passes with no margin (the default) and fails with a
    1 dB margin."""
    module = noisy(50.5)
    probe = demo_probe.with_thresholds({"snr_db": 50.0})
    assert run_canary(module, probe, 2).verdict.passed
    assert run_canary(module, probe, 2, retry_margin_db=0.0).verdict.passed
    failed = run_canary(module, probe, 2, retry_margin_db=1.0).verdict
    assert not failed.passed and "snr_db" in failed.reasons[0]


def test_run_canary_gives_the_first_failure_of_every_case(demo_probe: probes.Probe) -> None:
    """Two runs of two cases, all failing: the reasons name the first failing run of each case,
    then the count."""
    verdict = run_canary(noisy(20.0), demo_probe.with_thresholds({"snr_db": 30.0}), 2).verdict
    assert [r.split(":")[0] for r in verdict.reasons] == [
        "canary run 1 case 0",
        "canary run 1 case 1",
        "4 of 4 canary runs failed",
    ]


def test_run_canary_reports_the_furthest_basis_it_judged_on(demo_probe: probes.Probe) -> None:
    """A module 1% louder than the goldens, judged against what every init agreed on: the
    canary passes, on the basis DISPUTED (not GOLDEN, which it started from)."""
    scaled = Scaled(demo.demo_factory(threads=1)(), 1.01)
    names = demo_probe.output_names
    agreed = {
        k: dict(zip(names, scaled.run([c.inputs[n] for n in demo_probe.input_names]), strict=True))
        for k, c in enumerate(demo_probe.cases)
    }
    judgement = Judgement(demo_probe, None)
    assert judgement.dispute([agreed, agreed]) is not None
    canary = run_canary(scaled, demo_probe, 2, judgement=judgement)
    assert canary.verdict.passed
    assert canary.basis is Basis.DISPUTED


def test_run_canary_stopped_at_a_failure_keeps_its_basis(demo_probe: probes.Probe) -> None:
    """Judged against agreed outputs that match case 0 only, a canary that stops at its first
    failure (case 1) fails on the basis DISPUTED."""
    names, inputs = demo_probe.output_names, demo_probe.input_names

    def outputs(gain: float, k: int) -> dict[str, Array]:
        arrays = [demo_probe.cases[k].inputs[n] for n in inputs]
        return dict(
            zip(names, Scaled(demo.demo_factory(threads=1)(), gain).run(arrays), strict=True)
        )

    agreed = {0: outputs(1.01, 0), 1: outputs(1.02, 1)}
    judgement = Judgement(demo_probe, None)
    assert judgement.dispute([agreed, agreed]) is not None
    scaled = Scaled(demo.demo_factory(threads=1)(), 1.01)
    stopped = run_canary(scaled, demo_probe, 2, judgement=judgement, stop_at_failure=True)
    assert not stopped.verdict.passed
    assert stopped.verdict.reasons[0].startswith("canary run 1 case 1")
    assert stopped.basis is Basis.DISPUTED


# ------------------------------------------------------------------ init_and_check


def test_init_and_check_raises_the_limits_by_the_retry_margin(demo_probe: probes.Probe) -> None:
    """A build with noise 0.5 dB above a 50 dB limit passes its init canary with no margin (the
    default) and fails it with a 1 dB margin."""
    probe = demo_probe.with_thresholds({"snr_db": 50.0})
    build = lambda **_: noisy(50.5)  # noqa: E731
    assert init_and_check(build, {}, probe, 2)[1].verdict.passed
    assert init_and_check(build, {}, probe, 2, retry_margin_db=0.0)[1].verdict.passed
    failed = init_and_check(build, {}, probe, 2, retry_margin_db=1.0)[1].verdict
    assert not failed.passed and "snr_db" in failed.reasons[0]


def test_init_and_check_judges_with_the_judgement_it_is_given(demo_probe: probes.Probe) -> None:
    """A build with noise at 60 dB passes a probe at 30 dB, and fails the same init canary
    judged by a judgement of a probe at 90 dB."""
    loose = demo_probe.with_thresholds({"snr_db": 30.0})
    strict = Judgement(demo_probe.with_thresholds({"snr_db": 90.0}), None)
    build = lambda **_: noisy(60.0)  # noqa: E731
    assert init_and_check(build, {}, loose, 1)[1].verdict.passed
    assert not init_and_check(build, {}, loose, 1, judgement=strict)[1].verdict.passed


def test_init_and_check_tells_a_dynamic_load_mnn_made_static_and_what_it_printed(
    converted: dict[str, Any],
) -> None:
    """A dynamic=True load MNN made static (control flow): the canary says so, and keeps what MNN
    printed while loading in its notes."""
    import warnings

    from test_real_models import cf_factory, cf_inputs

    probe = probes.record(cf_factory(converted), cf_inputs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", guard.mnn.DynamicIgnoredWarning)
        _, canary = init_and_check(cf_factory(converted), {"dynamic": True}, probe, 1)
    assert canary.verdict.passed and canary.turned_static
    assert any(
        n.startswith("MNN while loading: ") and mnn.STATIC_LOAD_NOTE in n for n in canary.notes
    )
