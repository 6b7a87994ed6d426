"""The documented serving recipes, run for real on 127.0.0.1: gunicorn (deploy/gunicorn.conf.py)
with 2 workers, and uvicorn with 2 workers, in prometheus_client's multiprocess mode.

Waits poll a condition against a bound; nothing sleeps and then counts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"
BIN = Path(sys.executable).parent
BOUND = 90.0  # seconds any one condition may take on a slow, shared 2-core machine
T = TypeVar("T")

pytestmark = pytest.mark.slow


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    """(status, body) of a GET; (0, reason) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def until(what: str, probe: Callable[[], T | None], server: subprocess.Popen[bytes]) -> T:
    """Poll `probe` until it returns something, the server dies, or BOUND passes."""
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        found = probe()
        if found is not None:
            return found
        if server.poll() is not None:
            raise AssertionError(f"the server exited ({server.returncode}) waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {BOUND} s")


def readiness(url: str) -> tuple[int, dict[str, Any]] | None:
    """(status, body) of /readyz, None while nothing answers."""
    status, body = get(url + "/readyz")
    return (status, json.loads(body)) if status else None


def pids(doc: dict[str, Any]) -> set[int]:
    """The worker pids that /readyz lists."""
    return {s["pid"] for s in doc["sessions"] if "pid" in s}


def healthy_pids(url: str) -> set[int]:
    """The pids of the mnn_guard_healthy series of session vocoder in one scrape."""
    text = get(url + "/metrics")[1]
    return {
        int(s.labels["pid"])
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "mnn_guard_healthy" and s.labels.get("session") == "vocoder"
    }


class Readiness:
    """Polls /readyz at `url` and keeps the worker pids of every 200 answer it saw."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ready_with: list[set[int]] = []  # the pids each 200 answer listed

    def __call__(self) -> tuple[int, dict[str, Any]] | None:
        answer = readiness(self.url)
        if answer is not None and answer[0] == 200:
            self.ready_with.append(pids(answer[1]))
        return answer


def two_ready_workers(poll: Readiness, server: subprocess.Popen[bytes]) -> set[int]:
    """Wait until /readyz is 200 listing two worker pids; return them."""

    def both_ready() -> set[int] | None:
        answer = poll()
        ok = answer is not None and answer[0] == 200 and len(pids(answer[1])) == 2
        return pids(answer[1]) if ok and answer is not None else None

    return until("two ready workers", both_ready, server)


def kill_one_and_follow(
    poll: Readiness, server: subprocess.Popen[bytes], workers: set[int]
) -> None:
    """kill -9 one worker; readiness must list its replacement instead, and /metrics drop it."""
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)

    def replaced() -> set[int] | None:
        answer = poll()
        now = pids(answer[1]) if answer is not None and answer[0] == 200 else set()
        return now if len(now) == 2 and victim not in now else None

    second = until("a ready replacement worker", replaced, server)
    assert len(second & workers) == 1
    until(
        "metrics without the dead worker", lambda: healthy_pids(poll.url) == second or None, server
    )


def stop(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM and wait, then SIGKILL the whole group if it lingers."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)


@pytest.fixture()
def multiproc_env(tmp_path: Path) -> dict[str, str]:
    """An environment with an empty PROMETHEUS_MULTIPROC_DIR, as the recipes' start scripts do."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    return {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}


