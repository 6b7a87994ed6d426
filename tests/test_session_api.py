"""The Session API (`MNN.Interpreter` + `createSession`) guarded with the Module API's contract:
canary after every init, owned outputs, resizing, recovery down a session ladder to the Module
API's dynamic=True, probes shared across the two APIs, the tools with `--api session`."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import MNN
import numpy as np
import pytest
from conftest import quiet_policy, reference
from prometheus_client import CollectorRegistry
from spawning import report_from_spawned

import guard
import probes
from guard import mnn
from guard.testing import CapturingListener, DegradedModule, Fault, FaultyFactory
from guard.tools import bench, bench_checks, bench_report, cli, demo

Array = np.ndarray[Any, Any]
MIXED_NAMES = (["x", "index", "bias"], ["picked", "energy"])  # model order, not sorted order
INDEX = np.array([3, 1], np.int32)
SESSION_ONLY = quiet_policy(ladder=(guard.Rung("session"),))


def make_demo_session(**config: Any) -> tuple[Any, Any]:
    """A user's own Session-API factory, as MNN's documentation writes one."""
    interpreter = MNN.Interpreter(str(demo.DEMO_MODEL))
    return interpreter, interpreter.createSession({"numThread": 1, **config})


@dataclass
class Held:
    """A user's object holding an interpreter and its session."""

    interpreter: Any
    session: Any


def make_held_session(**config: Any) -> Held:
    """A user's factory returning an object with .interpreter and .session."""
    return Held(*make_demo_session(**config))


def session_factory(path: Path | str, **kw: Any) -> mnn.MNNSessionFactory:
    """A one-thread Session-API factory."""
    return guard.mnn_session_factory(path, {"numThread": 1}, **kw)


def mixed_inputs(frames: int = 12, seed: int = 0) -> dict[str, Array]:
    """Inputs of the mixed model: a signal, int channel indices, a bias."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 4, frames)).astype(np.float32)
    return {"x": x, "index": INDEX.copy(), "bias": np.array([0.5], np.float32)}


def mixed_truth(inputs: dict[str, Array]) -> tuple[Array, Array]:
    """What the mixed model computes, in numpy."""
    x = inputs["x"]
    return x[:, inputs["index"], :] + inputs["bias"], np.mean(x * x, axis=2, keepdims=True)


def record_mixed(factory: Any, reference: dict[str, Any] | None = None) -> probes.Probe:
    """A probe of the mixed model with T dynamic in 1..64."""
    return probes.record(
        factory, mixed_inputs(), reference=reference or {}, dynamic={"x": {2: (1, 64)}}
    )


def wrap(factory: Any, probe: probes.Probe, policy: guard.Policy, **kw: Any) -> Any:
    """guard.wrap without the global registry."""
    return guard.wrap(factory, probe, policy=policy, registry=CollectorRegistry(), **kw)


# ------------------------------------------------------------------- the adapter


def test_the_demo_vocoder_through_a_session_matches_the_module_api(
    demo_probe: probes.Probe,
) -> None:
    """A Session-API factory serves the demo vocoder as the dynamic Module API computes it,
    at the canary's length and, after a resize, at others."""
    policy = quiet_policy(ladder=guard.SESSION_LADDER)
    with wrap(session_factory(demo.DEMO_MODEL), demo_probe, policy, name="sess") as session:
        assert (session.status.mode, session.status.healthy) == ("session", True)
        for frames in (100, 37, 100, 250):
            mel = demo.demo_mel(frames, seed=frames)
            wav = session.run({"mel": mel})["wav"]
            assert wav.shape == (1, 1, frames * demo.HOP)
            np.testing.assert_allclose(wav, reference(mel), atol=1e-5)


