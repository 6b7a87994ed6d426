"""Shadow checks: sampled live calls judged against a reference module, off the request path.

Faults here are degraded only for inputs unlike the canary (loud ones, another length): the
canary passes them, the shadow must not.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import FakeClock, reference
from plans import HangingReference
from polling import BOUND, until
from prometheus_client import CollectorRegistry

import guard
import probes
from guard.diagnosis import find_bundles
from guard.reference import Where
from guard.shadow import Reference
from guard.testing import CapturingListener, Fault, FaultyFactory, Frames, LouderThan
from guard.tools import demo
from probes.measures import snr_db

Array = np.ndarray[Any, Any]
WORK = "shadow check"  # what the tests wait for
LOUD = 10.0  # the canary mels peak below this in magnitude; a loud live mel (x4) above


def mels(count: int, seed: int = 0) -> Iterator[Array]:
    """Live inputs, every other one loud (a fault triggered by loudness sees half of them)."""
    rng = np.random.default_rng(seed)
    for k in range(count):
        mel = demo.demo_mel(int(rng.integers(20, 60)), seed=1000 + k)
        yield mel * np.float32(4.0) if k % 2 else mel


def loud_only(seed: int = 0) -> FaultyFactory:
    """Every static init degraded (30 dB noise), but only on forwards with loud inputs."""
    return FaultyFactory(
        demo.demo_factory(threads=1), fault=Fault.NOISE, rate=1.0, snr_db=30.0,
        trigger=LouderThan(LOUD), seed=seed,
    )  # fmt: skip


def degraded(out: Array, clean: Array) -> bool:
    """True when an output is not what a clean module computes (beyond float rounding)."""
    return bool(snr_db(clean, out) < 100.0)


def policy(**kw: Any) -> guard.Policy:
    """A policy without background maintenance (promotions only when a test asks)."""
    return guard.Policy(**{"background": False, "promote_after": None, **kw})


def test_the_canary_alone_serves_a_fault_only_loud_inputs_trigger(demo_probe: probes.Probe) -> None:
    """Without shadow checks the loud-input fault passes the canary and is served."""
    with guard.wrap(loud_only(), demo_probe, policy=policy(), metrics=False) as s:
        assert s.status.mode == "static"
        loud = demo.demo_mel(40, seed=3) * np.float32(4.0)
        assert degraded(s.run({"mel": loud})["wav"], reference(loud))


def test_a_fault_on_half_the_inputs_is_served_a_bounded_number_of_times(
    demo_probe: probes.Probe,
) -> None:
    """shadow_every=5, half the live inputs trigger the fault: at most 30 degraded outputs in
    400 calls, none after the first divergence, even once a promotion was tried."""
    clock = FakeClock()
    listener = CapturingListener()
    session = guard.wrap(
        loud_only(), demo_probe, policy=policy(shadow_every=5, promote_after=60.0),
        listeners=[listener], metrics=False, clock=clock,
    )  # fmt: skip
    bad_before, bad_after, first = 0, 0, None
    with session:
        assert session.status.shadow.reference is Reference.DYNAMIC  # built before wrap returned
        for k, mel in enumerate(mels(400)):
            wav = session.run({"mel": mel})["wav"]
            bad = degraded(wav, reference(mel))
            if first is None:  # served before the divergence was seen (this call included)
                bad_before += bad
            else:
                bad_after += bad
            if first is None and any(e.check.result.value == "fail" for e in listener.of("shadow")):
                first = k
                until(WORK, lambda: session.status.mode == "dynamic")
            if k == 300:  # a promotion back to static is tried: it must fail now
                clock.advance(61)
                assert session.maintain() == []
                assert session.status.mode == "dynamic"
        assert first is not None, "the shadow never saw the fault"
        assert bad_before + bad_after <= 30 and bad_after == 0, (bad_before, bad_after, first)
        assert len(session.probe.cases) > len(demo_probe.cases)  # the live inputs joined


def test_a_fault_only_another_length_triggers_is_caught(demo_probe: probes.Probe) -> None:
    """A module degraded only for 57-frame inputs: caught by the shadow, then by the canary."""
    faulty = FaultyFactory(
        demo.demo_factory(threads=1), fault=Fault.NOISE, rate=1.0, snr_db=30.0,
        trigger=Frames(57),
    )  # fmt: skip
    with guard.wrap(faulty, demo_probe, policy=policy(shadow_every=1), metrics=False) as s:
        assert s.status.mode == "static"
        s.run({"mel": demo.demo_mel(57, seed=1)})
        until(WORK, lambda: s.status.mode == "dynamic")
        shadow = s.status.shadow
        assert shadow is not None and shadow.failed == 1
        mel = demo.demo_mel(57, seed=2)
        assert not degraded(s.run({"mel": mel})["wav"], reference(mel))


def test_shadow_checks_are_counted_and_the_worst_snr_shown(demo_probe: probes.Probe) -> None:
    """mnn_guard_shadow_checks_total{result} counts passes and failures; the worst-SNR gauge
    shows the lowest shadow SNR of the module in use."""
    registry = CollectorRegistry()
    with guard.wrap(
        demo.demo_factory(threads=1), demo_probe, policy=policy(shadow_every=2),
        registry=registry, name="sh",
    ) as s:  # fmt: skip
        for mel in list(mels(10)):
            s.run({"mel": mel})
        shadow = lambda: s.status.shadow  # noqa: E731
        until(WORK, lambda: shadow() is not None and shadow().checks + shadow().dropped == 5)
        count = {
            r: registry.get_sample_value(
                "mnn_guard_shadow_checks_total", {"session": "sh", "result": r}
            )
            for r in ("pass", "fail", "dropped")
        }
        done = shadow()  # a loaded machine may drop one of the 5 samples: counted all the same
        assert count == {"pass": float(done.checks), "fail": 0.0, "dropped": float(done.dropped)}
        assert done.checks >= 1
        worst = registry.get_sample_value("mnn_guard_shadow_snr_db", {"session": "sh"})
        assert worst is not None and worst > demo_probe.limits_for("wav")["snr_db"]


class SlowReference:
    """A factory whose reference (dynamic) modules take `seconds` per forward."""

    def __init__(self, factory: Any, seconds: float) -> None:
        self.factory, self.seconds = factory, seconds
        self.inputs, self.outputs, self.path = factory.inputs, factory.outputs, factory.path
        self.gate = threading.Event()

    def __call__(self, **overrides: Any) -> Any:
        module = self.factory(**overrides)
        if not overrides.get("dynamic"):
            return module
        runner = guard.mnn.adapt(module)
        gate = self.gate

        class Slow:
            def run(self, arrays: Any) -> Any:
                gate.wait(30)
                return runner.run(arrays)

        return Slow()


def test_a_full_queue_drops_samples_and_counts_them(demo_probe: probes.Probe) -> None:
    """While the reference is busy, samples beyond the queue's room are dropped and counted,
    and no call waits for the shadow."""
    slow = SlowReference(demo.demo_factory(threads=1), 1.0)
    registry = CollectorRegistry()
    with guard.wrap(
        slow, demo_probe, policy=policy(shadow_every=1), registry=registry, name="q"
    ) as s:
        start = time.monotonic()
        for mel in list(mels(20)):
            s.run({"mel": mel})
        assert time.monotonic() - start < 10  # the blocked reference held no call
        dropped = registry.get_sample_value(
            "mnn_guard_shadow_checks_total", {"session": "q", "result": "dropped"}
        )
        assert dropped is not None and dropped >= 20 - 5  # the queue holds 4, one in hand
        slow.gate.set()
        assert s.status.shadow is not None and s.status.shadow.dropped == dropped


def test_a_divergence_is_logged_with_its_worst_value_and_bundled(
    demo_probe: probes.Probe, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A shadow failure is a warning naming the worst SNR; with Policy.diagnose its bundle holds
    the live inputs that diverged."""
    loud = demo.demo_mel(40, seed=3) * np.float32(4.0)
    listener = CapturingListener()
    with caplog.at_level(logging.WARNING, logger="mnn_guard"), guard.wrap(
        loud_only(), demo_probe, metrics=False, listeners=[listener],
        policy=policy(shadow_every=1, diagnose=tmp_path / "diag"),
    ) as s:  # fmt: skip
        s.run({"mel": loud})
        until(WORK, lambda: s.status.mode == "dynamic")
    said = [r.getMessage() for r in caplog.records if "shadow check failed" in r.getMessage()]
    assert said and "dB" in said[0]
    fails = [e.check for e in listener.of("shadow") if e.result == "fail"]
    assert fails and 25 < fails[0].module_worst_db < 35  # the module's worst: the 30 dB fault
    until(WORK, lambda: bool(find_bundles(tmp_path / "diag")))
    shadow = [b for b in find_bundles(tmp_path / "diag") if "shadow" in b.name]
    assert shadow
    with np.load(shadow[0] / "inputs.npz") as inputs:
        assert any(np.array_equal(inputs[k], loud) for k in inputs.files)


