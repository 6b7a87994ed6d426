"""The replica core (guard.integrations.replica): build, health check, hot swap, run, HTTP errors,
with the real demo vocoder and a second real model, a fresh registry and health table per test."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import quiet_policy
from prometheus_client import CollectorRegistry

import guard
import probes
from guard import mnn
from guard.errors import SwapRefused
from guard.integrations.replica import PoolBuild, Replica, Spec, http_error
from guard.metrics import metrics_for
from guard.testing import FaultyFactory
from guard.tools import demo
from guard.tools.models import build_vocoder
from probes import store

Array = np.ndarray[Any, Any]
QUIET = quiet_policy(reinit_attempts=0)


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model, probe dir) of a second vocoder (other weights), with its own recorded probe."""
    folder = tmp_path_factory.mktemp("other")
    model = folder / "other.mnn"
    build_vocoder(model, seed=1)
    factory = guard.mnn_factory(model, ["mel"], ["wav"], threads=1)
    probes.record(
        factory, {"mel": demo.demo_mel()}, reference={"dynamic": True},
        dynamic={"mel": {2: (1, 4000)}},
    ).save(folder / "other.probe")  # fmt: skip
    return model, folder / "other.probe"


def clean(model: Path, x: Array) -> Array:
    """The output of a fresh dynamic module of `model`."""
    return mnn.adapt(guard.mnn_factory(model, ["mel"], ["wav"], threads=1)(dynamic=True)).run([x])[
        0
    ]


@pytest.fixture()
def table() -> guard.health.HealthTable:
    """A fresh health table."""
    return guard.health.HealthTable()


@pytest.fixture()
def replica(
    demo_paths: tuple[Path, Path], registry: CollectorRegistry, table: guard.health.HealthTable
) -> Iterator[Replica]:
    """A replica serving the demo vocoder as session "vocoder"."""
    made = Replica(name="vocoder", policy=QUIET, sink=metrics_for(registry), health=table)
    made.configure({"model": str(demo_paths[0]), "probe": str(demo_paths[1])})
    yield made
    made.close()


def healthy(registry: CollectorRegistry) -> Any:
    """mnn_guard_healthy of session vocoder."""
    return registry.get_sample_value("mnn_guard_healthy", {"session": "vocoder"})


def info_hashes(registry: CollectorRegistry) -> set[str]:
    """The model hashes session vocoder's info series carry."""
    return {
        s.labels["model_sha256"]
        for m in registry.collect()
        for s in m.samples
        if s.name == "mnn_guard_session_info" and s.labels["session"] == "vocoder"
    }


def test_swap_serves_the_new_model_and_its_metrics(
    replica: Replica, other: tuple[Path, Path], registry: CollectorRegistry
) -> None:
    """A config naming another model swaps it in: outputs, the info series and health follow
    it, and the old session is closed."""
    x = demo.demo_mel(40, seed=3)
    old = replica.served
    assert replica.configure({"model": str(other[0]), "probe": str(other[1])}) is True
    np.testing.assert_allclose(replica.run({"mel": x})["wav"], clean(other[0], x), atol=1e-5)
    assert old is not None and old.status.closed  # type: ignore[attr-defined]
    assert info_hashes(registry) == {store.file_sha256(other[0])}
    assert healthy(registry) == 1.0


def test_same_config_changes_nothing(replica: Replica, demo_paths: tuple[Path, Path]) -> None:
    """configure() with the config in use builds nothing and returns False."""
    served = replica.served
    config = {"model": str(demo_paths[0]), "probe": str(demo_paths[1])}
    assert (replica.configure(config), replica.served) == (False, served)


@pytest.mark.hostile
def test_a_degraded_new_model_is_refused_and_the_old_one_serves_on(
    replica: Replica,
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
    table: guard.health.HealthTable,
) -> None:
    """A new model whose every init is degraded is refused with the canary's reason; the old
    session serves exact outputs, and its health and gauges never showed the candidate."""
    x = demo.demo_mel(40, seed=4)
    served = replica.served
    seen: list[Any] = []
    faulty = FaultyFactory(demo.demo_factory(threads=1), rate=1.0, affects="all")
    spec = Spec(factory=faulty, probe=demo_probe, name="vocoder", policy=QUIET)
    original = table.record

    def spy(owner: object, status: guard.SessionStatus, detail: Any = None) -> None:
        seen.append(status.state)
        original(owner, status, detail)

    table.record = spy  # type: ignore[method-assign]
    with pytest.raises(SwapRefused, match=r"not swapped in.*RecoveryExhausted.*snr"):
        replica.swap(spec)
    assert replica.served is served
    np.testing.assert_allclose(replica.run({"mel": x})["wav"], clean(Path(demo.DEMO_MODEL), x),
                               atol=1e-5)  # fmt: skip
    assert (seen, table.readiness()[0], healthy(registry)) == ([], True, 1.0)
    assert (
        registry.get_sample_value("mnn_guard_state", {"session": "vocoder", "state": "serving"})
        == 1.0
    )


