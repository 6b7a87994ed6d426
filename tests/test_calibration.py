"""Calibrated judgement: a module is held to what clean inits compute, measured at record time.

Faults are injected into real modules (noise on their outputs, one layer's weights changed in
a rebuilt model file); "caught" means the guard serves no static module that has them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from spawning import report_from_spawned

import guard
import probes
from guard import mnn
from guard.ladder import Basis
from guard.mnn.weights import Weights
from guard.testing import DegradedModule, Fault, FaultyFactory
from guard.tools import demo
from guard.tools.models import build_small, small_inputs
from probes.calibration import MARGIN_DB, precision_db
from probes.measures import snr_db
from probes.probe import Case

Array = np.ndarray[Any, Any]
SCHEMA1 = Path(__file__).parent / "data" / "probe_schema1"


def quiet(**kw: Any) -> guard.Policy:
    """No background thread, no promotion: the session does only what wrap does."""
    return guard.Policy(background=False, promote_after=None, **kw)


def served_modes(factory: Any, probe: probes.Probe, sessions: int, **policy: Any) -> Counter[str]:
    """How many of `sessions` fresh sessions serve each rung."""
    modes: Counter[str] = Counter()
    for k in range(sessions):
        with guard.wrap(factory, probe, policy=quiet(**policy), metrics=False, name=f"c{k}") as s:
            modes[s.status.mode] += 1
    return modes


def shifted(probe: probes.Probe, db: float, seed: int = 5) -> probes.Probe:
    """The probe with every golden moved by noise at `db` SNR: a machine that computes the
    model that far from the recording one."""
    rng = np.random.default_rng(seed)
    cases = []
    for case in probe.cases:
        outputs = {}
        for name, golden in case.outputs.items():
            rms = float(np.sqrt(np.mean(np.square(golden, dtype=np.float64))))
            noise = rng.normal(0.0, rms / 10 ** (db / 20), golden.shape)
            outputs[name] = (golden + noise).astype(golden.dtype)
        cases.append(Case(inputs=case.inputs, outputs=outputs))
    return dataclasses.replace(probe, cases=tuple(cases))


# ------------------------------------------------------------------ what recording measures


def test_the_shipped_probe_is_calibrated_from_bit_identical_inits(demo_probe: probes.Probe) -> None:
    """Clean inits of the demo vocoder are bit-identical: the limit is the ulp floor, less the
    margin, far above the fixed 45 dB; and it says where it was measured."""
    calibration = demo_probe.calibration
    assert calibration is not None and set(calibration.outputs) == {"wav"}
    wav = calibration.outputs["wav"]
    assert wav.spread_db == math.inf
    assert 100 < wav.floor_db < precision_db(np.dtype(np.float32))
    assert wav.limit_db == pytest.approx(wav.floor_db - MARGIN_DB)
    assert dict(demo_probe.limits_for("wav")) == {
        **dict(demo_probe.thresholds),
        "snr_db": wav.limit_db,
    }
    assert dict(demo_probe.limits_for("wav", "loose")) == dict(demo_probe.thresholds)
    assert calibration.inits >= 2 and calibration.processes == 2
    assert set(calibration.provenance) == {"mnn", "cpu", "threads", "python"}
    assert calibration.provenance["mnn"] == mnn.mnn_version()


def test_limits_set_by_hand_are_not_calibrated(tmp_path: Path) -> None:
    """A per-output limit keeps that output uncalibrated; thresholds= keeps every output so."""
    path = tmp_path / "small.mnn"
    build_small(path)
    factory = guard.mnn_factory(path, ["audio", "state", "sr"], ["prob", "state_out"], threads=1)
    inputs = small_inputs()
    mine = probes.record(factory, inputs, per_output={"prob": {"snr_db": 30.0}}, processes=0)
    assert mine.calibration is not None and set(mine.calibration.outputs) == {"state_out"}
    assert dict(mine.limits_for("prob")) == {"snr_db": 30.0}
    every = probes.record(factory, inputs, thresholds={"snr_db": 40.0}, processes=0)
    assert every.calibration is None and dict(every.limits_for("state_out")) == {"snr_db": 40.0}
    none = probes.record(factory, inputs, calibrate_inits=0, processes=0)
    assert none.calibration is None


def test_a_limit_set_later_wins_over_the_calibrated_one(demo_probe: probes.Probe) -> None:
    """with_thresholds(wav={"snr_db": 30}) drops wav's calibrated limit."""
    mine = demo_probe.with_thresholds(wav={"snr_db": 30.0})
    assert mine.calibration is None and dict(mine.limits_for("wav")) == {"snr_db": 30.0}
    golden = demo_probe.cases[0].outputs["wav"]
    assert mine.judge({"wav": golden * np.float32(1.001)}).passed
    assert not demo_probe.judge({"wav": golden * np.float32(1.001)}).passed


