"""The Grafana dashboard's queries, evaluated by a real Prometheus server scraping a real guard."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import guard
import probes
from guard.testing import Affects, Fault, FaultyFactory
from guard.tools import demo

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "mnn-guard.json"
# what Grafana puts in for its variables: windows that hold several 1 s scrapes
GRAFANA = {"$__rate_interval": "10s", "$__range": "5m", "$session": ".*"}
WAIT = 60.0  # seconds for Prometheus to start, scrape and have rates (a slow CI machine)


def panels() -> list[dict[str, Any]]:
    """Every panel of the dashboard that queries (rows flattened)."""
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        found.extend([panel, *panel.get("panels", [])])
    return [p for p in found if p.get("targets")]


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables filled in) of every target."""
    out = []
    for panel in panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in GRAFANA.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out


def grouped_by(expr: str) -> set[str]:
    """The labels every series of a query must carry: its outermost `by (...)` less optional ones.

    `pid` exists only in multiprocess mode; `le` is consumed by histogram_quantile.
    """
    match = re.search(r"by \(([^)]*)\)", expr)
    labels = {x.strip() for x in match.group(1).split(",")} if match else set()
    return labels - {"pid", "le"}


def test_dashboard_is_well_formed() -> None:
    """Unique panel ids, a grid position each, the datasource variable, a session filter."""
    board = json.loads(DASHBOARD.read_text())
    everything = [p for top in board["panels"] for p in [top, *top.get("panels", [])]]
    ids = [p["id"] for p in everything]
    assert len(ids) == len(set(ids))
    assert all({"h", "w", "x", "y"} <= set(p["gridPos"]) for p in everything)
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "session"}
    for panel in panels():
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert 'session=~"$session"' in target["expr"], target["expr"]


def test_every_metric_in_the_dashboard_exists(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """Each mnn_guard_* name the dashboard queries is exposed by a guarded session."""
    session = guard.wrap(demo_factory, demo_probe, name="v", registry=registry)
    exposed = generate_latest(registry).decode()
    session.close()
    names = {n for _, expr in queries() for n in re.findall(r"mnn_guard_\w+", expr)}
    assert len(names) >= 10
    for name in names:
        assert re.search(rf"^{name}[{{ ]", exposed, re.M), f"{name} is not exposed"


# ------------------------------------------------------------- a real Prometheus


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get_json(url: str) -> Any:
    """GET a URL on 127.0.0.1 and parse its JSON body."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def poll(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    """Call `check` until it returns something truthy (errors count as not yet), within a bound."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:  # not listening yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout:g} s (last: {last!r})")


@pytest.fixture()
def prometheus_bin() -> str:
    """The Prometheus server from Debian's `prometheus` package; in CI its absence fails."""
    found = shutil.which("prometheus")
    if found is None:
        why = "the `prometheus` binary is not installed (apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}: .ci/run installs it; the dashboard queries cannot be checked")
        pytest.skip(f"DASHBOARD QUERIES NOT RUN: {why}")
    return found


