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