@pytest.mark.parametrize("make", [make_demo_session, make_held_session])
def test_a_users_factory_is_guarded_with_a_one_line_change(
    make: Any, demo_probe: probes.Probe
) -> None:
    """`guard.session_factory(make, path=...)` guards a factory returning an (interpreter,
    session) pair or an object holding both; so does the bare factory with a session rung."""
    policy = quiet_policy(ladder=guard.SESSION_LADDER)
    mel = demo.demo_mel(60)
    factory = guard.session_factory(make, path=demo.DEMO_MODEL)
    with wrap(factory, demo_probe, policy, name="one-line") as session:
        assert session.status.mode == "session"
        np.testing.assert_allclose(session.run({"mel": mel})["wav"], reference(mel), atol=1e-5)
    with wrap(make, demo_probe, SESSION_ONLY, name="bare") as session:
        np.testing.assert_allclose(session.run({"mel": mel})["wav"], reference(mel), atol=1e-5)


def test_outputs_are_owned_although_the_session_reuses_its_tensors() -> None:
    """The session's own output tensor changes on the next run; what the caller holds does not."""
    interpreter, session = make_demo_session()
    runner = mnn.adapt((interpreter, session), ["mel"], ["wav"])
    first_mel, second_mel = demo.demo_mel(40, seed=1), demo.demo_mel(40, seed=2)
    (first,) = runner.run([first_mel])
    view = interpreter.getSessionOutput(session, "wav").getNumpyData()  # MNN's own memory
    before = view.copy()
    (second,) = runner.run([second_mel])
    assert not np.array_equal(view, before)  # the session overwrote its tensor in place
    assert not np.shares_memory(first, second) and first.flags.owndata
    np.testing.assert_allclose(first, reference(first_mel), atol=1e-5)
    np.testing.assert_allclose(second, reference(second_mel), atol=1e-5)


def test_several_inputs_and_outputs_an_int_input_and_a_resize(
    converted: dict[str, Path],
) -> None:
    """The mixed model through a session: names bound in the probe's order (not the session's
    sorted one), an int32 input that picks channels, and new lengths resized per call."""
    factory = session_factory(converted["mixed"])
    info = mnn.inspect(converted["mixed"])  # the model's order, as the converter wrote it
    model_order = [info.input_names, list(info.outputs)]
    assert [sorted(n) for n in model_order] == [sorted(n) for n in MIXED_NAMES]
    assert [list(factory.inputs), list(factory.outputs)] == model_order
    runner = mnn.adapt(factory())  # adapted again without names: the model's order stays
    assert [list(runner.input_names), list(runner.output_names)] == model_order
    probe = record_mixed(factory)
    assert [probe.input_names, probe.output_names] == model_order
    assert dict(probe.cases[0].inputs)["index"].dtype == np.int32
    with wrap(factory, probe, SESSION_ONLY, name="mixed") as session:
        for frames in (12, 30, 1, 12):
            inputs = mixed_inputs(frames, seed=frames)
            out = session.run(inputs)
            picked, energy = mixed_truth(inputs)
            assert out["picked"].shape == (1, 2, frames)
            np.testing.assert_allclose(out["picked"], picked, rtol=1e-6)
            np.testing.assert_allclose(out["energy"], energy, rtol=1e-5)
        with pytest.raises(guard.InputMismatch, match="index"):
            session.run({**mixed_inputs(), "index": np.array([1, 2, 3], np.int32)})


def test_two_bindings_of_one_session_resize_from_what_mnn_reports(
    converted: dict[str, Path],
) -> None:
    """Two Runners bound to one session in different orders resize from the tensors' real
    shapes, so neither copies an array into a tensor of another size."""
    first = session_factory(converted["mixed"])()
    second = mnn.adapt(first, ["bias", "index", "x"], ["energy", "picked"])
    assert second is not first
    for runner, frames in ((first, 12), (second, 30), (first, 12), (second, 5)):
        inputs = mixed_inputs(frames, seed=frames)
        outputs = runner.run([inputs[n] for n in runner.input_names])
        out = dict(zip(runner.output_names, outputs, strict=True))
        np.testing.assert_allclose(out["picked"], mixed_truth(inputs)[0], rtol=1e-6)