@pytest.fixture()
def guarded(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> Iterator[str]:
    """A process serving metrics of a healthy session and of one whose every init is degraded.

    The degraded one is FAILED and retries every second; both get calls all along, so rates,
    canary failures, fallbacks and init times keep coming.
    """
    healthy = guard.wrap(demo_factory, demo_probe, name="healthy", registry=registry)
    broken_factory = FaultyFactory(demo_factory, fault=Fault.NOISE, rate=1.0, affects=Affects.ALL)
    broken = guard.wrap(
        broken_factory,
        demo_probe,
        name="broken",
        registry=registry,
        raise_exhausted=False,
        policy=guard.Policy(reinit_attempts=0, promote_after=1.0, wait_timeout=0.1),
    )
    stop = threading.Event()
    mel = demo.demo_mel(20)

    def traffic() -> None:
        while not stop.wait(0.02):
            healthy.run({"mel": mel})
            with pytest.raises(guard.GuardError):
                broken.run({"mel": mel})

    thread = threading.Thread(target=traffic, daemon=True)
    server = guard.serve(port=0, registry=registry)
    thread.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        stop.set()
        thread.join(10)
        server.close()
        healthy.close()
        broken.close()


@pytest.fixture()
def prometheus(prometheus_bin: str, guarded: str, tmp_path: Path) -> Iterator[str]:
    """A Prometheus server on 127.0.0.1 scraping the guarded process every second."""
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: mnn-guard\n    static_configs:\n"
        f"      - targets: ['{guarded}']\n"
    )
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [
            prometheus_bin,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={address}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
    )
    try:
        poll("Prometheus ready", lambda: urllib.request.urlopen(f"http://{address}/-/ready"))
        yield f"http://{address}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def query(base: str, promql: str) -> list[dict[str, Any]]:
    """An instant query through Prometheus's HTTP API; the vector's samples."""
    data = get_json(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
    assert data["status"] == "success", data
    assert data["data"]["resultType"] == "vector", (promql, data["data"]["resultType"])
    result: list[dict[str, Any]] = data["data"]["result"]
    return result


def by_session(series: list[dict[str, Any]]) -> dict[str, float]:
    """Each sample's value by its session label."""
    return {s["metric"].get("session", ""): float(s["value"][1]) for s in series}


def test_every_panel_query_returns_data(prometheus: str) -> None:
    """Every panel's PromQL, run by a real Prometheus scraping a real guard, returns series of
    the shape the panel draws: the labels it groups by, and the values it is about."""
    exprs = dict(queries())  # one query per panel title, but for latency panels' extra targets
    rate_query = exprs["Requests by result"]
    poll("rates of both sessions", lambda: len(by_session(query(prometheus, rate_query))) == 2)
    poll(  # the broken session's retries: at least one canary failure inside the window
        "a canary failure in the window",
        lambda: by_session(query(prometheus, exprs["Canary checks by result"] + " > 0")).get(
            "broken"
        ),
    )
    for title, promql in queries():
        series = query(prometheus, promql)
        assert series, f"panel {title!r} got no data from {promql}"
        for sample in series:
            assert grouped_by(promql) <= set(sample["metric"]), (title, sample["metric"])
            assert sample["value"][1] in ("NaN", "+Inf", "-Inf") or math.isfinite(
                float(sample["value"][1])
            )
    results: dict[str, list[dict[str, Any]]] = {}
    for title, promql in queries():
        results.setdefault(title, []).extend(query(prometheus, promql))
    assert by_session(results["Health per session and pid"]) == {"healthy": 1.0, "broken": 0.0}
    rung_series = results["Rung per session and pid"]
    rungs = {s["metric"]["session"]: s["metric"]["rung"] for s in rung_series}
    assert rungs["healthy"] == "static"
    states = {
        s["metric"]["session"]: s["metric"]["state"] for s in results["State per session and pid"]
    }
    assert states == {"healthy": "serving", "broken": "failed"}
    errors = by_session(results["Error rate"])
    assert errors == {"healthy": 0.0, "broken": 1.0}
    recoveries = {
        s["metric"]["action"]: float(s["value"][1])
        for s in results["Recoveries by action"]
        if s["metric"]["session"] == "broken"
    }
    assert set(recoveries) == {"reinit", "fallback", "promote"}
    snr = by_session(results["Worst canary SNR"])
    assert snr["broken"] < 45.0 <= snr["healthy"]
    latency = [
        float(s["value"][1])
        for s in results["run() latency"]
        if s["metric"] == {"session": "healthy", "rung": "static"}
    ]
    assert len(latency) == 3 and all(0 < x < 10 for x in latency)  # p50, p95, p99
    assert float(results["Unhealthy sessions"][0]["value"][1]) == 1.0
