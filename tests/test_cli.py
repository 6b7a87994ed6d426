"""The mnn-guard command line, run as a real process: results, exit codes, user errors."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import guard
from guard.tools import cli as cli_module
from guard.tools import demo, probe_commands


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run `mnn-guard ARGS` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "guard.tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_record_then_check_passes(demo_paths: tuple[Path, Path], tmp_path: Path) -> None:
    """record writes a probe from --shape; check on the same model exits 0 with a table."""
    model = str(demo_paths[0])
    rec = cli(
        "record",
        model,
        "--input",
        "mel",
        "--output",
        "wav",
        "--shape",
        "mel=1,80,30",
        "--dynamic",
        "mel:2=1..500",
        "-o",
        str(tmp_path / "p"),
    )
    assert rec.returncode == 0, rec.stderr
    assert "input  mel: float32[1, 80, 1..500]" in rec.stdout
    chk = cli("check", model, "--probe", str(tmp_path / "p"), "--inits", "3")
    assert chk.returncode == 0, chk.stderr
    assert chk.stdout.count(" pass ") == 3
    assert "0 of 3 init(s) degraded" in chk.stdout


def test_record_from_canary_file(demo_paths: tuple[Path, Path], tmp_path: Path) -> None:
    """record takes canary inputs from an .npz."""
    np.savez(tmp_path / "canary.npz", mel=demo.demo_mel(16))
    rec = cli(
        "record",
        str(demo_paths[0]),
        "--input",
        "mel",
        "--output",
        "wav",
        "--canary",
        str(tmp_path / "canary.npz"),
        "-o",
        str(tmp_path / "p"),
    )
    assert rec.returncode == 0, rec.stderr
    assert (tmp_path / "p" / "manifest.json").is_file()


def test_check_degraded_model_exits_1(demo_paths: tuple[Path, Path], tmp_path: Path) -> None:
    """A rebuilt model with 1% weight noise, checked against the shipped probe, exits 1."""
    noisy = tmp_path / "noisy.mnn"
    rng = np.random.default_rng(3)
    demo.build_vocoder(
        noisy,
        weight_transform=lambda w: (w * (1 + 0.01 * rng.standard_normal(w.shape))).astype(
            np.float32
        ),
    )
    folder = tmp_path / "bundles"
    chk = cli(
        "check", str(noisy), "--probe", str(demo_paths[1]), "--ignore-model-hash",
        "--diagnose", str(folder),
    )  # fmt: skip
    assert chk.returncode == 1, chk.stderr
    assert "FAIL" in chk.stdout and "1 of 1 init(s) degraded" in chk.stdout
    assert len(list(folder.glob("*/bundle.json"))) == 1  # check leaves a bundle by default


def test_check_with_a_named_override_passes(demo_paths: tuple[Path, Path]) -> None:
    """An enum override given by name (as the docs' fp16 rung does) is accepted and judged."""
    model, probe_dir = map(str, demo_paths)
    overrides = ["--override", "precision_mode=low", "--override", "dynamic=true"]
    chk = cli("check", model, "--probe", probe_dir, *overrides)
    assert chk.returncode == 0, chk.stderr
    assert "0 of 1 init(s) degraded" in chk.stdout


def test_check_stale_probe_exits_2(demo_paths: tuple[Path, Path], tmp_path: Path) -> None:
    """Checking another model against a probe without --ignore-model-hash is a usage error."""
    other = tmp_path / "other.mnn"
    demo.build_vocoder(other, seed=9)
    chk = cli("check", str(other), "--probe", str(demo_paths[1]))
    assert chk.returncode == 2
    assert "stale probe" in chk.stderr


def test_demo_leaves_a_rendered_bundle_per_failed_canary_when_asked(tmp_path: Path) -> None:
    """`demo --diagnose DIR`: a caught fault leaves a bundle whose page shows golden and actual."""
    folder = tmp_path / "bundles"
    run = cli(
        "demo", "--sessions", "3", "--requests", "1", "--rate", "0.3", "--seed", "7",
        "--port", "-1", "--diagnose", str(folder),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "diagnosis: 1 bundle(s) with report.html in" in run.stdout
    (bundle,) = folder.iterdir()
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert (manifest["session"], manifest["outcome"], manifest["rung"]["name"]) == (
        "vocoder", "fail", "static",
    )  # fmt: skip
    with np.load(bundle / "golden.npz") as golden, np.load(bundle / "actual.npz") as actual:
        assert sorted(golden.files) == sorted(actual.files) == ["case0/wav", "case1/wav"]
        assert not np.array_equal(golden["case0/wav"], actual["case0/wav"])
    page = (bundle / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "Golden and actual outputs" in page


def test_demo_serves_no_degraded_output() -> None:
    """`mnn-guard demo` catches every injected fault and serves 0 degraded outputs."""
    run = cli("demo", "--sessions", "20", "--requests", "2", "--rate", "0.3", "--port", "-1")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = dict(
        (line.rsplit("  ", 1)[0].strip(), line.rsplit("  ", 1)[1].strip())
        for line in run.stdout.splitlines()[1:]
    )
    assert lines["degraded outputs served"] == "0"
    assert int(lines["degraded inits injected"]) > 0
    assert lines["degraded inits caught"] == lines["degraded inits injected"]
    assert int(lines["recoveries: reinit"]) > 0


# ------------------------------------------------------------------ user errors


def corrupt_model(tmp_path: Path, model: Path) -> str:
    """The demo model with every 97th byte scrambled."""
    data = bytearray(model.read_bytes())
    data[::97] = bytes(b ^ 0x5A for b in data[::97])
    (tmp_path / "corrupt.mnn").write_bytes(bytes(data))
    return str(tmp_path / "corrupt.mnn")


def truncated_model(tmp_path: Path, model: Path) -> str:
    """The first half of the demo model."""
    data = model.read_bytes()
    (tmp_path / "truncated.mnn").write_bytes(data[: len(data) // 2])
    return str(tmp_path / "truncated.mnn")


def empty_model(tmp_path: Path, model: Path) -> str:
    """A zero-byte .mnn file."""
    (tmp_path / "empty.mnn").write_bytes(b"")
    return str(tmp_path / "empty.mnn")


def probe_with_corrupt_deflate(tmp_path: Path, probe_dir: Path) -> str:
    """The demo probe with its arrays deflated, the stream scrambled, the checksum updated."""
    folder = tmp_path / "deflate.probe"
    shutil.copytree(probe_dir, folder)
    with zipfile.ZipFile(probe_dir / "arrays.npz") as npz:
        members = {name: npz.read(name) for name in npz.namelist()}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as npz:
        for name, data in members.items():
            npz.writestr(name, data)
    data = bytearray(buffer.getvalue())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as npz:
        big = max(npz.infolist(), key=lambda i: i.compress_size)
    start = big.header_offset + 30 + len(big.filename.encode()) + len(big.extra)
    for k in range(start + 10, start + big.compress_size - 10, 7):
        data[k] ^= 0xA5
    (folder / "arrays.npz").write_bytes(bytes(data))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["arrays"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def probe_with_deep_manifest(tmp_path: Path, probe_dir: Path) -> str:
    """The demo probe whose manifest is 100,000 nested arrays."""
    folder = tmp_path / "deep.probe"
    shutil.copytree(probe_dir, folder)
    (folder / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    return str(folder)


Case = Callable[[Path, Path, Path], list[str]]
RECORD = ["record", "MODEL", "--input", "mel", "--output", "wav", "--shape", "mel=1,80,20"]
CHECK = ["check", "MODEL", "--probe", "PROBE"]

USER_ERRORS: dict[str, tuple[Case, str]] = {
    "check a corrupt model": (
        lambda t, m, p: ["check", corrupt_model(t, m), "--probe", str(p), "--ignore-model-hash"],
        "MNN says: Invalidate buffer to create MNN Module",  # MNN's own words, captured
    ),
    "check a truncated model": (
        lambda t, m, p: ["check", truncated_model(t, m), "--probe", str(p), "--ignore-model-hash"],
        "MNN could not load",
    ),
    "check an empty model": (
        lambda t, m, p: ["check", empty_model(t, m), "--probe", str(p), "--ignore-model-hash"],
        "is empty",
    ),
    "check a missing model": (
        lambda t, m, p: ["check", str(t / "nope.mnn"), "--probe", str(p)],
        "does not exist",
    ),
    "check a missing probe": (
        lambda t, m, p: ["check", str(m), "--probe", str(t / "nope")],
        "does not exist",
    ),
    "probe with a corrupt deflate stream": (
        lambda t, m, p: ["check", str(m), "--probe", probe_with_corrupt_deflate(t, p)],
        "ProbeError",
    ),
    "probe with a deeply nested manifest": (
        lambda t, m, p: ["check", str(m), "--probe", probe_with_deep_manifest(t, p)],
        "nested too deeply",
    ),
    "--override dynamic={}": (
        lambda t, m, p: [*CHECK, "--override", "dynamic={}"],
        "expected true, false, an integer or a name",
    ),
    "--override dynamic=yes": (
        lambda t, m, p: [*CHECK, "--override", "dynamic=yes"],
        "dynamic='yes': expected true, false or an integer",
    ),
    "--override precision_mode=5": (
        lambda t, m, p: [*CHECK, "--override", "precision_mode=5"],
        "precision_mode=5; expected one of",
    ),
    "--override runtime_manager=1": (
        lambda t, m, p: [*CHECK, "--override", "runtime_manager=1"],
        "runtime_manager=1; expected one made by MNN.nn.create_runtime_manager",
    ),
    "--override dinamic=true": (
        lambda t, m, p: [*CHECK, "--override", "dinamic=true"],
        "unknown MNN load option(s) ['dinamic']",
    ),
    "check --inits 0": (
        lambda t, m, p: [*CHECK, "--inits", "0"],
        "argument --inits: expected a whole number >= 1, got '0'",
    ),
    "check --inits -1": (
        lambda t, m, p: [*CHECK, "--inits", "-1"],
        "argument --inits: expected a whole number >= 1, got '-1'",
    ),
    "demo --sessions -1": (
        lambda t, m, p: ["demo", "--sessions", "-1"],
        "argument --sessions: expected a whole number >= 1",
    ),
    "demo --rate 2": (
        lambda t, m, p: ["demo", "--rate", "2"],
        "argument --rate: expected a fraction in 0..1",
    ),
    "doctor --starts 0": (
        lambda t, m, p: ["doctor", str(m), "--probe", str(p), "--starts", "0"],
        "argument --starts: expected a whole number >= 1",
    ),
    "doctor --processes 0": (
        lambda t, m, p: ["doctor", str(m), "--probe", str(p), "--processes", "0"],
        "argument --processes: expected a whole number >= 1",
    ),
    "doctor --config without KEY=VALUE": (
        lambda t, m, p: ["doctor", str(m), "--probe", str(p), "--api", "session", "--config", "x"],
        "argument --config: 'x': expected KEY=VALUE",
    ),
    "doctor a missing model": (
        lambda t, m, p: ["doctor", str(t / "nope.mnn"), "--probe", str(p)],
        "does not exist",
    ),
    "record --shape too large": (
        lambda t, m, p: [*RECORD, "--shape", "mel=1,80,999999999999", "-o", str(t / "out")],
        "a canary input holds at most",
    ),
    "record --shape not numbers": (
        lambda t, m, p: [*RECORD[:-2], "--shape", "mel=1,x", "-o", str(t / "out")],
        "expected NAME=[DTYPE:]D1,D2,... with positive integer sizes",
    ),
    "record --reference precision_mode=5": (
        lambda t, m, p: [*RECORD, "--reference", "precision_mode=5", "-o", str(t / "out")],
        "--reference: precision_mode=5",
    ),
    "record an output name the model lacks": (
        lambda t, m, p: [*RECORD[:5], "nope", *RECORD[6:], "-o", str(t / "out")],
        "no output or tensor named ['nope']. Its inputs are ['mel'] and its outputs ['wav']",
    ),
    "record -o an existing file": (
        lambda t, m, p: [*RECORD, "-o", str(m)],
        "is an existing file",
    ),
    "record -o file/sub": (
        lambda t, m, p: [*RECORD, "-o", str(m / "sub")],
        "is a file, not a folder",
    ),
    "record -o an unwritable place": (
        lambda t, m, p: [*RECORD, "-o", "/sys/mnn-guard-probe"],
        "cannot be written",
    ),
    "bench --json a directory": (
        lambda t, m, p: ["bench", "--quick", "--json", str(t)],
        "is a folder; expected a file",
    ),
    "bench --json in a missing folder": (
        lambda t, m, p: ["bench", "--quick", "--json", str(t / "no" / "bench.json")],
        "does not exist",
    ),
    "bench MODEL without --probe": (
        lambda t, m, p: ["bench", str(m)],
        "MODEL and --probe DIR go together",
    ),
    "no subcommand": (lambda t, m, p: [], "the following arguments are required: COMMAND"),
}


@pytest.mark.hostile
@pytest.mark.parametrize("case", list(USER_ERRORS), ids=list(USER_ERRORS))
def test_user_error_is_one_line_and_exit_2(
    case: str, demo_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    """Each user error exits 2 with one `mnn-guard ...` line naming it, never a traceback."""
    build, expected = USER_ERRORS[case]
    model, probe_dir = (tmp_path / "model.mnn", tmp_path / "probe")
    shutil.copy(demo_paths[0], model)
    shutil.copytree(demo_paths[1], probe_dir)
    args = [str(model) if a == "MODEL" else a for a in build(tmp_path, model, probe_dir)]
    args = [str(probe_dir) if a == "PROBE" else a for a in args]
    done = cli(*args)
    ours = [line for line in done.stderr.splitlines() if line.startswith("mnn-guard")]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(ours) == 1 and expected in ours[0], done.stderr
    assert "  ... " not in done.stderr  # no work started (bench prints progress as it goes)
    assert not (tmp_path / "out").exists()
    assert model.read_bytes() == demo_paths[0].read_bytes()


def test_a_bug_keeps_its_traceback(
    monkeypatch: pytest.MonkeyPatch, demo_paths: tuple[Path, Path]
) -> None:
    """Only user errors become one line: an unexpected exception in a subcommand propagates."""

    def broken(args: object) -> int:
        raise KeyError("a bug in mnn-guard")

    monkeypatch.setattr(probe_commands, "cmd_check", broken)
    with pytest.raises(KeyError, match="a bug in mnn-guard"):
        cli_module.main(["check", str(demo_paths[0]), "--probe", str(demo_paths[1])])


# ---------------------------------------------------------------------- layout


COMMANDS = ("inspect", "record", "check", "demo", "doctor", "bench", "diagnose", "report")
SHORT = {"--out": "-o"}  # flags the docs show by their short form


def readme_usage() -> dict[str, str]:
    """Each command's usage in the "Command line" section of docs/getting-started.md,
    continuation lines joined."""
    text = (Path(__file__).parents[1] / "docs" / "getting-started.md").read_text()
    block = text[text.index("## Command line") : text.index("Every command exits 0")]
    usage: dict[str, str] = {}
    for line in block.splitlines():
        found = re.match(r" {4}mnn-guard (\w+) ", line)
        if found:
            command = found.group(1)
            usage[command] = ""
        if line.startswith("    "):
            usage[command] += line
    return usage


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_usage_shows_every_flag(command: str) -> None:
    """Every flag `mnn-guard COMMAND --help` lists is in the documented usage of COMMAND."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_module.main([command, "--help"])
    flags = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", out.getvalue())) - {"--help"}
    usage = readme_usage()[command]
    missing = [f for f in sorted(flags) if not re.search(rf"{SHORT.get(f, f)}(?![\w-])", usage)]
    assert flags and not missing


def test_help_imports_no_tool_and_no_mnn() -> None:
    """`mnn-guard --help` lists every subcommand without importing MNN, numpy or any tool."""
    code = (
        "import contextlib, io, json, sys\n"
        "from guard.tools import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    cli.main(['--help'])\n"
        "print(json.dumps({'modules': sorted(sys.modules), 'help': out.getvalue()}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    result = json.loads(done.stdout)
    heavy = {"MNN", "numpy", "scipy", "probes", "prometheus_client"}
    ours = {"guard", "guard.version", "guard.errors", "guard.tools", "guard.tools.cli"}
    ours |= {"guard.tools.arguments", "guard.tools.errors"}
    loaded = [m for m in result["modules"] if m.split(".")[0] in heavy or m.startswith("guard")]
    assert set(loaded) == ours
    for command in ("record", "check", "demo", "doctor", "bench"):
        assert f"    {command} " in result["help"]


def test_version_is_the_one_in_guard_version() -> None:
    """`mnn-guard --version` prints the version written in guard/version.py."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        cli_module.main(["--version"])
    assert exit_.value.code == 0
    assert out.getvalue().strip() == f"mnn-guard {guard.__version__}"


def test_import_guard_imports_no_tool() -> None:
    """A serving process imports `guard` and its runtime names, never `guard.tools`."""
    code = (
        "import sys, guard\n"
        "guard.wrap, guard.Pool, guard.serve, guard.mnn_factory\n"
        "print(sorted(m for m in sys.modules if m.startswith('guard.tools')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


def test_usage_error_is_no_guard_error() -> None:
    """The CLI's UsageError is neither public in `guard` nor a GuardError (it is exit code 2)."""
    assert "UsageError" not in guard.__all__ and not hasattr(guard, "UsageError")
    assert not issubclass(cli_module.UsageError, guard.GuardError)


def test_tool_errors_live_with_the_tools() -> None:
    """BundleError and MissingExtra are GuardErrors in guard.tools.errors; the old path gives
    the same classes without the runtime importing them first."""
    code = (
        "import sys, guard.errors, guard.diagnosis\n"
        "before = sorted(m for m in sys.modules if m.startswith('guard.tools'))\n"
        "from guard.errors import BundleError, MissingExtra\n"
        "from guard.diagnosis import read_bundle\n"
        "from guard.tools import bundles, errors\n"
        "same = [BundleError is errors.BundleError, MissingExtra is errors.MissingExtra,\n"
        "        read_bundle is bundles.read_bundle]\n"
        "print(before, all(same), issubclass(BundleError, guard.errors.GuardError))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split() == ["[]", "True", "True"]
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        importlib.import_module("guard.errors").Nope  # noqa: B018


def test_wrap_is_the_function_after_its_module_is_imported() -> None:
    """`guard.wrap` is the function even when its module `guard.wrapping` was imported first."""
    code = "import guard.wrapping, guard\nprint(guard.wrap.__module__, callable(guard.wrap))\n"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split() == ["guard.wrapping", "True"]