def test_the_reference_of_a_control_flow_model_is_a_second_static_instance(
    converted: dict[str, Path],
) -> None:
    """MNN loads a control-flow model statically even with dynamic=True: the shadow still
    compares, against a second instance, and its status says so."""
    factory = guard.mnn_factory(converted["control_flow"], ["x", "flag"], ["y"], threads=1)
    inputs = {"x": np.linspace(-1, 1, 16, dtype=np.float32)[None], "flag": np.array(1, np.int32)}
    probe = probes.record(factory, inputs, calibrate_inits=0)
    with pytest.warns(guard.mnn.DynamicIgnoredWarning):
        session = guard.wrap(factory, probe, policy=policy(shadow_every=1), metrics=False)
    with session:
        session.run(inputs)
        until(WORK, lambda: session.status.shadow is not None and session.status.shadow.checks == 1)
        assert session.status.shadow.reference is Reference.STATIC


def test_no_shadow_by_default(demo_probe: probes.Probe) -> None:
    """Without shadow_every nothing is sampled and the status says so."""
    with guard.wrap(demo.demo_factory(threads=1), demo_probe, policy=policy(), metrics=False) as s:
        s.run({"mel": demo.demo_mel(30)})
        assert s.status.shadow is None
        assert not any(t.name.startswith("mnn-guard-shadow") for t in threading.enumerate())