@pytest.mark.hostile
def test_a_missing_model_is_refused_while_one_serves(replica: Replica, tmp_path: Path) -> None:
    """A config naming a file that is not there raises SwapRefused naming it; nothing changes."""
    served = replica.served
    with pytest.raises(SwapRefused, match=r"nowhere\.mnn"):
        replica.configure({"model": str(tmp_path / "nowhere.mnn"), "probe": str(demo.DEMO_PROBE)})
    assert replica.served is served
    replica.check()


@pytest.mark.hostile
def test_a_missing_model_with_nothing_serving_raises_its_own_error(tmp_path: Path) -> None:
    """With no model yet, a config naming a missing file raises the probe's own error."""
    with pytest.raises(probes.ProbeError, match="no such file"):
        Replica(health=guard.health.HealthTable()).configure(
            {"model": str(tmp_path / "nowhere.mnn"), "probe": str(demo.DEMO_PROBE)}
        )


def test_check_says_why_nothing_serves(
    demo_probe: probes.Probe, registry: CollectorRegistry, table: guard.health.HealthTable
) -> None:
    """check(): Unavailable with no model, RecoveryExhausted (with the canary's reason) for a
    first model whose every init failed, Unavailable once closed."""
    empty = Replica(name="x", sink=metrics_for(registry), health=table)
    with pytest.raises(guard.Unavailable, match="no model"):
        empty.check()
    faulty = FaultyFactory(demo.demo_factory(threads=1), rate=1.0, affects="all")
    bad = Replica(
        Spec(factory=faulty, probe=demo_probe, name="bad", policy=QUIET),
        sink=metrics_for(registry),
        health=table,
    )
    with pytest.raises(guard.RecoveryExhausted, match=r"exhausted.*snr"):
        bad.check()
    with pytest.raises(guard.RecoveryExhausted):
        bad.run({"mel": demo.demo_mel(20)})
    bad.close()
    with pytest.raises(guard.Unavailable):
        bad.check()


ERRORS = [
    (guard.InputMismatch("input 'mel' has 3 dims", input="mel"), 422, "input 'mel' has 3 dims"),
    (guard.Unavailable("no module within 30 s"), 503, "Unavailable: no module within 30 s"),
    (guard.RecoveryExhausted("every rung failed", []), 503, "RecoveryExhausted: every rung"),
    (guard.errors.SessionClosed("closed"), 503, "SessionClosed: closed"),
    (guard.errors.WorkerFailed("two workers"), 503, "WorkerFailed: two workers"),
    (guard.errors.PoisonRequest("killed two"), 503, "PoisonRequest: killed two"),
    (guard.errors.ForwardFailed("boom"), 503, "ForwardFailed: boom"),
]


@pytest.mark.parametrize(
    ("error", "status", "message"), ERRORS, ids=[type(e[0]).__name__ for e in ERRORS]
)
def test_http_error_maps_each_error(error: guard.GuardError, status: int, message: str) -> None:
    """Bad inputs are the client's (422); every other GuardError is 503, with the message."""
    got = http_error(error)
    assert (got[0], got[1].startswith(message)) == (status, True)


def test_answer_json(replica: Replica) -> None:
    """JSON in, JSON out: outputs as nested lists; a non-object, ragged lists or a wrong
    input shape are 422 with a reason."""
    x = demo.demo_mel(30, seed=5)
    status, body = asyncio.run(replica.answer_json({"mel": x.tolist()}))
    assert status == 200
    np.testing.assert_allclose(np.asarray(body["wav"], np.float32), clean(demo.DEMO_MODEL, x),
                               atol=1e-5)  # fmt: skip
    assert asyncio.run(replica.answer_json([1, 2]))[0] == 422
    assert asyncio.run(replica.answer_json({"mel": [[1.0], [1.0, 2.0]]}))[0] == 422
    status, body = asyncio.run(replica.answer_json({"mel": x[:, :40].tolist()}))
    assert status == 422 and "mel" in body["error"]


@pytest.mark.slow
def test_a_pool_replica_serves_and_swaps(
    demo_paths: tuple[Path, Path], other: tuple[Path, Path], table: guard.health.HealthTable
) -> None:
    """With PoolBuild the same core runs worker processes: check, arun, a swap to another
    model (ready after it), and a refused config keeping the pool."""
    replica = Replica(name="vocoder", policy=QUIET, build=PoolBuild(processes=1), health=table)
    try:
        replica.configure({"model": str(demo_paths[0]), "probe": str(demo_paths[1])})
        replica.check()
        x = demo.demo_mel(30, seed=6)
        out = asyncio.run(replica.arun({"mel": x}))["wav"]
        np.testing.assert_allclose(out, clean(demo_paths[0], x), atol=1e-5)
        replica.configure({"model": str(other[0]), "probe": str(other[1])})
        assert table.readiness(["vocoder"])[0] is True
        out = asyncio.run(replica.arun({"mel": x}))["wav"]
        np.testing.assert_allclose(out, clean(other[0], x), atol=1e-5)
        pool = replica.served
        with pytest.raises(SwapRefused):
            replica.configure({"model": str(other[0]), "probe": str(demo_paths[1])})
        assert replica.served is pool and table.readiness(["vocoder"])[0] is True
    finally:
        replica.close()
