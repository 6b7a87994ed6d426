"""`mnn-guard doctor` on the real demo vocoder, with fresh spawned processes per start."""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import guard
import probes
from guard.testing import FaultyFactory
from guard.tools import demo, doctor
from guard.tools.bundles import find_bundles, read_bundle
from guard.tools.doctor import DoctorReport, RungReport, doctor_json, format_doctor, run_doctor
from probes import store

STARTS = 16
RATE = 0.3
BASE_SEED = 100


class Ticketed:
    """A picklable factory: each fresh process takes its FaultyFactory seed from a shared counter.

    Every start draws a distinct ticket 0..STARTS-1, so the number of degraded starts is fixed
    (known in advance) whichever process gets which ticket: the test cannot flake.
    """

    def __init__(self, inner: FaultyFactory, counter: Any) -> None:
        self.inner = inner
        self.counter = counter
        self.ticket: int | None = None

    def __call__(self, **overrides: Any) -> Any:
        if self.ticket is None:
            with self.counter.get_lock():
                self.ticket = int(self.counter.value)
                self.counter.value += 1
            self.inner.seed = BASE_SEED + self.ticket
        return self.inner(**overrides)


class DiesOnDynamic:
    """A picklable factory whose process dies when the dynamic rung is initialised."""

    def __call__(self, **overrides: Any) -> Any:
        if overrides.get("dynamic"):
            os._exit(3)
        return demo.demo_factory(threads=1)(**overrides)


class HangsOnDynamic:
    """A picklable factory whose process hangs when the dynamic rung is initialised."""

    def __call__(self, **overrides: Any) -> Any:
        if overrides.get("dynamic"):
            time.sleep(600)
        return demo.demo_factory(threads=1)(**overrides)


def expected_degraded() -> int:
    """How many of the tickets 0..STARTS-1 draw a degraded static init (first draw < RATE)."""
    return sum(np.random.default_rng(BASE_SEED + t).random() < RATE for t in range(STARTS))


@pytest.fixture(scope="module")
def report(demo_paths: tuple[Path, Path]) -> DoctorReport:
    """Doctor over 16 fresh starts, 2 at a time, static inits degraded at rate 0.3."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    counter = multiprocessing.get_context("spawn").Value("i", 0)
    faulty = FaultyFactory(demo.demo_factory(threads=1), fault="noise", rate=RATE, affects="static")
    return run_doctor(Ticketed(faulty, counter), probe, starts=STARTS, processes=2)


@pytest.mark.slow
def test_static_degraded_count_is_the_injected_one(report: DoctorReport) -> None:
    """The static rung's degraded starts are exactly the injected ones."""
    static = report.rungs[0]
    assert (static.name, static.starts, static.errors) == ("static", STARTS, 0)
    assert static.degraded == expected_degraded() > 0


@pytest.mark.slow
def test_static_interval_contains_injected_rate(report: DoctorReport) -> None:
    """The 95% Clopper-Pearson interval of the static degraded rate contains the injected 0.3."""
    static = report.rungs[0]
    assert static.ci_low is not None and static.ci_high is not None
    assert static.ci_low <= RATE <= static.ci_high
    assert static.ci_low <= (static.degraded_rate or 0.0) <= static.ci_high
    assert any("snr_db" in r for r in static.reasons)


@pytest.mark.slow
def test_dynamic_rung_shows_no_degraded_start(report: DoctorReport) -> None:
    """The dynamic rung, spared by the injector, has 0 degraded starts and an interval from 0."""
    dynamic = report.rungs[1]
    counts = (dynamic.name, dynamic.starts, dynamic.degraded, dynamic.errors)
    assert counts == ("dynamic", STARTS, 0, 0)
    assert dynamic.ci_low == 0.0
    assert dynamic.ci_high == pytest.approx(1 - 0.025 ** (1 / STARTS))  # Clopper-Pearson, k=0


def forward_times(dynamic: bool, mel: np.ndarray[Any, Any]) -> tuple[float, float]:
    """The fastest and the median time of 15 forwards of a fresh one-thread module here, in
    seconds (the fastest is what a loaded machine cannot inflate)."""
    runner = guard.mnn.adapt(demo.demo_factory(threads=1)(**({"dynamic": True} if dynamic else {})))
    times = []
    for _ in range(15):
        start = time.perf_counter()
        runner.run([mel])
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


@pytest.mark.slow
def test_timings_and_speed_ratio_are_measured(
    report: DoctorReport, demo_paths: tuple[Path, Path]
) -> None:
    """Each rung's forward median is a forward's time (within 5x of one here); its speed is the
    median of every start's interleaved rounds against rung 0, with their middle half."""
    static, dynamic = report.rungs
    mel = probes.load(demo_paths[1]).cases[0].inputs["mel"]
    for rung, (fastest, here) in (
        (static, forward_times(False, mel)),
        (dynamic, forward_times(True, mel)),
    ):
        assert rung.init_median_s is not None and rung.forward_median_s is not None
        assert fastest / 5 < rung.forward_median_s < here * 5, (rung.name, fastest, here)
        assert 0 < rung.init_median_s < 10
    assert static.speed_ratio == 1.0
    speed = dynamic.speed
    assert speed is not None and dynamic.speed_ratio == speed.median
    assert speed.low <= speed.median <= speed.high and speed.null == 1.0
    assert speed.rounds == STARTS * doctor.FORWARD_RUNS