def test_a_failed_run_session_returns_no_stale_outputs(converted: dict[str, Path]) -> None:
    """A shape MNN cannot compute is an OutputMismatch, never the previous call's outputs; the
    next good shape is served again."""
    factory = session_factory(converted["stride32"])
    image = np.random.default_rng(0).standard_normal((1, 1, 64, 96)).astype(np.float32)
    probe = probes.record(
        factory, {"image": image}, reference={}, dynamic={"image": {2: (1, 512), 3: (1, 512)}}
    )
    with wrap(factory, probe, SESSION_ONLY, name="strided") as session:
        good = session.run({"image": image})["mask"]
        with pytest.raises(guard.errors.OutputMismatch, match="returned 0 outputs"):
            session.run({"image": image[..., :50, :50]})
        np.testing.assert_array_equal(session.run({"image": image})["mask"], good)
    runner = factory()
    assert runner.run([image[..., :50, :50]]) == []
    notes = runner.diagnose([image[..., :50, :50]])
    assert any("COMPUTE_SIZE_ERROR" in n for n in notes) and any(
        "Compute Shape" in n for n in notes
    )


# ------------------------------------------------------------------ ladders


@pytest.mark.hostile
@pytest.mark.parametrize("make", [None, make_demo_session])
def test_a_degraded_session_is_caught_and_replaced(
    make: Any, demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """A degraded first session (FaultyFactory) fails its canary and a fresh one serves, both
    for mnn_session_factory and for a bare (interpreter, session) factory (DegradedModule)."""
    inner = session_factory(demo.DEMO_MODEL) if make is None else make
    faulty = FaultyFactory(inner, fault=Fault.NOISE, schedule=[True], seed=3)
    listener = CapturingListener()
    policy = quiet_policy(ladder=guard.SESSION_LADDER if make is None else SESSION_ONLY.ladder)
    with guard.wrap(
        faulty, demo_probe, policy=policy, registry=registry, listeners=[listener], name="deg"
    ) as session:
        assert [e.outcome for e in listener.of("attempt")] == ["fail", "pass"]
        assert session.status.mode == "session" and faulty.degraded_inits == 1
        mel = demo.demo_mel(100)
        np.testing.assert_allclose(session.run({"mel": mel})["wav"], reference(mel), atol=1e-5)
        labels = {"session": "deg", "action": "reinit"}  # read before close() removes them
        assert registry.get_sample_value("mnn_guard_recoveries_total", labels) == 1


@pytest.mark.hostile
def test_a_session_ladder_falls_back_to_the_module_apis_dynamic(
    demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """When every session init is degraded, the last rung of the session ladder loads the same
    file through the Module API with dynamic=True, and serves."""
    faulty = FaultyFactory(session_factory(demo.DEMO_MODEL), fault=Fault.ZEROS, rate=1.0)
    ladder = guard.session_ladder({}, {"precision": "low"})
    assert [r.name for r in ladder] == ["session", "session:precision=low", "dynamic"]
    policy = quiet_policy(ladder=ladder, reinit_attempts=0)
    with guard.wrap(faulty, demo_probe, policy=policy, registry=registry, name="fb") as session:
        assert (session.status.mode, session.status.attempts) == ("dynamic", 3)
        assert isinstance(session._live, mnn.VarModule)  # the Module API, not a session
        mel = demo.demo_mel(80)
        np.testing.assert_allclose(session.run({"mel": mel})["wav"], reference(mel), atol=1e-6)
        labels = {"session": "fb", "action": "fallback"}
        assert registry.get_sample_value("mnn_guard_recoveries_total", labels) == 2
    assert faulty.degraded_inits == 2  # the two session rungs; dynamic=True was spared


@pytest.mark.parametrize("api", ["module", "session"])
def test_probes_recorded_through_either_api_judge_the_other(
    api: str, converted: dict[str, Path]
) -> None:
    """A probe recorded through one API passes (and serves) a factory of the other."""
    path = converted["mixed"]
    sessions = session_factory(path)  # names in the order the converter wrote them
    modules = guard.mnn_factory(path, sessions.inputs, sessions.outputs, threads=1)
    recorder, served = (modules, sessions) if api == "module" else (sessions, modules)
    probe = record_mixed(recorder, {} if api == "session" else {"dynamic": True})
    ladder = guard.SESSION_LADDER if served is sessions else guard.Policy().ladder
    with wrap(served, probe, quiet_policy(ladder=ladder), name=f"cross-{api}") as session:
        assert session.status.attempts == 1 and session.status.verdict is not None
        assert session.status.verdict.passed
        inputs = mixed_inputs(25, seed=9)
        np.testing.assert_allclose(session.run(inputs)["picked"], mixed_truth(inputs)[0])


@pytest.mark.hostile
def test_a_module_factory_listing_names_in_another_order_is_refused(
    converted: dict[str, Path],
) -> None:
    """A Module-API factory takes and gives arrays by position: a probe whose outputs are in
    another order is refused, never judged (or served) with its outputs swapped."""
    inputs, outputs = MIXED_NAMES
    probe = record_mixed(guard.mnn_factory(converted["mixed"], inputs, outputs, threads=1))
    swapped = guard.mnn_factory(converted["mixed"], inputs, outputs[::-1], threads=1)
    with pytest.raises(probes.ProbeError, match=r"lists its outputs as \['energy', 'picked'\]"):
        wrap(swapped, probe, quiet_policy(), name="swapped")


def test_session_ladders_are_checked() -> None:
    """Session ladders are named after their configs; duplicates and module configs refused."""
    assert guard.SESSION_LADDER[-1].overrides == {"api": "module", "dynamic": True}
    assert [r.name for r in guard.session_ladder({"memory": "low"}, fallback=False)] == [
        "session:memory=low"
    ]
    with pytest.raises(guard.ConfigError, match="same rung"):
        guard.session_ladder({}, {})
    with pytest.raises(guard.ConfigError, match="session configs"):
        guard.session_ladder({"api": "module"})


# -------------------------------------------------------------- what is refused


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"inputs": ["mel", "nope"]}, r"no input\(s\) \['nope'\]"),
        ({"outputs": ["nope"]}, "no output or tensor named"),
        ({"config": {"numthread": 1}}, "unknown session option"),
        ({"config": {"numThread": 0}}, "numThread must be a positive int"),
        ({"config": {"precision": "ultra"}}, "precision='ultra'"),
        ({"config": {"backend": "TPU"}}, "backend='TPU'"),
    ],
)
def test_wrong_names_and_options_are_config_errors(kw: dict[str, Any], match: str) -> None:
    """Names the model lacks and options MNN would ignore are refused before MNN sees them."""
    with pytest.raises(guard.ConfigError, match=match):
        guard.mnn_session_factory(demo.DEMO_MODEL, **kw)


