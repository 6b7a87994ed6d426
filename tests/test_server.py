"""`guard.serve`: real HTTP on 127.0.0.1, scraped with urllib and parsed by prometheus_client."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from health_files import Workers
from polling import BOUND
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import guard
import probes
from guard.integrations.endpoints import Endpoints
from guard.state import State
from guard.testing import FaultyFactory

QUIET = guard.Policy(background=False)
NO_REINIT = guard.Policy(reinit_attempts=0, background=False)

# The issue's table: family name (counters without `_total`), type, label names.
TABLE = [
    ("mnn_guard_inits", "counter", {"session", "rung"}),
    ("mnn_guard_canary_checks", "counter", {"session", "rung", "result"}),
    ("mnn_guard_recoveries", "counter", {"session", "action"}),
    ("mnn_guard_healthy", "gauge", {"session"}),
    ("mnn_guard_rung", "gauge", {"session", "rung"}),
    ("mnn_guard_rung_index", "gauge", {"session"}),
    ("mnn_guard_state", "gauge", {"session", "state"}),
    (
        "mnn_guard_session_info",
        "gauge",
        {"session", "guard_version", "mnn_version", "model_sha256"},
    ),
    ("mnn_guard_canary_snr_db", "gauge", {"session"}),
    ("mnn_guard_init_seconds", "histogram", {"session", "rung"}),
    ("mnn_guard_run_seconds", "histogram", {"session", "rung"}),
    ("mnn_guard_runs", "counter", {"session", "rung", "result"}),
]


def get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, HTTP errors included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()


@pytest.fixture()
def server(registry: CollectorRegistry) -> Iterator[guard.server.MetricsServer]:
    """A server on a free port over the test's fresh registry."""
    with guard.serve(port=0, registry=registry) as running:
        yield running


@pytest.fixture(scope="module")
def scraped(demo_paths: tuple[Path, Path], demo_probe: probes.Probe) -> dict[str, Any]:
    """Families parsed from one scrape after a session with a reinit, a fallback-free pass, runs."""
    from guard.tools import demo

    registry = CollectorRegistry()
    faulty = FaultyFactory(demo.demo_factory(threads=1), fault="noise", schedule=[True, False])
    with (
        guard.wrap(faulty, demo_probe, name="vocoder", registry=registry, policy=QUIET) as session,
        guard.serve(port=0, registry=registry) as running,
    ):
        session.run({"mel": demo.demo_mel(50)})
        status, content_type, body = get(running.url + "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(body)}
    return {"status": status, "content_type": content_type, "families": families}


def test_metrics_endpoint_serves_prometheus_text(scraped: dict[str, Any]) -> None:
    """/metrics answers 200 with the Prometheus text format prometheus_client negotiates."""
    assert scraped["status"] == 200
    assert scraped["content_type"].startswith("text/plain; version=")


@pytest.mark.parametrize(("name", "kind", "labels"), TABLE, ids=[row[0] for row in TABLE])
def test_scrape_has_metric_of_the_issue_table(
    scraped: dict[str, Any], name: str, kind: str, labels: set[str]
) -> None:
    """Every metric of the issue's table is scraped with its type and label names."""
    family = scraped["families"][name]
    seen = {k for s in family.samples for k in s.labels if k != "le"}
    assert (family.type, seen) == (kind, labels)


def test_scrape_counts_match_the_session(scraped: dict[str, Any]) -> None:
    """The scraped counters show the session's 2 inits, 1 reinit and 1 run."""
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in scraped["families"].values()
        for s in f.samples
    }
    assert (
        values[("mnn_guard_inits_total", (("rung", "static"), ("session", "vocoder")))],
        values[("mnn_guard_recoveries_total", (("action", "reinit"), ("session", "vocoder")))],
        values[
            ("mnn_guard_runs_total", (("result", "ok"), ("rung", "static"), ("session", "vocoder")))
        ],
    ) == (2.0, 1.0, 1.0)


def test_healthz_is_ok(server: guard.server.MetricsServer) -> None:
    """/healthz answers 200 "ok" while the process is up."""
    status, _, body = get(server.url + "/healthz")
    assert (status, body.strip()) == (200, "ok")


def test_unknown_path_is_404(server: guard.server.MetricsServer) -> None:
    """Any other path answers 404."""
    assert get(server.url + "/nope")[0] == 404


def test_readyz_with_healthy_session_is_200(
    server: guard.server.MetricsServer,
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
) -> None:
    """/readyz answers 200 and lists the session while every session is healthy."""
    with guard.wrap(demo_factory, demo_probe, name="X", registry=registry, policy=QUIET):
        status, content_type, body = get(server.url + "/readyz")
    doc = json.loads(body)
    listed = [(s["name"], s["healthy"]) for s in doc["sessions"]]
    assert (status, content_type, doc["ready"], listed) == (
        200,
        "application/json",
        True,
        [("X", True)],
    )


