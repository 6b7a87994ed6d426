"""Multiprocess mode: three spawned workers, one aggregated /metrics, a dead worker's gauges gone.

The pytest process itself never runs in multiprocess mode (prometheus_client picks its value
class at import): PROMETHEUS_MULTIPROC_DIR is set only while a worker is started, so the
spawned child inherits it before it imports anything, and the parent reads the directory
through `guard.serve(multiprocess_dir=...)`.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
import urllib.request
from collections.abc import Iterator
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

import guard

ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKERS = 3
VOCODER = {"session": "vocoder"}
Samples = list[tuple[str, dict[str, str], float]]


def worker(model: str, probe_dir: str, ready: Queue[Any], stop: Event) -> None:
    """A worker process: guard one demo session in multiprocess mode, report, wait for stop."""
    from prometheus_client import values

    import probes
    from guard.tools import demo

    session = guard.wrap(
        demo.demo_factory(threads=1),
        probes.load(probe_dir, model=model),
        name="vocoder",
        policy=guard.Policy(background=False),
    )
    session.run({"mel": demo.demo_mel(50)})
    ready.put((os.getpid(), session.status.healthy, bool(values.ValueClass._multiprocess)))
    stop.wait(60)  # exits without close(): its healthy gauge stays 1 until marked dead


def scrape(url: str) -> Samples:
    """Every sample of one /metrics scrape."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    families = text_string_to_metric_families(text)
    return [(s.name, s.labels, s.value) for f in families for s in f.samples]


def healthy_by_pid(samples: Samples) -> dict[int, float]:
    """The mnn_guard_healthy series of session vocoder, by worker pid."""
    return {
        int(labels["pid"]): value
        for name, labels, value in samples
        if name == "mnn_guard_healthy" and labels["session"] == "vocoder"
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of the one sample with this name and labels, None when absent."""
    found = [v for n, ls, v in samples if n == name and ls == labels]
    assert len(found) <= 1, found
    return found[0] if found else None


@pytest.fixture(scope="module")
def scenario(
    demo_paths: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Three workers scraped live, after one exits, and after it is marked dead."""
    directory = tmp_path_factory.mktemp("prom-multiproc")
    ctx = multiprocessing.get_context("spawn")
    ready: Queue[Any] = ctx.Queue()
    stops = [ctx.Event() for _ in range(WORKERS)]
    procs = [
        ctx.Process(target=worker, args=(str(demo_paths[0]), str(demo_paths[1]), ready, stop))
        for stop in stops
    ]
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(ENV, str(directory))
            for proc in procs:
                proc.start()
        assert ENV not in os.environ
        reports: list[tuple[int, bool, bool]] = []
        deadline = time.monotonic() + 60
        while len(reports) < WORKERS:
            try:
                reports.append(ready.get(timeout=0.5))
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode is not None]
                assert not dead and time.monotonic() < deadline, f"workers failed: {dead}"
        with guard.serve(port=0, multiprocess_dir=directory) as server:
            live = scrape(server.url)
            stops[0].set()
            procs[0].join(30)
            exited = scrape(server.url)
            mark_process_dead(procs[0].pid, path=str(directory))  # type: ignore[no-untyped-call]
            marked = scrape(server.url)
        yield {
            "reports": reports,
            "pids": [p.pid for p in procs],
            "exitcode": procs[0].exitcode,
            "live": live,
            "exited": exited,
            "marked": marked,
        }
    finally:
        for stop in stops:
            stop.set()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def test_workers_run_in_multiprocess_mode(scenario: dict[str, Any]) -> None:
    """Every worker got the directory before importing prometheus_client and came up healthy."""
    assert sorted(scenario["reports"]) == sorted((pid, True, True) for pid in scenario["pids"])