def test_calibration_survives_save_and_load(demo_probe: probes.Probe, tmp_path: Path) -> None:
    """The manifest keeps the measurements (null for bit-identical) and loads them back."""
    demo_probe.save(tmp_path / "p")
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["schema_version"] == 2
    assert manifest["calibration"]["outputs"]["wav"]["spread_db"] is None
    back = probes.load(tmp_path / "p")
    assert back.calibration == demo_probe.calibration


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.__setitem__("margin_db", -1.0), "'calibration.margin_db' must be a finite"),
        (lambda c: c["outputs"]["wav"].__setitem__("limit_db", "high"), "limit_db must be a"),
        (lambda c: c["outputs"].__setitem__("nope", c["outputs"]["wav"]), "unknown outputs"),
        (lambda c: c.__setitem__("extra", 1), "'calibration' needs exactly the keys"),
        (lambda c: c["provenance"].__setitem__("cpu", 7), "'calibration.provenance.cpu' must"),
    ],
    ids=["margin", "limit", "output", "key", "provenance"],
)
def test_a_damaged_calibration_is_refused(
    demo_probe: probes.Probe, tmp_path: Path, change: Any, message: str
) -> None:
    """Every damage to the calibration block is a ProbeError saying which field."""
    demo_probe.save(tmp_path / "p")
    path = tmp_path / "p" / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest["calibration"])
    path.write_text(json.dumps(manifest))
    with pytest.raises(probes.ProbeError, match=message):
        probes.load(tmp_path / "p")


class NthStatic:
    """A factory whose n-th static init (from 1) carries output noise at `snr` dB."""

    def __init__(self, factory: Any, n: int, snr: float) -> None:
        self.factory, self.n, self.snr, self.inits = factory, n, snr, 0
        self.inputs, self.outputs, self.path = factory.inputs, factory.outputs, factory.path

    def __call__(self, **overrides: Any) -> Any:
        module = self.factory(**overrides)
        if overrides.get("dynamic"):
            return module
        self.inits += 1
        if self.inits != self.n:
            return module
        return DegradedModule(module, Fault.NOISE, seed=self.inits, snr_db=self.snr)


def test_a_degraded_init_seen_while_recording_is_left_out_and_reported(tmp_path: Path) -> None:
    """One degraded static init among the calibration's: warned about, and not the measure."""
    faulty = NthStatic(demo.demo_factory(threads=1), n=2, snr=40.0)
    with pytest.warns(probes.CanaryWarning, match="left out a degraded init"):
        probe = probes.record(
            faulty, {"mel": demo.demo_mel(40)}, dynamic={"mel": {2: (1, 400)}}, processes=0
        )
    assert probe.calibration is not None
    assert probe.calibration.outputs["wav"].spread_db == math.inf
    assert any("left out a degraded init" in n for n in probe.meta.notes)


# ------------------------------------------------------------------ what the guard catches


@pytest.mark.parametrize("snr", [60.0, 45.0])
def test_fresh_output_noise_on_every_static_init_is_never_served(
    demo_probe: probes.Probe, snr: float
) -> None:
    """Fresh noise at 60 or 45 dB on every static init: 0 of 20 sessions serve static."""
    faulty = FaultyFactory(demo.demo_factory(threads=1), fault=Fault.NOISE, rate=1.0, snr_db=snr)
    assert served_modes(faulty, demo_probe, 20) == Counter({"dynamic": 20})


