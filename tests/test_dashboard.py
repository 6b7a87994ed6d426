"""The Grafana dashboard's queries, evaluated by a real Prometheus server scraping a real guard."""

from __future__ import annotations

import json
import math
import re
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_server import RULES, get_json, poll, prometheus, query, shortened_rules

import guard
import probes
from guard.testing import Affects, Fault, FaultyFactory
from guard.tools import demo

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "mnn-guard.json"
# what Grafana puts in for its variables: windows that hold several 1 s scrapes
GRAFANA = {
    "$__rate_interval": "10s",
    "$__range": "5m",
    "$session": ".*",
    "$job": ".*",
    "$instance": ".*",
}
FILTER = 'job=~"$job",instance=~"$instance",session=~"$session"'


def panels() -> list[dict[str, Any]]:
    """Every panel of the dashboard that queries (rows flattened)."""
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        found.extend([panel, *panel.get("panels", [])])
    return [p for p in found if p.get("targets")]


def filled(expr: str) -> str:
    """A query with Grafana's variables filled in."""
    for name, value in GRAFANA.items():
        expr = expr.replace(name, value)
    return expr


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables filled in) of every target."""
    return [(p["title"], filled(t["expr"])) for p in panels() for t in p["targets"]]


def grouped_by(expr: str) -> set[str]:
    """The labels every series of a query must carry: its outermost `by (...)` less optional ones.

    `pid` exists only in multiprocess mode; `le` is consumed by histogram_quantile.
    """
    match = re.search(r"by \(([^)]*)\)", expr)
    labels = {x.strip() for x in match.group(1).split(",")} if match else set()
    return labels - {"pid", "le"}


def test_dashboard_is_well_formed() -> None:
    """Unique panel ids, a grid position each, the datasource, job, instance and session
    variables, and every query filtered by the job and instance (and session, where it has one)."""
    board = json.loads(DASHBOARD.read_text())
    everything = [p for top in board["panels"] for p in [top, *top.get("panels", [])]]
    ids = [p["id"] for p in everything]
    assert len(ids) == len(set(ids))
    assert all({"h", "w", "x", "y"} <= set(p["gridPos"]) for p in everything)
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "job", "instance", "session"]
    for panel in panels():
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            expr = target["expr"]
            assert re.search(r'job=~"\$job\|?"', expr), expr
            assert re.search(r'instance=~"\$instance\|?"', expr), expr
            if "mnn_guard_" in expr and "mnn_guard_ready" not in expr:
                assert FILTER in expr, expr


def test_error_rate_panel_is_the_alerts_ratio() -> None:
    """The Error rate panel is MnnGuardErrorBudgetBurn's ratio (errors, unavailable and
    failed calls over all but invalid ones), over the panel's interval and filtered."""
    rules = yaml.safe_load(RULES.read_text())["groups"]
    (rule,) = [r for g in rules for r in g["rules"] if r.get("record", "").endswith("rate5m")]
    (panel,) = [p for p in panels() if p["title"] == "Error rate"]
    (target,) = panel["targets"]
    shown = target["expr"].replace(FILTER + ",", "").replace("$__rate_interval", "5m")
    assert " ".join(shown.split()) == " ".join(rule["expr"].split())