def test_counters_are_summed_over_workers(scenario: dict[str, Any]) -> None:
    """One scrape shows the three workers' inits, passes and runs summed."""
    live = scenario["live"]
    assert (
        value(live, "mnn_guard_inits_total", session="vocoder", rung="static"),
        value(live, "mnn_guard_canary_checks_total", **VOCODER, rung="static", result="pass"),
        value(live, "mnn_guard_runs_total", session="vocoder", rung="static", result="ok"),
        value(live, "mnn_guard_run_seconds_count", session="vocoder", rung="static"),
    ) == (3.0, 3.0, 3.0, 3.0)


def test_one_healthy_series_per_worker(scenario: dict[str, Any]) -> None:
    """The healthy gauge has one series per worker pid, each 1."""
    assert healthy_by_pid(scenario["live"]) == dict.fromkeys(scenario["pids"], 1.0)


def test_exited_worker_gauges_go_at_the_next_scrape(scenario: dict[str, Any]) -> None:
    """A worker that exited unannounced loses its gauge series at the next scrape (its pid no
    longer exists), with no mark_process_dead call: uvicorn has no hook to make one."""
    _, *alive = scenario["pids"]
    assert (scenario["exitcode"], sorted(healthy_by_pid(scenario["exited"]))) == (0, sorted(alive))


def test_dead_worker_gauges_disappear(scenario: dict[str, Any]) -> None:
    """After mark_process_dead the dead worker's gauge series are gone; the others remain."""
    dead, *alive = scenario["pids"]
    marked = scenario["marked"]
    gauges_of_dead = [name for name, labels, _ in marked if labels.get("pid") == str(dead)]
    assert (gauges_of_dead, sorted(healthy_by_pid(marked))) == ([], sorted(alive))


def test_dead_worker_counts_are_kept(scenario: dict[str, Any]) -> None:
    """Counters keep the dead worker's increments (they are totals, not live values)."""
    marked = scenario["marked"]
    assert value(marked, "mnn_guard_inits_total", session="vocoder", rung="static") == 3.0


def busy_worker(model: str, probe_dir: str, calls: Queue[Any], go: Event, stop: Event) -> None:
    """A worker process: 40 calls at once, report; 5 more when told, then exit without close()."""
    import probes
    from guard.tools import demo

    session = guard.wrap(
        demo.demo_factory(threads=1),
        probes.load(probe_dir, model=model),
        name="busy",
        policy=guard.Policy(background=False),
    )
    tiny = {"mel": demo.demo_mel(8)}
    for _ in range(40):
        session.run(tiny)
    calls.put(40)
    go.wait(60)
    for _ in range(5):
        session.run(tiny)
    calls.put(45)
    stop.wait(60)


def runs_in_files(directory: Path) -> float:
    """mnn_guard_runs_total of session busy (ok) as the files of every process say now."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    found = registry.get_sample_value(
        "mnn_guard_runs_total", {"session": "busy", "rung": "static", "result": "ok"}
    )
    return found or 0.0


def test_run_counts_reach_the_files_within_the_flush_interval_and_at_exit(
    demo_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    """A worker's burst of calls: the first is in the files at once, all of them within
    FLUSH_SECONDS with no further call; calls just before a normal exit are written at exit."""
    ctx = multiprocessing.get_context("spawn")
    calls: Queue[Any] = ctx.Queue()
    go, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(
        target=busy_worker, args=(str(demo_paths[0]), str(demo_paths[1]), calls, go, stop)
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV, str(tmp_path))
        proc.start()
    try:
        assert calls.get(timeout=60) == 40
        first = runs_in_files(tmp_path)
        deadline = time.monotonic() + guard.metrics.FLUSH_SECONDS + 10
        while runs_in_files(tmp_path) < 40:
            assert time.monotonic() < deadline, "the burst never reached the files"
            time.sleep(0.05)
        go.set()
        assert calls.get(timeout=60) == 45
        stop.set()
        proc.join(30)
        assert (first >= 1, proc.exitcode, runs_in_files(tmp_path)) == (True, 0, 45.0)
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
