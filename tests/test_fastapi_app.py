"""examples/fastapi_app.py run for real: uvicorn on 127.0.0.1, a guard.Pool of 2 workers started
in the lifespan, the guard's routes mounted, PROMETHEUS_MULTIPROC_DIR as its docstring says.

Waits poll a condition against a bound; nothing sleeps and then counts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_recipes import BIN, BOUND, ROOT, free_port, get, stop, until

from guard import mnn
from guard.tools import demo

pytestmark = pytest.mark.slow
Array = np.ndarray[Any, Any]


def post(url: str, body: bytes) -> tuple[int, bytes]:
    """(status, body) of a POST of raw bytes; (0, reason) when nothing answers."""
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/octet-stream"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()
    except OSError as exc:
        return 0, str(exc).encode()


def synthesize(url: str, mel: Array) -> tuple[int, bytes]:
    """POST a [1, 80, T] mel as float32 bytes."""
    return post(url + "/synthesize", mel.astype("<f4").tobytes())


def readiness(url: str) -> tuple[int, dict[str, Any]] | None:
    """(status, body) of /readyz, None while nothing answers."""
    status, body = get(url + "/readyz")
    return (status, json.loads(body)) if status else None


def vocoder(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The pool's entry in a /readyz document."""
    return next((s for s in doc["sessions"] if s["name"] == "vocoder"), None)


def worker_pids(doc: dict[str, Any]) -> set[int]:
    """The pool's worker pids that /readyz lists."""
    entry = vocoder(doc)
    return {w["pid"] for w in entry.get("workers", [])} if entry else set()


def healthy(url: str) -> dict[int, float]:
    """mnn_guard_healthy of session vocoder by worker pid, in one scrape of /metrics."""
    text = get(url + "/metrics")[1]
    return {
        int(s.labels["pid"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "mnn_guard_healthy" and s.labels.get("session") == "vocoder"
    }


def alive(pid: int) -> bool:
    """True while a process (not a zombie) has this pid."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.fixture()
def service(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """uvicorn serving examples/fastapi_app.py in multiprocess mode."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    port = free_port()
    server = subprocess.Popen(
        [
            *(str(BIN / "uvicorn"), "--app-dir", str(ROOT / "examples"), "fastapi_app:app"),
            *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
        ],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder), "VOCODER_PROCESSES": "2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    yield server, f"http://127.0.0.1:{port}"
    stop(server)


def test_fastapi_app_serves_and_tells_the_truth_through_a_killed_worker(
    service: tuple[subprocess.Popen[bytes], str],
) -> None:
    """Not ready while the pool starts; ready with both workers; requests served exactly; a
    killed worker leaves readiness (not ready while it is replaced) and /metrics at once, its
    replacement joins both; after shutdown no worker is left."""
    server, url = service
    first = until("an answer from /readyz", lambda: readiness(url), server)
    assert first[0] == 503  # the pool starts in the background: nothing serves yet

    def ready() -> dict[str, Any] | None:
        answer = readiness(url)
        ok = answer is not None and answer[0] == 200 and len(worker_pids(answer[1])) == 2
        return answer[1] if ok and answer is not None else None

    doc = until("a ready pool", ready, server)
    pids = worker_pids(doc)
    assert os.getpid() not in pids and server.pid not in pids

    mel = demo.demo_mel(300, seed=7)
    status, body = synthesize(url, mel)
    assert status == 200
    wav = np.frombuffer(body, dtype="<f4")
    expected = mnn.adapt(demo.demo_factory(threads=1)(dynamic=True)).run([mel])[0].ravel()
    np.testing.assert_allclose(wav, expected, rtol=0, atol=1e-5)
    status, body = synthesize(url, demo.demo_mel(4001))
    assert status == 422 and b"mel" in body  # the probe allows 1..4000 frames
    assert post(url + "/synthesize", b"\0" * 7)[0] == 422
    assert healthy(url) == dict.fromkeys(pids, 1.0)

    victim = min(pids)
    os.kill(victim, signal.SIGKILL)

    def replacing() -> dict[str, Any] | None:
        answer = readiness(url)
        entry = vocoder(answer[1]) if answer is not None and answer[0] == 503 else None
        return entry if entry is not None and entry["state"] == "starting" else None

    entry = until("/readyz saying the pool replaces a worker", replacing, server)
    assert any("starting" in r for r in entry["reasons"])
    assert until(
        "metrics without the dead worker", lambda: victim not in healthy(url) or None, server
    )

    def replaced() -> set[int] | None:
        now = ready()
        return worker_pids(now) if now is not None and victim not in worker_pids(now) else None

    after = until("a ready replacement worker", replaced, server)
    assert len(after & pids) == 1
    expected_health = dict.fromkeys(after, 1.0)
    assert until(
        "metrics of the replacement", lambda: healthy(url) == expected_health or None, server
    )
    status, body = synthesize(url, mel)
    assert status == 200
    np.testing.assert_allclose(np.frombuffer(body, dtype="<f4"), expected, rtol=0, atol=1e-5)

    stop(server)
    assert server.returncode is not None
    deadline = time.monotonic() + BOUND
    while any(map(alive, after)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, after)), "pool workers outlived the server"


def pool_size_and_warning(folder: Path, **environ: str) -> tuple[int, str]:
    """(the example's pool size, what it logged) when imported with these variables, in
    multiprocess mode on `folder`."""
    script = "import logging, fastapi_app; print(fastapi_app.PROCESSES)"
    env = {k: v for k, v in os.environ.items() if k not in ("UVICORN_WORKERS", "VOCODER_PROCESSES")}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT / "examples",
        env={**env, "PROMETHEUS_MULTIPROC_DIR": str(folder), **environ},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(done.stdout.split()[-1]), done.stderr


def test_pools_share_the_cores_among_uvicorn_workers_or_say_they_do_not(tmp_path: Path) -> None:
    """Each uvicorn worker runs its own pool: by default the pools share the cores
    (cores // UVICORN_WORKERS processes each, no warning); told more, the app warns that
    workers x processes MNN processes outnumber the cores."""
    cores = len(os.sched_getaffinity(0))
    size, said = pool_size_and_warning(tmp_path, UVICORN_WORKERS="2")
    assert size == max(1, cores // 2)
    assert ("MNN processes on" in said) == (2 * size > cores)
    size, said = pool_size_and_warning(tmp_path, UVICORN_WORKERS="2", VOCODER_PROCESSES=str(cores))
    assert size == cores
    assert f"2 uvicorn workers x {cores} pool processes = {2 * cores} MNN processes" in said