@pytest.mark.hostile
def test_wrong_names_never_crash_at_any_layer(converted: dict[str, Path]) -> None:
    """Wrong names through session_factory, a bare pair and overrides are ConfigErrors."""
    with pytest.raises(guard.ConfigError, match="no input"):
        guard.session_factory(make_demo_session, path=demo.DEMO_MODEL, inputs=["wav"])
    interpreter, session = make_demo_session()
    with pytest.raises(guard.ConfigError, match=r"session's inputs are \['mel'\]"):
        mnn.SessionModule(interpreter, session, ["spectrogram"], ["wav"])
    with pytest.raises(guard.ConfigError, match="saveTensors"):
        mnn.SessionModule(interpreter, session, ["mel"], ["hidden"])
    factory = session_factory(demo.DEMO_MODEL)
    with pytest.raises(guard.ConfigError, match="Module API load options"):
        factory(api="session", dynamic=True)
    with pytest.raises(guard.ConfigError, match="api='gpu'"):
        factory(api="gpu")
    with pytest.raises(guard.ConfigError, match=r"path=MODEL"):
        guard.session_factory(make_demo_session)(dynamic=True)
    with pytest.raises(guard.ConfigError, match="control flow"):
        guard.mnn_session_factory(converted["control_flow"])
    with pytest.raises(guard.errors.FactoryError, match=r"\(interpreter, session\)"):
        guard.session_factory(lambda: (session, interpreter))()


