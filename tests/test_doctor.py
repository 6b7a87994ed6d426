"""`mnn-guard doctor` on the real demo vocoder, with fresh spawned processes per start."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import probes
from guard import demo
from guard.doctor import DoctorReport, RungReport, run_doctor
from guard.testing import FaultyFactory

STARTS = 24
RATE = 0.3
BASE_SEED = 100


class Ticketed:
    """A picklable factory giving each fresh process its own FaultyFactory seed from a shared counter.

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


def expected_degraded() -> int:
    """How many of the tickets 0..STARTS-1 draw a degraded static init (first draw < RATE)."""
    return sum(np.random.default_rng(BASE_SEED + t).random() < RATE for t in range(STARTS))


@pytest.fixture(scope="module")
def report(demo_paths: tuple[Path, Path]) -> DoctorReport:
    """Doctor over 24 fresh starts, 2 at a time, static inits degraded at rate 0.3."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    counter = multiprocessing.get_context("spawn").Value("i", 0)
    faulty = FaultyFactory(demo.demo_factory(threads=1), fault="noise", rate=RATE, affects="static")
    return run_doctor(Ticketed(faulty, counter), probe, starts=STARTS, processes=2, progress=False)


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
    assert (dynamic.name, dynamic.starts, dynamic.degraded, dynamic.errors) == ("dynamic", STARTS, 0, 0)
    assert dynamic.ci_low == 0.0 and dynamic.ci_high is not None and dynamic.ci_high < 0.2


@pytest.mark.slow
def test_timings_and_speed_ratio_are_measured(report: DoctorReport) -> None:
    """Median init and forward times are positive; the ratio is dynamic over static forward time."""
    static, dynamic = report.rungs
    for rung in report.rungs:
        assert rung.init_median_s is not None and 0 < rung.init_median_s < 10
        assert rung.forward_median_s is not None and 0 < rung.forward_median_s < 1
    assert static.speed_ratio == 1.0
    assert dynamic.forward_median_s is not None and static.forward_median_s is not None
    assert dynamic.speed_ratio == pytest.approx(dynamic.forward_median_s / static.forward_median_s)


@pytest.mark.slow
def test_degraded_report_exits_1_and_says_so(report: DoctorReport) -> None:
    """A report with degraded starts has exit code 1 and its table says DEGRADED."""
    assert report.exit_code == 1
    assert "DEGRADED STARTS FOUND: static" in report.table()


@pytest.mark.slow
def test_report_json_round_trips(report: DoctorReport) -> None:
    """to_json() parses back to every field of the report and of each rung."""
    data = json.loads(report.to_json())
    assert set(data) == {*DoctorReport.__dataclass_fields__, "degraded"}
    assert data["degraded"] is True
    assert [set(r) for r in data["rungs"]] == [set(RungReport.__dataclass_fields__)] * 2


@pytest.mark.slow
def test_start_that_dies_is_an_error_not_a_hang(demo_paths: tuple[Path, Path]) -> None:
    """A process that dies during a rung is counted as an error for that rung; the others stand."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    report = run_doctor(DiesOnDynamic(), probe, starts=2, processes=2, progress=False)
    static, dynamic = report.rungs
    assert (static.starts, static.degraded, static.errors) == (2, 0, 0)
    assert (dynamic.starts, dynamic.errors, dynamic.degraded_rate) == (2, 2, None)
    assert "exit code 3" in dynamic.reasons[0]
    assert report.exit_code == 1


@pytest.mark.slow
def test_cli_json_is_clean_and_exits_0(demo_paths: tuple[Path, Path]) -> None:
    """`mnn-guard doctor --json` prints only JSON on stdout, progress on stderr, and exits 0."""
    model, probe_dir = demo_paths
    cmd = [sys.executable, "-m", "guard.cli", "doctor", str(model), "--probe", str(probe_dir),
           "--starts", "3", "--processes", "2", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert set(data) == {*DoctorReport.__dataclass_fields__, "degraded"}
    assert [(r["name"], r["starts"], r["degraded"]) for r in data["rungs"]] == [
        ("static", 3, 0), ("dynamic", 3, 0)
    ]
    assert done.stderr.count("doctor: start ") == 3


def test_bad_starts_is_a_config_error(demo_probe: probes.Probe) -> None:
    """starts=0 is refused before any process starts."""
    from guard.errors import ConfigError

    with pytest.raises(ConfigError, match="starts must be a positive int, got 0"):
        run_doctor(demo.demo_factory(), demo_probe, starts=0)