@pytest.mark.parametrize("scale", [1.001, 1.01])
def test_one_layers_weights_changed_by_a_tenth_of_a_percent_are_caught(
    demo_probe: probes.Probe, tmp_path: Path, scale: float
) -> None:
    """Every layer's weights of the vocoder (its 20 convolution kernels), one at a time,
    scaled by 1.001 or 1.01 in a rebuilt model that static inits load: no session serves
    static. (Its biases matter less: 1.001 on some moves the output by less than rounding.)"""
    weights = Weights(demo.DEMO_MODEL)
    clean = demo.demo_factory(threads=1)
    served = []
    kernels = [t for t in weights.tensors if len(t.shape) > 1]
    assert len(kernels) == 20
    for tensor in kernels:
        path = tmp_path / f"{tensor.index}.mnn"
        weights.save_perturbed(path, tensor, scale=scale)
        rebuilt = guard.mnn_factory(path, ["mel"], ["wav"], threads=1)
        faulty = FaultyFactory(clean, fault=Fault.SWAP, rate=1.0, replacement=rebuilt)
        if served_modes(faulty, demo_probe, 1, reinit_attempts=0)["static"]:
            served.append(tensor.name)
    assert not served, served


def clean_sessions(threads: int, conn: Any) -> None:
    """Child: 130 clean sessions at `threads` MNN threads; reports how each served."""
    probe = probes.load(demo.DEMO_PROBE, model=demo.DEMO_MODEL)
    factory = demo.demo_factory(threads=threads)
    bases: Counter[tuple[str, str, int]] = Counter()
    for k in range(130):
        with guard.wrap(factory, probe, policy=quiet(), metrics=False, name=f"t{k}") as s:
            bases[(s.status.mode, s.status.basis.value, s.status.attempts)] += 1
    conn.send(bases)


def test_clean_inits_raise_no_false_alarm_at_threads_1_and_4() -> None:
    """130 clean sessions at one thread and 130 at four all serve static on the goldens (each
    count in a fresh process: MNN's thread pool, once a four-thread module ran, keeps spinning
    in its process and would slow every later test's forwards)."""
    for threads in (1, 4):
        bases = report_from_spawned(clean_sessions, threads, seconds=600.0)
        assert bases == Counter({("static", Basis.GOLDEN.value, 1): 130}), (threads, bases)


def test_goldens_80db_away_give_no_false_alarm_and_still_catch_a_58db_fault(
    demo_probe: probes.Probe,
) -> None:
    """A probe whose goldens lie 80 dB from what this machine computes: clean static inits
    serve, judged against a local reference; a 58 dB fault on every static init is caught."""
    far = shifted(demo_probe, 80.0)
    clean = demo.demo_factory(threads=1)
    counted = FaultyFactory(clean, rate=0.0)
    for k in range(10):
        with guard.wrap(counted, far, policy=quiet(), metrics=False, name=f"f{k}") as s:
            assert (s.status.mode, s.status.basis) == ("static", Basis.LOCAL)
    assert counted.inits == 20  # each session: its static init and one reference init
    faulty = FaultyFactory(clean, fault=Fault.NOISE, rate=1.0, snr_db=58.0)
    assert served_modes(faulty, far, 10) == Counter({"dynamic": 10})


def test_goldens_no_init_here_computes_are_disputed_not_exhausted(
    demo_probe: probes.Probe, caplog: pytest.LogCaptureFixture
) -> None:
    """Goldens 40 dB from what every init here computes: the guard cannot tell whether the
    probe is stale here or every init is degraded alike; it says so and serves what they agree
    on (basis disputed) rather than failing every rung."""
    far = shifted(demo_probe, 40.0)
    registry = CollectorRegistry()
    with caplog.at_level(logging.WARNING, logger="mnn_guard"):
        session = guard.wrap(
            demo.demo_factory(threads=1), far, policy=quiet(), registry=registry, name="far"
        )
    with session:
        assert session.status.healthy and session.status.basis is Basis.DISPUTED
        assert "judged against a disputed reference" in session.status.describe()
        basis = {
            b.value: registry.get_sample_value("mnn_guard_basis", {"session": "far", "basis": b})
            for b in Basis
        }
        assert basis == {"golden": 0.0, "local": 0.0, "disputed": 1.0}
    said = [r.getMessage() for r in caplog.records if r.getMessage().endswith("(basis disputed)")]
    assert said and all(m.startswith("session far: all ") for m in said)