@pytest.mark.slow
def test_degraded_report_says_so(report: DoctorReport) -> None:
    """A report with degraded starts is degraded, and its text names the rung that was."""
    text = format_doctor(report, "demo_vocoder.mnn")
    assert report.degraded
    assert text.startswith(f"mnn-guard doctor: {STARTS} fresh process starts of demo_vocoder.mnn")
    assert "DEGRADED STARTS FOUND: static" in text
    assert [line.split()[0] for line in text.splitlines()[3:5]] == ["static", "dynamic"]


@pytest.mark.slow
def test_report_json_round_trips(report: DoctorReport) -> None:
    """doctor_json() parses back to every field of the report and of each rung."""
    data = json.loads(doctor_json(report))
    assert set(data) == {*DoctorReport.__dataclass_fields__, "degraded"}
    assert data["degraded"] is True
    assert [set(r) for r in data["rungs"]] == [set(RungReport.__dataclass_fields__)] * 2


@pytest.mark.slow
def test_start_that_dies_is_an_error_not_a_hang(demo_paths: tuple[Path, Path]) -> None:
    """A process that dies during a rung is counted as an error for that rung; the others stand."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    report = run_doctor(DiesOnDynamic(), probe, starts=2, processes=2)
    static, dynamic = report.rungs
    assert (static.starts, static.degraded, static.errors) == (2, 0, 0)
    assert (dynamic.starts, dynamic.errors, dynamic.degraded_rate) == (2, 2, None)
    assert "exit code 3" in dynamic.reasons[0]
    assert report.degraded


@pytest.mark.slow
def test_start_that_hangs_is_killed_after_start_timeout(demo_paths: tuple[Path, Path]) -> None:
    """A process that hangs is killed after start_timeout and its unfinished rung is an error."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    began = time.monotonic()
    report = run_doctor(HangsOnDynamic(), probe, starts=1, processes=1, start_timeout=8.0)
    dynamic = report.rungs[1]
    assert (dynamic.starts, dynamic.errors) == (1, 1)
    assert "exceeded 8 s and was killed" in dynamic.reasons[0]
    assert time.monotonic() - began < 30


def doctor_cli(model: Path, probe_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run `mnn-guard doctor MODEL --probe DIR --starts 2 --json ...` in a fresh interpreter."""
    cmd = [sys.executable, "-m", "guard.tools.cli", "doctor", str(model), "--probe", str(probe_dir)]
    cmd += ["--starts", "2", "--processes", "2", "--json", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_cli_json_is_clean_and_exits_0(demo_paths: tuple[Path, Path]) -> None:
    """`doctor --json` on the clean model prints only JSON with every field, progress on stderr."""
    done = doctor_cli(*demo_paths)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert set(data) == {*DoctorReport.__dataclass_fields__, "degraded"}
    assert [set(r) for r in data["rungs"]] == [set(RungReport.__dataclass_fields__)] * 2
    rungs = [(r["name"], r["starts"], r["degraded"], r["errors"]) for r in data["rungs"]]
    assert rungs == [("static", 2, 0, 0), ("dynamic", 2, 0, 0)]
    assert done.stderr.count("doctor: start ") == 2


@pytest.mark.slow
def test_cli_exits_1_on_a_degraded_model(demo_paths: tuple[Path, Path], tmp_path: Path) -> None:
    """A rebuilt model with 1% weight noise vs the shipped probe: every start degraded, exit 1,
    and a rendered diagnosis bundle for each of the 4 failed canaries."""
    noisy = tmp_path / "noisy.mnn"
    rng = np.random.default_rng(3)
    demo.build_vocoder(
        noisy, weight_transform=lambda w: w * (1 + 0.01 * rng.standard_normal(w.shape))
    )
    folder = tmp_path / "bundles"
    done = doctor_cli(noisy, demo_paths[1], "--ignore-model-hash", "--diagnose", str(folder))
    assert done.returncode == 1, done.stderr
    data = json.loads(done.stdout)
    assert data["degraded"] is True
    assert [(r["name"], r["degraded"]) for r in data["rungs"]] == [("static", 2), ("dynamic", 2)]
    bundles = [read_bundle(b) for b in find_bundles(folder)]
    assert sorted(b.manifest["rung"]["name"] for b in bundles) == ["dynamic"] * 2 + ["static"] * 2
    assert all((b.path / "report.html").is_file() for b in bundles)
    assert all(b.manifest["model"]["sha256"] == store.file_sha256(noisy) for b in bundles)
    assert done.stderr.count("diagnosis bundle: ") == 4


@pytest.mark.slow
def test_progress_gets_one_line_per_start(demo_paths: tuple[Path, Path]) -> None:
    """`progress` is called once per finished start, with that start's verdict per rung."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    lines: list[str] = []
    run_doctor(demo.demo_factory(threads=1), probe, starts=2, processes=2, progress=lines.append)
    assert [line.split(":")[1].strip() for line in lines] == ["start 1/2", "start 2/2"]
    assert all("static pass, dynamic pass" in line for line in lines)