def start_gunicorn(env: dict[str, str], **extra: str) -> tuple[subprocess.Popen[bytes], str, str]:
    """gunicorn with the repository's config and 2 workers: (process, app url, metrics url)."""
    app_port, metrics_port = free_port(), free_port()
    env = {
        **env,
        "MNN_GUARD_BIND": f"127.0.0.1:{app_port}",
        "MNN_GUARD_WORKERS": "2",
        "MNN_GUARD_METRICS_PORT": str(metrics_port),
        "MNN_GUARD_METRICS_HOST": "127.0.0.1",
        **extra,
    }
    server = subprocess.Popen(
        [
            *(str(BIN / "gunicorn"), "-c", str(ROOT / "deploy" / "gunicorn.conf.py")),
            *("--chdir", str(APPS), "vocoder_wsgi:app"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return server, f"http://127.0.0.1:{app_port}", f"http://127.0.0.1:{metrics_port}"


@pytest.fixture()
def gunicorn(multiproc_env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[bytes], str, str]]:
    """A healthy gunicorn service."""
    started = start_gunicorn(multiproc_env)
    yield started
    stop(started[0])


def test_gunicorn_readiness_and_metrics_follow_a_killed_worker(
    gunicorn: tuple[subprocess.Popen[bytes], str, str],
) -> None:
    """The master's /readyz lists both workers' sessions; after kill -9 of one, the replacement
    is listed instead, and /metrics no longer shows the dead worker's health series. /readyz
    knows gunicorn's worker count: it never says ready with one worker listed (at the start,
    or between the kill and the replacement)."""
    server, app, metrics = gunicorn
    poll = Readiness(metrics)
    first = two_ready_workers(poll, server)
    status, body = get(app + "/?frames=30")
    assert status == 200 and json.loads(body)["samples"] > 0
    assert healthy_pids(metrics) == first
    kill_one_and_follow(poll, server, first)
    assert get(metrics + "/healthz")[0] == 200
    assert all(len(listed) == 2 for listed in poll.ready_with), poll.ready_with


def rss_mb(pid: int) -> float:
    """A process's resident set size in MiB (/proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_gunicorn_master_stays_small_beside_its_workers(
    gunicorn: tuple[subprocess.Popen[bytes], str, str],
) -> None:
    """The master never loads a model: serving /metrics and watching the workers, it stays
    under 64 MiB (docs/ops.md, "Sizing") and /readyz lists no session of its own."""
    server, app, metrics = gunicorn
    poll = Readiness(metrics)
    workers = two_ready_workers(poll, server)
    for _ in range(5):
        assert get(app + "/?frames=100")[0] == 200
    assert get(metrics + "/metrics")[0] == 200
    master, each = rss_mb(server.pid), [rss_mb(pid) for pid in workers]
    print(f"gunicorn master {master:.0f} MiB, demo workers {[round(v) for v in each]} MiB")
    assert master < 64
    answer = poll()
    assert answer is not None and server.pid not in pids(answer[1]) and pids(answer[1]) == workers


def test_gunicorn_with_every_worker_exhausted_stays_up_not_ready(
    multiproc_env: dict[str, str],
) -> None:
    """Every init degraded: each worker keeps its FAILED session, the probed port answers 503
    naming both workers, gunicorn does not exit, and a request gets 503, not a bad output."""
    server, app, metrics = start_gunicorn(multiproc_env, VOCODER_FAULT="all")
    try:

        def both_failed() -> dict[str, Any] | None:
            answer = readiness(metrics)
            if answer is None or len(pids(answer[1])) != 2:
                return None
            states = {s["state"] for s in answer[1]["sessions"]}
            return answer[1] if answer[0] == 503 and states == {"failed"} else None

        doc = until("two failed workers", both_failed, server)
        assert doc["ready"] is False
        assert get(app + "/")[0] == 503
        assert server.poll() is None
    finally:
        stop(server)


def first_worker(marker: Path, server: subprocess.Popen[bytes]) -> int:
    """The pid of the worker that claimed the app's VOCODER_FIRST file."""

    def claimed() -> int | None:
        text = marker.read_text() if marker.exists() else ""
        return int(text) if text else None

    return until("the first worker", claimed, server)


def listed(url: str, pid: int, state: str) -> dict[str, Any] | None:
    """The /readyz entry of worker `pid` while it is in `state`, else None."""
    answer = readiness(url)
    entries = [s for s in answer[1]["sessions"] if s.get("pid") == pid] if answer else []
    return entries[0] if entries and entries[0]["state"] == state else None


def gone(pid: int) -> bool:
    """True once no process has this pid (the master reaped its killed worker)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def first_worker_replaced(
    started: tuple[subprocess.Popen[bytes], str, str], marker: Path, state: str
) -> tuple[float, int, set[int], set[int]]:
    """A server (process, app url, metrics url) whose first worker's session stays in `state`
    (the app's VOCODER_FAULT): wait until that worker is killed and two workers are ready.
    Returns the seconds it had been in `state` when it was gone, its pid, the other pids
    listed with it and the pids then ready; /healthz must say 200 after the kill."""
    server, app, metrics = started
    try:
        victim = first_worker(marker, server)
        entry = until(f"the first worker {state}", lambda: listed(metrics, victim, state), server)
        answer = readiness(metrics)
        assert answer is not None and answer[0] == 503
        others = pids(answer[1]) - {victim}
        until("the first worker killed", lambda: gone(victim) or None, server)
        seconds = time.time() - entry["since"]
        assert get(metrics + "/healthz")[0] == 200
        ready = two_ready_workers(Readiness(metrics), server)
        assert get(app + "/")[0] == 200
        return seconds, victim, others, ready
    finally:
        stop(server)


def test_gunicorn_kills_and_replaces_a_worker_hung_at_start(
    multiproc_env: dict[str, str], tmp_path: Path
) -> None:
    """A worker whose first init hangs in a native call holding the GIL (gunicorn's own timeout
    has no heartbeat to miss yet) is killed by the master's watchdog once its session has been
    STARTING for MNN_GUARD_START_TIMEOUT, not before, and gunicorn replaces it: the pod then
    serves with two workers."""
    marker = tmp_path / "first"
    started = start_gunicorn(
        multiproc_env,
        VOCODER_FAULT="hang-first",
        VOCODER_FIRST=str(marker),
        MNN_GUARD_START_TIMEOUT="4",
    )
    seconds, victim, _, ready = first_worker_replaced(started, marker, "starting")
    print(f"hung worker gone {seconds:.1f} s after its session started (limit 4 s)")
    assert seconds >= 4
    assert victim not in ready


def test_gunicorn_replaces_one_worker_failed_too_long_and_keeps_the_others(
    multiproc_env: dict[str, str], tmp_path: Path
) -> None:
    """The first worker's every init is degraded: once its session has been FAILED for
    MNN_GUARD_RESTART_AFTER, the master kills that worker alone and gunicorn starts a fresh
    one; the healthy worker keeps its pid and the master's /healthz stays 200 (no pod restart)."""
    marker = tmp_path / "first"
    started = start_gunicorn(
        multiproc_env,
        VOCODER_FAULT="fail-first",
        VOCODER_FIRST=str(marker),
        MNN_GUARD_RESTART_AFTER="3",
    )
    seconds, victim, others, ready = first_worker_replaced(started, marker, "failed")
    print(f"failed worker gone {seconds:.1f} s after it failed (limit 3 s)")
    assert seconds >= 3
    assert victim not in ready and others <= ready


def start_uvicorn(env: dict[str, str], **extra: str) -> tuple[subprocess.Popen[bytes], str, str]:
    """uvicorn with 2 workers (UVICORN_WORKERS=2) serving the ASGI vocoder and guard's routes:
    (process, url, url)."""
    port = free_port()
    server = subprocess.Popen(
        [
            *(str(BIN / "uvicorn"), "--port", str(port), "--host", "127.0.0.1"),
            *("--app-dir", str(APPS), "--log-level", "warning", "vocoder_asgi:app"),
        ],
        env={**env, "UVICORN_WORKERS": "2", **extra},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    return server, url, url


def test_uvicorn_two_workers_share_readiness_and_metrics(multiproc_env: dict[str, str]) -> None:
    """uvicorn with 2 workers (UVICORN_WORKERS=2) and guard's ASGI routes mounted: /readyz
    lists both workers from either, and is never ready with one (the app reads
    UVICORN_WORKERS); after kill -9 of one, uvicorn's replacement shows up and the dead pid's
    series go."""
    server, url, _ = start_uvicorn(multiproc_env)
    try:
        poll = Readiness(url)
        first = two_ready_workers(poll, server)
        status, body = get(url + "/synthesize")
        assert status == 200 and json.loads(body)["pid"] in first
        assert healthy_pids(url) == first
        kill_one_and_follow(poll, server, first)
        assert all(len(listed) == 2 for listed in poll.ready_with), poll.ready_with
    finally:
        stop(server)


def test_uvicorn_replaces_a_worker_hung_at_start(
    multiproc_env: dict[str, str], tmp_path: Path
) -> None:
    """uvicorn's supervisor pings its workers from a thread that starts before the app is
    imported: a worker whose first init hangs in a native call holding the GIL stops answering
    and is killed (--timeout-worker-healthcheck, 5 s) and replaced, without a watchdog."""
    marker = tmp_path / "first"
    started = start_uvicorn(multiproc_env, VOCODER_FAULT="hang-first", VOCODER_FIRST=str(marker))
    seconds, victim, _, ready = first_worker_replaced(started, marker, "starting")
    print(f"uvicorn: hung worker gone {seconds:.1f} s after its session started")
    assert victim not in ready


def shadow_counts(url: str) -> dict[str, float]:
    """mnn_guard_shadow_checks_total of session vocoder by result, summed over the workers."""
    counts: dict[str, float] = {}
    for f in text_string_to_metric_families(get(url + "/metrics")[1]):
        for s in f.samples:
            if s.name == "mnn_guard_shadow_checks_total" and s.labels["session"] == "vocoder":
                counts[s.labels["result"]] = counts.get(s.labels["result"], 0.0) + s.value
    return counts


def test_gunicorn_workers_shadow_live_calls_and_leave_a_module_only_loud_inputs_degrade(
    multiproc_env: dict[str, str],
) -> None:
    """Every static module of both workers is degraded only on loud inputs (the canary passes
    it). With a shadow check on every call, each worker leaves the static rung after its first
    loud call, and the master's /metrics counts the failed shadow checks."""
    server, app, metrics = started = start_gunicorn(
        multiproc_env, VOCODER_FAULT="loud-all", VOCODER_SHADOW="1"
    )
    try:
        workers = two_ready_workers(Readiness(metrics), server)
        rungs: dict[int, str] = {}

        def both_dynamic() -> bool | None:
            status, body = get(app + "/?frames=30&gain=4")
            if status == 200:
                answer = json.loads(body)
                rungs[answer["pid"]] = answer["rung"]
            return True if set(rungs) == workers and set(rungs.values()) == {"dynamic"} else None

        until("both workers on the dynamic rung", both_dynamic, server)
        counts = until(
            "two failed shadow checks on /metrics",
            lambda: ((c := shadow_counts(metrics)).get("fail", 0) >= 2 and c) or None,
            server,
        )
        assert set(counts) == {"pass", "fail", "dropped"}, counts
    finally:
        stop(started[0])
