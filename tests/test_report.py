"""`mnn-guard report`: the HTML page of real bundles, with pictures that show the difference."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import guard
import probes
from guard import mnn
from guard.canary import run_canary
from guard.diagnosis import DiagnosisListener, find_bundles
from guard.ladder import Attempt, Outcome
from guard.testing import Fault, FaultyFactory
from guard.tools.report import figure, figure_png, render_folder, render_report


def images(page: str) -> list[np.ndarray]:
    """Every inline PNG of a page, decoded to RGB pixels."""
    found = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")) for b in found]


def bundle_of(
    folder: Path, factory: guard.mnn.MNNFactory, probe: probes.Probe, fault: Fault | None
) -> Path:
    """A bundle of one canary run on a real module, degraded by `fault` or clean."""
    module = mnn.adapt(factory())
    if fault is not None:
        module = FaultyFactory(factory, fault=fault, schedule=[True], snr_db=15.0)()
    canary = run_canary(module, probe, 1)
    outputs = canary.failed_outputs or {  # a clean module fails nothing: keep what it returned
        i: dict(zip(probe.output_names, module.run([c.inputs["mel"]]), strict=True))
        for i, c in enumerate(probe.cases)
    }
    outcome = Outcome.PASS if canary.verdict.passed else Outcome.FAIL
    attempt = Attempt(guard.STATIC, 0, outcome, canary.verdict, None, 0.1, outputs)
    listener = DiagnosisListener(folder, probe, factory=factory)
    listener.record("voc", attempt)
    assert listener.flush(30)
    (path,) = find_bundles(folder)
    return path


def test_pages_show_the_difference_between_clean_and_degraded(
    tmp_path: Path, demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe
) -> None:
    """Both pages render one picture per case; the degraded module's pictures differ."""
    clean = render_report(bundle_of(tmp_path / "clean", demo_factory, demo_probe, None))
    noisy = render_report(bundle_of(tmp_path / "noisy", demo_factory, demo_probe, Fault.NOISE))
    clean_page, noisy_page = clean.read_text(), noisy.read_text()
    clean_images, noisy_images = images(clean_page), images(noisy_page)
    assert len(clean_images) == len(noisy_images) == len(demo_probe.cases)
    for a, b in zip(clean_images, noisy_images, strict=True):
        assert a.shape == b.shape and a.shape[0] > 500 and a.shape[1] > 700
        changed = np.any(a != b, axis=-1).mean()
        assert changed > 0.05, changed  # the difference row and the error spectrogram
    assert 'class="fail">FAIL' in noisy_page and 'class="fail">FAIL' not in clean_page
    assert "snr_db" in noisy_page and "How to hand this to MNN" in noisy_page
    for page in (clean_page, noisy_page):  # self-contained: nothing to fetch
        assert not re.search(r"<(script|link|iframe)|src=\"(?!data:)", page)
        assert 200_000 < len(page) < 1_500_000


def test_a_nan_output_and_a_4d_output_still_render() -> None:
    """NaN outputs are drawn as 0 with a note; a 4-D output gets an error histogram alone."""
    rng = np.random.default_rng(0)
    golden = np.sin(np.arange(4096) / 7.0).astype(np.float32)[None, None]
    nan = figure_png(golden, np.full_like(golden, np.nan), "x")
    signal = np.asarray(Image.open(io.BytesIO(nan)))
    block = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    hist = np.asarray(Image.open(io.BytesIO(figure_png(block, block + 0.1, "y"))))
    assert signal.shape[0] > 2 * hist.shape[0]  # four rows of plots against one histogram
    assert "NaN/Inf values drawn as 0" in figure(golden, golden * np.nan, "x").axes[0].get_title()


def titled(fig: Any, start: str) -> Any:
    """The one axes of `fig` whose title starts with `start`."""
    (ax,) = [ax for ax in fig.axes if ax.get_title().startswith(start)]
    return ax


def test_the_difference_is_drawn_on_its_own_scale() -> None:
    """A small error fills its row: the y-axis spans the difference, not the golden's peak."""
    golden = np.sin(np.arange(4096) / 7.0).astype(np.float32)[None, None]
    error = 0.01 * np.random.default_rng(1).standard_normal(golden.shape).astype(np.float32)
    row = titled(figure(golden, golden + error, "x"), "difference")
    low, high = row.get_ylim()
    largest = float(np.abs(error).max())
    assert largest <= high < 1.2 * largest and low == -high
    assert f"at most {largest:.3g}" in row.get_title()


