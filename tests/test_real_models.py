"""Real converted models (small ONNX graphs, see tests/onnx_models.py): names checked against
the model, control flow, scalar inputs, derived canaries, and the tools on any model."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx_models
import pytest
from conftest import quiet_policy
from prometheus_client import CollectorRegistry

import guard
import probes
from guard import mnn
from guard.testing import CapturingListener, FaultyFactory
from guard.tools import bench, bench_report, cli, demo
from guard.tools.doctor import format_doctor, run_doctor

Array = np.ndarray[Any, Any]
CF_NAMES = (["x", "flag"], ["y"])
ROLES_NAMES = (["x", "scales", "state", "gain"], ["y", "new_state"])
SCALES = np.array([0.5, 2.0, 0.7], np.float32)


def cf_inputs(flag: int = 1) -> dict[str, Array]:
    """Canary inputs of the control-flow model: a signal and a 0-d int64 flag."""
    x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    return {"x": x, "flag": np.array(flag, np.int64)}


def roles_inputs(frames: int = 12) -> dict[str, Array]:
    """Canary inputs of the roles model: signal, control vector, recurrent state, 0-d gain."""
    rng = np.random.default_rng(1)
    return {
        "x": rng.standard_normal((1, 4, frames)).astype(np.float32),
        "scales": SCALES.copy(),
        "state": rng.standard_normal((1, 8)).astype(np.float32),
        "gain": np.array(1.5, np.float32),
    }


def cf_factory(converted: dict[str, Path]) -> guard.mnn.MNNFactory:
    """A one-thread factory of the control-flow model."""
    return guard.mnn_factory(converted["control_flow"], *CF_NAMES, threads=1)


def roles_factory(converted: dict[str, Path]) -> guard.mnn.MNNFactory:
    """A one-thread factory of the roles model."""
    return guard.mnn_factory(converted["roles"], *ROLES_NAMES, threads=1)


def run_python(script: str) -> subprocess.CompletedProcess[str]:
    """Run a Python script in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `mnn-guard ARGS` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "guard.tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ours(stderr: str) -> list[str]:
    """The lines mnn-guard itself wrote on stderr."""
    return [line for line in stderr.splitlines() if line.startswith("mnn-guard")]


# ---------------------------------------------------------------- inspect


def test_inspect_the_demo_vocoder(demo_paths: tuple[Path, Path]) -> None:
    """inspect reads names, shape, dtype and format from the file; no control flow."""
    info = mnn.inspect(demo_paths[0])
    mel = mnn.TensorInfo(
        name="mel", shape=(1, 80, 100), dtype="float32", runs_as="float32", format="NCHW"
    )
    assert (info.inputs, info.outputs, info.control_flow) == ((mel,), ("wav",), False)
    assert info.mnn_version == "3.6.1" and info.biz_code == ""  # the release that wrote it


def test_inspect_a_converted_control_flow_model(converted: dict[str, Path]) -> None:
    """An ONNX If graph: an int64 scalar input read as int32 [], the bizCode, control flow
    (inputs in the order the converter wrote them, which differs between MNN releases)."""
    info = mnn.inspect(converted["control_flow"])
    assert sorted((t.name, t.dtype, t.shape) for t in info.inputs) == [
        ("flag", "int32", ()),
        ("x", "float32", (1, 16)),
    ]
    assert info.outputs == ("y",) and info.biz_code == onnx_models.BIZ_CODE
    assert info.control_flow is True
    assert any(mnn.STATIC_LOAD_NOTE in note for note in info.notes)
    assert mnn.inspect(converted["stride32"]).inputs[0].shape == (1, 1, -1, -1)  # open H, W


def test_inspect_follows_the_file(converted: dict[str, Path], tmp_path: Path) -> None:
    """The cache is per file and mtime: a model rewritten in place is read again."""
    model = tmp_path / "model.mnn"
    shutil.copy(converted["roles"], model)
    assert sorted(mnn.inspect(model).input_names) == sorted(ROLES_NAMES[0])
    shutil.copy(converted["control_flow"], model)
    os.utime(model, ns=(1, 1))
    assert sorted(mnn.inspect(model).input_names) == sorted(CF_NAMES[0])


