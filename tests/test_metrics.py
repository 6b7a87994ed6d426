"""Prometheus metrics of guarded sessions, asserted on a fresh registry per test."""

from __future__ import annotations

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
            "rung": sample(registry, "mnn_guard_rung"),
            "init_seconds": sample(registry, "mnn_guard_init_seconds_count", rung="static"),
        }
    assert observed == {
        "inits": 3.0,
        "fail": 2.0,
        "pass": 1.0,
        "reinit": 2.0,
        "fallback": None,
        "healthy": 1.0,
        "rung": 0.0,
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
    """Every static init degraded: the session ends on rung 1 'dynamic' with one fallback."""
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
            "rung": sample(registry, "mnn_guard_rung"),
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
        "rung": 1.0,
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
        "rung": sample(registry, "mnn_guard_rung"),
        "snr_of_fault": 20.0 < sample(registry, "mnn_guard_canary_snr_db") < 45.0,
    }
    assert observed == {
        "static_fail": 2.0,
        "dynamic_fail": 2.0,
        "static_pass": None,
        "dynamic_pass": None,
        "reinit": 2.0,
        "fallback": 1.0,
        "healthy": 0.0,
        "rung": 1.0,
        "snr_of_fault": True,
    }


def test_runs_are_counted_and_timed(
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
    mel: np.ndarray[Any, Any],
) -> None:
    """Three run() calls: runs_total{result=ok} 3, no error series, 3 run_seconds observations."""
    with guard.wrap(demo_factory, demo_probe, name="vocoder", registry=registry, policy=QUIET) as s:
        for _ in range(3):
            s.run({"mel": mel})
    observed = (
        sample(registry, "mnn_guard_runs_total", rung="static", result="ok"),
        sample(registry, "mnn_guard_runs_total", rung="static", result="error"),
        sample(registry, "mnn_guard_run_seconds_count", rung="static"),
        sample(registry, "mnn_guard_run_seconds_sum", rung="static") > 0,
    )
    assert observed == (3.0, None, 3.0, True)


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


def test_close_sets_healthy_to_zero(
    demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe, registry: CollectorRegistry
) -> None:
    """A closed session is exported as unhealthy."""
    session = guard.wrap(demo_factory, demo_probe, name="vocoder", registry=registry, policy=QUIET)
    session.close()
    assert sample(registry, "mnn_guard_healthy") == 0.0