@pytest.mark.parametrize(
    ("shape", "channel"), [((1, 1, 24, 40), None), ((1, 3, 24, 40), 2), ((24, 40, 1), None)]
)
def test_2d_and_3d_outputs_get_images_of_golden_actual_and_error(
    shape: tuple[int, ...], channel: int | None
) -> None:
    """A probability map gets golden, actual and error as images (a stack: its worst channel),
    above the error histogram."""
    golden = np.random.default_rng(2).random(shape).astype(np.float32)
    actual = golden.copy()
    actual.reshape(-1)[-7] += 0.5  # in the last channel of a stack
    fig = figure(golden, actual, "map")
    images = {ax.get_title(): ax.images[0].get_array() for ax in fig.axes if ax.images}
    assert set(images) == {"golden", "actual", "error (actual - golden)"}
    plane = (lambda x: np.squeeze(x)[channel]) if channel is not None else np.squeeze
    assert np.allclose(images["golden"], plane(golden))
    assert np.allclose(images["error (actual - golden)"], plane(actual) - plane(golden))
    assert titled(fig, "error histogram")
    if channel is not None:
        assert f"channel {channel} of 3 (the largest error)" in fig.subfigs[0].get_suptitle()


def test_the_worst_elements_of_a_map_are_indexed_by_plain_integers(
    tmp_path: Path, converted: dict[str, Path]
) -> None:
    """The page of a converted model's [1, 1, H, W] output: its image, and worst elements
    listed as [0, 0, 3, 17], never as numpy reprs."""
    factory = guard.mnn_factory(converted["stride32"], ["image"], ["mask"], threads=1)
    image = np.random.default_rng(3).random((1, 1, 32, 64)).astype(np.float32)
    probe = probes.record(factory, {"image": image}, derive=False)
    module = FaultyFactory(factory, fault=Fault.NOISE, schedule=[True], snr_db=15.0)()
    canary = run_canary(module, probe, 1)
    attempt = Attempt(
        guard.STATIC, 0, Outcome.FAIL, canary.verdict, None, 0.1, canary.failed_outputs
    )
    listener = DiagnosisListener(tmp_path / "d", probe, factory=factory)
    listener.record("map", attempt)
    assert listener.flush(30)
    (path,) = find_bundles(tmp_path / "d")
    page = render_report(path).read_text()
    indices = re.findall(r"<td>(\[[^<]*\])</td>", page)
    assert len(indices) == 10 and all(re.fullmatch(r"\[0, 0, \d+, \d+\]", i) for i in indices)
    assert "np.int64" not in page and len(images(page)) == 1


def test_render_folder_renders_every_bundle(
    tmp_path: Path, demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe
) -> None:
    """A folder of bundles gets one page per bundle; a folder without any is a GuardError."""
    bundle_of(tmp_path / "d", demo_factory, demo_probe, Fault.ZEROS)
    (page,) = render_folder(tmp_path / "d")
    assert page.name == "report.html" and images(page.read_text())
    with pytest.raises(guard.GuardError, match="holds no diagnosis bundle"):
        render_folder(tmp_path)


@pytest.mark.hostile
def test_without_matplotlib_the_report_says_how_to_get_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
) -> None:
    """Without the extra, rendering raises MissingExtra naming the pip command; writes nothing."""
    path = bundle_of(tmp_path / "d", demo_factory, demo_probe, Fault.NOISE)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if it were not installed
    with pytest.raises(guard.GuardError, match=r"pip install matplotlib \(the diagnose extra\)"):
        render_report(path)
    assert not (path / "report.html").exists()


@pytest.mark.hostile
def test_report_of_a_folder_without_bundles_is_one_line(tmp_path: Path) -> None:
    """`mnn-guard report DIR` on a folder that holds no bundle: exit 2 and one line."""
    run = subprocess.run(
        [sys.executable, "-m", "guard.tools.cli", "report", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    ours = [line for line in run.stderr.splitlines() if line.startswith("mnn-guard")]
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len(ours) == 1 and "holds no diagnosis bundle" in ours[0], run.stderr
