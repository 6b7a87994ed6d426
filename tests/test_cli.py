"""The mnn-guard command line, run as a real process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from guard.tools import demo


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
    chk = cli("check", str(noisy), "--probe", str(demo_paths[1]), "--ignore-model-hash")
    assert chk.returncode == 1, chk.stderr
    assert "FAIL" in chk.stdout and "1 of 1 init(s) degraded" in chk.stdout


def test_check_stale_probe_exits_2(demo_paths: tuple[Path, Path], tmp_path: Path) -> None:
    """Checking another model against a probe without --ignore-model-hash is a usage error."""
    other = tmp_path / "other.mnn"
    demo.build_vocoder(other, seed=9)
    chk = cli("check", str(other), "--probe", str(demo_paths[1]))
    assert chk.returncode == 2
    assert "stale probe" in chk.stderr


def test_bad_usage_exits_2(demo_paths: tuple[Path, Path], tmp_path: Path) -> None:
    """Malformed arguments and missing files exit 2 with a message."""
    bad_shape = cli(
        "record",
        str(demo_paths[0]),
        "--input",
        "mel",
        "--output",
        "wav",
        "--shape",
        "mel=1,x",
        "-o",
        str(tmp_path / "p"),
    )
    assert bad_shape.returncode == 2 and "--shape" in bad_shape.stderr
    no_probe = cli("check", str(demo_paths[0]), "--probe", str(tmp_path / "none"))
    assert no_probe.returncode == 2 and "does not exist" in no_probe.stderr
    no_args = cli("check")
    assert no_args.returncode == 2


def test_demo_serves_no_degraded_output() -> None:
    """`mnn-guard demo` catches every injected fault and serves 0 degraded outputs."""
    run = cli("demo", "--sessions", "20", "--requests", "2", "--rate", "0.3", "--port", "-1")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = dict(
        (line.rsplit("  ", 1)[0].strip(), line.rsplit("  ", 1)[1].strip())
        for line in run.stdout.splitlines()
        if line.startswith("  ")
    )
    assert lines["degraded outputs served"] == "0"
    assert int(lines["degraded inits injected"]) > 0
    assert lines["degraded inits caught"] == lines["degraded inits injected"]
    assert int(lines["recoveries: reinit"]) > 0
