"""`mnn-guard check` with a probe recorded under another MNN release: it says so and how far
each output moved from the goldens, and what a guarded session would make of it."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import probes
from guard import mnn
from guard.tools import demo
from guard.tools.check import format_check, run_check

OTHER = "2.9.9"  # a release the probe claims to come from (not the one installed)


def from_other_mnn(probe: probes.Probe) -> probes.Probe:
    """The probe as if recorded under another MNN release."""
    return dataclasses.replace(probe, meta=dataclasses.replace(probe.meta, mnn_version=OTHER))


def rebuilt(folder: Path, name: str, transform: Any) -> mnn.MNNFactory:
    """The demo vocoder rebuilt with every weight transformed: a build that computes otherwise."""
    path = folder / f"{name}.mnn"
    demo.build_vocoder(path, weight_transform=transform)
    return mnn.mnn_factory(path, ["mel"], ["wav"], threads=1)


def test_the_same_computation_is_within_the_calibrated_limit(demo_probe: probes.Probe) -> None:
    """Clean inits under "another" release: the move per output, within the limit, said so."""
    report = run_check(demo.demo_factory(threads=1), from_other_mnn(demo_probe), {}, inits=2)
    assert report.upgrade is not None and report.degraded == 0
    assert (report.upgrade.recorded, report.upgrade.running) == (OTHER, mnn.mnn_version())
    assert list(report.upgrade.moved_db) == ["wav"]
    assert report.upgrade.moved_db["wav"] >= demo_probe.limits_for("wav")["snr_db"]
    text = format_check(report)
    assert f"probe recorded with MNN {OTHER}, running MNN {mnn.mnn_version()}" in text
    assert "wav: " in text and "within the calibrated limit" in text


def test_a_slightly_different_computation_is_judged_against_a_local_reference(
    demo_probe: probes.Probe, tmp_path: Path
) -> None:
    """fp16-rounded weights (beyond the calibrated limit, within the loose one), as a release
    computing slightly differently: every init passes on a local reference, and the report
    says how far the output moved and that sessions judge it so."""
    fp16 = rebuilt(tmp_path, "fp16", lambda w: w.astype(np.float16).astype(np.float32))
    report = run_check(fp16, from_other_mnn(demo_probe), {}, inits=2)
    assert report.upgrade is not None and report.degraded == 0
    assert {i.basis for i in report.inits} == {"local"}
    moved = report.upgrade.moved_db["wav"]
    assert demo_probe.limits_for("wav", "loose")["snr_db"] < moved
    assert moved < demo_probe.limits_for("wav")["snr_db"]
    assert "local reference (basis local)" in report.upgrade.verdicts()["wav"]
    assert f"wav: {moved:.1f} dB" in format_check(report)


def test_a_changed_computation_is_beyond_the_loose_limit(
    demo_probe: probes.Probe, tmp_path: Path
) -> None:
    """3% weight noise (about 20 dB): the inits fail, and the report says the outputs moved
    beyond the loose limit."""
    rng = np.random.default_rng(7)
    noisy = rebuilt(tmp_path, "noisy", lambda w: w * (1 + 0.03 * rng.standard_normal(w.shape)))
    report = run_check(noisy, from_other_mnn(demo_probe), {}, inits=1)
    assert report.upgrade is not None and report.degraded == 1
    assert report.upgrade.moved_db["wav"] < demo_probe.limits_for("wav", "loose")["snr_db"]
    assert "beyond the loose limit" in report.upgrade.verdicts()["wav"]


def test_a_probe_of_this_release_reports_no_upgrade(demo_probe: probes.Probe) -> None:
    """A probe recorded under the installed release: no upgrade section."""
    here = dataclasses.replace(
        demo_probe, meta=dataclasses.replace(demo_probe.meta, mnn_version=mnn.mnn_version())
    )
    report = run_check(demo.demo_factory(threads=1), here, {}, inits=1)
    assert report.upgrade is None and "probe recorded with MNN" not in format_check(report)


def test_cli_json_says_the_releases_and_the_move(
    demo_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    """`check --json` with a probe from another release: both releases and dB per output."""
    folder = Path(shutil.copytree(demo_paths[1], tmp_path / "probe"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["mnn_version"] = OTHER
    (folder / "manifest.json").write_text(json.dumps(manifest))
    done = subprocess.run(
        [sys.executable, "-m", "guard.tools.cli", "check", str(demo_paths[0]), "--probe",
         str(folder), "--json", "--no-diagnose"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)["mnn"]
    assert (found["probe"], found["running"]) == (OTHER, mnn.mnn_version())
    moved = found["moved_db"]["wav"]
    assert (moved is None and found["bit_exact"] == ["wav"]) or moved > 45
    assert f"probe recorded with MNN {OTHER}" in done.stderr


@pytest.mark.parametrize("value", [math.inf, 120.0])
def test_a_move_within_the_limit_needs_nothing(value: float) -> None:
    """The verdict of a move at or above the calibrated limit, bit-exact included."""
    from guard.tools.check import Upgrade

    upgrade = Upgrade(
        recorded=OTHER, running="3.6.1", moved_db={"wav": value},
        tight_db={"wav": 107.0}, loose_db={"wav": 45.0},
    )  # fmt: skip
    assert upgrade.verdicts()["wav"].startswith("within the calibrated limit")
