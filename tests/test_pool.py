"""guard.Pool with real spawned workers: order, crashes, timeouts, input errors, close, soak."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import guard
import probes
from guard import mnn
from guard.inputs import prepare_inputs
from guard.testing import FaultyFactory
from guard.tools import demo

Array = np.ndarray[Any, Any]
FRAMES = (40, 60, 80, 100)


def quiet_policy(**kw: Any) -> guard.Policy:
    """A policy with no background thread, so workers do only what requests ask."""
    return guard.Policy(background=False, promote_after=None, **kw)


def mels(count: int, offset: int = 0) -> list[Array]:
    """Distinct mel inputs of a few lengths."""
    return [demo.demo_mel(FRAMES[i % len(FRAMES)], seed=offset + i) for i in range(count)]


def references(inputs: list[Array]) -> list[Array]:
    """Clean outputs from a fresh dynamic module in this process (the trusted configuration)."""
    module = demo.demo_factory(threads=1)(dynamic=True)
    return [mnn.adapt(module).run([x])[0] for x in inputs]


def assert_outputs(outputs: list[dict[str, Array]], expected: list[Array]) -> None:
    """Every output matches its own reference, in order."""
    assert len(outputs) == len(expected)
    for k, (out, ref) in enumerate(zip(outputs, expected, strict=True)):
        assert out["wav"].shape == ref.shape, k
        np.testing.assert_allclose(out["wav"], ref, rtol=0, atol=1e-5, err_msg=f"request {k}")


def gone(pid: int) -> bool:
    """True once a process is reaped (no zombie left in /proc)."""
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture(scope="module")
def pool(demo_paths: tuple[Path, Path]) -> Iterator[guard.Pool]:
    """Two workers serving the clean demo vocoder."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    with guard.Pool(
        demo.demo_factory(threads=1),
        probe,
        processes=2,
        policy=quiet_policy(),
        name="pool",
        request_timeout=30.0,
    ) as p:
        yield p


def test_map_serves_200_requests_in_order(pool: guard.Pool) -> None:
    """Two workers serve 200 distinct requests; each output matches its own input's reference."""
    inputs = mels(200)
    outputs = pool.map([{"mel": x} for x in inputs])
    assert_outputs(outputs, references(inputs))
    served = [w.requests for w in pool.status()]
    assert len(served) == 2 and min(served) > 0, served  # both workers took part


def test_status_lists_each_worker(pool: guard.Pool) -> None:
    """status() names each worker's pid, rung and health."""
    pool.run({"mel": demo.demo_mel(50)})
    status = pool.status()
    assert [w.slot for w in status] == [0, 1]
    assert all(w.rung == "static" and w.healthy for w in status)
    assert len({w.pid for w in status}) == 2 and os.getpid() not in {w.pid for w in status}


def test_killed_worker_is_replaced_and_no_request_is_lost(pool: guard.Pool) -> None:
    """SIGKILL on a worker mid-run: its request is retried, none is lost, a new worker joins."""
    inputs = [demo.demo_mel(200, seed=1000 + i) for i in range(60)]
    expected = references(inputs)
    before = {w.pid for w in pool.status()}
    replaced = pool.replaced
    done: Future[list[dict[str, Array]]] = Future()
    requests = [{"mel": x} for x in inputs]
    thread = threading.Thread(target=lambda: done.set_result(pool.map(requests)))
    thread.start()
    deadline = time.monotonic() + 30
    while sum(w.requests for w in pool.status()) < 10 and time.monotonic() < deadline:
        time.sleep(0.002)
    victim = pool.status()[0].pid
    os.kill(victim, signal.SIGKILL)
    assert not done.done(), "the map finished before the kill; make the requests longer"
    assert_outputs(done.result(timeout=60), expected)
    thread.join()
    while pool.replaced == replaced and time.monotonic() < deadline:
        time.sleep(0.05)
    after = {w.pid for w in pool.status()}
    assert pool.replaced == replaced + 1
    assert victim not in after and len(after) == 2 and len(after - before) == 1
    assert gone(victim)


BAD_INPUTS = [
    pytest.param({"mel": np.zeros((1, 79, 50), np.float32)}, id="channels"),
    pytest.param({"mel": np.zeros((80, 50), np.float32)}, id="rank"),
    pytest.param({"spec": np.zeros((1, 80, 50), np.float32)}, id="name"),
    pytest.param({"mel": np.full((1, 80, 50), np.nan, np.float32)}, id="nan"),
    pytest.param({"mel": [[1.0]]}, id="list"),
]


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_input_mismatch_reaches_caller_unchanged(
    pool: guard.Pool, demo_probe: probes.Probe, bad: dict[str, Any]
) -> None:
    """A worker's InputMismatch reaches the caller with the same message; no worker is replaced."""
    with pytest.raises(guard.InputMismatch) as local:
        prepare_inputs(demo_probe.inputs, bad)
    pids = [w.pid for w in pool.status()]
    with pytest.raises(guard.InputMismatch) as remote:
        pool.run(bad)
    assert str(remote.value) == str(local.value)
    assert remote.value.input == local.value.input
    assert [w.pid for w in pool.status()] == pids


