"""What a worker's memory grows with (docs/ops.md, "Sizing"): real worker processes
(tests/apps/worker_rss.py) guarding the demo vocoder and a 64 MiB model converted from ONNX,
on the first rung, on the fallback rung, and through a fallback and a promotion (two modules
at once); their RSS against the documented budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx_models
import pytest

import guard
import probes

pytestmark = pytest.mark.slow
WORKER = Path(__file__).resolve().parent / "apps" / "worker_rss.py"
MODES = ("serve", "fallback", "promote")


def measure(model: str, probe: str, mode: str) -> dict[str, float]:
    """One worker process's memory in MiB: base, rss, peak (and the rung it ended on)."""
    done = subprocess.run(
        [sys.executable, str(WORKER), model, probe, mode],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """By model (demo, wide): its file's MiB and each mode's measurement."""
    folder = tmp_path_factory.mktemp("wide")
    wide = onnx_models.convert(onnx_models.wide(), folder / "wide.mnn")
    factory = guard.mnn_factory(str(wide), ["x"], ["y"], threads=1)
    x = np.random.default_rng(1).standard_normal((1, 2048)).astype(np.float32)
    probes.record(factory, {"x": x}, model=str(wide)).save(folder / "wide.probe")
    from guard.tools import demo

    models = {
        "demo": ("demo", "-", demo.DEMO_MODEL),
        "wide": (str(wide), str(folder / "wide.probe"), wide),
    }
    return {
        which: {
            "file": Path(path).stat().st_size / 2**20,
            **{mode: measure(model, probe, mode) for mode in MODES},
        }
        for which, (model, probe, path) in models.items()
    }


SLACK_MB = 20.0  # what the allocator may keep of a failed init's module


@pytest.mark.parametrize("which", ["demo", "wide"])
def test_a_workers_peak_fits_its_budget(measured: dict[str, Any], which: str) -> None:
    """Loading, falling back and promoting (a module built while another serves), a worker's
    peak RSS stays within the budget: its RSS before the model, twice the larger peak of one
    module (a worker that loaded and served on the first or the fallback rung, less its RSS
    before the model), and 20 MiB."""
    found = measured[which]
    serve, fallback, promote = (found[mode] for mode in MODES)
    assert (serve["rung"], fallback["rung"], promote["rung"]) == (0, 1, 0)
    module = max(serve["peak"] - serve["base"], fallback["peak"] - fallback["base"])
    budget = promote["base"] + 2 * module + SLACK_MB
    print(
        f"{which} ({found['file']:.1f} MiB file): before the model {serve['base']:.0f} MiB, "
        f"serving on the first rung {serve['rss']:.0f} (peak {serve['peak']:.0f}), on the "
        f"fallback rung {fallback['rss']:.0f} (peak {fallback['peak']:.0f}), after a fallback "
        f"and a promotion {promote['rss']:.0f} (peak {promote['peak']:.0f}); budget {budget:.0f}"
    )
    assert max(serve["peak"], fallback["peak"], promote["peak"]) <= budget


def test_a_weight_heavy_module_takes_a_few_times_its_file(measured: dict[str, Any]) -> None:
    """The 64 MiB model takes 2 to 3 times its file on each rung while it serves, and at most
    4 times at its peak (loading): the rule of thumb for models whose weights dominate."""
    found = measured["wide"]
    for mode in ("serve", "fallback"):
        steady = (found[mode]["rss"] - found[mode]["base"]) / found["file"]
        peak = (found[mode]["peak"] - found[mode]["base"]) / found["file"]
        assert 2.0 <= steady <= 3.0 and peak <= 4.0, (mode, steady, peak)
