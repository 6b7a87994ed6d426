"""What `guard.mnn` reads from a model file: names cached until the file is replaced, input
dtypes as declared and as MNN runs them, and tensors with a zero dimension."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx_models
import pytest

import guard
import probes
from guard import mnn
from guard.tools import cli
from guard.tools.diagnose import run_diagnose

Array = np.ndarray[Any, Any]
X = np.linspace(-1.0, 1.0, 4, dtype=np.float32).reshape(1, 4)


# ---------------------------------------------------------------- a file replaced in place


@pytest.mark.hostile
def test_a_model_swapped_under_the_same_size_and_mtime_is_read_again(tmp_path: Path) -> None:
    """A model replaced as `cp -p` does (same inode, size and mtime, other input name) is
    inspected again: a factory with the old names is a ConfigError, not a SIGSEGV."""
    left = onnx_models.convert(onnx_models.tanh_of("left"), tmp_path / "left.mnn")
    rite = onnx_models.convert(onnx_models.tanh_of("rite"), tmp_path / "rite.mnn")
    assert left.stat().st_size == rite.stat().st_size
    script = f"""
        import os, shutil
        import guard
        path = {str(tmp_path / "model.mnn")!r}
        shutil.copyfile({str(left)!r}, path)
        guard.mnn_factory(path, ["left"], ["y"])(dynamic=True)
        before = os.stat(path)
        shutil.copyfile({str(rite)!r}, path)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(path)
        print("same", (after.st_ino, after.st_size, after.st_mtime_ns)
              == (before.st_ino, before.st_size, before.st_mtime_ns))
        try:
            guard.mnn_factory(path, ["left"], ["y"])(dynamic=True)
        except guard.ConfigError as exc:
            print("refused", "['rite']" in str(exc))
        """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"returned {done.returncode}: {done.stderr}"
    assert done.stdout.split() == ["same", "True", "refused", "True"]


# ---------------------------------------------------------------- declared and computed dtypes


@pytest.fixture(scope="module")
def int64_model(converted: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mixed model with its int `index` input declared int64 in the file."""
    folder = tmp_path_factory.mktemp("int64")
    return onnx_models.declare_int64(converted["mixed"], folder / "mixed64.mnn")


def test_inspect_says_what_the_file_declares_and_what_mnn_runs(int64_model: Path) -> None:
    """An input declared int64 is int64 as declared and int32 as MNN runs it, in both APIs;
    the others are what they are in both."""
    for info in (mnn.inspect(int64_model), mnn.inspect_session(int64_model)):
        kinds = {t.name: (t.dtype, t.runs_as) for t in info.inputs}
        assert kinds == {
            "x": ("float32", "float32"),
            "index": ("int64", "int32"),
            "bias": ("float32", "float32"),
        }


def test_cli_inspect_prints_both_dtypes(
    int64_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mnn-guard inspect` shows the declared dtype and the one MNN computes with, and says
    where they differ; --json carries both."""
    assert cli.main(["inspect", str(int64_model)]) == cli.EXIT_OK
    text = capsys.readouterr().out
    (row,) = [line for line in text.splitlines() if line.startswith("index")]
    assert row.split()[1:3] == ["int64", "int32"] and "runs as" in text
    assert "input 'index': the file declares int64; MNN computes with int32" in text
    assert cli.main(["inspect", str(int64_model), "--json"]) == cli.EXIT_OK
    (index,) = [t for t in json.loads(capsys.readouterr().out)["inputs"] if t["name"] == "index"]
    assert (index["dtype"], index["runs_as"]) == ("int64", "int32")


def test_an_int64_declared_input_serves(int64_model: Path) -> None:
    """A probe recorded with int64 channel indices serves the model MNN runs in int32."""
    inputs = {
        "x": np.ones((1, 4, 6), np.float32),
        "index": np.array([3, 0], np.int64),
        "bias": np.array([0.5], np.float32),
    }
    factory = guard.mnn_factory(int64_model, ["x", "index", "bias"], ["picked"], threads=1)
    probe = probes.record(factory, inputs)
    with guard.wrap(factory, probe, metrics=False) as session:
        picked = session.run(inputs)["picked"]
    np.testing.assert_array_equal(picked, np.full((1, 2, 6), 1.5, np.float32))


# ---------------------------------------------------------------- tensors with a zero dimension


def test_run_tensors_reads_a_tensor_with_a_zero_dimension(converted: dict[str, Path]) -> None:
    """An intermediate [1, 0] tensor comes out as an empty float32 array of its shape."""
    got = mnn.run_tensors(converted["empty_tensors"], ["x"], [X], ["empty", "joined", "y"])
    assert got["empty"].shape == (1, 0) and got["empty"].dtype == np.float32
    np.testing.assert_array_equal(got["joined"], X)
    np.testing.assert_allclose(got["y"], np.tanh(X), rtol=1e-3)  # MNN 3.0 approximates tanh


def test_constant_arrays_keep_an_empty_constant(converted: dict[str, Path]) -> None:
    """An empty constant is an empty array of its shape among the weights."""
    weights = mnn.constant_arrays(converted["empty_tensors"])
    assert weights["nothing"].shape == (1, 0)


def test_diagnose_runs_through_empty_tensors(converted: dict[str, Path], tmp_path: Path) -> None:
    """`diagnose` of a model with empty tensors, against a copy of itself: every tensor is
    compared (the empty one too), nothing diverges, no weight differs."""
    model = converted["empty_tensors"]
    copy = shutil.copy(model, tmp_path / "copy.mnn")
    probe = probes.record(guard.mnn_factory(model, ["x"], ["y"], threads=1), {"x": X})
    found = run_diagnose(model, probe, reference_model=copy)
    assert not found.diverged and found.weights == ()
    empty = [t for t in found.tensors if t.name == "empty"]
    assert len(empty) == 1 and empty[0].snr_db == float("inf")


def test_a_file_of_constants_declares_no_inputs_and_says_why(tmp_path: Path) -> None:
    """A model saved with no placeholder (as MNN 3.0 and 3.1 save an eager graph): inspect
    finds no inputs and its notes say why; a factory naming an input is refused, saying so."""
    path = tmp_path / "constants.mnn"
    y = mnn.F.const(np.arange(4, dtype=np.float32), [1, 4], mnn.F.NCHW)
    y.name = "y"
    mnn.F.save([y], str(path))
    info = mnn.inspect(path)
    assert info.inputs == () and mnn.NO_INPUTS_NOTE in info.notes
    with pytest.raises(guard.ConfigError, match=r"Its inputs are \[\] \(the file declares no"):
        guard.mnn_factory(path, ["x"], ["y"])


def test_graph_building_keeps_placeholders_as_inputs(tmp_path: Path) -> None:
    """Inside graph_building() a placeholder is an Input and the saved file names it, on any
    release; the block leaves MNN's evaluation mode as it found it."""
    before = mnn.placeholders_fold()
    with mnn.graph_building():
        x = mnn.F.placeholder([1, 4], mnn.F.NCHW)
        x.name = "x"
        assert x.op_type == "Input"
        y = mnn.F.relu(x)
        y.name = "y"
        mnn.F.save([y], str(tmp_path / "relu.mnn"))
    assert mnn.inspect(tmp_path / "relu.mnn").input_names == ["x"]
    assert (mnn.F.placeholder([1], mnn.F.NCHW).op_type != "Input") == before