@pytest.mark.hostile
@pytest.mark.parametrize("every", [0, -1, 1.5, True, "5"])
def test_a_bad_shadow_period_is_refused(every: Any) -> None:
    """shadow_every is a whole number of calls >= 1, or None."""
    with pytest.raises(guard.ConfigError, match="shadow_every"):
        guard.Policy(shadow_every=every)


def test_a_pool_worker_shadows_its_own_calls(demo_probe: probes.Probe) -> None:
    """In a guard.Pool the shadow lives inside the worker: after the first loud call its
    session leaves the static rung, and loud calls are served exact from then on."""
    loud = demo.demo_mel(50, seed=12) * np.float32(4.0)
    clean = reference(loud)
    with guard.Pool(
        loud_only(), demo_probe, processes=1, name="pooled",
        policy=policy(shadow_every=1), request_timeout=60.0,
    ) as pool:  # fmt: skip
        assert pool.status()[0].rung == "static"
        served = [pool.run({"mel": loud})["wav"]]
        deadline = time.monotonic() + 30
        while degraded(served[-1], clean):
            assert time.monotonic() < deadline, "the worker kept serving the degraded module"
            served.append(pool.run({"mel": loud})["wav"])
        assert not any(degraded(pool.run({"mel": loud})["wav"], clean) for _ in range(10))
        assert pool.status()[0].rung == "dynamic"


def test_a_shadowed_session_starts_its_shadow_series_and_removes_them_at_close(
    demo_probe: probes.Probe,
) -> None:
    """With shadow_every set, the counters exist at 0 for every result and the worst-SNR gauge
    reads +Inf before the first check; closing the session removes them."""
    registry = CollectorRegistry()
    names = ("mnn_guard_shadow_checks_total", "mnn_guard_shadow_snr_db")
    with guard.wrap(
        demo.demo_factory(threads=1), demo_probe, policy=policy(shadow_every=1000),
        registry=registry, name="fresh",
    ):  # fmt: skip
        found = {
            (x.name, x.labels.get("result")): x.value
            for m in registry.collect()
            for x in m.samples
            if x.name in names
        }
        assert found == {
            ("mnn_guard_shadow_checks_total", "pass"): 0.0,
            ("mnn_guard_shadow_checks_total", "fail"): 0.0,
            ("mnn_guard_shadow_checks_total", "dropped"): 0.0,
            ("mnn_guard_shadow_snr_db", None): float("inf"),
        }
    left = [x for m in registry.collect() for x in m.samples if x.name in names]
    assert left == []


@pytest.mark.hostile
def test_a_reference_that_hangs_delays_wrap_by_init_timeout_at_most(
    demo_probe: probes.Probe, caplog: pytest.LogCaptureFixture
) -> None:
    """wrap waits for the shadow's reference within Policy.init_timeout, then serves and says
    so; the checks start once the reference exists."""
    hanging = HangingReference(demo.demo_factory(threads=1))
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mnn_guard"), guard.wrap(
        hanging, demo_probe, metrics=False, policy=policy(shadow_every=1, init_timeout=2.0)
    ) as s:  # fmt: skip
        # init_timeout (2 s), far below the wait_timeout (30 s) or 60 s that a wrong bound waits
        assert time.monotonic() - start < 20
        assert s.status.shadow is not None and s.status.shadow.reference is Reference.NONE
        assert any("reference was not built" in r.getMessage() for r in caplog.records)
        mel = demo.demo_mel(30, seed=4)
        assert not degraded(s.run({"mel": mel})["wav"], reference(mel))
        hanging.gate.set()
        until(
            WORK,
            lambda: s.status.shadow is not None and s.status.shadow.reference is not Reference.NONE,
        )
        s.run({"mel": mel})
        until(WORK, lambda: s.status.shadow is not None and s.status.shadow.checks >= 1)