def test_an_intermediate_tensor_is_an_output_of_the_session(converted: dict[str, Path]) -> None:
    """Any tensor of the model may be an output: the factory keeps it with saveTensors."""
    factory = session_factory(converted["mixed"], outputs=["picked", "squared"])
    inputs = mixed_inputs(8)
    picked, squared = factory().run([inputs[n] for n in MIXED_NAMES[0]])
    np.testing.assert_allclose(squared, inputs["x"] ** 2, rtol=1e-6)
    np.testing.assert_allclose(picked, mixed_truth(inputs)[0], rtol=1e-6)


# ------------------------------------------------------- threads, fork, pickling


def count_threads(config: dict[str, Any], conn: Connection) -> None:
    """Spawned: threads of this process before and after creating one session."""
    before = len(os.listdir("/proc/self/task"))
    runner = guard.mnn_session_factory(demo.DEMO_MODEL, config)()
    runner.run([demo.demo_mel(10)])
    conn.send((before, len(os.listdir("/proc/self/task"))))


def fork_a_served_session(conn: Connection) -> None:
    """Spawned: serve a Session-API session, fork, and report what a run in the child raises."""
    probe = probes.load(demo.DEMO_PROBE)
    policy = quiet_policy(ladder=guard.SESSION_LADDER)
    session = guard.wrap(session_factory(demo.DEMO_MODEL), probe, policy=policy, metrics=False)
    reader, writer = multiprocessing.Pipe(duplex=False)
    pid = os.fork()
    if pid == 0:
        try:
            session.run({"mel": demo.demo_mel(20)})
            writer.send("served")
        except Exception as exc:
            writer.send(type(exc).__name__)
        finally:
            os._exit(0)
    answered = reader.poll(10.0)
    os.waitpid(pid, 0)
    conn.send(reader.recv() if answered else "hung")


def spawned(target: Any, *args: Any) -> Any:
    """Run `target(*args, conn)` in a fresh spawned process; its one report."""
    return report_from_spawned(target, *args)


def test_num_thread_is_honoured() -> None:
    """numThread=1 starts no MNN thread; numThread=3 starts two workers."""
    one_before, one_after = spawned(count_threads, {"numThread": 1})
    three_before, three_after = spawned(count_threads, {"numThread": 3})
    assert one_after == one_before
    assert three_after == three_before + 2


def test_a_child_forked_after_a_session_gets_fork_after_load(demo_paths: Any) -> None:
    """A run in a child forked after a Session-API load is ForkAfterLoad, not a hang."""
    assert spawned(fork_a_served_session) == "ForkAfterLoad"


def test_session_factories_pickle_and_serve_in_a_pool(demo_probe: probes.Probe) -> None:
    """mnn_session_factory and session_factory of a module-level function pickle; guard.Pool
    serves a Session-API factory in a spawned worker."""
    factory = guard.session_factory(make_demo_session, path=demo.DEMO_MODEL)
    assert pickle.loads(pickle.dumps(factory)) == factory
    policy = quiet_policy(ladder=guard.SESSION_LADDER)
    mel = demo.demo_mel(30)
    with guard.Pool(session_factory(demo.DEMO_MODEL), demo_probe, processes=1, policy=policy) as p:
        np.testing.assert_allclose(p.run({"mel": mel})["wav"], reference(mel), atol=1e-5)


def test_degraded_module_adapts_a_session_pair() -> None:
    """DegradedModule runs a bare (interpreter, session) pair and degrades its outputs."""
    degraded = DegradedModule(make_demo_session(), Fault.ZEROS)
    assert isinstance(degraded.runner, mnn.SessionModule)
    (wav,) = degraded.bind(["mel"], ["wav"]).run([demo.demo_mel(10)])
    assert wav.shape == (1, 1, 10 * demo.HOP) and not wav.any()