def test_every_metric_in_the_dashboard_exists(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """Each mnn_guard_* name the dashboard queries is exposed by a guarded session and its
    routes (mnn_guard_ready)."""
    session = guard.wrap(
        demo_factory, demo_probe, name="v", registry=registry,
        policy=guard.Policy(shadow_every=10),
    )  # fmt: skip
    with (
        guard.serve(port=0, registry=registry) as server,
        urllib.request.urlopen(server.url + "/metrics", timeout=5) as response,
    ):
        exposed = response.read().decode()
    session.close()
    names = {n for _, expr in queries() for n in re.findall(r"mnn_guard_\w+", expr)}
    assert len(names) >= 11
    for name in names:
        assert re.search(rf"^{name}[{{ ]", exposed, re.M), f"{name} is not exposed"


# ------------------------------------------------------------- a real Prometheus


@pytest.fixture()
def guarded(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> Iterator[str]:
    """A process serving metrics of a healthy session, of one whose every init is degraded,
    and of one that fell back while it started (before Prometheus's first scrape).

    The degraded one is FAILED and retries every second; all get calls all along, so rates,
    canary failures, fallbacks and init times keep coming; the healthy one's every fifth call
    is shadow-checked.
    """
    healthy = guard.wrap(
        demo_factory, demo_probe, name="healthy", registry=registry,
        policy=guard.Policy(shadow_every=5),
    )  # fmt: skip
    broken_factory = FaultyFactory(demo_factory, fault=Fault.NOISE, rate=1.0, affects=Affects.ALL)
    broken = guard.wrap(
        broken_factory,
        demo_probe,
        name="broken",
        registry=registry,
        raise_exhausted=False,
        policy=guard.Policy(reinit_attempts=0, promote_after=1.0, wait_timeout=0.1),
    )
    fellback = guard.wrap(
        FaultyFactory(demo_factory, fault=Fault.NOISE, rate=1.0),  # static inits only
        demo_probe,
        name="fellback",
        registry=registry,
        policy=guard.Policy(reinit_attempts=0, promote_after=None),
    )
    stop = threading.Event()
    mel = demo.demo_mel(20)

    def traffic() -> None:
        while not stop.wait(0.02):
            healthy.run({"mel": mel})
            fellback.run({"mel": mel})
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
        for session in (healthy, broken, fellback):
            session.close()


@pytest.fixture()
def scraped(guarded: str, tmp_path: Path) -> Iterator[tuple[str, float]]:
    """A Prometheus server scraping the guarded process every second, with the repository's
    rules (`for:` 1 s, so that alerts fire); (its URL, when it started)."""
    started = time.time()
    with prometheus(tmp_path, [guarded], rules=shortened_rules(tmp_path, "1s")) as base:
        yield base, started


def by_session(series: list[dict[str, Any]]) -> dict[str, float]:
    """Each sample's value by its session label."""
    return {s["metric"].get("session", ""): float(s["value"][1]) for s in series}


def peak(base: str, promql: str, since: float, **labels: str) -> float:
    """The highest value the query's series with these labels took from `since` until now
    (1 s steps): what a panel drew over that time; 0 when it drew none."""
    params = {"query": promql, "start": f"{since:.3f}", "end": f"{time.time():.3f}", "step": "1"}
    data = get_json(f"{base}/api/v1/query_range?{urllib.parse.urlencode(params)}")
    assert data["status"] == "success", data
    values = [
        float(v)
        for series in data["data"]["result"]
        if labels.items() <= series["metric"].items()
        for _, v in series["values"]
    ]
    return max(values, default=0.0)


def test_every_panel_query_returns_data(scraped: tuple[str, float]) -> None:
    """Every panel's PromQL, run by a real Prometheus scraping a real guard (with the rules),
    returns series of the shape the panel draws: the labels it groups by, and the values it is
    about; the start of a session that fell back before the first scrape is drawn too."""
    prometheus_url, started = scraped
    exprs = dict(queries())  # one query per panel title, but for latency panels' extra targets
    rate_query = exprs["Requests by result"]
    poll("rates of all sessions", lambda: len(by_session(query(prometheus_url, rate_query))) == 3)
    poll(  # the broken session's retries: at least one canary failure inside the window
        "a canary failure in the window",
        lambda: by_session(query(prometheus_url, exprs["Canary checks by result"] + " > 0")).get(
            "broken"
        ),
    )
    failing = {"MnnGuardSessionExhausted", "MnnGuardNotReady"}  # the broken session's

    def alerted() -> bool:
        fired = {s["metric"]["alertname"] for s in query(prometheus_url, exprs["Firing alerts"])}
        return failing <= fired

    poll("the broken session's alerts firing", alerted)
    for title, promql in queries():
        series = query(prometheus_url, promql)
        assert series, f"panel {title!r} got no data from {promql}"
        for sample in series:
            assert grouped_by(promql) <= set(sample["metric"]), (title, sample["metric"])
            assert sample["value"][1] in ("NaN", "+Inf", "-Inf") or math.isfinite(
                float(sample["value"][1])
            )
    results: dict[str, list[dict[str, Any]]] = {}
    for title, promql in queries():
        results.setdefault(title, []).extend(query(prometheus_url, promql))
    health = by_session(results["Health per session and pid"])
    assert health == {"healthy": 1.0, "broken": 0.0, "fellback": 1.0}
    rung_series = results["Rung per session and pid"]
    rungs = {s["metric"]["session"]: s["metric"]["rung"] for s in rung_series}
    assert (rungs["healthy"], rungs["fellback"]) == ("static", "dynamic")
    states = {
        s["metric"]["session"]: s["metric"]["state"] for s in results["State per session and pid"]
    }
    assert states == {"healthy": "serving", "broken": "failed", "fellback": "serving"}
    errors = by_session(results["Error rate"])
    assert errors == {"healthy": 0.0, "broken": 1.0, "fellback": 0.0}
    recoveries = {
        s["metric"]["action"]: float(s["value"][1])
        for s in results["Recoveries by action"]
        if s["metric"]["session"] == "broken"
    }
    assert set(recoveries) == {"reinit", "fallback", "promote"}
    snr = by_session(results["Worst canary SNR"])
    assert snr["broken"] < 45.0 <= snr["healthy"]
    assert set(by_session(results["Worst shadow SNR"])) == {"healthy"}  # the one shadowed
    assert peak(prometheus_url, exprs["Shadow checks by result"], started, session="healthy",
                result="pass")  # fmt: skip
    latency = [
        float(s["value"][1])
        for s in results["run() latency"]
        if s["metric"] == {"session": "healthy", "rung": "static"}
    ]
    assert len(latency) == 3 and all(0 < x < 10 for x in latency)  # p50, p95, p99
    assert float(results["Unhealthy sessions"][0]["value"][1]) == 1.0
    assert [float(s["value"][1]) for s in results["Targets up"]] == [1.0]
    assert [float(s["value"][1]) for s in results["Ready per instance (/readyz)"]] == [0.0]
    assert failing <= {s["metric"]["alertname"] for s in results["Firing alerts"]}
    # the fellback session's start, before the first scrape: drawn, not lost
    fell = {"session": "fellback"}
    assert peak(prometheus_url, exprs["Recoveries by action"], started, **fell, action="fallback")
    assert peak(prometheus_url, exprs["Canary checks by result"], started, **fell, result="fail")
    assert peak(prometheus_url, exprs["Inits by rung"], started, **fell, rung="static")
    init_p95 = [
        float(s["value"][1])
        for s in query(prometheus_url, [q for t, q in queries() if t == "Init + canary time"][1])
        if s["metric"]["session"] == "fellback"
    ]
    assert init_p95 and all(0 < x < 600 for x in init_p95), init_p95