def test_the_check_judges_copies_the_caller_cannot_change(demo_probe: probes.Probe) -> None:
    """A caller that overwrites its inputs and the outputs it was handed, after run() returned
    and before the shadow checked them, changes nothing: the call passes its check."""
    slow = SlowReference(demo.demo_factory(threads=1), 1.0)
    with guard.wrap(slow, demo_probe, policy=policy(shadow_every=1), metrics=False) as s:
        mel = demo.demo_mel(30, seed=5)
        wav = s.run({"mel": mel})["wav"]
        mel *= np.float32(4.0)  # the caller's own arrays, reused for its next call
        wav[...] = 0.0
        slow.gate.set()
        until(WORK, lambda: s.status.shadow is not None and s.status.shadow.checks == 1)
        assert (s.status.shadow.failed, s.status.mode) == (0, "static")


class ShortReference:
    """A factory whose reference (dynamic) modules return no outputs for live calls."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.inputs, self.outputs, self.path = factory.inputs, factory.outputs, factory.path

    def __call__(self, **overrides: Any) -> Any:
        module = self.factory(**overrides)
        if not overrides.get("dynamic"):
            return module
        runner = guard.mnn.adapt(module)

        class Short:
            calls = 0

            def run(self, arrays: Any) -> Any:
                Short.calls += 1
                return runner.run(arrays)[:0] if Short.calls > 1 else runner.run(arrays)

        return Short()


def test_a_reference_returning_too_few_outputs_judges_nothing_and_says_so(
    demo_probe: probes.Probe, caplog: pytest.LogCaptureFixture
) -> None:
    """A live call the reference answers with too few outputs is not judged (neither a pass nor
    a failure); the log names both counts, and the module serves on."""
    factory = ShortReference(demo.demo_factory(threads=1))
    with caplog.at_level(logging.WARNING, logger="mnn_guard"), guard.wrap(
        factory, demo_probe, policy=policy(shadow_every=1), metrics=False
    ) as s:  # fmt: skip
        for seed in range(3):
            s.run({"mel": demo.demo_mel(30, seed=seed)})
        until(WORK, lambda: any("returned 0 outputs" in r.getMessage() for r in caplog.records))
        said = [r.getMessage() for r in caplog.records if "returned 0 outputs" in r.getMessage()]
        assert f"session {s.name}" in said[0] and "expected 1" in said[0]
        assert s.status.shadow is not None and s.status.shadow.failed == 0
        assert s.status.mode == "static"


# ------------------------------------------------------------ what the session gives its shadow


class StallsElsewhere:
    """A factory (it pickles) that builds at once in the process that made it and takes longer
    than any bound in another: the session starts, its reference process does not."""

    def __init__(self) -> None:
        self.home = os.getpid()
        self.factory = demo.demo_factory(threads=1)

    def __call__(self, **overrides: Any) -> Any:
        if os.getpid() != self.home:
            time.sleep(BOUND)
        return self.factory(**overrides)


def test_the_reference_process_is_given_up_after_the_sessions_init_timeout(
    demo_probe: probes.Probe,
) -> None:
    """A reference process that does not build within Policy.init_timeout (2 s here) is given
    up after that bound, which its error names; the session serves meanwhile."""
    bounded = policy(shadow_every=1, init_timeout=2.0)
    with guard.wrap(StallsElsewhere(), demo_probe, metrics=False, policy=bounded) as s:
        error = until(WORK, lambda: s.status.shadow is not None and s.status.shadow.error)
        assert "did not answer within 2 s while it built" in error, error
        assert s.status.healthy


def test_shadow_process_false_keeps_the_sessions_reference_on_a_thread(
    demo_probe: probes.Probe, caplog: pytest.LogCaptureFixture
) -> None:
    """Policy(shadow_process=False) reaches the shadow: its reference is built on the shadow's
    thread here, without a warning."""
    with caplog.at_level(logging.WARNING, logger="mnn_guard"), guard.wrap(
        loud_only(), demo_probe, metrics=False, policy=policy(shadow_every=1, shadow_process=False)
    ) as s:  # fmt: skip
        until(WORK, lambda: s.status.shadow is not None and s.status.shadow.where is not Where.NONE)
        assert s.status.shadow is not None
        assert (s.status.shadow.where, s.status.shadow.pid) == (Where.THREAD, None)
        assert not any("runs on a thread" in r.getMessage() for r in caplog.records)
