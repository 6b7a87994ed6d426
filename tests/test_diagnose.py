"""`mnn-guard diagnose` on real models rebuilt with a perturbation in one known layer."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_models
import pytest

import guard
import probes
from guard import mnn
from guard.tools import demo
from guard.tools.diagnose import execution_order, format_diagnosis, run_diagnose

LAYERS = ("Convolution", "Deconvolution")


def perturb_one(index: int, scale: float = 0.2) -> Callable[[np.ndarray[Any, Any]], Any]:
    """A weight transform that adds `scale` relative noise to the `index`-th weight drawn only."""
    drawn = [0]
    rng = np.random.default_rng(index)

    def transform(w: np.ndarray[Any, Any]) -> Any:
        k = drawn[0]
        drawn[0] += 1
        return w * (1 + scale * rng.standard_normal(w.shape)) if k == index else w

    return transform


def layer(model: Path, index: int) -> str:
    """The `index`-th conv layer in execution order: the builder draws its weight `index`-th."""
    graph = execution_order(mnn.tensor_graph(model))
    return [n.name for n in graph if n.op_type in LAYERS][index]


CLEAN = -1  # the key of the clean rebuild in `perturbed`


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The demo vocoder rebuilt with one layer's weights perturbed: early, middle, last; and
    rebuilt clean (key CLEAN), the reference built by the same MNN release: the shipped file's
    tensor names are those of the release that wrote it."""
    folder = tmp_path_factory.mktemp("perturbed")
    models = {CLEAN: folder / "clean.mnn"}
    demo.build_vocoder(models[CLEAN])
    for index in (0, 7, 18):
        models[index] = folder / f"layer{index}.mnn"
        demo.build_vocoder(models[index], weight_transform=perturb_one(index))
    return models


@pytest.mark.parametrize("index", [0, 7, 18])
def test_diagnose_names_the_perturbed_layer(
    perturbed: dict[int, Path], demo_probe: probes.Probe, index: int
) -> None:
    """The first divergent tensor is the perturbed layer; the path runs from it to the output."""
    expected = layer(perturbed[index], index)
    found = run_diagnose(perturbed[index], demo_probe, reference_model=perturbed[CLEAN])
    assert found.diverged and found.outputs["wav"] < demo_probe.thresholds["snr_db"]
    assert [t.name for t in found.first] == [expected]
    assert found.first[0].op_type in LAYERS and found.first[0].snr_db < 40
    assert found.path[0].name == expected and found.path[-1].name == "wav"
    assert all(a.name in b.inputs for a, b in zip(found.path, found.path[1:], strict=False))
    (weight,) = [w for w in found.weights if expected in w.read_by]
    assert len(found.weights) == 1 and weight.snr_db < 20
    before = [t for t in found.tensors if t.index < found.first[0].index]
    assert before and not any(t.diverged for t in before)
    text = format_diagnosis(found)
    assert expected in text and "weights differ" in text


def test_identical_configurations_agree(demo_probe: probes.Probe) -> None:
    """The shipped model, static against its dynamic reference: no tensor diverges."""
    found = run_diagnose(demo.DEMO_MODEL, demo_probe, tries=2)
    assert not found.diverged and found.tries == 2
    assert len(found.tensors) == 60 and found.weights == ()
    assert all(t.snr_db == float("inf") for t in found.tensors)
    assert "the configurations agree" in format_diagnosis(found)


def test_the_threshold_is_honoured(demo_probe: probes.Probe, perturbed: dict[int, Path]) -> None:
    """A threshold below every tensor's SNR finds no divergence in a perturbed model."""
    loose = run_diagnose(
        perturbed[7], demo_probe, reference_model=perturbed[CLEAN], threshold_db=5.0
    )
    assert not loose.diverged and loose.threshold_db == 5.0