def test_cli_inspect(converted: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """`mnn-guard inspect` prints the inputs and says dynamic=True is not honoured; --json too."""
    assert cli.main(["inspect", str(converted["control_flow"])]) == cli.EXIT_OK
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines() if line.startswith("flag ")]
    assert rows == [["flag", "int32", "int32", "[]", "NCHW"]] and "control flow: yes" in text
    assert cli.main(["inspect", str(converted["control_flow"]), "--json"]) == cli.EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert (data["control_flow"], data["dynamic_honoured"]) == (True, False)
    assert sorted(i["name"] for i in data["inputs"]) == sorted(CF_NAMES[0])


def test_inspect_starts_no_mnn_thread_and_a_fork_stays_safe(demo_paths: tuple[Path, Path]) -> None:
    """Inspecting (as guard.mnn_factory does) loads on a one-thread runtime manager: no MNN
    threads start, the process is not marked as loaded, and a forked child can load and run."""
    done = run_python(
        f"""
        import os
        import guard
        from guard import mnn
        before = len(os.listdir("/proc/self/task"))
        factory = guard.mnn_factory({str(demo_paths[0])!r}, ["mel"], ["wav"], threads=1)
        print("threads", len(os.listdir("/proc/self/task")) - before, mnn.loaded_pid())
        pid = os.fork()
        if pid == 0:
            from guard.tools import demo
            out = mnn.adapt(factory()).run([demo.demo_mel(8)])
            os._exit(0 if out[0].shape == (1, 1, 8 * 256) else 3)
        print("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        """
    )
    assert done.stdout.split() == ["threads", "0", "None", "child", "0"], done.stderr


# ---------------------------------------------------------------- names


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("inputs", "outputs", "problem"),
    [
        (["x", "flag"], ["yy"], "no output or tensor named ['yy']"),
        (["x", "flg"], ["y"], "no input(s) ['flg']; input(s) ['flag'] not given"),
        (["x"], ["y"], "input(s) ['flag'] not given"),
        (["x", "x", "flag"], ["y"], "input(s) ['x'] given twice"),
        (["x", "flag"], ["y", "y"], "output(s) ['y'] given twice"),
    ],
    ids=["output typo", "input typo", "missing input", "input twice", "output twice"],
)
def test_mnn_factory_refuses_names_the_model_lacks(
    converted: dict[str, Path], inputs: list[str], outputs: list[str], problem: str
) -> None:
    """A wrong name is a ConfigError naming the model's real names, before MNN sees it."""
    with pytest.raises(guard.ConfigError) as info:
        guard.mnn_factory(converted["control_flow"], inputs, outputs)
    assert problem in str(info.value)
    names = mnn.inspect(converted["control_flow"]).input_names  # the converter's order
    assert sorted(names) == ["flag", "x"]
    assert f"Its inputs are {names} and its outputs ['y']" in str(info.value)


def test_any_tensor_of_the_model_is_a_valid_output(converted: dict[str, Path]) -> None:
    """An intermediate tensor (MNN can return any) passes the check and loads."""
    factory = guard.mnn_factory(converted["control_flow"], CF_NAMES[0], ["cond", "y"], threads=1)
    cond, y = mnn.adapt(factory()).run([cf_inputs()["x"], np.array(1, np.int32)])
    assert cond.shape == () and y.shape == (1, 16)


