"""Check the built distributions as a user meets them (`make dist` runs it; CI too).

    python compat/wheel_check.py DIST [--mnn oldest|newest|X.Y.Z ...]

The sdist must hold docs/, examples/ and deploy/, and both files the version of
guard/version.py. Then, for each PyMNN release asked for, the wheel is installed into a fresh
virtual environment (uv), and from a folder outside the source tree `mnn-guard demo` must
serve no degraded output and `mnn-guard inspect` must name the inputs of models built there,
which the project never saw: one with MNN.expr, one converted from ONNX by MNN's converter.
Exits 1 on the first failure, saying which.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SDIST_HOLDS = ("docs/", "examples/", "deploy/", "CHANGELOG.md")
UNSEEN = {  # models the project never saw, built in the user's folder -> their inputs
    # MNN.expr; PyMNN 3.0 and 3.1 evaluate eagerly: a graph saved so would lose its inputs
    "expr.mnn": ("gain", "signal"),
    # an ONNX graph through MNN's converter module (not the `mnnconvert` script, which runs
    # `pip install` and sends usage telemetry)
    "onnx.mnn": ("audio", "bias"),
}
BUILD_UNSEEN = """
    import MNN.expr as F
    F.lazy_eval(True)
    signal = F.placeholder([1, 3, 50], F.NCHW)
    signal.name = "signal"
    gain = F.placeholder([1], F.NCHW)
    gain.name = "gain"
    level = F.reduce_mean(F.relu(signal) * gain, [2])
    level.name = "level"
    F.save([level], "expr.mnn")

    import numpy as np, onnx, _tools
    from onnx import TensorProto, helper, numpy_helper
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Mul", ["audio", "w"], ["m"]),
         helper.make_node("Add", ["m", "bias"], ["s"]),
         helper.make_node("Sigmoid", ["s"], ["loud"])],
        "unseen",
        [value("audio", TensorProto.FLOAT, [1, 2, "N"]), value("bias", TensorProto.FLOAT, [2, 1])],
        [value("loud", TensorProto.FLOAT, [1, 2, "N"])],
        [numpy_helper.from_array(np.array(1.5, np.float32), "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), "onnx.onnx")
    _tools.mnnconvert(["mnnconvert", "-f", "ONNX", "--modelFile", "onnx.onnx",
                       "--MNNModel", "onnx.mnn", "--bizCode", "mnn-guard-wheel-check"])
"""


class CheckFailed(Exception):
    """One check of the distributions failed."""


def _releases() -> tuple[str, ...]:
    """noxfile.RELEASES: the supported releases are listed there once."""
    spec = importlib.util.spec_from_file_location("noxfile", ROOT / "noxfile.py")
    if spec is None or spec.loader is None:
        raise CheckFailed("noxfile.py cannot be read")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(module.RELEASES)


def _version() -> str:
    namespace: dict[str, str] = {}
    exec((ROOT / "guard" / "version.py").read_text(), namespace)
    return namespace["__version__"]


def _uv() -> str:
    from uv import find_uv_bin

    return str(find_uv_bin())


def _run(args: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CheckFailed(f"{what} exited {done.returncode}: {done.stderr.strip()[-600:]}")
    return done


def check_files(dist: Path) -> Path:
    """The sdist's contents and both files' version; the wheel's path."""
    version = _version()
    wheels = sorted(dist.glob("mnn_guard-*.whl"))
    sdists = sorted(dist.glob("mnn_guard-*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        raise CheckFailed(f"expected one wheel and one sdist in {dist}, found {wheels + sdists}")
    for path in (*wheels, *sdists):
        if f"-{version}" not in path.name:
            raise CheckFailed(f"{path.name} is not version {version} (guard/version.py)")
    with tarfile.open(sdists[0]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    missing = [h for h in SDIST_HOLDS if not any(n.startswith(h) for n in names)]
    if missing:
        raise CheckFailed(f"the sdist lacks {missing}")
    print(f"sdist and wheel: version {version}; the sdist holds {', '.join(SDIST_HOLDS)}")
    return wheels[0]


def check_install(wheel: Path, mnn: str, work: Path) -> None:
    """The wheel with MNN==mnn in a fresh environment: demo and inspect outside the tree."""
    began = time.monotonic()
    venv = work / f"venv-{mnn}"
    uv = _uv()
    _run([uv, "venv", "-q", "-p", sys.executable, str(venv)], work, "uv venv")
    python = str(venv / "bin" / "python")
    wanted = [str(wheel), f"MNN=={mnn}", "onnx"]  # onnx for the converted model only
    _run([uv, "pip", "install", "-q", "-p", python, *wanted], work, "install")
    installed = time.monotonic() - began
    outside = work / f"user-{mnn}"
    outside.mkdir()
    demo = _run([str(venv / "bin" / "mnn-guard"), "demo", "--json"], outside, "mnn-guard demo")
    found = json.loads(demo.stdout)
    if found["degraded_served"] != 0 or found["served"] == 0:
        raise CheckFailed(f"MNN {mnn}: the demo served {found['degraded_served']} degraded")
    _run([python, "-c", textwrap.dedent(BUILD_UNSEEN)], outside, "building the unseen models")
    named = {}
    for model, expected in UNSEEN.items():
        inspect = _run(
            [str(venv / "bin" / "mnn-guard"), "inspect", model, "--json"],
            outside,
            f"mnn-guard inspect {model}",
        )
        names = tuple(sorted(i["name"] for i in json.loads(inspect.stdout)["inputs"]))
        if names != expected:
            raise CheckFailed(f"MNN {mnn}: inspect named {model}'s inputs {names}, not {expected}")
        named[model] = names
    print(
        f"MNN {mnn}: installed in {installed:.0f} s; demo served {found['served']} outputs, 0 "
        f"degraded; inspect named {named}; {time.monotonic() - began:.0f} s in all"
    )


def main(argv: list[str] | None = None) -> int:
    """Check the files, then each release's install."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dist", type=Path)
    parser.add_argument("--mnn", action="append", default=[], help="oldest, newest or X.Y.Z")
    args = parser.parse_args(argv)
    releases = _releases()
    named = {"oldest": releases[0], "newest": releases[-1]}
    try:
        wheel = check_files(args.dist)
        with tempfile.TemporaryDirectory(prefix="mnn-guard-wheel-") as folder:
            for mnn in args.mnn:
                check_install(wheel.resolve(), named.get(mnn, mnn), Path(folder))
    except CheckFailed as exc:
        print(f"wheel_check: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