def test_execution_order_puts_inputs_first() -> None:
    """A shuffled graph comes back with every tensor after the tensors it reads."""
    graph = mnn.tensor_graph(demo.DEMO_MODEL)
    shuffled = list(graph)
    random.Random(3).shuffle(shuffled)
    order = execution_order(shuffled)
    seen: set[str] = set()
    for node in order:
        assert set(node.inputs) <= seen
        seen.add(node.name)
    assert len(order) == len(graph) == 107
    assert execution_order(graph) == graph  # the file's order already is one


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Converted ONNX models in pairs that differ where diagnose cannot look: inside an `If`
    subgraph, and inside a Convolution operator (its weights)."""
    folder = tmp_path_factory.mktemp("pairs")
    built = {
        "control_flow": onnx_models.control_flow(),
        "control_flow_3": onnx_models.control_flow(two=3.0),
        "conv": onnx_models.conv(seed=0),
        "conv_1": onnx_models.conv(seed=1),
        "chain_a": onnx_models.chain("middle_a"),
        "chain_b": onnx_models.chain("middle_b"),
        "chain_b3": onnx_models.chain("middle_b", gain=3.0),
    }
    return {
        name: onnx_models.convert(model, folder / f"{name}.mnn") for name, model in built.items()
    }


def test_control_flow_says_subgraph_internals_are_invisible(pairs: dict[str, Path]) -> None:
    """A divergence inside an `If` shows at the `If`; the report says what it cannot see."""
    factory = guard.mnn_factory(pairs["control_flow"], ["x", "flag"], ["y"], threads=1)
    x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    probe = probes.record(factory, {"x": x, "flag": np.array(1, np.int64)})
    found = run_diagnose(pairs["control_flow_3"], probe, reference_model=pairs["control_flow"])
    assert [(t.name, t.op_type) for t in found.first] == [("y", "If")]
    (note,) = found.notes
    assert "y [If]" in note and "invisible" in note
    assert f"note: {note}" in format_diagnosis(found)


def test_weights_inside_convolutions_are_said_not_compared(pairs: dict[str, Path]) -> None:
    """Two ONNX-converted models with other conv weights: no weight is compared, and why."""
    factory = guard.mnn_factory(pairs["conv"], ["x"], ["y"], threads=1)
    x = np.random.default_rng(2).standard_normal((1, 2, 8, 8)).astype(np.float32)
    probe = probes.record(factory, {"x": x})
    found = run_diagnose(pairs["conv_1"], probe, reference_model=pairs["conv"])
    assert found.diverged and found.first[0].op_type == "Convolution"
    assert found.weights == ()
    (note,) = found.notes
    assert "weights sit inside the operators" in note and found.first[0].name in note
    assert f"note: {note}" in format_diagnosis(found)
    same = run_diagnose(pairs["conv"], probe)  # one file: no weights to compare, nothing to say
    assert same.notes == () and not same.diverged


def test_tensors_the_reference_does_not_name_are_said_not_compared(
    pairs: dict[str, Path],
) -> None:
    """A reference that names a tensor differently: the tensors both name are compared, the
    path to the outputs skips the other, and a note says how many were left out."""
    factory = guard.mnn_factory(pairs["chain_b3"], ["x"], ["y"], threads=1)
    x = np.random.default_rng(4).standard_normal((1, 16)).astype(np.float32)
    probe = probes.record(factory, {"x": x}, derive=False)
    same = run_diagnose(pairs["chain_a"], probe, reference_model=pairs["chain_b"])
    assert not same.diverged and "middle_a" not in [t.name for t in same.tensors]
    found = run_diagnose(pairs["chain_a"], probe, reference_model=pairs["chain_b3"])
    assert [t.name for t in found.first] == ["scaled"]
    assert [t.name for t in found.path] == ["scaled", "y"]
    (note,) = found.notes
    assert note.startswith("1 computed tensor(s) of the model have no namesake")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `mnn-guard ARGS` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "guard.tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_check_leaves_a_bundle_and_diagnose_adds_to_it(
    perturbed: dict[int, Path], demo_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    """check exits 1 and leaves a rendered bundle; diagnose --bundle names the layer in it."""
    model, probe = str(perturbed[7]), str(demo_paths[1])
    folder = tmp_path / "bundles"
    chk = cli("check", model, "--probe", probe, "--ignore-model-hash", "--diagnose", str(folder))
    assert chk.returncode == 1, chk.stderr
    assert "diagnosis bundle:" in chk.stdout and "report.html" in chk.stdout
    (bundle,) = [p for p in folder.iterdir() if (p / "bundle.json").is_file()]
    assert (bundle / "report.html").is_file()
    dia = cli(
        "diagnose", model, "--probe", probe, "--ignore-model-hash", "--json",
        "--reference-model", str(perturbed[CLEAN]), "--bundle", str(bundle),
    )  # fmt: skip
    assert dia.returncode == 1, dia.stderr
    found = json.loads(dia.stdout)
    expected = layer(perturbed[7], 7)
    assert found["first"][0]["name"] == expected and found["diverged"] is True
    assert json.loads((bundle / "diagnosis.json").read_text())["first"][0]["name"] == expected
    assert f"<td>{expected}</td>" in (bundle / "report.html").read_text()


@pytest.mark.hostile
def test_a_probe_of_another_model_points_to_ignore_model_hash(
    perturbed: dict[int, Path], demo_paths: tuple[Path, Path]
) -> None:
    """Diagnosing a rebuilt model against the clean model's probe: the one-line stale-probe
    error names --ignore-model-hash."""
    run = cli("diagnose", str(perturbed[0]), "--probe", str(demo_paths[1]))
    ours = [line for line in run.stderr.splitlines() if line.startswith("mnn-guard")]
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len(ours) == 1 and "stale probe" in ours[0], run.stderr
    assert "or pass --ignore-model-hash to judge another build" in ours[0]


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--override", "dynamik=true"], "unknown MNN load option"),
        (["--bundle", "."], "not a diagnosis bundle"),
        (["--tries", "0"], "expected a whole number >= 1"),
        (["--reference-model", "/nonexistent.mnn"], "does not exist"),
    ],
)
def test_diagnose_user_errors_are_one_line(
    demo_paths: tuple[Path, Path], args: list[str], message: str
) -> None:
    """A bad option, bundle or file: exit 2 with one `mnn-guard` line on stderr."""
    run = cli("diagnose", str(demo_paths[0]), "--probe", str(demo_paths[1]), *args)
    ours = [line for line in run.stderr.splitlines() if line.startswith("mnn-guard")]
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert len(ours) == 1 and message in ours[0], run.stderr