@pytest.mark.hostile
def test_a_wrong_name_never_crashes(converted: dict[str, Path], tmp_path: Path) -> None:
    """A bare factory call (dynamic=True, which MNN answers with SIGSEGV), guard.wrap over a
    factory whose output is misspelt, and the CLI's record and check: errors, never a crash."""
    model = str(converted["control_flow"])
    probe_dir = tmp_path / "probe"
    probes.record(cf_factory(converted), cf_inputs()).save(probe_dir)
    done = run_python(
        f"""
        import guard, probes
        from guard.mnn import MNNFactory
        typo = MNNFactory({model!r}, ("x", "flag"), ("yy",))
        try:
            typo(dynamic=True)
        except guard.ConfigError as exc:
            print("bare", type(exc).__name__)

        class Misspelt:
            path, inputs, outputs = {model!r}, ["x", "flag"], ["y"]
            def __call__(self, **overrides):
                return typo(**overrides)

        probe = probes.load({str(probe_dir)!r})
        try:
            guard.wrap(Misspelt(), probe, metrics=False, policy=guard.Policy(background=False))
        except guard.RecoveryExhausted as exc:
            print("wrap", type(exc.__cause__).__name__, len(exc.attempts))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["bare", "ConfigError", "wrap", "ConfigError", "8"]
    record = run_cli(
        "record", model, "--input", "x", "--input", "flag", "--output", "yy",
        "--shape", "x=1,16", "--shape", "flag=int64:", "-o", str(tmp_path / "out"),
    )  # fmt: skip
    check = run_cli("check", str(converted["roles"]), "--probe", str(probe_dir))
    check_other = run_cli(
        "check", str(converted["roles"]), "--probe", str(probe_dir), "--ignore-model-hash"
    )
    for run, expected in (
        (record, "no output or tensor named ['yy']"),
        (check, "stale probe"),
        (check_other, f"Its inputs are {mnn.inspect(converted['roles']).input_names}"),
    ):
        assert run.returncode == cli.EXIT_USAGE, run.stderr
        assert len(ours(run.stderr)) == 1 and expected in ours(run.stderr)[0], run.stderr


# ---------------------------------------------------------------- control flow


def test_record_says_a_dynamic_reference_was_static(converted: dict[str, Path]) -> None:
    """The probe keeps the reference asked for, and its notes say MNN loaded it statically."""
    probe = probes.record(cf_factory(converted), cf_inputs())
    assert probe.meta.reference == {"dynamic": True}
    assert any("was a static load" in note for note in probe.meta.notes)
    plain = probes.record(roles_factory(converted), roles_inputs())
    assert not any("static load" in note for note in plain.meta.notes)


@pytest.mark.hostile
def test_record_still_refuses_a_reference_that_disagrees(converted: dict[str, Path]) -> None:
    """A static-in-fact reference whose second init is degraded is refused, and says static."""
    faulty = FaultyFactory(cf_factory(converted), schedule=[False, True], affects="all")
    with pytest.raises(probes.ProbeError, match=r"loaded statically.*does not agree with itself"):
        probes.record(faulty, cf_inputs())


@pytest.mark.parametrize(("model", "static"), [("control_flow", True), ("vocoder", False)])
def test_the_dynamic_rung_is_reported_as_what_it_is(
    model: str,
    static: bool,
    converted: dict[str, Path],
    demo_paths: tuple[Path, Path],
    demo_probe: probes.Probe,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every static init degraded: the session serves on the 'dynamic' rung; for a model with
    control flow, status, attempt, log line and metric say MNN loaded it statically."""
    if model == "vocoder":
        factory, probe = demo.demo_factory(), demo_probe
    else:
        factory, probe = cf_factory(converted), probes.record(cf_factory(converted), cf_inputs())
    faulty = FaultyFactory(factory, schedule=[True] * 4)  # the static rung's 4 inits
    caplog.set_level(logging.INFO, logger="mnn_guard")
    registry, events = CollectorRegistry(), CapturingListener()
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        session = guard.wrap(
            faulty, probe, policy=quiet_policy(), registry=registry, listeners=[events]
        )
    gauge = "mnn_guard_rung_loaded_static"
    with session:
        status = session.status
        loaded = [
            registry.get_sample_value(gauge, {"session": "default", "rung": rung})
            for rung in ("static", "dynamic")
        ]
    assert loaded == [0, int(static)]
    assert status.mode == "dynamic" and status.turned_static is static
    assert ("loaded static" in status.describe()) is static
    assert status.history[-1].turned_static is static
    assert [a.turned_static for a in status.history[:-1]] == [False] * 4
    said = any(mnn.STATIC_LOAD_NOTE in note for note in status.history[-1].notes)
    assert said is static
    logged = [r.getMessage() for r in caplog.records if "loaded static" in r.getMessage()]
    assert bool(logged) is static
    warned_ignored = [w for w in warned if issubclass(w.category, guard.mnn.DynamicIgnoredWarning)]
    assert len(warned_ignored) == int(static)
    if static:
        assert "no real dynamic fallback" in str(warned_ignored[0].message)


@pytest.mark.parametrize(("model", "spared"), [("control_flow", False), ("vocoder", True)])
def test_fault_injection_degrades_a_dynamic_rung_that_mnn_loads_statically(
    model: str, spared: bool, converted: dict[str, Path], demo_probe: probes.Probe
) -> None:
    """FaultyFactory's default spares dynamic=True inits only where MNN honours them: on the
    control-flow model (loaded statically all the same) every init is degraded and the
    session FAILS; on the vocoder the dynamic rung is spared and serves."""
    if model == "vocoder":
        factory, probe = demo.demo_factory(threads=1), demo_probe
    else:
        factory, probe = cf_factory(converted), probes.record(cf_factory(converted), cf_inputs())
    faulty = FaultyFactory(factory, rate=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", guard.mnn.DynamicIgnoredWarning)
        session = guard.wrap(
            faulty, probe, policy=quiet_policy(), metrics=False, raise_exhausted=False
        )
    with session:
        status = session.status
    assert (status.healthy, status.mode) == (spared, "dynamic")
    assert faulty.degraded_inits == faulty.inits - int(spared)
    assert {a.turned_static for a in status.history if a.rung.name == "dynamic"} == {not spared}


class ZeroOneOutput:
    """A real module of the roles model whose output `index` comes back all zeros."""

    def __init__(self, module: Any, index: int) -> None:
        self.runner = mnn.adapt(module, *ROLES_NAMES)
        self.index = index

    def run(self, arrays: Any) -> list[Array]:
        outputs = self.runner.run(arrays)
        outputs[self.index] = np.zeros_like(outputs[self.index])
        return outputs


@pytest.mark.parametrize("index", [0, 1])
def test_one_failing_output_of_two_fails_the_canary(index: int, converted: dict[str, Path]) -> None:
    """Both outputs present, one of them right: the other one's fault fails every canary and
    the session's status names that output alone."""
    factory = roles_factory(converted)
    probe = probes.record(factory, roles_inputs())
    session = guard.wrap(
        lambda **kw: ZeroOneOutput(factory(**kw), index), probe, metrics=False,
        raise_exhausted=False, policy=quiet_policy(reinit_attempts=0, ladder=(guard.STATIC,)),
    )  # fmt: skip
    with session:
        status = session.status
    bad = ROLES_NAMES[1][index]
    assert status.state is guard.State.FAILED and status.verdict is not None
    named = {r.split(": ")[1] for r in status.verdict.reasons if r.startswith("canary run")}
    assert named == {f"output {bad!r}"}


@pytest.mark.slow
def test_doctor_reports_the_dynamic_rung_static(converted: dict[str, Path]) -> None:
    """doctor counts the starts whose dynamic rung MNN loaded statically and prices none."""
    factory = cf_factory(converted)
    report = run_doctor(factory, probes.record(factory, cf_inputs()), starts=1, processes=1)
    assert [(r.name, r.loaded_static, r.errors) for r in report.rungs] == [
        ("static", 0, 0),
        ("dynamic", 1, 0),
    ]
    text = format_doctor(report, "control_flow.mnn")
    assert "dynamic (loaded static)" in text and "n/a (static)" in text
    assert "MNN loaded rung(s) 'dynamic' in 1 of 1 starts statically" in text


def test_bench_says_there_is_no_dynamic_mode_to_price(converted: dict[str, Path]) -> None:
    """bench on the control-flow model flags its dynamic row instead of pricing a static load."""
    factory = cf_factory(converted)
    probe = probes.record(factory, cf_inputs())
    cost = bench.dynamic_cost(factory, probe, dict(probe.cases[0].inputs), quick=True)
    assert cost.dynamic_ignored is True
    # the row as the report prints it (the rest of a bench run is test_bench's)
    report = SimpleNamespace(dynamic=cost, api="module", model="control_flow.mnn")
    row = bench_report._dynamic_row(report)  # type: ignore[arg-type]
    assert "no dynamic mode to price: MNN loads control_flow.mnn statically" in " ".join(row)


# ---------------------------------------------------------------- scalars


def test_to_var_keeps_a_scalar_0d() -> None:
    """A 0-d array becomes a 0-d Var of its dtype (MNN would take [1] as well: it must not)."""
    for value in (np.array(3, np.int32), np.array(1.5, np.float32)):
        var = mnn.to_var(value)
        assert var.shape == []
        assert mnn.to_numpy(var).shape == () and mnn.to_numpy(var) == value


@pytest.mark.parametrize("model", ["control_flow", "roles"])
def test_scalar_inputs_round_trip(model: str, converted: dict[str, Path], tmp_path: Path) -> None:
    """A 0-d int64 flag and a 0-d float gain: recorded 0-d, saved, loaded, wrapped and run."""
    if model == "control_flow":
        factory, inputs, scalar = cf_factory(converted), cf_inputs(), "flag"
    else:
        factory, inputs, scalar = roles_factory(converted), roles_inputs(), "gain"
    probes.record(factory, inputs).save(tmp_path / "p")
    probe = probes.load(tmp_path / "p", model=factory.path)
    spec = next(s for s in probe.inputs if s.name == scalar)
    assert spec.shape == () and probe.cases[0].inputs[scalar].shape == ()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", guard.mnn.DynamicIgnoredWarning)
        session = guard.wrap(factory, probe, policy=quiet_policy(), metrics=False)
    with session:
        if model == "control_flow":
            x = inputs["x"]
            doubled = session.run({**inputs, "flag": np.array(1, np.int64)})["y"]
            shifted = session.run({**inputs, "flag": np.array(0, np.int32)})["y"]
            assert np.allclose(doubled, x * 2) and np.allclose(shifted, x + 2)
        else:
            out = session.run({**inputs, "gain": np.array(-3.0, np.float32)})["y"]
            assert np.allclose(out, inputs["x"] * SCALES[1] * -3.0 + SCALES[0], atol=1e-5)
        with pytest.raises(guard.InputMismatch, match="rank 1"):
            session.run({**inputs, scalar: inputs[scalar].reshape(1)})


# ---------------------------------------------------------------- derived canaries


def test_default_derive_rolls_only_inputs_with_a_dynamic_axis(converted: dict[str, Path]) -> None:
    """The signal is rolled along its declared dynamic axis; control inputs and state held."""
    inputs = roles_inputs(12)
    probe = probes.record(roles_factory(converted), inputs, dynamic={"x": {2: (1, 64)}})
    assert len(probe.cases) == 2
    derived = probe.cases[1].inputs
    assert np.array_equal(derived["x"], np.roll(inputs["x"], 6, axis=2))
    for name in ("scales", "state", "gain"):
        assert np.array_equal(derived[name], inputs[name]), name
    assert "case 1 is case 0 with x by 6 along axis 2; scales, state, gain held fixed" in (
        probe.meta.notes
    )


def test_derive_chooses_inputs_and_axes(converted: dict[str, Path]) -> None:
    """derive={"state": 1} rolls only the state, along axis 1; derive=False records one case."""
    inputs = roles_inputs()
    chosen = probes.record(roles_factory(converted), inputs, derive={"state": 1})
    derived = chosen.cases[1].inputs
    assert np.array_equal(derived["state"], np.roll(inputs["state"], 4, axis=1))
    assert np.array_equal(derived["x"], inputs["x"])
    assert not np.array_equal(
        chosen.cases[1].outputs["new_state"], chosen.cases[0].outputs["new_state"]
    )
    none = probes.record(roles_factory(converted), inputs, derive=False)
    assert len(none.cases) == 1 and "derive=False" in none.meta.notes[0]
    fixed = probes.record(roles_factory(converted), inputs)  # no dynamic axis declared
    assert len(fixed.cases) == 2, fixed.meta.notes
    moved = fixed.cases[1].inputs
    for name in ("x", "scales", "state"):  # every input of 2+ values, along its last axis > 1
        axis = max(a for a, size in enumerate(inputs[name].shape) if size > 1)
        assert np.array_equal(
            moved[name], np.roll(inputs[name], inputs[name].shape[axis] // 2, axis)
        )
    assert np.array_equal(moved["gain"], inputs["gain"])
    assert fixed.meta.notes[0].endswith("; gain held fixed")


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("derive", "message"),
    [
        ({"gain": None}, "input 'gain' is a scalar (0-d)"),
        ({"pitch": 0}, "derive names unknown inputs ['pitch']"),
        ({"x": 3}, "axis 3 of input 'x' is out of range for rank 3"),
        ({"x": True}, "axis True of input 'x'"),
    ],
    ids=["scalar", "unknown", "axis", "bool axis"],
)
def test_derive_refuses_what_cannot_be_rolled(
    converted: dict[str, Path], derive: dict[str, Any], message: str
) -> None:
    """A derive choice that names no input, a scalar or no axis is a ProbeError."""
    with pytest.raises(probes.ProbeError) as info:
        probes.record(roles_factory(converted), roles_inputs(), derive=derive)
    assert message in str(info.value)


def test_cli_record_with_dtypes_and_derive_choices(
    converted: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """record --shape NAME=DTYPE:..., a scalar NAME=DTYPE:, --derive NAME:AXIS, --no-derive."""
    base = ["record", str(converted["roles"])]
    base += [f"--input={n}" for n in ROLES_NAMES[0]] + [f"--output={n}" for n in ROLES_NAMES[1]]
    base += ["--shape", "x=1,4,20", "--shape", "scales=float32:3", "--shape", "state=1,8"]
    base += ["--shape", "gain=float32:", "--dynamic", "x:2=1..64"]
    assert cli.main([*base, "--derive", "state:1", "-o", str(tmp_path / "a")]) == cli.EXIT_OK
    assert "note: case 1 is case 0 with state by 4 along axis 1" in capsys.readouterr().out
    assert cli.main([*base, "--no-derive", "-o", str(tmp_path / "b")]) == cli.EXIT_OK
    assert len(probes.load(tmp_path / "b").cases) == 1
    cf = ["record", str(converted["control_flow"]), "--input", "x", "--input", "flag"]
    cf += [
        "--output",
        "y",
        "--shape",
        "x=1,16",
        "--shape",
        "flag=int64:",
        "-o",
        str(tmp_path / "c"),
    ]
    assert cli.main(cf) == cli.EXIT_OK
    flag = probes.load(tmp_path / "c").inputs[1]
    assert (flag.name, flag.dtype, flag.shape) == ("flag", "int32", ())


# ---------------------------------------------------------------- check and demo output


def test_check_shows_every_score_of_a_failing_init(
    demo_paths: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A degraded build: cosine, LSD and SNR are numbers in the table and the JSON; the
    reasons are given in full, for every canary case (the table shows the worst one)."""
    noisy = tmp_path / "noisy.mnn"
    rng = np.random.default_rng(3)
    demo.build_vocoder(
        noisy, weight_transform=lambda w: w * (1 + 0.01 * rng.standard_normal(w.shape))
    )
    args = ["check", str(noisy), "--probe", str(demo_paths[1]), "--ignore-model-hash"]
    assert cli.main([*args, "--inits", "2", "--json"]) == cli.EXIT_DEGRADED
    data = json.loads(capsys.readouterr().out)
    assert [i["passed"] for i in data["inits"]] == [False, False]
    for init in data["inits"]:
        wav = init["scores"]["wav"]
        assert all(isinstance(wav[k], float) for k in ("snr_db", "cosine", "max_abs", "lsd_db"))
        assert init["reasons"] and init["missing"] == []
        cases = {r.split(":")[0] for r in init["reasons"] if r.startswith("canary run")}
        assert cases == {"canary run 1 case 0", "canary run 1 case 1"}
    assert cli.main(args) == cli.EXIT_DEGRADED
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("1 "))
    assert "FAIL" in row and "-" not in row.split()[3:]  # every score is a number
    for reason in data["inits"][0]["reasons"]:
        assert f"init 1: {reason}" in table


def test_check_reports_what_mnn_says_on_a_failed_forward(
    converted: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A build whose cells are 64 px, judged with a 96 px canary: MNN's own reason is shown."""
    factory = guard.mnn_factory(converted["stride32"], ["image"], ["mask"], threads=1)
    image = np.random.default_rng(2).standard_normal((1, 1, 64, 96)).astype(np.float32)
    probes.record(factory, {"image": image}).save(tmp_path / "p")
    args = ["check", str(converted["stride64"]), "--probe", str(tmp_path / "p")]
    assert cli.main([*args, "--ignore-model-hash", "--json"]) == cli.EXIT_DEGRADED
    init = json.loads(capsys.readouterr().out)["inits"][0]
    assert init["missing"] == ["mask"]
    assert any("MNN on a canary forward: Broad cast error" in n for n in init["notes"])


def test_demo_json(capsys: pytest.CaptureFixture[str]) -> None:
    """`mnn-guard demo --json` prints one JSON document of the demo's counts."""
    args = ["demo", "--sessions", "3", "--requests", "1", "--rate", "1", "--port", "-1", "--json"]
    assert cli.main(args) == cli.EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["sessions"] == 3 and data["degraded_served"] == 0
    assert data["injected"] == data["caught"] > 0


# ---------------------------------------------------------------- bench on any model


def test_bench_quick_on_a_model_whose_dims_must_be_multiples_of_32(
    converted: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench runs on the probe's own canary (64 x 96) and labels the rows by the file name;
    with --no-reference it measures that model only (test_bench runs the reference rows)."""
    model = converted["stride32"]
    factory = guard.mnn_factory(model, ["image"], ["mask"], threads=1)
    image = np.random.default_rng(4).standard_normal((1, 1, 64, 96)).astype(np.float32)
    probes.record(factory, {"image": image}).save(tmp_path / "p")
    args = ["bench", "--quick", "--no-reference", str(model), "--probe", str(tmp_path / "p")]
    assert cli.main([*args, "--json", str(tmp_path / "b.json")]) == cli.EXIT_OK
    data = json.loads((tmp_path / "b.json").read_text())
    assert (data["model"], data["builtin"], data["frames"]) == ("stride32.mnn", False, None)
    assert data["inputs"] == "image float32[1, 1, 64, 96]"
    assert data["hot"]["model"] == "stride32.mnn" and data["hot"]["met"] is None
    assert data["tiny"] is None and data["pools"] == [] and data["startup"] is None
    table = capsys.readouterr().out
    assert "**stride32.mnn** (its probe's canary: image float32[1, 1, 64, 96])" in table
    assert "vocoder" not in table and "Reference measures" not in table
    assert cli.main([*args, "--frames", "100"]) == cli.EXIT_USAGE


# ---------------------------------------------------------------- MNN's own words


def test_captured_output_collects_and_echoes_native_prints(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """What C code prints on fd 1 is collected as lines and re-emitted on the real stderr."""
    libc = ctypes.CDLL(None)
    with mnn.captured_output() as lines:
        libc.printf(b"hello from C\n")
    assert lines == ["hello from C"]
    out, err = capfd.readouterr()
    assert "hello from C" in err and "hello from C" not in out


def test_a_file_mnn_refuses_names_mnns_reason(tmp_path: Path) -> None:
    """A corrupt model: the FactoryError carries what MNN printed, not a bare SystemError."""
    bad = tmp_path / "bad.mnn"
    bad.write_bytes(b"not a model at all" * 10)
    with pytest.raises(
        guard.errors.FactoryError, match="MNN says: Invalidate buffer to create MNN Module"
    ):
        mnn.MNNFactory(str(bad), ("x",), ("y",))()


def test_a_reduced_precision_build_guarded_against_fp32_goldens(
    demo_probe: probes.Probe, tmp_path: Path
) -> None:
    """The recipe of docs/concepts.md: the fp32 probe refuses the fp16 file; a probe recorded
    from the fp32 reference with the fp16 file's hash and its own limit serves it, judged vs
    fp32."""
    fp16 = tmp_path / "vocoder_fp16.mnn"
    demo.build_vocoder(fp16, weight_transform=lambda w: w.astype(np.float16).astype(np.float32))
    fp16_factory = guard.mnn_factory(fp16, ["mel"], ["wav"], threads=1)
    with pytest.raises(probes.ProbeError, match="stale probe"):
        guard.wrap(fp16_factory, demo_probe, metrics=False, policy=quiet_policy())
    probe = probes.record(
        demo.demo_factory(),
        {"mel": demo.demo_mel(20)},
        model=fp16,
        per_output={"wav": probes.Thresholds(min_snr_db=50)},
    )
    with guard.wrap(fp16_factory, probe, metrics=False, policy=quiet_policy()) as session:
        verdict = session.status.verdict
    assert verdict is not None and verdict.passed
    assert 50 < verdict.worst_snr_db < 100  # fp16 weights: close, not identical
