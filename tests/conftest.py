"""Shared fixtures: the real demo vocoder, its probe, a tiny model, a fresh registry."""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx_models
import pytest
from hypothesis import settings
from prometheus_client import CollectorRegistry

import guard
import probes
from guard import health, mnn
from guard.tools import demo

Array = np.ndarray[Any, Any]


def quiet_policy(**kw: Any) -> guard.Policy:
    """A policy with no background thread, so tests see only what they trigger."""
    return guard.Policy(background=False, promote_after=None, **kw)


_REFERENCE_LOCK = threading.Lock()  # one forward at a time: a module shared by threads is not safe


@functools.cache
def _reference_runner() -> mnn.Runner:
    """One dynamic module of the demo vocoder, built on first use, on one thread (a pool of
    four spins in the test process and slows every later forward on a busy machine)."""
    return mnn.adapt(demo.demo_factory(threads=1)(dynamic=True))


def reference(x: Array) -> Array:
    """The clean output of a dynamic module (the trusted configuration) for `x`."""
    with _REFERENCE_LOCK:
        return _reference_runner().run([x])[0]


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds


def pytest_configure(config: pytest.Config) -> None:
    """Fix glibc's mmap threshold at its 128 KiB default for the whole run.

    glibc raises the threshold for good once a larger mmapped block is freed (a 4 MB output in
    test_async_pool), after which 1 MB arrays come from the heap, which keeps freed pages: the
    RSS-based leak tests then saw +52 MB of allocator cache, not of live objects, depending on
    which tests ran before. With the threshold fixed they measure live objects in any order.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to fix
        pass


# CI runs the same examples every time (HYPOTHESIS_PROFILE=ci in .ci/run), so a run is
# reproducible; local runs draw new ones, and a failure found there is pinned with @example.
settings.register_profile("ci", derandomize=True, print_blob=True)
# `make mutate` runs each mutant against few, fixed examples (docs/development.md, "Mutation
# testing")
settings.register_profile("mutation", derandomize=True, max_examples=25, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
MUTATION = os.environ.get("HYPOTHESIS_PROFILE") == "mutation"


def examples(n: int) -> int:
    """A test's Hypothesis example count; at most 25 while `make mutate` runs a mutant."""
    return min(n, 25) if MUTATION else n


@pytest.fixture(scope="session")
def demo_paths() -> tuple[Path, Path]:
    """(model, probe dir) of the bundled demo vocoder, verified by hash."""
    return demo.ensure_demo()


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The small ONNX test graphs (tests/onnx_models.py), converted to .mnn once per run."""
    return onnx_models.build_all(tmp_path_factory.mktemp("converted"))


@pytest.fixture(scope="session")
def demo_probe(demo_paths: tuple[Path, Path]) -> probes.Probe:
    """The shipped demo probe, loaded with validation."""
    return probes.load(demo_paths[1], model=demo_paths[0])


@pytest.fixture()
def demo_factory(demo_paths: tuple[Path, Path]) -> guard.mnn.MNNFactory:
    """A one-thread factory for the demo vocoder."""
    return demo.demo_factory(threads=1)


@pytest.fixture(scope="session")
def mel() -> np.ndarray[Any, Any]:
    """A deterministic 100-frame mel input."""
    return demo.demo_mel(100)


@pytest.fixture()
def registry() -> CollectorRegistry:
    """A fresh Prometheus registry per test."""
    return CollectorRegistry()


_hostile: dict[str, int] = {"passed": 0, "failed": 0}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count hostile cases as they finish."""
    if report.when == "call" and "hostile" in report.keywords:
        _hostile["passed" if report.passed else "failed"] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say how many hostile cases ran."""
    total = _hostile["passed"] + _hostile["failed"]
    if total:
        terminalreporter.write_line(
            f"hostile cases run: {total} ({_hostile['passed']} passed, {_hostile['failed']} failed)"
        )


@pytest.fixture(autouse=True)
def _clean_health() -> Iterator[None]:
    """Each test starts with an empty process-wide readiness table."""
    health.HEALTH.clear()
    yield


@pytest.fixture
def hour_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Background threads started in the test tick idle once an hour, not every second: what
    they do within a test's bound they did because they were woken."""
    import guard.maintenance
    import guard.session

    def loop(ref: Any, wake: threading.Event, every: float) -> None:
        guard.maintenance.maintenance_loop(ref, wake, 3600.0)

    monkeypatch.setattr(guard.session, "maintenance_loop", loop)
