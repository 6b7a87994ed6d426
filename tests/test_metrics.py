"""Prometheus metrics of guarded sessions, asserted on a fresh registry per test."""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import Any

import numpy as np
import pytest
from conftest import FakeClock
from plans import CANARY_FORWARDS, GaugeAtEvent, Plan, plan_session
from polling import until
from prometheus_client import CollectorRegistry

import guard
import probes
from guard import mnn
from guard.ladder import Action
from guard.testing import Fault, FaultyFactory
from guard.tools import demo

QUIET = guard.Policy(background=False)
ONE_REINIT = guard.Policy(reinit_attempts=1, background=False)
Array = np.ndarray[Any, Any]


def sample(registry: CollectorRegistry, name: str, session: str = "vocoder", **labels: str) -> Any:
    """One sample value of session `session`, None when the series does not exist."""
    return registry.get_sample_value(name, {"session": session, **labels})


def on_rung(registry: CollectorRegistry, session: str = "vocoder") -> str | None:
    """The rung whose mnn_guard_rung series is 1 (the only one), None when none is."""
    on = [
        s.labels["rung"]
        for m in registry.collect()
        for s in m.samples
        if s.name == "mnn_guard_rung" and s.labels["session"] == session and s.value == 1
    ]
    assert len(on) <= 1, on
    return on[0] if on else None


def canary(registry: CollectorRegistry, rung: str, result: str) -> Any:
    """Canary checks of session vocoder on `rung` with `result`, None when never counted."""
    return sample(registry, "mnn_guard_canary_checks_total", rung=rung, result=result)