def test_inits_that_each_fail_differently_are_never_disputed(demo_probe: probes.Probe) -> None:
    """Every init degraded with its own noise (the field's fault): the ladder is exhausted,
    nothing is served as disputed."""
    faulty = FaultyFactory(
        demo.demo_factory(threads=1), fault=Fault.NOISE, rate=1.0, affects="all", snr_db=30
    )
    with pytest.raises(guard.RecoveryExhausted):
        guard.wrap(faulty, demo_probe, policy=quiet(reinit_attempts=1), metrics=False)


def test_silent_inits_everywhere_are_exhausted_not_disputed(demo_probe: probes.Probe) -> None:
    """Every init returns zeros, the same ones: silence is no other machine's answer."""
    faulty = FaultyFactory(demo.demo_factory(threads=1), fault=Fault.ZEROS, rate=1.0, affects="all")
    with pytest.raises(guard.RecoveryExhausted):
        guard.wrap(faulty, demo_probe, policy=quiet(reinit_attempts=1), metrics=False)


class Borderline:
    """A factory whose static inits carry output noise: `first` dB on the first, `later` dB on
    every later one (the dynamic rung is clean)."""

    def __init__(self, factory: Any, first: float, later: float) -> None:
        self.factory, self.first, self.later, self.inits = factory, first, later, 0
        self.inputs, self.outputs, self.path = factory.inputs, factory.outputs, factory.path

    def __call__(self, **overrides: Any) -> Any:
        module = self.factory(**overrides)
        if overrides.get("dynamic"):
            return module
        self.inits += 1
        snr = self.first if self.inits == 1 else self.later
        return DegradedModule(module, Fault.NOISE, seed=self.inits, snr_db=snr)


def test_a_fault_near_the_limit_does_not_get_through_by_being_retried(
    demo_probe: probes.Probe,
) -> None:
    """A first static init 5 dB below the calibrated limit, re-inits 5 dB above it: the re-inits
    must beat the limit by the retry margin, so the session falls back; without the margin
    the borderline re-init would have been served."""
    limit = demo_probe.limits_for("wav")["snr_db"]
    factory = demo.demo_factory(threads=1)
    near = Borderline(factory, first=limit - 5, later=limit + 5)
    assert served_modes(near, demo_probe, 1) == Counter({"dynamic": 1})
    lottery = Borderline(factory, first=limit - 5, later=limit + 5)
    assert served_modes(lottery, demo_probe, 1, retry_margin_db=0.0) == Counter({"static": 1})


# ------------------------------------------------------------------ canaries


def test_a_fixed_shape_model_gets_a_second_canary_that_catches_stale_outputs(
    tmp_path: Path,
) -> None:
    """No dynamic axis: recording still derives a second case (the inputs rolled), so a module
    that returns the previous call's output is caught."""
    path = tmp_path / "small.mnn"
    build_small(path)
    factory = guard.mnn_factory(path, ["audio", "state", "sr"], ["prob", "state_out"], threads=1)
    probe = probes.record(factory, small_inputs(), processes=0)
    assert len(probe.cases) == 2 and probe.meta.notes[0].startswith("case 1 is case 0 with")
    stale = FaultyFactory(factory, fault=Fault.STALE, rate=1.0)
    assert served_modes(stale, probe, 3) == Counter({"dynamic": 3})


@pytest.mark.parametrize(
    ("inputs", "outputs", "warned"),
    [
        ({"input_lengths": np.array([1], np.int32)}, {"y": np.arange(8.0)[None]}, "near zero"),
        ({"x": np.ones((1, 8), np.float32)}, {"y": np.zeros((1, 8))}, "is silent"),
        ({"x": np.ones((1, 8), np.float32)}, {"y": np.full((1, 8), 0.25)}, "is constant"),
        ({"x": np.ones((1, 8), np.float32)}, {"p": np.array([[0.003, 0.997]])}, "confident"),
        ({"x": np.ones((1, 8), np.float32)}, {"t": np.tile([0.9999, -0.9998], (1, 32))}, "bounds"),
    ],
    ids=["length", "silent", "constant", "softmax", "tanh"],
)
def test_degenerate_canaries_are_named(inputs: Any, outputs: Any, warned: str) -> None:
    """Each kind of canary that judges little of the model is named in one sentence."""
    from guard.canaries import degenerate

    found = degenerate([inputs], [outputs])
    assert len(found) == 1 and warned in found[0], found


