"""Prometheus metrics of guarded sessions, asserted on a fresh registry per test."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

import guard
import probes
from guard.testing import FaultyFactory

QUIET = guard.Policy(background=False)
ONE_REINIT = guard.Policy(reinit_attempts=1, background=False)


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


def test_closing_an_older_session_keeps_the_newer_ones_series(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """Two sessions of one name: closing the older one leaves the newer one's series."""
    older = guard.wrap(demo_factory, demo_probe, name="vocoder", registry=registry, policy=QUIET)
    with guard.wrap(demo_factory, demo_probe, name="vocoder", registry=registry, policy=QUIET):
        older.close()
        assert sample(registry, "mnn_guard_healthy") == 1.0


def test_every_series_starts_at_zero(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """Each rung x result, each action and each call result exists from the start, at 0."""
    with guard.wrap(demo_factory, demo_probe, name="vocoder", registry=registry, policy=QUIET):
        zeros = [
            canary(registry, rung, result)
            for rung in ("dynamic",)
            for result in ("pass", "fail", "error", "timeout")
        ]
        zeros += [
            sample(registry, "mnn_guard_recoveries_total", action=a)
            for a in ("reinit", "fallback", "promote")
        ]
        zeros += [
            sample(registry, "mnn_guard_runs_total", rung=r, result=c)
            for r in ("static", "dynamic")
            for c in ("ok", "error", "invalid", "unavailable", "failed", "closed")
        ]
    assert zeros == [0.0] * len(zeros)


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


def test_a_newer_session_of_another_model_takes_the_name_over(registry: CollectorRegistry) -> None:
    """A newer session of a name built from another model owns its gauges: the older one's info
    series goes at once, and closing the older one later leaves the newer one's series."""
    ladder = guard.Policy().ladder
    older = guard.metrics.PrometheusListener("v", ladder, registry=registry, info=("g", "m", "a"))
    guard.metrics.PrometheusListener("v", ladder, registry=registry, info=("g", "m", "b"))
    taken = _hashes(registry)
    older.on_close("v")
    assert (taken, _hashes(registry), sample(registry, "mnn_guard_healthy", "v")) == (
        {"b"},
        {"b"},
        0.0,
    )


def test_a_standby_listener_publishes_its_gauges_only_once_live(
    registry: CollectorRegistry,
) -> None:
    """A standby listener (a hot swap's new session) counts its events but leaves the name's
    gauges to the live one until go_live(), which publishes its latest status."""
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
    after = (_hashes(registry), sample(registry, "mnn_guard_healthy", "v"))
    assert (before, after) == (({"a"}, 1.0), ({"b"}, 1.0))
    assert sample(registry, "mnn_guard_inits_total", "v", rung="static") == 1.0
    assert sample(registry, "mnn_guard_state", "v", state="serving") == 1.0