def test_scheduled_faults_are_counted(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """Two degraded inits then a clean one: 3 inits, 2 fails, 1 pass, 2 reinits, healthy, rung 0."""
    faulty = FaultyFactory(demo_factory, fault="noise", schedule=[True, True, False])
    with guard.wrap(faulty, demo_probe, name="vocoder", registry=registry, policy=QUIET):
        observed = {
            "inits": sample(registry, "mnn_guard_inits_total", rung="static"),
            "fail": canary(registry, "static", "fail"),
            "pass": canary(registry, "static", "pass"),
            "reinit": sample(registry, "mnn_guard_recoveries_total", action="reinit"),
            "fallback": sample(registry, "mnn_guard_recoveries_total", action="fallback"),
            "healthy": sample(registry, "mnn_guard_healthy"),
            "rung": on_rung(registry),
            "init_seconds": sample(registry, "mnn_guard_init_seconds_count", rung="static"),
        }
    assert observed == {
        "inits": 3.0,
        "fail": 2.0,
        "pass": 1.0,
        "reinit": 2.0,
        "fallback": 0.0,
        "healthy": 1.0,
        "rung": "static",
        "init_seconds": 3.0,
    }


def test_last_canary_snr_is_exported(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """The SNR gauge holds the worst SNR of the last canary judgement (the passing one)."""
    faulty = FaultyFactory(demo_factory, fault="noise", schedule=[True, False])
    with guard.wrap(faulty, demo_probe, name="vocoder", registry=registry, policy=QUIET) as s:
        verdict = s.status.verdict
        exported = sample(registry, "mnn_guard_canary_snr_db")
    assert verdict is not None
    assert (exported, exported >= 45.0) == (verdict.worst_snr_db, True)


def test_fallback_is_counted(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """Every static init degraded: the session ends on rung 1 'dynamic' (rung index 1) with one
    fallback."""
    faulty = FaultyFactory(demo_factory, fault="noise", rate=1.0)
    with guard.wrap(faulty, demo_probe, name="vocoder", registry=registry, policy=ONE_REINIT) as s:
        observed = {
            "mode": s.status.mode,
            "static_inits": sample(registry, "mnn_guard_inits_total", rung="static"),
            "dynamic_inits": sample(registry, "mnn_guard_inits_total", rung="dynamic"),
            "static_fail": canary(registry, "static", "fail"),
            "dynamic_pass": canary(registry, "dynamic", "pass"),
            "reinit": sample(registry, "mnn_guard_recoveries_total", action="reinit"),
            "fallback": sample(registry, "mnn_guard_recoveries_total", action="fallback"),
            "healthy": sample(registry, "mnn_guard_healthy"),
            "rung": on_rung(registry),
            "rung_index": sample(registry, "mnn_guard_rung_index"),
        }
    assert observed == {
        "mode": "dynamic",
        "static_inits": 2.0,
        "dynamic_inits": 1.0,
        "static_fail": 2.0,
        "dynamic_pass": 1.0,
        "reinit": 1.0,
        "fallback": 1.0,
        "healthy": 1.0,
        "rung": "dynamic",
        "rung_index": 1.0,
    }


def test_exhaustion_is_counted(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """Every init degraded: RecoveryExhausted, every canary failed, healthy 0 on the last rung."""
    faulty = FaultyFactory(demo_factory, fault="noise", rate=1.0, affects="all", snr_db=29.0)
    with pytest.raises(guard.RecoveryExhausted):
        guard.wrap(faulty, demo_probe, name="vocoder", registry=registry, policy=ONE_REINIT)
    observed = {
        "static_fail": canary(registry, "static", "fail"),
        "dynamic_fail": canary(registry, "dynamic", "fail"),
        "static_pass": canary(registry, "static", "pass"),
        "dynamic_pass": canary(registry, "dynamic", "pass"),
        "reinit": sample(registry, "mnn_guard_recoveries_total", action="reinit"),
        "fallback": sample(registry, "mnn_guard_recoveries_total", action="fallback"),
        "healthy": sample(registry, "mnn_guard_healthy"),
        "rung": on_rung(registry),
        "failed": sample(registry, "mnn_guard_state", state="failed"),
        "snr_of_fault": 20.0 < sample(registry, "mnn_guard_canary_snr_db") < 45.0,
    }
    assert observed == {
        "static_fail": 2.0,
        "dynamic_fail": 2.0,
        "static_pass": 0.0,
        "dynamic_pass": 0.0,
        "reinit": 2.0,
        "fallback": 1.0,
        "healthy": 0.0,
        "rung": "dynamic",
        "failed": 1.0,
        "snr_of_fault": True,
    }


def test_runs_are_counted_and_timed(
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
    mel: np.ndarray[Any, Any],
) -> None:
    """Three run() calls: runs_total{result=ok} 3, error 0, 3 run_seconds observations."""
    with guard.wrap(demo_factory, demo_probe, name="vocoder", registry=registry, policy=QUIET) as s:
        for _ in range(3):
            s.run({"mel": mel})
        observed = (
            sample(registry, "mnn_guard_runs_total", rung="static", result="ok"),
            sample(registry, "mnn_guard_runs_total", rung="static", result="error"),
            sample(registry, "mnn_guard_run_seconds_count", rung="static"),
            sample(registry, "mnn_guard_run_seconds_sum", rung="static") > 0,
        )
    assert observed == (3.0, 0.0, 3.0, True)


def test_two_sessions_share_one_registry(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """Two sessions with different names keep separate series in the same registry."""
    faulty = FaultyFactory(demo_factory, fault="noise", schedule=[True, False])
    with (
        guard.wrap(demo_factory, demo_probe, name="clean", registry=registry, policy=QUIET),
        guard.wrap(faulty, demo_probe, name="flaky", registry=registry, policy=QUIET),
    ):
        observed = {
            name: (
                sample(registry, "mnn_guard_inits_total", session=name, rung="static"),
                sample(registry, "mnn_guard_healthy", session=name),
            )
            for name in ("clean", "flaky")
        }
    assert observed == {"clean": (1.0, 1.0), "flaky": (2.0, 1.0)}


def test_close_removes_the_sessions_series(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """A closed session leaves /metrics: no healthy 0 that would page forever."""
    session = guard.wrap(demo_factory, demo_probe, name="vocoder", registry=registry, policy=QUIET)
    assert sample(registry, "mnn_guard_healthy") == 1.0
    session.close()
    left = [
        s.name
        for m in registry.collect()
        for s in m.samples
        if s.labels.get("session") == "vocoder"
    ]
    assert left == []


def test_every_call_is_counted_by_result(
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
    mel: np.ndarray[Any, Any],
) -> None:
    """Served, invalid and closed calls each count under their own result."""
    s = guard.wrap(demo_factory, demo_probe, name="vocoder", registry=registry, policy=QUIET)
    s.run({"mel": mel})
    for bad in ({"mel": mel[:, :40]}, {"nope": mel}):
        with pytest.raises(guard.InputMismatch):
            s.run(bad)
    counts = {
        c: sample(registry, "mnn_guard_runs_total", rung="static", result=c)
        for c in ("ok", "invalid")
    }
    s.close()
    with pytest.raises(guard.errors.SessionClosed):
        s.run({"mel": mel})
    assert counts == {"ok": 1.0, "invalid": 2.0}


def test_failed_session_counts_refused_calls(
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
    mel: np.ndarray[Any, Any],
) -> None:
    """A session kept in FAILED (raise_exhausted=False) counts each refused call as failed."""
    faulty = FaultyFactory(demo_factory, fault="noise", rate=1.0, affects="all")
    s = guard.wrap(
        faulty,
        demo_probe,
        name="vocoder",
        registry=registry,
        policy=guard.Policy(background=False, reinit_attempts=0),
        raise_exhausted=False,
    )
    assert s.status.state is guard.State.FAILED
    for _ in range(3):
        with pytest.raises(guard.RecoveryExhausted):
            s.run({"mel": mel})
    assert sample(registry, "mnn_guard_runs_total", rung="dynamic", result="failed") == 3.0
    s.close()


def test_info_names_versions_and_model(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """mnn_guard_session_info carries guard and MNN versions and the model's sha256."""
    with guard.wrap(demo_factory, demo_probe, name="vocoder", registry=registry, policy=QUIET):
        (info,) = [
            s.labels
            for m in registry.collect()
            for s in m.samples
            if s.name == "mnn_guard_session_info"
        ]
    assert (info["guard_version"], info["mnn_version"], info["model_sha256"]) == (
        guard.__version__,
        guard.mnn.mnn_version(),
        demo_probe.meta.model_sha256,
    )


@pytest.mark.hostile
def test_bad_buckets_are_refused() -> None:
    """Buckets that are empty, unsorted, negative or infinite raise ConfigError."""
    for bad in ((), (0.1, 0.01), (-1.0, 1.0), (1.0, float("inf"))):
        with pytest.raises(guard.ConfigError, match=r"Buckets\.run"):
            guard.metrics.Buckets(run=bad)


def test_buckets_are_set_once_per_registry(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """Custom buckets apply to the registry's histograms; other buckets later are refused."""
    buckets = guard.metrics.Buckets(run=(0.001, 0.01))
    with guard.wrap(
        demo_factory, demo_probe, name="a", registry=registry, policy=QUIET, buckets=buckets
    ):
        edge = sample(
            registry, "mnn_guard_run_seconds_bucket", session="a", rung="static", le="0.01"
        )
        with pytest.raises(guard.ConfigError, match="set once per registry"):
            guard.wrap(
                demo_factory,
                demo_probe,
                name="b",
                registry=registry,
                policy=QUIET,
                buckets=guard.metrics.Buckets(run=(0.5,)),
            )
    assert edge == 0.0


def _scrape(registry: CollectorRegistry, session: str) -> tuple[float, float, float]:
    """(runs_total ok, run_seconds_count, +Inf bucket) of static, all from one collect()."""
    found = {
        (x.name, x.labels.get("le")): x.value
        for m in registry.collect()
        for x in m.samples
        if x.labels.get("session") == session
        and x.labels.get("rung") == "static"
        and x.labels.get("result", "ok") == "ok"
    }
    return (
        found[("mnn_guard_runs_total", None)],
        found[("mnn_guard_run_seconds_count", None)],
        found[("mnn_guard_run_seconds_bucket", "+Inf")],
    )


def test_run_counts_are_exact_under_threads_and_each_scrape_is_consistent(
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
    mel: Any,
) -> None:
    """4 threads x 40 calls while a scraper reads: every call counted once, no torn scrape."""
    import threading

    s = guard.wrap(demo_factory, demo_probe, name="threads", registry=registry, policy=QUIET)
    done = threading.Event()
    scrapes: list[tuple[float, float, float]] = []

    def scrape() -> None:
        while not done.is_set():
            scrapes.append(_scrape(registry, "threads"))

    def call() -> None:
        for _ in range(40):
            s.run({"mel": mel})

    scraper = threading.Thread(target=scrape)
    scraper.start()
    callers = [threading.Thread(target=call) for _ in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    done.set()
    scraper.join()
    assert _scrape(registry, "threads") == (160.0, 160.0, 160.0)
    assert len(scrapes) > 1
    assert all(ok == count == inf for ok, count, inf in scrapes), "a scrape saw a torn tally"
    assert [x[0] for x in scrapes] == sorted(x[0] for x in scrapes), "a counter went down"
    s.close()


def test_run_tally_buckets_match_prometheus_clients_histogram(registry: CollectorRegistry) -> None:
    """Durations on, between and past the bounds land in the buckets a Histogram puts them in."""
    from prometheus_client import Histogram

    buckets = guard.metrics.Buckets(run=(0.001, 0.01, 0.1))
    listener = guard.metrics.PrometheusListener(
        "tally", (guard.STATIC,), registry=registry, buckets=buckets
    )
    other = CollectorRegistry()
    reference = Histogram("mnn_guard_run_seconds", "run() time.", ["session", "rung"],
                          registry=other, buckets=buckets.run)  # fmt: skip
    durations = (0.0, 0.0005, 0.001, 0.0010001, 0.01, 0.05, 0.1, 0.1000001, 7.0)
    for seconds in durations:
        listener.on_run("tally", guard.STATIC, seconds, guard.listeners.Call.OK)
        reference.labels("tally", "static").observe(seconds)
    listener.on_run("tally", guard.STATIC, 3.0, guard.listeners.Call.ERROR)

    def samples(r: CollectorRegistry) -> dict[tuple[str, str | None], float]:
        return {
            (x.name, x.labels.get("le")): x.value
            for m in r.collect()
            if m.name == "mnn_guard_run_seconds"
            for x in m.samples
            if not x.name.endswith("_created")
        }

    assert samples(registry) == samples(other)
    assert sample(registry, "mnn_guard_runs_total", "tally", rung="static", result="error") == 1
    assert sample(registry, "mnn_guard_run_seconds_sum", "tally", rung="static") == sum(durations)
    listener.on_close("tally")
    assert sample(registry, "mnn_guard_runs_total", "tally", rung="static", result="ok") is None


def test_run_series_are_created_at_the_sessions_start_and_follow_the_librarys_switch(
    registry: CollectorRegistry,
) -> None:
    """runs_total and run_seconds carry _created (the tally's start) unless switched off."""
    import time

    import prometheus_client

    before = time.time()
    listener = guard.metrics.PrometheusListener("c", (guard.STATIC,), registry=registry)
    after = time.time()
    for _ in range(2):
        listener.on_run("c", guard.STATIC, 0.5, guard.listeners.Call.ERROR)

    def created() -> list[float]:
        found = [
            x
            for m in registry.collect()
            for x in m.samples
            if x.name in ("mnn_guard_runs_created", "mnn_guard_run_seconds_created")
        ]
        assert all(x.labels["session"] == "c" and x.labels["rung"] == "static" for x in found)
        return [x.value for x in found]

    stamps = created()
    assert len(stamps) == 7 and all(before <= t <= after for t in stamps)  # 6 results + 1
    assert sample(registry, "mnn_guard_runs_total", "c", rung="static", result="error") == 2
    assert sample(registry, "mnn_guard_run_seconds_count", "c", rung="static") == 0
    prometheus_client.disable_created_metrics()
    try:
        assert created() == []
    finally:
        prometheus_client.enable_created_metrics()
    listener.on_close("c")


def test_multiprocess_mode_writes_every_call_through(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """With PROMETHEUS_MULTIPROC_DIR, calls go straight to prometheus_client's own metrics."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    buckets = guard.metrics.Buckets(run=(0.001, 0.1))
    listener = guard.metrics.PrometheusListener(
        "mp", (guard.STATIC, guard.DYNAMIC), registry=registry, buckets=buckets
    )
    m = listener.metrics
    assert m.tallies is None and m.written is not None
    assert sample(registry, "mnn_guard_runs_total", "mp", rung="dynamic", result="failed") == 0
    assert sample(registry, "mnn_guard_run_seconds_count", "mp", rung="dynamic") == 0
    Call = guard.listeners.Call
    for seconds, result in ((0.0005, Call.OK), (0.05, Call.OK), (0.05, Call.OK), (9.0, Call.ERROR)):
        listener.on_run("mp", guard.STATIC, seconds, result)
    listener.on_run("mp", guard.DYNAMIC, 0.5, Call.OK)
    got = {
        r: sample(registry, "mnn_guard_runs_total", "mp", rung="static", result=r)
        for r in ("ok", "error", "invalid")
    }
    assert got == {"ok": 3, "error": 1, "invalid": 0}
    assert sample(registry, "mnn_guard_run_seconds_sum", "mp", rung="static") == 0.1005
    le = [
        sample(registry, "mnn_guard_run_seconds_bucket", "mp", rung="static", le=b)
        for b in ("0.001", "0.1", "+Inf")
    ]
    assert le == [1, 3, 3]
    assert sample(registry, "mnn_guard_run_seconds_bucket", "mp", rung="dynamic", le="+Inf") == 1
    listener.on_close("mp")
    assert math.isnan(sample(registry, "mnn_guard_healthy", "mp"))


def _hashes(registry: CollectorRegistry, session: str = "v") -> set[str]:
    """The model hashes of the session's info series."""
    return {
        s.labels["model_sha256"]
        for m in registry.collect()
        for s in m.samples
        if s.name == "mnn_guard_session_info" and s.labels["session"] == session
    }


def _status(state: guard.State) -> guard.SessionStatus:
    """A status of session v on the first rung."""
    return guard.SessionStatus(
        name="v", state=state, rung=guard.STATIC, rung_index=0, verdict=None, history=()
    )


def test_two_live_sessions_of_a_name_from_two_models_show_both_info_series(
    registry: CollectorRegistry,
) -> None:
    """Two live sessions of a name built from two models: an info series each; closing the
    older one removes its info series and leaves the newer one's series."""
    ladder = guard.Policy().ladder
    older = guard.metrics.PrometheusListener("v", ladder, registry=registry, info=("g", "m", "a"))
    guard.metrics.PrometheusListener("v", ladder, registry=registry, info=("g", "m", "b"))
    both = _hashes(registry)
    older.on_close("v")
    assert (both, _hashes(registry), sample(registry, "mnn_guard_healthy", "v")) == (
        {"a", "b"},
        {"b"},
        0.0,
    )


def test_a_standby_listener_publishes_its_gauges_only_once_live(
    registry: CollectorRegistry,
) -> None:
    """A standby listener (a hot swap's new session) counts its events but leaves the name's
    gauges to the live one until go_live(), which publishes its latest status; the old one's
    info series goes when it is closed."""
    ladder = guard.Policy().ladder
    live = guard.metrics.PrometheusListener("v", ladder, registry=registry, info=("g", "m", "a"))
    live.on_status("v", _status(guard.State.SERVING))
    standby = guard.metrics.PrometheusListener(
        "v", ladder, registry=registry, info=("g", "m", "b"), standby=True
    )
    standby.on_init("v", guard.STATIC)
    standby.on_status("v", _status(guard.State.STARTING))
    before = (_hashes(registry), sample(registry, "mnn_guard_healthy", "v"))
    standby.on_status("v", _status(guard.State.SERVING))
    standby.go_live()
    live.on_close("v")
    after = (_hashes(registry), sample(registry, "mnn_guard_healthy", "v"))
    assert (before, after) == (({"a"}, 1.0), ({"b"}, 1.0))
    assert sample(registry, "mnn_guard_inits_total", "v", rung="static") == 1.0
    assert sample(registry, "mnn_guard_state", "v", state="serving") == 1.0


# ------------------------------------------------------------------ every series and family


def test_every_series_of_a_new_session_and_nothing_else(
    demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """After one clean init: every series of the session with its value, and no other's."""
    s = plan_session(Plan("clean"), demo_probe, FakeClock(), registry=registry)
    got = {
        (x.name, tuple(sorted((k, v) for k, v in x.labels.items() if k != "session"))): x.value
        for m in registry.collect()
        for x in m.samples
        if not x.name.endswith(("_created", "_bucket", "_sum"))
        and x.name != "mnn_guard_session_info"
    }
    assert {x.labels["session"] for m in registry.collect() for x in m.samples} == {"p"}
    want: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for rung in ("static", "dynamic"):
        up = float(rung == "static")
        want[("mnn_guard_inits_total", (("rung", rung),))] = up
        want[("mnn_guard_rung", (("rung", rung),))] = up
        want[("mnn_guard_rung_loaded_static", (("rung", rung),))] = 0.0
        want[("mnn_guard_init_seconds_count", (("rung", rung),))] = up
        want[("mnn_guard_run_seconds_count", (("rung", rung),))] = 0.0
        for result in ("pass", "fail", "error", "timeout"):
            key = ("mnn_guard_canary_checks_total", (("result", result), ("rung", rung)))
            want[key] = float(up and result == "pass")
        for call in ("ok", "error", "invalid", "unavailable", "failed", "closed"):
            want[("mnn_guard_runs_total", (("result", call), ("rung", rung)))] = 0.0
    for action in ("reinit", "fallback", "promote"):
        want[("mnn_guard_recoveries_total", (("action", action),))] = 0.0
    for state in guard.State:
        want[("mnn_guard_state", (("state", state.value),))] = float(state is guard.State.SERVING)
    for basis in ("golden", "local", "disputed"):
        want[("mnn_guard_basis", (("basis", basis),))] = float(basis == "golden")
    want[("mnn_guard_healthy", ())] = 1.0
    want[("mnn_guard_rung_index", ())] = 0.0
    snr = s.status.verdict.worst_snr_db if s.status.verdict is not None else None
    want[("mnn_guard_canary_snr_db", ())] = snr  # type: ignore[assignment]
    assert got == want
    (info,) = [
        x for m in registry.collect() for x in m.samples if x.name == "mnn_guard_session_info"
    ]
    assert info.value == 1.0
    s.close()


FAMILIES = {
    "mnn_guard_session_info": "1 per guarded session: versions and the model file's sha256.",
    "mnn_guard_inits": "Module initialisations (factory calls).",
    "mnn_guard_canary_checks": "Canary judgements by result (pass, fail, error, timeout).",
    "mnn_guard_recoveries": "Recovery actions (reinit, fallback, promote).",
    "mnn_guard_runs": "run() calls by result (ok, error, invalid, unavailable, failed, closed).",
    "mnn_guard_healthy": "1 while the session serves a module whose canary passed.",
    "mnn_guard_rung": "1 for the rung the session is on, 0 for its other rungs.",
    "mnn_guard_rung_index": (
        "Position on the ladder of the rung the session is on: 0 is the first (fastest); "
        "above 0 after a fallback, even one before the first scrape."
    ),
    "mnn_guard_state": "1 for the session's state, 0 for the others.",
    "mnn_guard_rung_loaded_static": (
        "1 when the rung asked for dynamic=True and MNN loaded it statically (the model has "
        "control flow): that rung is no real fallback."
    ),
    "mnn_guard_basis": (
        "1 for what the serving module's canary was judged against: golden (the probe's), "
        "local (a reference built here: this machine computes slightly differently) or "
        "disputed (every init here disagrees with the probe alike: the guard cannot tell)."
    ),
    "mnn_guard_canary_snr_db": "Worst SNR of the last canary judgement, in dB.",
    "mnn_guard_init_seconds": "Init + canary time.",
    "mnn_guard_run_seconds": "run() time.",
    "mnn_guard_shadow_checks": (
        "Sampled live calls by shadow result: pass, fail (diverged from the reference) or "
        "dropped (the queue was full)."
    ),
    "mnn_guard_shadow_snr_db": (
        "Worst SNR of the shadow checks of the module in use, in dB (+Inf before the first)."
    ),
}


def test_every_family_says_what_it_counts(registry: CollectorRegistry) -> None:
    """The HELP line of each mnn_guard family, as dashboards and docs/ops.md quote it."""
    guard.metrics.metrics_for(registry)
    helps = {m.name: m.documentation for m in registry.collect()}
    assert helps == FAMILIES


def test_a_listener_made_alone_starts_every_gauge_at_zero(registry: CollectorRegistry) -> None:
    """A PrometheusListener made by hand, before any event: healthy, rung index, rung and state
    read 0."""
    listener = guard.metrics.PrometheusListener("solo", guard.Policy().ladder, registry=registry)
    assert listener.session == "solo"
    gauges = [
        sample(registry, "mnn_guard_healthy", session="solo"),
        sample(registry, "mnn_guard_rung_index", session="solo"),
        *(
            sample(registry, "mnn_guard_rung", session="solo", rung=r)
            for r in ("static", "dynamic")
        ),
        *(sample(registry, "mnn_guard_state", session="solo", state=x.value) for x in guard.State),
    ]
    assert gauges == [0.0] * 10


def test_sessions_report_to_the_global_registry_by_default(demo_probe: probes.Probe) -> None:
    """Without a registry, series go to the global REGISTRY and leave it at close."""
    from prometheus_client import REGISTRY

    assert guard.metrics.metrics_for() is guard.metrics.metrics_for(REGISTRY)
    s = guard.wrap(
        demo.demo_factory(threads=1), demo_probe, name="global-16",
        policy=guard.Policy(background=False),
    )  # fmt: skip
    assert REGISTRY.get_sample_value("mnn_guard_healthy", {"session": "global-16"}) == 1.0
    s.close()
    assert REGISTRY.get_sample_value("mnn_guard_healthy", {"session": "global-16"}) is None


# ------------------------------------------------------------------ gauges as the session moves


def test_state_and_rung_gauges_follow_the_session(
    demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """mnn_guard_state has exactly one state at 1 and mnn_guard_rung one rung, as they change."""

    def ones(name: str, label: str) -> list[str]:
        return [
            s.labels[label]
            for m in registry.collect()
            for s in m.samples
            if s.name == name and s.labels["session"] == "p" and s.value == 1
        ]

    clock = FakeClock()
    s = plan_session(Plan("bad", "clean"), demo_probe, clock, registry=registry)
    assert (ones("mnn_guard_state", "state"), ones("mnn_guard_rung", "rung")) == (
        ["serving"],
        ["dynamic"],
    )
    clock.advance(301)
    assert s.maintain() == [Action.PROMOTE]
    assert (ones("mnn_guard_state", "state"), ones("mnn_guard_rung", "rung")) == (
        ["serving"],
        ["static"],
    )
    assert sample(registry, "mnn_guard_healthy", "p") == 1.0
    s.close()


def test_failing_recheck_is_counted_and_sets_the_snr_gauge(
    demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """A failing re-check counts canary_checks{result=fail} and sets the SNR gauge to its SNR."""
    faulty = FaultyFactory(
        demo.demo_factory(threads=1),
        fault=Fault.NOISE,
        schedule=[True],
        degrade_after=CANARY_FORWARDS,
    )
    gauges = GaugeAtEvent(registry)
    s = plan_session(faulty, demo_probe, FakeClock(), registry=registry, listeners=[gauges])
    assert s.maintain(force_recheck=True) == ["recheck"]
    (check,) = [g for g in gauges.seen if g[0] == "check"]
    assert check[1] == "fail" and check[2] is not None and 20 < check[2] < 45
    assert check[3] == check[2]
    counts = {
        r: sample(registry, "mnn_guard_canary_checks_total", "p", rung="static", result=r)
        for r in ("pass", "fail")
    }
    assert counts == {"pass": 2.0, "fail": 1.0}  # the first init, the re-check, the replacement
    assert sample(registry, "mnn_guard_recoveries_total", "p", action="reinit") == 1.0
    assert sample(registry, "mnn_guard_inits_total", "p", rung="static") == 2.0
    s.close()


def test_timeout_sets_the_snr_gauge_to_minus_infinity(
    demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """An init that times out counts canary_checks{result=timeout} and reads -inf dB."""
    faulty = FaultyFactory(
        demo.demo_factory(threads=1),
        fault=Fault.HANG,
        schedule=[True],
        affects="all",
        hang_seconds=6.0,
    )
    gauges = GaugeAtEvent(registry)
    s = plan_session(
        faulty,
        demo_probe,
        FakeClock(),
        registry=registry,
        listeners=[gauges],
        init_timeout=1.5,  # the hung init's bound; a clean one takes far less, even under load
        reinit_attempts=1,
    )
    hung = [t for t in threading.enumerate() if t.name == "mnn-guard-init"]
    assert hung and all(t.daemon for t in hung)  # a hung init never blocks the process's exit
    assert gauges.seen[0] == ("attempt", "timeout", None, -math.inf)
    timed_out = s.status.history[0]
    assert str(timed_out.error) == (
        "init + canary of session 'p' on rung 'static' did not finish within 1.5 s "
        "(Policy.init_timeout)"
    )
    assert (timed_out.notes, timed_out.turned_static, timed_out.outputs) == ((), False, {})
    assert 0.3 <= timed_out.seconds < 30
    assert gauges.seen[1][1] == "pass" and gauges.seen[1][3] == gauges.seen[1][2]
    assert (
        sample(registry, "mnn_guard_canary_checks_total", "p", rung="static", result="timeout") == 1
    )
    s.close()


def test_a_dynamic_rung_mnn_loads_statically_is_flagged(
    converted: dict[str, Any], registry: CollectorRegistry
) -> None:
    """rung_loaded_static is 1 for a control-flow model's dynamic rung only."""
    import warnings

    from test_real_models import cf_factory, cf_inputs

    probe = probes.record(cf_factory(converted), cf_inputs())
    faulty = FaultyFactory(cf_factory(converted), fault=Fault.RAISE, schedule=[True])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", guard.mnn.DynamicIgnoredWarning)
        s = guard.wrap(
            faulty, probe, name="p", registry=registry,
            policy=guard.Policy(background=False, reinit_attempts=0),
        )  # fmt: skip
    assert [a.outcome.value for a in s.status.history] == ["error", "pass"]
    loaded = {
        r: sample(registry, "mnn_guard_rung_loaded_static", "p", rung=r)
        for r in ("static", "dynamic")
    }
    assert loaded == {"static": 0.0, "dynamic": 1.0}
    assert any(mnn.STATIC_LOAD_NOTE in n for n in s.status.history[-1].notes)
    said = s.status.describe()
    assert said.startswith(f"serving on rung 'dynamic' (1) [{guard.ladder.STATIC_LOAD}] after 2 ")
    s.close()


def test_an_older_session_of_the_same_name_cannot_touch_the_newer_ones_gauges(
    demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """An older session of the same name, publishing or closing, leaves the newer one's series."""
    clock = FakeClock()
    older = plan_session(Plan("clean"), demo_probe, clock, registry=registry)
    newer = guard.wrap(
        Plan("bad"),
        demo_probe,
        name="p",
        registry=registry,
        raise_exhausted=False,
        policy=guard.Policy(background=False, reinit_attempts=0),
    )
    assert sample(registry, "mnn_guard_healthy", "p") == 0.0
    assert older.maintain(force_recheck=True) == ["recheck"]  # publishes CHECKING, SERVING
    assert sample(registry, "mnn_guard_healthy", "p") == 0.0
    assert sample(registry, "mnn_guard_state", "p", state="failed") == 1.0
    older.close()
    assert sample(registry, "mnn_guard_state", "p", state="failed") == 1.0
    assert sample(registry, "mnn_guard_healthy", "p") == 0.0
    newer.close()
    assert sample(registry, "mnn_guard_state", "p", state="failed") is None


def test_closing_in_multiprocess_mode_turns_gauges_to_nan(
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
) -> None:
    """Where series cannot be removed (multiprocess files), closing makes every gauge NaN."""
    s = plan_session(Plan("clean"), demo_probe, FakeClock(), registry=registry)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    s.close()
    gauges = [
        sample(registry, "mnn_guard_healthy", "p"),
        sample(registry, "mnn_guard_canary_snr_db", "p"),
        *(sample(registry, "mnn_guard_rung", "p", rung=r) for r in ("static", "dynamic")),
        *(
            sample(registry, "mnn_guard_rung_loaded_static", "p", rung=r)
            for r in ("static", "dynamic")
        ),
        *(sample(registry, "mnn_guard_state", "p", state=x.value) for x in guard.State),
    ]
    assert len(gauges) == 12 and all(math.isnan(g) for g in gauges), gauges
    assert sample(registry, "mnn_guard_inits_total", "p", rung="static") == 1.0  # counters stay


def test_lowercase_multiprocess_variable_counts_too(
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
) -> None:
    """Lowercase prometheus_multiproc_dir counts too: closing leaves NaN gauges, info included."""
    s = plan_session(Plan("clean"), demo_probe, FakeClock(), registry=registry)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setenv("prometheus_multiproc_dir", str(tmp_path))
    s.close()
    (info,) = [
        x.value
        for m in registry.collect()
        for x in m.samples
        if x.name == "mnn_guard_session_info" and x.labels["session"] == "p"
    ]
    assert math.isnan(info) and math.isnan(sample(registry, "mnn_guard_healthy", "p"))


# ------------------------------------------------------------------ histograms and buckets


def test_run_seconds_are_the_calls_own(
    demo_probe: probes.Probe, registry: CollectorRegistry, mel: Array
) -> None:
    """run_seconds observes each call's own duration (milliseconds here, not the clock's time)."""
    s = plan_session(Plan("clean"), demo_probe, FakeClock(), registry=registry)
    for _ in range(3):
        s.run({"mel": mel})
    total = sample(registry, "mnn_guard_run_seconds_sum", "p", rung="static")
    assert 0 < total < 5
    assert sample(registry, "mnn_guard_run_seconds_bucket", "p", rung="static", le="5.0") == 3
    s.close()


def test_buckets_reach_the_histograms_and_must_be_positive(
    demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """Custom bounds are the histograms' le labels (run and init); a bound of 0 is refused."""
    with pytest.raises(guard.ConfigError, match=r"Buckets\.init"):
        guard.metrics.Buckets(init=(0.0, 1.0))
    buckets = guard.metrics.Buckets(run=(0.001, 0.01), init=(0.5, 600.0))
    guard.wrap(
        demo.demo_factory(threads=1), demo_probe, name="b", registry=registry, buckets=buckets,
        policy=guard.Policy(background=False),
    ).close()  # fmt: skip
    guard.metrics.PrometheusListener("h", guard.Policy().ladder, registry=registry)
    bounds = {
        name: sorted(
            float(x.labels["le"])
            for m in registry.collect()
            for x in m.samples
            if x.name == f"{name}_bucket"
            and x.labels["session"] == "h"
            and x.labels["rung"] == "static"
        )
        for name in ("mnn_guard_run_seconds", "mnn_guard_init_seconds")
    }
    assert bounds == {
        "mnn_guard_run_seconds": [0.001, 0.01, math.inf],
        "mnn_guard_init_seconds": [0.5, 600.0, math.inf],
    }


def test_the_same_buckets_may_be_passed_again(
    demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """A second session passing the registry's own buckets again is accepted."""
    buckets = guard.metrics.Buckets(run=(0.001, 0.01))
    for name in ("a", "b"):
        guard.wrap(
            demo.demo_factory(threads=1), demo_probe, name=name, registry=registry,
            buckets=buckets, policy=guard.Policy(background=False),
        ).close()  # fmt: skip
    assert guard.metrics.metrics_for(registry).buckets == buckets
    with pytest.raises(guard.ConfigError) as info:
        guard.metrics.metrics_for(registry, guard.metrics.Buckets(run=(0.5,)))
    assert str(info.value).endswith("; buckets are set once per registry, by its first session")


def _seen(table: guard.health.HealthTable, registry: CollectorRegistry) -> tuple[Any, ...]:
    """What readiness and the gauges say of name "v": (ready, state, sessions, healthy gauge,
    failed gauge, serving gauge)."""
    ready, details = table.readiness()
    (entry,) = details if details else ({"state": None},)
    return (
        ready,
        entry["state"],
        entry.get("sessions", 1),
        sample(registry, "mnn_guard_healthy", "v"),
        sample(registry, "mnn_guard_state", "v", state="failed"),
        sample(registry, "mnn_guard_state", "v", state="serving"),
    )


@pytest.mark.parametrize("failed_first", [True, False], ids=["failed-first", "healthy-first"])
def test_two_live_sessions_of_a_name_show_the_worst_until_each_is_closed(
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
    failed_first: bool,
) -> None:
    """A FAILED v and a healthy v, built in either order: readiness and the gauges show FAILED
    (not ready, healthy 0) while both live and while the FAILED one lives alone; the second
    wrap warns of the duplicate; the name goes only when both are closed."""
    table = guard.health.HealthTable()
    kw: dict[str, Any] = {"name": "v", "registry": registry, "health": table, "policy": QUIET}
    faulty = FaultyFactory(demo_factory, fault="noise", rate=1.0, affects="all")

    def build_failed() -> guard.GuardedSession:
        return guard.wrap(faulty, demo_probe, raise_exhausted=False, **kw)

    def build_healthy() -> guard.GuardedSession:
        return guard.wrap(demo_factory, demo_probe, **kw)

    builders = (build_failed, build_healthy) if failed_first else (build_healthy, build_failed)
    first = builders[0]()
    caplog.clear()
    second = builders[1]()
    failed, healthy = (first, second) if failed_first else (second, first)
    assert failed.status.state is guard.State.FAILED and healthy.status.healthy
    assert any("a live session or pool of this name exists" in m for m in caplog.messages)
    both = _seen(table, registry)
    healthy.close()
    alone = _seen(table, registry)
    with pytest.raises(guard.RecoveryExhausted):
        failed.run({"mel": np.zeros((1, 80, 8), np.float32)})
    failed.close()
    assert (both, alone, _seen(table, registry)) == (
        (False, "failed", 2, 0.0, 1.0, 0.0),
        (False, "failed", 1, 0.0, 1.0, 0.0),
        (False, None, 1, None, None, None),
    )


def test_two_healthy_sessions_of_a_name_are_ready_until_one_fails(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """Two healthy sessions of a name: ready, healthy 1; one turning FAILED makes the name
    unhealthy whichever of them it is (listeners driven by hand)."""
    ladder = guard.Policy().ladder
    table = guard.health.HealthTable()
    older, newer = (guard.metrics.PrometheusListener("v", ladder, registry=registry) for _ in "ab")
    health = [guard.health.HealthListener(table) for _ in "ab"]
    for metrics, listener in zip((older, newer), health, strict=True):
        for target in (metrics, listener):
            target.on_status("v", _status(guard.State.SERVING))
    served = _seen(table, registry)
    for target in (older, health[0]):
        target.on_status("v", _status(guard.State.FAILED))
    assert (served, _seen(table, registry)) == (
        (True, "serving", 2, 1.0, 0.0, 1.0),
        (False, "failed", 2, 0.0, 1.0, 0.0),
    )


def test_a_session_whose_wrap_raised_shows_until_another_of_its_name_starts(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """wrap() raised RecoveryExhausted: no session to close, so the name stays FAILED in the
    gauges and readiness until a new session of the name starts, which then shows alone."""
    table = guard.health.HealthTable()
    kw: dict[str, Any] = {"name": "v", "registry": registry, "health": table, "policy": QUIET}
    faulty = FaultyFactory(demo_factory, fault="noise", rate=1.0, affects="all")
    with pytest.raises(guard.RecoveryExhausted):
        guard.wrap(faulty, demo_probe, **kw)
    abandoned = _seen(table, registry)
    with guard.wrap(demo_factory, demo_probe, **kw):
        replaced = _seen(table, registry)
    assert (abandoned, replaced) == (
        (False, "failed", 1, 0.0, 1.0, 0.0),
        (True, "serving", 1, 1.0, 0.0, 1.0),
    )


def test_a_session_name_is_a_str_of_at_most_128_characters(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """A 10,000-character name (a 1.6 MB exposition) or a non-str one is refused before any
    init, saying the limit; 128 characters label every series."""
    for name, match in (("v" * 10_000, "at most 128 characters .* of 10000"), (None, "a str")):
        with pytest.raises(guard.ConfigError, match=match):
            guard.wrap(demo_factory, demo_probe, name=name, registry=registry)  # type: ignore[arg-type]
    assert registry.get_sample_value("mnn_guard_inits_total", {"session": "v" * 10_000}) is None
    longest = "v" * 128
    with guard.wrap(demo_factory, demo_probe, name=longest, registry=registry, policy=QUIET):
        assert sample(registry, "mnn_guard_healthy", longest) == 1.0


class SnrAtCheck(guard.Listener):
    """Reads the SNR gauge right after the Prometheus listener took a re-check's result."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.seen: list[float] = []

    def on_check(self, session: str, attempt: Any) -> None:
        self.seen.append(sample(self.registry, "mnn_guard_canary_snr_db"))


def test_a_non_finite_canary_output_is_the_worst_snr(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """A canary whose output is NaN, at init and at a re-check (a module that turns NaN after
    its 4 canary forwards): the SNR gauge reads -Inf, the worst value, never a finite score."""
    policy = guard.Policy(
        background=False, promote_after=None, reinit_attempts=0, ladder=(guard.STATIC,)
    )
    nan = FaultyFactory(demo_factory, fault="nan", rate=1.0, affects="all")
    with guard.wrap(
        nan, demo_probe, name="vocoder", registry=registry, policy=policy, raise_exhausted=False
    ) as s:
        at_init = (s.status.state, sample(registry, "mnn_guard_canary_snr_db"))
    turning = FaultyFactory(
        demo_factory, fault="nan", schedule=[True], affects="all", degrade_after=4
    )
    checks = SnrAtCheck(registry)
    with guard.wrap(
        turning, demo_probe, name="vocoder", registry=registry, policy=policy,
        listeners=[checks],
    ) as s:  # fmt: skip
        passed = sample(registry, "mnn_guard_canary_snr_db")
        assert s.maintain(force_recheck=True) == ["recheck"]
        replaced = (s.status.state, sample(registry, "mnn_guard_canary_snr_db"))
    assert at_init == (guard.State.FAILED, -math.inf)
    assert passed > 45.0 and checks.seen == [-math.inf]
    assert replaced[0] is guard.State.SERVING and replaced[1] > 45.0


class AtStatus(guard.Listener):
    """At each status (after the health and Prometheus listeners took it): the state, the
    healthy gauge, the state gauge of that state, and readiness."""

    def __init__(self, registry: CollectorRegistry, table: guard.health.HealthTable) -> None:
        self.registry = registry
        self.table = table
        self.seen: list[tuple[str, Any, Any, bool]] = []

    def on_status(self, session: str, status: guard.SessionStatus) -> None:
        state = status.state.value
        self.seen.append(
            (
                state,
                sample(self.registry, "mnn_guard_healthy"),
                sample(self.registry, "mnn_guard_state", state=state),
                self.table.readiness()[0],
            )
        )


def test_a_passing_recheck_keeps_the_session_healthy_while_it_runs(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """The module serves while CHECKING: healthy 1, state checking 1 and ready throughout a
    passing re-check, as before and after it."""
    table = guard.health.HealthTable()
    seen = AtStatus(registry, table)
    with guard.wrap(
        demo_factory, demo_probe, name="vocoder", registry=registry, health=table,
        policy=QUIET, listeners=[seen],
    ) as s:  # fmt: skip
        seen.seen.clear()
        assert s.maintain(force_recheck=True) == ["recheck"]
    assert seen.seen == [("checking", 1.0, 1.0, True), ("serving", 1.0, 1.0, True)]


# ------------------------------------------------------------ multiprocess mode's flushed tallies
# (the class that writes run() counts to prometheus_client's files, used in-process here: the
# metrics it writes to are ordinary ones on a private registry)

BOUNDS = (0.001, 0.01)


def flushed_pair(registry: CollectorRegistry) -> tuple[Any, Any, Any]:
    """A counter and histogram as multiprocess mode writes them, and a twin histogram."""
    from prometheus_client import Counter, Histogram

    counter = Counter("w_runs", "runs", ["session", "rung", "result"], registry=registry)
    histogram = Histogram("w_secs", "secs", ["session", "rung"], registry=registry, buckets=BOUNDS)
    twin = Histogram("t_secs", "secs", ["session", "rung"], registry=registry, buckets=BOUNDS)
    return counter, histogram, twin


def histogram_samples(registry: CollectorRegistry, name: str) -> dict[str, float]:
    """A histogram's buckets, count and sum, by sample suffix and bound."""
    return {
        f"{s.name[len(name):]}{s.labels.get('le', '')}": s.value
        for m in registry.collect() if m.name == name for s in m.samples
        if not s.name.endswith("_created")
    }  # fmt: skip


def test_flushed_runs_start_every_series_at_zero_and_write_only_what_was_added() -> None:
    """add_rung makes every result's counter and the histogram exist at 0; a flush writes the
    calls since the last flush (as many inc/observe calls would), a flush of nothing adds
    nothing, and the histogram matches one fed each duration directly."""
    from guard import metrics

    registry = CollectorRegistry()
    counter, histogram, twin = flushed_pair(registry)
    runs = metrics._FlushedRuns((counter, histogram), "s", BOUNDS)
    runs.add_rung("static")
    value = registry.get_sample_value
    for result in metrics.Call:
        assert value("w_runs_total", {"session": "s", "rung": "static", "result": result}) == 0
    assert value("w_secs_count", {"session": "s", "rung": "static"}) == 0
    rounds = [[0.0005, 0.005, 0.05], [0.002], [], [0.0], [0.0001, 0.3]]  # 0.0: buckets alone grow
    for durations in rounds:
        for seconds in durations:
            runs.tally.add("static", metrics.CALL_OK, seconds)
            twin.labels("s", "static").observe(seconds)
        runs.tally.add("static", metrics.Call.ERROR, 0.0)
        runs.flush()
        assert histogram_samples(registry, "w_secs") == histogram_samples(registry, "t_secs")
        ok = sum(len(r) for r in rounds[: rounds.index(durations) + 1])
        errors = rounds.index(durations) + 1
        labels = {"session": "s", "rung": "static"}
        assert value("w_runs_total", {**labels, "result": "ok"}) == ok
        assert value("w_runs_total", {**labels, "result": "error"}) == errors
        assert value("w_runs_total", {**labels, "result": "invalid"}) == 0
        runs.flush()  # nothing new: nothing written
        assert value("w_runs_total", {**labels, "result": "error"}) == errors
        assert histogram_samples(registry, "w_secs") == histogram_samples(registry, "t_secs")


def test_a_flushed_call_after_a_quiet_spell_is_written_at_once_then_waits_for_the_next() -> None:
    """The first call after FLUSH_SECONDS without a flush is written at once (dirty cleared);
    the next ones wait, marked dirty, for the flusher or the next due time."""
    from guard import metrics

    registry = CollectorRegistry()
    counter, histogram, _ = flushed_pair(registry)
    runs = metrics._FlushedRuns((counter, histogram), "q", BOUNDS)
    runs.add_rung("static")
    assert not runs.dirty and runs.due == 0.0
    runs.add("static", metrics.CALL_OK, 0.002)
    labels = {"session": "q", "rung": "static", "result": "ok"}
    assert registry.get_sample_value("w_runs_total", labels) == 1 and not runs.dirty
    assert runs.due > time.monotonic() + metrics.FLUSH_SECONDS / 2  # the next wait starts
    runs.add("static", metrics.CALL_OK, 0.002)
    assert registry.get_sample_value("w_runs_total", labels) == 1 and runs.dirty
    runs.due = time.monotonic()  # due now: the next call writes both
    runs.add("static", metrics.CALL_OK, 0.002)
    assert registry.get_sample_value("w_runs_total", labels) == 3 and not runs.dirty


def test_the_flusher_thread_writes_pending_tallies_and_flush_all_writes_the_rest() -> None:
    """A flusher starts one daemon thread named mnn-guard-metrics-flush, which writes a tally
    with calls pending within a few FLUSH_SECONDS; flush(pending_only=True) skips clean ones,
    flush() writes every one."""
    from guard import metrics

    registry = CollectorRegistry()
    counter, histogram, _ = flushed_pair(registry)
    flusher = metrics._Flusher()
    runs = metrics._FlushedRuns((counter, histogram), "f", BOUNDS)  # watched by the global one
    flusher.watch(runs)
    thread = flusher.thread
    assert thread is not None and thread.daemon and thread.name == "mnn-guard-metrics-flush"
    flusher.watch(runs)
    assert flusher.thread is thread  # one thread per flusher
    runs.add_rung("static")
    runs.due = math.inf  # no call writes itself: only a flush does
    runs.tally.add("static", metrics.CALL_OK, 0.002)
    labels = {"session": "f", "rung": "static", "result": "ok"}
    flusher.flush(pending_only=True)  # not dirty (tally.add alone): nothing written
    assert registry.get_sample_value("w_runs_total", labels) == 0
    flusher.flush()
    assert registry.get_sample_value("w_runs_total", labels) == 1
    runs.add("static", metrics.CALL_OK, 0.002)  # dirty now
    assert runs.dirty
    until(
        "the flusher thread's write", lambda: registry.get_sample_value("w_runs_total", labels) == 2
    )
    assert not runs.dirty


# ------------------------------------------------------------ events the tests above reach only
# from threads or processes mutmut cannot follow: the listener and the run counts, directly


def test_a_standby_listener_goes_live_once(registry: CollectorRegistry) -> None:
    """go_live() twice joins the name once: closing the listener then leaves no series of it."""
    ladder = guard.Policy().ladder
    standby = guard.metrics.PrometheusListener(
        "v", ladder, registry=registry, info=("g", "m", "b"), standby=True
    )
    standby.on_status("v", _status(guard.State.SERVING))
    standby.go_live()
    standby.go_live()
    assert sample(registry, "mnn_guard_healthy", "v") == 1.0
    standby.on_close("v")
    assert sample(registry, "mnn_guard_healthy", "v") is None and _hashes(registry) == set()


def test_a_recheck_leaves_how_mnn_loaded_the_rung_as_the_init_said(
    registry: CollectorRegistry,
) -> None:
    """mnn_guard_rung_loaded_static comes from the init (the load); a re-check of the same
    module, which loads nothing, counts its canary check and leaves that gauge alone."""
    from guard.ladder import Attempt, Outcome

    ladder = guard.Policy().ladder
    listener = guard.metrics.PrometheusListener("v", ladder, registry=registry)
    dynamic = ladder[1]
    verdict = probes.Verdict(True, {}, ())
    init = Attempt(dynamic, 1, Outcome.PASS, verdict, None, 0.1, turned_static=True)
    listener.on_attempt("v", init)
    listener.on_status("v", dataclasses.replace(_status(guard.State.SERVING), rung=dynamic))
    assert sample(registry, "mnn_guard_rung_loaded_static", "v", rung="dynamic") == 1.0
    listener.on_check("v", Attempt(dynamic, 1, Outcome.PASS, verdict, None, 0.01))
    assert sample(registry, "mnn_guard_rung_loaded_static", "v", rung="dynamic") == 1.0
    labels = {"rung": "dynamic", "result": "pass"}
    assert sample(registry, "mnn_guard_canary_checks_total", "v", **labels) == 2.0


def test_shadow_checks_are_counted_by_result_and_set_the_worst_snr(
    registry: CollectorRegistry,
) -> None:
    """on_shadow counts each result; a judged check sets the shadow SNR gauge to the module's
    worst so far, a dropped sample leaves it."""
    from guard.shadow import ShadowCheck, ShadowResult

    ladder = guard.Policy().ladder
    listener = guard.metrics.PrometheusListener("v", ladder, registry=registry, shadow=True)
    listener.on_status("v", _status(guard.State.SERVING))
    assert sample(registry, "mnn_guard_shadow_snr_db", "v") == math.inf
    listener.on_shadow("v", ShadowCheck(ShadowResult.FAIL, module_worst_db=29.5))
    listener.on_shadow("v", ShadowCheck(ShadowResult.DROPPED))
    listener.on_shadow("v", ShadowCheck(ShadowResult.DROPPED))
    counts = {
        r.value: sample(registry, "mnn_guard_shadow_checks_total", "v", result=r.value)
        for r in ShadowResult
    }
    assert counts == {"pass": 0.0, "fail": 1.0, "dropped": 2.0}
    assert sample(registry, "mnn_guard_shadow_snr_db", "v") == 29.5


class RecordingSink:
    """A sink that keeps what it was told, as (what, family, labels[, value])."""

    def __init__(self) -> None:
        self.said: list[tuple[Any, ...]] = []

    def declare(self, family: Any, labels: tuple[str, ...]) -> None:
        self.said.append(("declare", family.name, labels))

    def inc(self, family: Any, labels: tuple[str, ...]) -> None:
        self.said.append(("inc", family.name, labels))

    def observe(self, family: Any, labels: tuple[str, ...], value: float) -> None:
        self.said.append(("observe", family.name, labels, value))


def test_run_counts_on_a_plain_sink_are_counter_and_histogram_calls() -> None:
    """FamilyRuns (the Ray sink's run counts): a rung's series declared for every result and
    its duration; each call counted by result, a served one observed with its seconds."""
    from guard.listeners import CALL_OK, Call
    from guard.sinks import FamilyRuns

    sink = RecordingSink()
    runs = FamilyRuns(sink, "v")  # type: ignore[arg-type]
    runs.add_rung("static")
    declared = {x[2] for x in sink.said if x[0] == "declare"}
    assert declared == {("v", "static")} | {("v", "static", c.value) for c in Call}
    assert {x[1] for x in sink.said} == {"mnn_guard_run_seconds", "mnn_guard_runs"}
    sink.said.clear()
    runs.add("static", CALL_OK, 0.25)
    runs.add("static", Call.INVALID, 0.5)
    assert sink.said == [
        ("inc", "mnn_guard_runs", ("v", "static", "ok")),
        ("observe", "mnn_guard_run_seconds", ("v", "static"), 0.25),
        ("inc", "mnn_guard_runs", ("v", "static", "invalid")),
    ]


def _shadow_status(worst: float) -> Any:
    """A status of session v, serving, whose shadow's worst SNR is `worst`."""
    from guard.shadow import Reference, ShadowStatus

    shadow = ShadowStatus(
        every=1, reference=Reference.DYNAMIC, checks=1, failed=0, dropped=0, worst_snr_db=worst
    )
    return dataclasses.replace(_status(guard.State.SERVING), shadow=shadow)


def test_shadow_series_exist_only_for_a_shadowed_session_and_follow_its_status(
    registry: CollectorRegistry,
) -> None:
    """A listener made without `shadow` has no shadow series, even when a status names one; a
    shadowed one shows the status's worst shadow SNR."""
    ladder = guard.Policy().ladder
    plain = guard.metrics.PrometheusListener("p", ladder, registry=registry)
    plain.on_status("p", dataclasses.replace(_shadow_status(25.0), name="p"))
    assert sample(registry, "mnn_guard_shadow_snr_db", "p") is None
    assert sample(registry, "mnn_guard_shadow_checks_total", "p", result="fail") is None
    shadowed = guard.metrics.PrometheusListener("v", ladder, registry=registry, shadow=True)
    shadowed.on_status("v", _shadow_status(25.0))
    assert sample(registry, "mnn_guard_shadow_snr_db", "v") == 25.0
    shadowed.on_status("v", _status(guard.State.SERVING))  # no shadow in it: the gauge stays
    assert sample(registry, "mnn_guard_shadow_snr_db", "v") == 25.0


def test_a_name_keeps_its_snr_gauges_while_a_live_session_of_it_has_them(
    registry: CollectorRegistry,
) -> None:
    """Two sessions of one name: closing the one that judged leaves the canary and shadow SNR
    gauges while the other has values of its own, and drops them when the other has none."""
    from guard.ladder import Attempt, Outcome

    ladder = guard.Policy().ladder
    verdict = probes.Verdict(True, {}, ())
    attempt = Attempt(ladder[0], 0, Outcome.PASS, verdict, None, 0.1)

    def listener(judged: bool) -> Any:
        made = guard.metrics.PrometheusListener("v", ladder, registry=registry, shadow=judged)
        if judged:
            made.on_attempt("v", attempt)
            made.on_status("v", _shadow_status(25.0))
        else:
            made.on_status("v", _status(guard.State.SERVING))
        return made

    first, second = listener(True), listener(True)
    first.on_close("v")
    assert sample(registry, "mnn_guard_canary_snr_db", "v") is not None
    assert sample(registry, "mnn_guard_shadow_snr_db", "v") == 25.0
    second.on_close("v")
    first, second = listener(True), listener(False)
    first.on_close("v")
    assert sample(registry, "mnn_guard_canary_snr_db", "v") is None
    assert sample(registry, "mnn_guard_shadow_snr_db", "v") is None
    assert sample(registry, "mnn_guard_healthy", "v") == 1.0  # the other still shows
    second.on_close("v")
    second.on_close("v")  # a second close changes nothing and raises nothing
    assert sample(registry, "mnn_guard_healthy", "v") is None


def test_a_closed_standby_listener_never_goes_live(registry: CollectorRegistry) -> None:
    """A hot swap's standby session closed before it went live publishes nothing after."""
    ladder = guard.Policy().ladder
    standby = guard.metrics.PrometheusListener("v", ladder, registry=registry, standby=True)
    standby.on_status("v", _status(guard.State.SERVING))
    standby.on_close("v")
    standby.go_live()
    assert sample(registry, "mnn_guard_healthy", "v") is None


def test_a_dropped_gauge_set_again_is_shown_again(registry: CollectorRegistry) -> None:
    """The sink forgets a dropped series' child: setting the series again makes it anew."""
    from guard.families import HEALTHY

    sink = guard.metrics.metrics_for(registry)
    sink.set(HEALTHY, ("d",), 1)
    sink.drop(HEALTHY, ("d",))
    assert sample(registry, "mnn_guard_healthy", "d") is None
    sink.set(HEALTHY, ("d",), 0)
    assert sample(registry, "mnn_guard_healthy", "d") == 0.0


def test_a_scrape_in_multiprocess_mode_sees_every_session_of_a_names_calls(
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
) -> None:
    """Two live sessions of one name in multiprocess mode share its run tally: a scrape in this
    process writes the older session's pending calls too (docs/ops.md: at most FLUSH_SECONDS
    behind, none behind when the process serves the scrape)."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    tiny = {"mel": demo.demo_mel(8)}
    ok = {"rung": "static", "result": "ok"}
    with (
        guard.wrap(demo_factory, demo_probe, name="mp", registry=registry, policy=QUIET) as older,
        guard.wrap(demo_factory, demo_probe, name="mp", registry=registry, policy=QUIET),
    ):
        older.run(tiny)  # the first call after a quiet spell is written at once
        older.run(tiny)  # the second waits for the flusher, or for a scrape
        assert sample(registry, "mnn_guard_runs_total", "mp", **ok) == 2


def test_a_metrics_listener_made_with_defaults_is_live_at_once_and_unshadowed(
    registry: CollectorRegistry,
) -> None:
    """MetricsListener's defaults: it joins its name's live sessions when made (no go_live()),
    and has no shadow series (a session without Policy.shadow_every)."""
    from guard.sinks import MetricsListener

    listener = MetricsListener("d", guard.Policy().ladder, guard.metrics.metrics_for(registry))
    listener.on_status("d", dataclasses.replace(_status(guard.State.SERVING), name="d"))
    assert sample(registry, "mnn_guard_healthy", "d") == 1.0
    assert sample(registry, "mnn_guard_shadow_snr_db", "d") is None
    assert sample(registry, "mnn_guard_shadow_checks_total", "d", result="pass") is None


def test_of_two_starting_sessions_of_a_name_the_one_on_a_slower_rung_shows(
    registry: CollectorRegistry,
) -> None:
    """The name's gauges show its worst live session: of two starting ones, one with no status
    yet and one already on the second rung, the one on the slower rung."""
    ladder = guard.Policy().ladder
    guard.metrics.PrometheusListener("v", ladder, registry=registry)  # says nothing yet
    later = guard.metrics.PrometheusListener("v", ladder, registry=registry)
    starting = _status(guard.State.STARTING)
    later.on_status("v", dataclasses.replace(starting, rung=ladder[1], rung_index=1))
    assert sample(registry, "mnn_guard_rung_index", "v") == 1.0
    assert sample(registry, "mnn_guard_state", "v", state="starting") == 1.0
    assert on_rung(registry, "v") == ladder[1].name


@pytest.mark.parametrize("shadowed", [True, False], ids=["shadowed", "unshadowed"])
def test_closing_in_multiprocess_mode_turns_the_shadow_gauge_nan_only_where_it_was_shown(
    shadowed: bool, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """Closing in multiprocess mode makes a shadowed session's shadow SNR gauge NaN and gives a
    session without shadow checks no shadow series at all."""
    listener = guard.metrics.PrometheusListener(
        "v", guard.Policy().ladder, registry=registry, shadow=shadowed
    )
    listener.on_status("v", _shadow_status(25.0))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    listener.on_close("v")
    shown = sample(registry, "mnn_guard_shadow_snr_db", "v")
    assert math.isnan(shown) if shadowed else shown is None


def test_closing_one_of_two_sessions_in_multiprocess_mode_adds_no_snr_series_they_lacked(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """Two sessions of a name without shadow checks or a canary judgement yet: closing one in
    multiprocess mode leaves the name with no canary or shadow SNR series (not even NaN)."""
    ladder = guard.Policy().ladder
    first, second = (
        guard.metrics.PrometheusListener("v", ladder, registry=registry) for _ in range(2)
    )
    for listener in (first, second):
        listener.on_status("v", _status(guard.State.SERVING))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    first.on_close("v")
    assert sample(registry, "mnn_guard_healthy", "v") == 1.0  # the other still shows
    assert sample(registry, "mnn_guard_canary_snr_db", "v") is None
    assert sample(registry, "mnn_guard_shadow_snr_db", "v") is None
