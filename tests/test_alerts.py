"""The repository's alert rules (their `for:` shortened in a copy) evaluated by a real Prometheus
scraping real processes, under a job not named mnn-guard: processes whose session fell back
before their first scrape, one that serves nothing, and a healthy one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_server import alerts, poll, prometheus, query, shortened_rules
from test_recipes import APPS, first_worker, readiness, start_gunicorn, stop, until

pytestmark = pytest.mark.slow

HOLD = "3s"  # every `for:` of the test copy of the rules


@pytest.fixture()
def single(tmp_path: Path) -> Iterator[dict[str, str]]:
    """One process per mode of tests/apps/serve_one.py, by mode: its metrics address."""
    processes = {
        mode: subprocess.Popen(
            [sys.executable, str(APPS / "serve_one.py"), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for mode in ("healthy", "fellback", "empty")
    }
    try:
        yield {
            mode: f"127.0.0.1:{int(process.stdout.readline())}"  # type: ignore[union-attr]
            for mode, process in processes.items()
        }
    finally:
        for process in processes.values():
            process.communicate(timeout=30)  # closing stdin ends it


@pytest.fixture()
def gunicorn_fell_back(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """gunicorn with 2 workers whose first fell back while it started (its metrics address and
    that worker's pid), both serving before anything scrapes it."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    marker = tmp_path / "first"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    server, _, metrics = start_gunicorn(
        env, VOCODER_FAULT="fallback-first", VOCODER_FIRST=str(marker)
    )
    try:
        victim = first_worker(marker, server)

        def on_dynamic() -> bool | None:
            answer = readiness(metrics)
            if answer is None or answer[0] != 200:
                return None
            rungs = {s["pid"]: s["rung"] for s in answer[1]["sessions"]}
            return (len(rungs) == 2 and rungs[victim] == "dynamic") or None

        until("both workers serving, the first on the dynamic rung", on_dynamic, server)
        yield metrics.removeprefix("http://"), victim
    finally:
        stop(server)


def firing(base: str) -> list[dict[str, str]]:
    """The labels of every firing alert."""
    return [a["labels"] for a in alerts(base) if a["state"] == "firing"]


def fired(base: str, name: str, **labels: str) -> dict[str, str] | None:
    """The labels of the firing alert `name` with these labels, None while there is none."""
    found = [a for a in firing(base) if a["alertname"] == name and labels.items() <= a.items()]
    return found[0] if found else None


def test_alerts_name_a_start_fallback_and_a_process_serving_nothing_and_spare_a_healthy_one(
    single: dict[str, str], gunicorn_fell_back: tuple[str, int], tmp_path: Path
) -> None:
    """With the shipped rules (`for:` 3 s) and a job named `pods`: MnnGuardFellBack and
    MnnGuardOnSlowerRung fire for the process that fell back before its first scrape (and, under
    gunicorn, name the worker's pid and rung); MnnGuardNotReady fires for the process whose only
    session is closed; the healthy process has no alert, pending or firing, after 15 scrapes."""
    gunicorn, victim = gunicorn_fell_back
    targets = [*single.values(), gunicorn]
    rules = shortened_rules(tmp_path, HOLD)
    started = time.monotonic()
    with prometheus(tmp_path, targets, job="pods", rules=rules) as base:
        expected: dict[str, tuple[str, dict[str, str]]] = {
            "fellback": ("MnnGuardFellBack", {"instance": single["fellback"]}),
            "fellback rung": ("MnnGuardOnSlowerRung", {"instance": single["fellback"]}),
            "empty": ("MnnGuardNotReady", {"instance": single["empty"]}),
            "gunicorn": ("MnnGuardFellBack", {"instance": gunicorn}),
            "gunicorn rung": (
                "MnnGuardOnSlowerRung",
                {"instance": gunicorn, "pid": str(victim), "rung": "dynamic"},
            ),
        }
        seconds: dict[str, float] = {}

        def all_fired() -> bool:
            for what, (name, labels) in expected.items():
                if what not in seconds and fired(base, name, **labels):
                    seconds[what] = round(time.monotonic() - started, 1)
            return len(seconds) == len(expected)

        poll(f"{sorted(expected)} firing", all_fired)
        healthy = single["healthy"]
        poll(
            "15 scrapes of the healthy process",
            lambda: query(base, f'count_over_time(up{{instance="{healthy}"}}[10m]) >= 15'),
        )
        history = query(base, f'count_over_time(ALERTS{{instance="{healthy}"}}[10m])')
        everything = firing(base)
    print("alerts fired, seconds after Prometheus started:", seconds)
    assert history == [], history
    assert all(a.get("job") in (None, "pods") for a in everything)
    assert not [a for a in everything if a.get("instance") == healthy]