# ------------------------------------------------------------------ the tools


def test_inspect_api_session(
    converted: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """`inspect --api session` lists the session's tensors, open sizes as ?."""
    assert cli.main(["inspect", str(converted["mixed"]), "--api", "session"]) == cli.EXIT_OK
    text = capsys.readouterr().out
    assert "x" in text and "[1, 4, ?]" in text and "int32" in text and "picked" in text
    assert cli.main(["inspect", str(converted["mixed"]), "--api", "session", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in data["inputs"]] == MIXED_NAMES[0]
    assert data["api"] == "session" and data["outputs"][0]["shape"] is None


def test_check_api_session(demo_paths: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`check --api session` judges fresh sessions; a Module API override is the fallback's."""
    model, probe = (str(p) for p in demo_paths)
    base = ["check", model, "--probe", probe, "--api", "session", "--no-diagnose", "--json"]
    assert cli.main([*base, "--inits", "2", "--override", "precision=low"]) == cli.EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["api"] == "session" and data["degraded"] == 0 and len(data["inits"]) == 2
    assert cli.main([*base, "--override", "dynamic=true"]) == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["overrides"] == {"api": "module", "dynamic": True}
    assert cli.main([*base, "--override", "precison=low"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "unknown session option(s) ['precison']" in err and err.count("\n") == 1


def test_doctor_api_session_has_a_rung_per_config(
    demo_paths: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`doctor --api session --config ...`: one rung per session config, then dynamic."""
    model, probe = (str(p) for p in demo_paths)
    args = ["doctor", model, "--probe", probe, "--api", "session", "--starts", "1"]
    extra = ["--config", "", "--config", "precision=low,numThread=1", "--json", "--no-diagnose"]
    assert cli.main([*args, *extra]) == cli.EXIT_OK
    rungs = json.loads(capsys.readouterr().out)["rungs"]
    names = ["session", "session:precision=low,numThread=1", "dynamic"]
    assert [r["name"] for r in rungs] == names
    assert all(r["starts"] == 1 and r["degraded"] == 0 and r["errors"] == 0 for r in rungs)
    assert cli.main([*args[:4], "--config", "precision=low"]) == cli.EXIT_USAGE
    assert "--config sets the rungs of --api session" in capsys.readouterr().err


def test_bench_api_session(capsys: pytest.CaptureFixture[str]) -> None:
    """`bench --api session` compares the raw Session API with the raw Module API on the same
    file, prices a Session API factory's sentinels as impossible (it has no saveTensors), and
    labels its rows so (the whole quick run is test_bench's, through the Module API)."""
    factory = mnn.mnn_session_factory(demo.DEMO_MODEL, {"numThread": 1})
    probe = probes.load(demo.DEMO_PROBE, model=demo.DEMO_MODEL)
    mel = demo.demo_mel(100)
    apis = bench.api_compare(factory, [mel], quick=True)
    assert apis.session_us > 0 and apis.module_us > 0 and apis.ratio.median > 0
    policy = guard.Policy(background=False, promote_after=None)
    priced = bench_checks.sentinel_cost(factory, probe, {"mel": mel}, policy, quick=True)
    assert isinstance(priced, str) and "cannot record or serve sentinels" in priced
    cost = bench.dynamic_cost(factory, probe, {"mel": mel}, quick=True)
    report = SimpleNamespace(dynamic=cost, api="session", model=demo.DEMO_MODEL.name)
    rows = [bench_report._dynamic_row(report), bench_report._api_row(apis)]  # type: ignore[arg-type]
    table = " ".join(" ".join(row) for row in rows)
    assert "Session API session vs Module API `dynamic=True`" in table
    assert "raw Session API run vs raw Module API forward" in table
    with pytest.raises(SystemExit) as exit_:  # a bad choice: one line of usage, exit 2
        cli.main(["bench", "--api", "sessions"])
    assert exit_.value.code == cli.EXIT_USAGE and "sessions" in capsys.readouterr().err