def test_a_sound_canary_raises_no_warning(demo_probe: probes.Probe) -> None:
    """The demo's own canary is not degenerate."""
    from guard.canaries import degenerate

    assert (
        degenerate([c.inputs for c in demo_probe.cases], [c.outputs for c in demo_probe.cases])
        == []
    )


def test_recording_warns_about_a_degenerate_canary(confident: Path) -> None:
    """A canary whose softmax is saturated warns while recording, and the probe notes it."""
    factory = guard.mnn_factory(confident, ["image"], ["prob"], threads=1)
    with pytest.warns(probes.CanaryWarning, match="confident probability") as seen:
        probe = probes.record(factory, _image(), calibrate_inits=0)
    assert len(seen) == 1
    assert any(n.startswith("degenerate canary: output 'prob'") for n in probe.meta.notes)


def test_dynamic_axes_take_a_step(demo_factory: Any, tmp_path: Path) -> None:
    """dynamic={"mel": {2: (10, 400, 10)}}: 110 frames fit, 105 do not; the step is saved."""
    probe = probes.record(
        demo_factory, {"mel": demo.demo_mel(100)}, dynamic={"mel": {2: (10, 400, 10)}},
        calibrate_inits=0,
    )  # fmt: skip
    assert probe.inputs[0].shape == (1, 80, (10, 400, 10))
    probe.save(tmp_path / "p")
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [1, 80, [10, 400, 10]]
    with guard.wrap(demo_factory, probes.load(tmp_path / "p"), policy=quiet(), metrics=False) as s:
        assert s.run({"mel": demo.demo_mel(110)})["wav"].shape == (1, 1, 110 * demo.HOP)
        with pytest.raises(
            guard.InputMismatch, match=r"expected the dynamic range 10\.\.400 step 10"
        ):
            s.run({"mel": demo.demo_mel(105)})


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ((10, 400, 0), "bad step 0"),
        ((10, 400, 7), "outside the declared range"),
        ((9, 2), "bad range"),
    ],
)
def test_bad_steps_are_refused(demo_factory: Any, bounds: Any, message: str) -> None:
    """A step below 1, a canary off the step, or a reversed range is a ProbeError."""
    with pytest.raises(probes.ProbeError, match=message):
        probes.record(
            demo_factory, {"mel": demo.demo_mel(100)}, dynamic={"mel": {2: bounds}},
            calibrate_inits=0,
        )  # fmt: skip


# ------------------------------------------------------------------ probes of schema 1


def test_a_schema_1_probe_loads_and_judges_as_before(tmp_path: Path) -> None:
    """The committed schema-1 probe loads uncalibrated with its fixed limits: 60 dB output noise
    passes it, 29 dB fails it; a session on it serves a 60 dB fault, as before."""
    folder = tmp_path / "old"
    shutil.copytree(SCHEMA1, folder)
    old = probes.load(folder, model=demo.DEMO_MODEL)
    assert old.meta.schema_version == 1 and old.calibration is None
    assert dict(old.thresholds) == {"snr_db": 45.0, "cosine": 0.99995, "lsd_db": 1.0}
    golden = old.cases[0].outputs["wav"].astype(np.float64)
    rms = float(np.sqrt(np.mean(golden**2)))
    rng = np.random.default_rng(2)
    for db, ok in ((60.0, True), (29.0, False)):
        noisy = (golden + rng.normal(0, rms / 10 ** (db / 20), golden.shape)).astype(np.float32)
        assert old.judge({"wav": noisy}).passed is ok
        assert snr_db(golden, noisy) == pytest.approx(db, abs=0.5)
    faulty = FaultyFactory(demo.demo_factory(threads=1), fault=Fault.NOISE, rate=1.0, snr_db=60)
    assert served_modes(faulty, old, 1) == Counter({"static": 1})


# ------------------------------------------------------------------ sentinels and assess