def test_request_timeout_twice_raises_worker_failed(demo_paths: tuple[Path, Path]) -> None:
    """A request that exceeds request_timeout on two workers raises WorkerFailed saying so."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    with guard.Pool(
        demo.demo_factory(threads=1),
        probe,
        processes=1,
        policy=quiet_policy(),
        name="slow",
        request_timeout=0.01,
    ) as p:
        first = p.status()[0].pid
        with pytest.raises(guard.WorkerFailed, match=r"request failed on two workers") as info:
            p.run({"mel": demo.demo_mel(4000)})
        assert str(info.value).count("exceeded request_timeout=0.01 s and was killed") == 2
        assert gone(first)


def test_close_is_idempotent_and_run_after_close_raises(demo_paths: tuple[Path, Path]) -> None:
    """close() twice is fine, workers exit and are reaped, run() then raises SessionClosed."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    p = guard.Pool(
        demo.demo_factory(threads=1), probe, processes=1, policy=quiet_policy(), name="c"
    )
    pid = p.status()[0].pid
    p.close()
    p.close()
    assert gone(pid)
    assert p.status() == []
    assert all(c.pid != pid for c in multiprocessing.active_children())
    with pytest.raises(guard.SessionClosed, match="pool 'c' is closed"):
        p.run({"mel": demo.demo_mel(50)})


def test_worker_startup_failure_raises_from_constructor(demo_paths: tuple[Path, Path]) -> None:
    """Every init degraded in the worker: the constructor raises RecoveryExhausted naming it."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    faulty = FaultyFactory(demo.demo_factory(threads=1), fault="noise", rate=1.0, affects="all")
    before = {c.pid for c in multiprocessing.active_children()}
    match = r"pool 'bad': worker 0 \(pid \d+\) could not start"
    with pytest.raises(guard.RecoveryExhausted, match=match) as info:
        guard.Pool(faulty, probe, processes=1, policy=quiet_policy(reinit_attempts=0), name="bad")
    assert "every rung of the ladder failed its canary" in str(info.value)
    assert {c.pid for c in multiprocessing.active_children()} <= before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"processes": 0}, "processes must be a positive int"),
        ({"start_method": "fork"}, "start_method must be one of"),
        ({"request_timeout": 0}, "request_timeout must be > 0"),
        ({"factory": lambda **kw: None}, "must pickle to reach spawned workers"),
    ],
)
def test_bad_pool_config_raises_config_error(
    demo_probe: probes.Probe, kwargs: dict[str, Any], match: str
) -> None:
    """Bad pool options raise ConfigError before any process starts."""
    args: dict[str, Any] = {"factory": demo.demo_factory(threads=1), "probe": demo_probe, **kwargs}
    with pytest.raises(guard.ConfigError, match=match):
        guard.Pool(**args)


# --------------------------------------------------------------------------- soak

SOAK_PROCESSES = 4
SOAK_INITS = 25
SOAK_REQUESTS = 2


def soak_worker(
    probe_dir: str, seed: int, cases: list[tuple[Array, Array]], out: Connection
) -> None:
    """One process: 25 guarded inits with 10% degraded; judge every served output."""
    faulty = FaultyFactory(
        demo.demo_factory(threads=1), fault="noise", rate=0.1, seed=seed, per_process=True
    )
    probe = probes.load(probe_dir)
    judge = dataclasses.replace(
        probe, cases=tuple(probes.Case(inputs={"mel": x}, outputs={"wav": y}) for x, y in cases)
    )
    caught = served = degraded_served = fallbacks = 0
    for _ in range(SOAK_INITS):
        with guard.wrap(faulty, probe, policy=quiet_policy(), name="soak", metrics=False) as s:
            caught += sum(a.outcome is guard.ladder.Outcome.FAIL for a in s.status.history)
            fallbacks += s.status.rung_index > 0
            for k, (x, _) in enumerate(cases):
                served += 1
                degraded_served += not judge.judge(s.run({"mel": x}), case=k).passed
    out.send((faulty.degraded_inits, caught, served, degraded_served, faulty.inits, fallbacks))


@pytest.mark.slow
def test_soak_serves_no_degraded_output(demo_paths: tuple[Path, Path]) -> None:
    """4 processes x 25 inits, 10% of inits degraded: every degraded init is caught, none served."""
    inputs = mels(SOAK_REQUESTS, offset=500)
    cases = list(zip(inputs, references(inputs), strict=True))
    ctx = multiprocessing.get_context("spawn")
    pipes = [ctx.Pipe(duplex=False) for _ in range(SOAK_PROCESSES)]
    workers = [
        ctx.Process(target=soak_worker, args=(str(demo_paths[1]), 7 + i, cases, w), daemon=True)
        for i, (_, w) in enumerate(pipes)
    ]
    for p in workers:
        p.start()
    try:
        results = []
        for r, _ in pipes:
            assert r.poll(120), "a soak worker gave no result within 120 s"
            results.append(r.recv())
    finally:
        for p in workers:
            p.join(5)
            if p.is_alive():
                p.kill()
    totals = (sum(column) for column in zip(*results, strict=True))
    injected, caught, served, bad, inits, fallbacks = totals
    print(
        f"soak: {inits} inits, {injected} degraded injected, {caught} caught, "
        f"{fallbacks} fallbacks, {served} outputs served, {bad} degraded served"
    )
    assert served == SOAK_PROCESSES * SOAK_INITS * SOAK_REQUESTS
    assert injected > 0
    assert caught == injected
    assert bad == 0