def _exhaust(
    factory: guard.mnn.MNNFactory, probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """Build a session named X whose every init is degraded (it raises RecoveryExhausted)."""
    faulty = FaultyFactory(factory, fault="noise", rate=1.0, affects="all")
    with pytest.raises(guard.RecoveryExhausted):
        guard.wrap(faulty, probe, name="X", registry=registry, policy=NO_REINIT)


def test_readyz_is_503_after_exhaustion(
    server: guard.server.MetricsServer,
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
) -> None:
    """An exhausted session makes /readyz 503, naming it, its last rung and the failed SNR."""
    _exhaust(demo_factory, demo_probe, registry)
    status, _, body = get(server.url + "/readyz")
    doc = json.loads(body)
    (entry,) = doc["sessions"]
    snr_reason = any("snr_db" in reason for reason in entry["reasons"])
    assert (status, doc["ready"], entry["name"], entry["rung"], entry["healthy"], snr_reason) == (
        503,
        False,
        "X",
        "dynamic",
        False,
        True,
    )


def test_readyz_recovers_when_healthy_session_replaces(
    server: guard.server.MetricsServer,
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
) -> None:
    """After an exhausted X, a later healthy session named X makes /readyz 200 again."""
    _exhaust(demo_factory, demo_probe, registry)
    before = get(server.url + "/readyz")[0]
    with guard.wrap(demo_factory, demo_probe, name="X", registry=registry, policy=QUIET):
        after = get(server.url + "/readyz")[0]
    assert (before, after) == (503, 200)


def test_closing_older_session_keeps_newer_failure(
    server: guard.server.MetricsServer,
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
) -> None:
    """Closing an older healthy X does not erase a newer exhausted X: /readyz stays 503."""
    older = guard.wrap(demo_factory, demo_probe, name="X", registry=registry, policy=QUIET)
    _exhaust(demo_factory, demo_probe, registry)
    older.close()
    assert get(server.url + "/readyz")[0] == 503


def test_readyz_forgets_closed_session(
    server: guard.server.MetricsServer,
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
) -> None:
    """A closed session is no longer listed by /readyz, which then has nothing to be ready for."""
    guard.wrap(demo_factory, demo_probe, name="X", registry=registry, policy=QUIET).close()
    status, _, body = get(server.url + "/readyz")
    assert (status, json.loads(body)) == (503, {"ready": False, "sessions": []})


def test_default_registry_is_the_global_one() -> None:
    """Without a registry the server shows the global registry (the process's own metrics)."""
    with guard.serve(port=0) as running:
        body = get(running.url + "/metrics")[2]
    assert "python_info" in body


def test_close_is_idempotent_and_frees_the_port(registry: CollectorRegistry) -> None:
    """close() twice is fine, and the port then refuses connections."""
    running = guard.serve(port=0, registry=registry)
    running.close()
    running.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(running.url + "/healthz", timeout=2)


@pytest.mark.parametrize("port", [-1, 65536, "9108", True, 1.5])
def test_bad_port_is_rejected(port: Any) -> None:
    """A port outside 0..65535 or not an int raises ConfigError naming the port."""
    with pytest.raises(guard.ConfigError, match="port must be an int"):
        guard.serve(port=port)


def test_busy_port_is_rejected(server: guard.server.MetricsServer) -> None:
    """Listening on a port already in use raises ConfigError naming host and port."""
    with pytest.raises(guard.ConfigError, match=f"127.0.0.1:{server.port}"):
        guard.serve(port=server.port)


def test_missing_multiprocess_dir_is_rejected(tmp_path: Path) -> None:
    """A multiprocess_dir that does not exist raises ConfigError naming it."""
    missing = tmp_path / "nowhere"
    with pytest.raises(guard.ConfigError, match="nowhere"):
        guard.serve(port=0, multiprocess_dir=missing)


def test_registry_and_multiprocess_dir_exclude_each_other(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    """Passing both a registry and a multiprocess_dir raises ConfigError."""
    with pytest.raises(guard.ConfigError, match="not both"):
        guard.serve(port=0, registry=registry, multiprocess_dir=tmp_path)


def test_readyz_with_no_session_is_503(server: guard.server.MetricsServer) -> None:
    """Before any session exists the process is not ready."""
    status, _, body = get(server.url + "/readyz")
    assert (status, json.loads(body)["ready"]) == (503, False)


def test_readyz_waits_for_expected_sessions(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """With expect=[a, b], one healthy session is not enough: b is listed as missing."""
    with (
        guard.serve(port=0, registry=registry, expect=["a", "b"]) as running,
        guard.wrap(demo_factory, demo_probe, name="a", registry=registry, policy=QUIET),
    ):
        status, _, body = get(running.url + "/readyz")
        with guard.wrap(demo_factory, demo_probe, name="b", registry=registry, policy=QUIET):
            after = get(running.url + "/readyz")[0]
    states = {s["name"]: s["state"] for s in json.loads(body)["sessions"]}
    assert (status, states, after) == (503, {"a": "serving", "b": "missing"}, 200)


def test_session_kept_failed_is_not_ready(
    server: guard.server.MetricsServer,
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
) -> None:
    """A session kept in FAILED (raise_exhausted=False) answers 503 with state failed."""
    faulty = FaultyFactory(demo_factory, fault="noise", rate=1.0, affects="all")
    with guard.wrap(
        faulty, demo_probe, name="X", registry=registry, policy=NO_REINIT, raise_exhausted=False
    ):
        status, _, body = get(server.url + "/readyz")
    (entry,) = json.loads(body)["sessions"]
    assert (status, entry["state"], entry["healthy"]) == (503, "failed", False)


def raw(port: int, request: bytes) -> bytes:
    """Send raw bytes on a fresh connection and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_head_answers_like_get_without_a_body(server: guard.server.MetricsServer) -> None:
    """HEAD on each route gives the GET status and headers and an empty body."""
    for path, code in (("/metrics", b"200"), ("/healthz", b"200"), ("/readyz", b"503")):
        answer = raw(server.port, f"HEAD {path} HTTP/1.0\r\n\r\n".encode())
        head, _, body = answer.partition(b"\r\n\r\n")
        assert (head.split(b" ")[1], body) == (code, b""), path


def test_exact_paths_only(server: guard.server.MetricsServer) -> None:
    """//metrics, /metrics/ and /readyz/x are not routes."""
    for path in ("//metrics", "/metrics/", "/readyz/x", "/"):
        assert get(server.url + path)[0] == 404, path


def test_other_methods_get_405(server: guard.server.MetricsServer) -> None:
    """POST is refused with 405."""
    answer = raw(server.port, b"POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
    assert answer.split(b" ")[1] == b"405"


def test_openmetrics_and_gzip_are_negotiated(
    server: guard.server.MetricsServer,
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
) -> None:
    """Accept: OpenMetrics gives the OpenMetrics format; Accept-Encoding: gzip compresses it."""
    with guard.wrap(demo_factory, demo_probe, name="X", registry=registry, policy=QUIET):
        request = urllib.request.Request(
            server.url + "/metrics",
            headers={
                "Accept": "application/openmetrics-text; version=1.0.0",
                "Accept-Encoding": "gzip",
            },
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            kind, encoding = response.headers["Content-Type"], response.headers["Content-Encoding"]
            text = gzip.decompress(response.read()).decode()
    assert kind.startswith("application/openmetrics-text")
    assert encoding == "gzip"
    assert text.rstrip().endswith("# EOF") and "mnn_guard_healthy" in text


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed this client's connection (EOF or reset), without waiting."""
    try:
        return sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


@pytest.mark.hostile
def test_stalled_clients_are_dropped_and_disconnects_are_quiet(
    registry: CollectorRegistry, capfd: pytest.CaptureFixture[str]
) -> None:
    """Clients that send half a request are closed by the server at their deadline, clients
    that hang up early are forgotten, and nothing is printed."""
    limits = guard.server.Limits(request_seconds=0.5)
    with guard.serve(port=0, registry=registry, limits=limits) as server:
        stalled = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
        for sock in stalled:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
        for _ in range(20):  # ask and hang up at once
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        for sock in stalled:
            sock.settimeout(10)
            assert sock.recv(1) == b""  # the server hung up on it
            sock.close()
        assert get(server.url + "/healthz")[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception" not in err


TRICKLE = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200 + b"\r\n\r\n"


@pytest.mark.hostile
def test_trickling_clients_hold_no_thread_and_meet_one_deadline(
    registry: CollectorRegistry,
) -> None:
    """40 clients trickling one header byte every 0.2 s: each is cut off at its 1 s deadline
    (a timeout per read would never fire), no thread is spent on them, and a scrape sent
    meanwhile is answered at once."""
    limits = guard.server.Limits(request_seconds=1.0)
    with guard.serve(port=0, registry=registry, limits=limits) as server:
        baseline = threading.active_count()
        start = time.monotonic()
        clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
        cut: dict[int, float] = {}
        threads = [baseline]
        answered = None
        for step, byte in enumerate(TRICKLE):
            for number, sock in enumerate(clients):
                if number not in cut and closed_by_server(sock):
                    cut[number] = time.monotonic() - start
                elif number not in cut:
                    sock.send(bytes([byte]))
            threads.append(threading.active_count())
            if step == 2:
                begun = time.monotonic()
                answered = get(server.url + "/healthz")[0], time.monotonic() - begun
            if len(cut) == len(clients) or time.monotonic() - start > 10:
                break
            time.sleep(0.2)  # the trickle's pace
        for sock in clients:
            sock.close()
    assert len(cut) == 40 and max(cut.values()) < 3.0, cut  # the head takes 46 s to send
    assert answered is not None and answered[0] == 200 and answered[1] < 1.0, answered
    assert max(threads) <= baseline + limits.threads, threads


@pytest.mark.hostile
def test_idle_connections_open_at_once_and_leave_room(registry: CollectorRegistry) -> None:
    """200 idle connections all open within 3 s (a real listen backlog), hold no thread, and
    leave room for a scrape; beyond Limits.connections the longest-waiting ones are closed,
    and the rest at their deadline."""
    limits = guard.server.Limits(request_seconds=3.0, connections=64)
    with guard.serve(port=0, registry=registry, limits=limits) as server:
        baseline = threading.active_count()
        start = time.monotonic()
        idle = [
            socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(200)
        ]
        opened = time.monotonic() - start
        threads = threading.active_count()
        status = get(server.url + "/healthz")[0]  # answered after all 200 were accepted
        evicted = sum(map(closed_by_server, idle))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(map(closed_by_server, idle)):
            time.sleep(0.05)
        ended = time.monotonic() - start
        for sock in idle:
            sock.close()
    assert opened < 3.0, opened
    assert (status, threads <= baseline + limits.threads) == (200, True), threads
    assert evicted >= 200 - limits.connections, evicted
    assert ended < 3.0 + 2.0, ended  # each was closed by its deadline at the latest


def test_limits_are_checked() -> None:
    """A deadline of 0 or a count below 1 raises ConfigError naming the field."""
    for field, bad in (("request_seconds", 0.0), ("connections", 0), ("threads", True)):
        with pytest.raises(guard.ConfigError, match=field):
            guard.server.Limits(**{field: bad})


def test_healthz_asks_for_a_restart_after_a_long_failure(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """/healthz turns 503, naming the session, once it has been FAILED for restart_after."""
    faulty = FaultyFactory(demo_factory, fault="noise", rate=1.0, affects="all")
    with (
        guard.serve(port=0, registry=registry, restart_after=0.2) as running,
        guard.wrap(
            faulty, demo_probe, name="X", registry=registry, policy=NO_REINIT, raise_exhausted=False
        ) as session,
    ):
        assert get(running.url + "/healthz")[0] == 200  # failed, but not for long yet
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and time.time() - session.status.since <= 0.2:
            time.sleep(0.02)
        status, _, body = get(running.url + "/healthz")
    assert (status, "X" in body, "restart" in body) == (503, True, True)


def ready_gauge(url: str) -> float:
    """The value of mnn_guard_ready in one scrape of `url`."""
    body = get(url + "/metrics")[2]
    (value,) = [
        s.value
        for f in text_string_to_metric_families(body)
        for s in f.samples
        if s.name == "mnn_guard_ready"
    ]
    return value


def test_metrics_say_whether_the_process_is_ready(
    server: guard.server.MetricsServer,
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
) -> None:
    """/metrics carries mnn_guard_ready, what /readyz says as 1 or 0: 0 with no session, 1
    while one serves, 0 again once its only session is closed (a process serving nothing, which
    has no other mnn_guard series left)."""
    before = ready_gauge(server.url)
    session = guard.wrap(demo_factory, demo_probe, name="X", registry=registry, policy=QUIET)
    serving = ready_gauge(server.url)
    session.close()
    body = get(server.url + "/metrics")[2]
    assert (before, serving, ready_gauge(server.url)) == (0.0, 1.0, 0.0)
    assert "\nmnn_guard_healthy{" not in body  # no series left, only its HELP and TYPE


def test_readyz_waits_for_every_expected_worker(tmp_path: Path) -> None:
    """With workers=2 in multiprocess mode, one serving worker is not enough: /readyz lists the
    missing worker with both counts and mnn_guard_ready is 0; with the second it is ready."""
    workers = Workers(tmp_path)
    try:
        workers.start(State.SERVING)
        with guard.serve(port=0, multiprocess_dir=tmp_path, workers=2) as running:
            status, _, body = get(running.url + "/readyz")
            waiting = (status, ready_gauge(running.url))
            workers.start(State.SERVING)
            ready = (get(running.url + "/readyz")[0], ready_gauge(running.url))
    finally:
        workers.close()
    (missing,) = [e for e in json.loads(body)["sessions"] if e["state"] == "missing"]
    assert waiting == (503, 0.0)
    assert (missing["name"], missing["expected"], missing["live"]) == ("workers", 2, 1)
    assert "1 of 2 worker processes" in missing["reasons"][0]
    assert ready == (200, 1.0)


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2"])
def test_bad_worker_counts_are_refused(workers: Any) -> None:
    """The expected worker count is an int >= 1."""
    with pytest.raises(guard.ConfigError, match="workers must be an int"):
        Endpoints(workers=workers)


def test_several_workers_need_multiprocess_mode(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Expecting 2 workers without a multiprocess directory is refused, naming the variable:
    each worker would answer for itself alone."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with pytest.raises(guard.ConfigError, match="PROMETHEUS_MULTIPROC_DIR"):
        Endpoints(workers=2)
    assert Endpoints(registry, workers=1).workers == 1


UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.mark.hostile
def test_asgi_app_refuses_websockets_without_an_error(tmp_path: Path) -> None:
    """Real uvicorn serving guard.asgi_app(): a websocket upgrade to any path is refused with
    403 and uvicorn logs no error; plain HTTP still answers."""
    from test_recipes import free_port
    from test_recipes import get as get_or_0

    port = free_port()
    log = tmp_path / "uvicorn.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [
                *(str(Path(sys.executable).parent / "uvicorn"), "--factory"),
                *("guard.integrations.endpoints:asgi_app", "--port", str(port)),
                *("--host", "127.0.0.1", "--log-level", "info"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while get_or_0(f"http://127.0.0.1:{port}/healthz")[0] != 200:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        answers = [
            raw_http11(port, UPGRADE.format(path=path).encode()) for path in ("/metrics", "/x")
        ]
        status = get(f"http://127.0.0.1:{port}/readyz")[0]
    finally:
        server.terminate()
        server.wait(30)
    text = log.read_text()
    assert [a.split(b"\r\n", 1)[0] for a in answers] == [b"HTTP/1.1 403 Forbidden"] * 2
    assert status == 503  # no session in that process: served, not ready
    assert "ERROR" not in text and "Traceback" not in text, text


def raw_http11(port: int, request: bytes) -> bytes:
    """Send one request and read the answer (its first bytes within BOUND) until the server
    closes or 2 s pass quietly."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        sock.settimeout(BOUND)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                sock.settimeout(2)
        except TimeoutError:
            pass
    return b"".join(chunks)


WORKER = """
import sys, guard, probes
from guard.testing import FaultyFactory
from guard.tools import demo

factory = demo.demo_factory(threads=1)
if sys.argv[2] == "failed":
    factory = FaultyFactory(factory, fault="zeros", rate=1.0, affects="all")
session = guard.wrap(
    factory, probes.load(sys.argv[1]), name="vocoder", raise_exhausted=False,
    policy=guard.Policy(background=False, reinit_attempts=0),
)
print(session.status.state.value, flush=True)
sys.stdin.read()  # until the test kills it
"""


def test_readiness_forgets_the_sessions_of_a_worker_that_died(
    demo_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    """Two real workers in multiprocess mode, one FAILED: /readyz is 503 naming its pid; once
    it is killed (SIGKILL, no goodbye) /readyz is 200 with the live worker alone."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    command = [sys.executable, "-c", WORKER, str(demo_paths[1])]
    pipes: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    workers = [
        subprocess.Popen([*command, kind], env=env, **pipes) for kind in ("serving", "failed")
    ]
    try:
        assert [w.stdout.readline().strip() for w in workers if w.stdout] == ["serving", "failed"]
        serving, failed = workers
        with guard.serve(port=0, multiprocess_dir=tmp_path) as running:
            status, _, body = get(running.url + "/readyz")
            before = (status, sorted((e["pid"], e["state"]) for e in json.loads(body)["sessions"]))
            failed.kill()
            failed.wait(30)
            status, _, body = get(running.url + "/readyz")
            after = (status, [(e["pid"], e["state"]) for e in json.loads(body)["sessions"]])
    finally:
        for worker in workers:
            worker.kill()
            worker.wait(30)
    assert before == (503, sorted([(serving.pid, "serving"), (failed.pid, "failed")]))
    assert after == (200, [(serving.pid, "serving")])