@pytest.fixture(scope="module")
def confident(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier whose canary's softmax is saturated ([1.0, 3e-9])."""
    import onnx_models

    folder = tmp_path_factory.mktemp("confident")
    return onnx_models.convert(onnx_models.classifier(confidence=30.0), folder / "clf.mnn")


def _image(seed: int = 0) -> dict[str, Array]:
    return {"image": np.random.default_rng(seed).standard_normal((1, 3, 16, 16)).astype(np.float32)}


def test_auto_sentinels_pick_the_logits_before_a_softmax(confident: Path) -> None:
    """sentinels="auto" adds the tensor the softmax reads, judged and calibrated, never served."""
    factory = guard.mnn_factory(confident, ["image"], ["prob"], threads=1)
    with pytest.warns(probes.CanaryWarning, match="confident probability"):
        probe = probes.record(factory, _image(), sentinels="auto", processes=0)
    assert probe.output_names == ["prob", "logits"] and probe.sentinel_names == ["logits"]
    assert probe.calibration is not None and set(probe.calibration.outputs) == {"prob", "logits"}
    with guard.wrap(factory, probe, policy=quiet(), metrics=False) as session:
        out = session.run(_image(3))
    assert list(out) == ["prob"] and out["prob"].shape == (1, 2)


def test_sentinels_are_judged_on_the_serving_module(confident: Path, tmp_path: Path) -> None:
    """A static init whose last layer's weights are 1% off: the saturated softmax passes the
    probe without sentinels; with the logits as a sentinel the session falls back."""
    factory = guard.mnn_factory(confident, ["image"], ["prob"], threads=1)
    weights = Weights(confident)
    layer = next(t for t in weights.tensors if t.name.startswith("logits") and len(t.shape) > 1)
    weights.save_perturbed(tmp_path / "faulty.mnn", layer, scale=1.01)
    rebuilt = guard.mnn_factory(tmp_path / "faulty.mnn", ["image"], ["prob"], threads=1)
    faulty = FaultyFactory(factory, fault=Fault.SWAP, rate=1.0, replacement=rebuilt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", probes.CanaryWarning)
        plain = probes.record(factory, _image(), processes=0)
        watched = probes.record(factory, _image(), sentinels="auto", processes=0)
    assert served_modes(faulty, plain, 1) == Counter({"static": 1})
    assert served_modes(faulty, watched, 1) == Counter({"dynamic": 1})


def test_a_factory_that_cannot_load_sentinels_is_refused(confident: Path) -> None:
    """A plain callable cannot add outputs: wrap says so instead of serving without them."""
    factory = guard.mnn_factory(confident, ["image"], ["prob"], threads=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", probes.CanaryWarning)
        probe = probes.record(factory, _image(), sentinels="auto", calibrate_inits=0)

    def plain(**overrides: Any) -> Any:
        return factory(**overrides)

    with pytest.raises(guard.ConfigError, match="sentinels"):
        guard.wrap(plain, probe, metrics=False)


def test_assess_reports_coverage_with_and_without_sentinels(
    confident: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """On a saturated softmax, assess finds the canary blind to every weight without
    sentinels, and sees every one with sentinels="auto"; --json holds `coverage` in 0..1."""
    from guard.tools.cli import main

    factory = guard.mnn_factory(confident, ["image"], ["prob"], threads=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", probes.CanaryWarning)
        probes.record(factory, _image(), processes=0).save(tmp_path / "plain")
        probes.record(factory, _image(), sentinels="auto", processes=0).save(tmp_path / "watched")
    assert main(["assess", str(confident), "--probe", str(tmp_path / "plain")]) == 0
    said = capsys.readouterr().out
    assert "coverage 0%" in said and "--sentinels auto" in said
    assert main(["assess", str(confident), "--probe", str(tmp_path / "watched"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["coverage"] >= 0.9 and report["coverage_without_sentinels"] < 0.5
    assert report["sentinels"] == ["logits"] and report["blind"] == []
    assert len(report["tensors"]) == 8 and report["perturbation"]["relative_to_std"] == 0.01


def test_assess_covers_every_weight_of_the_demo_vocoder(demo_probe: probes.Probe) -> None:
    """The shipped probe catches 1% noise on every one of the vocoder's 40 weight tensors."""
    from guard.tools.assess import run_assess

    report = run_assess(demo.DEMO_MODEL, demo_probe)
    assert len(report.tensors) == 40 and report.faithful
    assert report.coverage == 1.0, report.blind
    assert all(t.snr_db < demo_probe.limits_for("wav")["snr_db"] for t in report.tensors)
