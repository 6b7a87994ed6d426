"""The bundled demo vocoder is reproducible from the project's own code."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import reference

import guard
import probes
from guard import mnn
from guard.tools import demo
from guard.tools.demo_job import run_demo
from probes import store


def test_rebuild_is_byte_identical(tmp_path: Path) -> None:
    """Building the vocoder is deterministic on every release, and on the release that wrote
    the shipped file it gives exactly the shipped bytes (so the shipped probe applies)."""
    demo.build_vocoder(tmp_path / "a.mnn")
    demo.build_vocoder(tmp_path / "b.mnn")
    rebuilt = store.file_sha256(tmp_path / "a.mnn")
    assert rebuilt == store.file_sha256(tmp_path / "b.mnn")
    assert store.file_sha256(demo.DEMO_MODEL) == demo.DEMO_SHA256
    writer = mnn.inspect(demo.DEMO_MODEL).mnn_version
    assert rebuilt == demo.DEMO_SHA256 or writer != mnn.mnn_version()


def test_rebuild_computes_what_the_shipped_model_computes(tmp_path: Path) -> None:
    """On any release, the vocoder built here and the shipped file compute the same outputs."""
    demo.build_vocoder(tmp_path / "v.mnn")
    x = demo.demo_mel(100)
    rebuilt = mnn.mnn_factory(tmp_path / "v.mnn", ["mel"], ["wav"], threads=1)
    assert np.array_equal(mnn.adapt(rebuilt()).run([x])[0], reference(x))
    assert mnn.inspect(tmp_path / "v.mnn").input_names == ["mel"]


def test_shipped_probe_matches_the_model(demo_probe: probes.Probe) -> None:
    """The shipped probe names the shipped model's hash, the MNN release that wrote the model
    and a dynamic T."""
    assert demo_probe.meta.model_sha256 == demo.DEMO_SHA256
    assert demo_probe.meta.mnn_version == mnn.inspect(demo.DEMO_MODEL).mnn_version
    assert demo_probe.inputs[0].shape == (1, 80, (1, 4000))
    assert len(demo_probe.cases) == 2


@pytest.mark.parametrize("frames", [1, 7, 100, 333])
def test_any_length_gives_hop_samples_per_frame(frames: int) -> None:
    """The vocoder maps T frames to T*256 samples on both rungs, with a non-trivial signal."""
    factory = demo.demo_factory()
    x = demo.demo_mel(frames)
    static = mnn.adapt(factory()).run([x])[0]
    dynamic = mnn.adapt(factory(dynamic=True)).run([x])[0]
    assert static.shape == dynamic.shape == (1, 1, frames * demo.HOP)
    assert np.array_equal(static, dynamic)
    assert 0.05 < float(np.std(static)) < 0.9


def test_mnn_factory_rejects_unknown_options() -> None:
    """A misspelt load option raises instead of being ignored by MNN."""
    with pytest.raises(guard.ConfigError, match="unknown MNN load option"):
        guard.mnn_factory(demo.DEMO_MODEL, ["mel"], ["wav"], dynamik=True)
    with pytest.raises(guard.ConfigError, match="precision_mode='fast'"):
        guard.mnn_factory(demo.DEMO_MODEL, ["mel"], ["wav"], precision_mode="fast")


def test_mnn_factory_missing_model(tmp_path: Path) -> None:
    """A missing model file is a FactoryError naming the path."""
    factory = guard.mnn_factory(tmp_path / "nope.mnn", ["mel"], ["wav"])
    with pytest.raises(guard.errors.FactoryError, match="does not exist"):
        factory()


def test_quiet_demo_restores_the_log_level(caplog: pytest.LogCaptureFixture) -> None:
    """`run_demo(quiet=True)` silences the guard's warnings for the run only, then restores them."""
    logger = logging.getLogger("mnn_guard")
    caplog.set_level(logging.INFO, logger="mnn_guard")  # and back to its level after the test
    seen: list[int] = []
    report = run_demo(
        sessions=2, requests=1, rate=1.0, progress=lambda _: seen.append(logger.level)
    )
    assert seen and set(seen) == {logging.ERROR}
    assert logger.level == logging.INFO
    assert report.injected > 0 and report.tally.caught == report.injected
    assert report.bad == 0 and not report.degraded
