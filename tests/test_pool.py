"""guard.Pool with real spawned workers: order, crashes, timeouts, input errors, close, soak,
and hostile requests: undecodable, poison (segfaults in MNN), raising, workers dying idle."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import pickle
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from holding import stopped
from polling import BOUND, until

import guard
import probes
from guard import mnn
from guard.inputs import prepare_inputs
from guard.pool import SlotState, wire, worker
from guard.pool.shared import DEPTH, Lane
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


def gone(pid: int | None) -> bool:
    """True once a process is reaped (no zombie left in /proc)."""
    return pid is not None and not Path(f"/proc/{pid}").exists()


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
    """status() names each slot's pid and state, and its worker session's state and rung."""
    pool.run({"mel": demo.demo_mel(50)})
    status = pool.status()
    assert [w.slot for w in status] == [0, 1]
    for w in status:
        assert (w.state, w.session, w.rung, w.serving, w.busy) == (
            SlotState.IDLE,
            guard.State.SERVING,
            "static",
            True,
            False,
        )
    assert len({w.pid for w in status}) == 2 and os.getpid() not in {w.pid for w in status}


def test_killed_worker_is_replaced_and_no_request_is_lost(
    pool: guard.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL on a worker with requests in hand (held stopped from before the map, so the map
    cannot end first): its requests are retried, none is lost, a new worker joins; the log says
    which worker died how."""
    caplog.set_level(logging.WARNING, logger="mnn_guard")
    inputs = [demo.demo_mel(200, seed=1000 + i) for i in range(60)]
    expected = references(inputs)
    before = {w.pid for w in pool.status()}
    victim = pool.status()[0].pid
    assert victim is not None
    replaced, served = pool.replaced, pool.status()[1].requests
    done: Future[list[dict[str, Array]]] = Future()
    requests = [{"mel": x} for x in inputs]

    def serve_all() -> None:
        try:
            done.set_result(pool.map(requests))
        except BaseException as exc:  # reaches the assertion below at once, not in 60 s
            done.set_exception(exc)

    def held_while_the_other_serves() -> bool:
        if done.done():
            done.result()  # the map's own error, if it raised
        status = pool.status()
        return status[0].busy and status[1].requests > served

    thread = threading.Thread(target=serve_all)
    with stopped(victim):
        thread.start()
        until("a request in the held worker's hands", held_while_the_other_serves, 60)
        os.kill(victim, signal.SIGKILL)
        assert not done.done(), "the map finished before the kill"
    assert_outputs(done.result(timeout=60), expected)
    thread.join()
    until("the victim's replacement", lambda: pool.replaced != replaced, 60)
    after = {w.pid for w in pool.status()}
    assert pool.replaced == replaced + 1
    assert victim not in after and len(after) == 2 and len(after - before) == 1
    assert gone(victim)
    said = f"pool pool: worker 0 (pid {victim}) was killed by SIGKILL; replacing it"
    assert said in caplog.messages, caplog.messages


def _refuse_to_load(data: bytes) -> None:
    """What unpickling an Unloadable calls: it always raises."""
    raise RuntimeError(f"refusing to rebuild {len(data)} bytes")


class Unloadable(np.ndarray[Any, Any]):
    """An array that pickles and cannot be unpickled anywhere (its reduce raises on load)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_to_load, (self.tobytes(),))


class UnloadableBox:
    """Not an array; pickles and cannot be unpickled."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_to_load, (b"",))


BAD_INPUTS = [
    pytest.param({"mel": np.zeros((1, 79, 50), np.float32)}, id="channels"),
    pytest.param({"mel": np.zeros((80, 50), np.float32)}, id="rank"),
    pytest.param({"spec": np.zeros((1, 80, 50), np.float32)}, id="name"),
    pytest.param({"mel": np.full((1, 80, 50), np.nan, np.float32)}, id="nan"),
    pytest.param({"mel": [[1.0]]}, id="list"),
    pytest.param({"mel": UnloadableBox()}, id="unloadable", marks=pytest.mark.hostile),
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


def test_request_timeout_twice_is_a_poison_request(demo_paths: tuple[Path, Path]) -> None:
    """A request that exceeds request_timeout on two workers raises PoisonRequest saying so."""
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
        with pytest.raises(guard.errors.PoisonRequest, match=r"it cost two workers") as info:
            p.run({"mel": demo.demo_mel(4000)})
        assert str(info.value).count("exceeded request_timeout=0.01 s and was killed") == 2
        assert gone(first)


def test_close_is_idempotent_and_run_after_close_raises(demo_paths: tuple[Path, Path]) -> None:
    """close() twice is fine, workers exit and are reaped, their pipes closed, run() then
    raises SessionClosed."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    p = guard.Pool(
        demo.demo_factory(threads=1), probe, processes=1, policy=quiet_policy(), name="c"
    )
    pid = p.status()[0].pid
    assert repr(p) == "<Pool 'c' 1 worker(s)>"
    sockets = socket_inodes()
    p.close()
    assert len(sockets - socket_inodes()) == 1  # the idle worker's pipe
    p.close()
    assert repr(p) == "<Pool 'c' closed>"
    assert gone(pid)
    assert p.status() == []
    assert all(c.pid != pid for c in multiprocessing.active_children())
    with pytest.raises(guard.errors.SessionClosed, match="pool 'c' is closed"):
        p.run({"mel": demo.demo_mel(50)})


def test_worker_startup_failure_raises_from_constructor(demo_paths: tuple[Path, Path]) -> None:
    """Every init degraded in the worker: the constructor raises the worker's RecoveryExhausted
    with its message and every attempt's verdict, and a note naming the worker."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    faulty = FaultyFactory(demo.demo_factory(threads=1), fault="noise", rate=1.0, affects="all")
    before = {c.pid for c in multiprocessing.active_children()}
    match = "every rung of the ladder failed its canary"
    with pytest.raises(guard.RecoveryExhausted, match=match) as info:
        guard.Pool(faulty, probe, processes=1, policy=quiet_policy(reinit_attempts=0), name="bad")
    attempts = info.value.attempts
    assert [(a.rung.name, a.outcome.value) for a in attempts] == [
        ("static", "fail"),
        ("dynamic", "fail"),
    ]
    assert all(v is not None and not v.passed for v in info.value.verdicts)
    assert any(
        re.fullmatch(r"pool 'bad': worker 0 \(pid \d+\) could not start", n)
        for n in info.value.__notes__
    )
    assert {c.pid for c in multiprocessing.active_children()} <= before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"processes": 0}, "processes must be a positive int"),
        ({"processes": True}, "processes must be a positive int, got True"),
        ({"processes": 2.0}, r"processes must be a positive int, got 2\.0"),
        ({"max_waiting": -1}, "max_waiting must be an int >= 0, got -1"),
        ({"max_waiting": True}, "max_waiting must be an int >= 0, got True"),
        ({"max_waiting": 1.5}, r"max_waiting must be an int >= 0, got 1\.5"),
        (
            {"start_method": "fork"},
            r"start_method must be one of \('spawn', 'forkserver'\), got 'fork' \(a forked "
            r"worker hangs in MNN once the parent has loaded a module\)",
        ),
        ({"request_timeout": 0}, "request_timeout must be > 0"),
        (
            {"factory": lambda **kw: None},
            r"must pickle to reach spawned workers: .* \(guard\.mnn_factory pickles; a lambda "
            r"or closure does not\)",
        ),
        ({"name": "p" * 10_000}, "a session name has at most 128 characters .* of 10000"),
        ({"name": 7}, "a session name is a str, got int"),
    ],
)
def test_bad_pool_config_raises_config_error(
    demo_probe: probes.Probe, kwargs: dict[str, Any], match: str
) -> None:
    """Bad pool options raise ConfigError before any process starts."""
    args: dict[str, Any] = {"factory": demo.demo_factory(threads=1), "probe": demo_probe, **kwargs}
    with pytest.raises(guard.ConfigError, match=match):
        guard.Pool(**args)


def test_pool_defaults_and_max_waiting_zero_admitting_one_call_at_a_time(
    demo_probe: probes.Probe,
) -> None:
    """By default a pool has two workers and a 60 s request timeout; max_waiting=0 is allowed
    and admits one async call at a time, however many came before."""
    factory = demo.demo_factory(threads=1)
    with guard.Pool(factory, demo_probe, policy=quiet_policy(), name="defaults") as p:
        assert len(p.status()) == 2 and p.request_timeout == 60.0
        assert p.max_waiting == guard.pool.MAX_WAITING == 256
    with guard.Pool(
        factory, demo_probe, processes=1, max_waiting=0, policy=quiet_policy(), name="no-wait"
    ) as p:
        assert p.max_waiting == 0 and p.run({"mel": demo.demo_mel(40)})["wav"].ndim == 3

        async def after_two_calls() -> list[object]:
            for _ in range(2):  # each admitted call that ends gives its place back
                await p.arun({"mel": demo.demo_mel(40)})
            calls = [asyncio.ensure_future(p.arun({"mel": demo.demo_mel(40)})) for _ in range(2)]
            return await asyncio.gather(*calls, return_exceptions=True)

        served, refused = asyncio.run(after_two_calls())
        assert isinstance(served, dict) and isinstance(refused, guard.Unavailable)
        assert "1 calls are already in flight or waiting (processes + max_waiting = 1)" in str(
            refused
        )


# ------------------------------------------------------------------ hostile requests

SEGFAULT, RAISE = 1234.5, 2345.5  # a mel whose first value is one of these crashes or raises
SLEEP = 3456.5  # ... or sleeps as many seconds as its second value says, then serves
SLEEP_RAISE = 4567.5  # ... or sleeps so, then raises


class MarkedModule:
    """A real demo module at the numpy level that segfaults or raises on a marked input."""

    def __init__(self, module: Any) -> None:
        self.runner = mnn.adapt(module)

    def run(self, arrays: list[Array]) -> list[Array]:
        """Forward through MNN, unless the first value marks the input as poison."""
        first = float(arrays[0].flat[0])
        if first == SEGFAULT:
            os.kill(os.getpid(), signal.SIGSEGV)  # as MNN does on some inputs
        if first == RAISE:
            raise RuntimeError("injected forward failure")
        if first in (SLEEP, SLEEP_RAISE):
            time.sleep(float(arrays[0].flat[1]))
        if first == SLEEP_RAISE:
            raise RuntimeError("injected forward failure, late")
        return self.runner.run(arrays)


class MarkedFactory:
    """Picklable: the demo factory's real modules, wrapped in MarkedModule."""

    def __init__(self, factory: mnn.MNNFactory) -> None:
        self.factory = factory
        self.path, self.inputs, self.outputs = factory.path, factory.inputs, factory.outputs

    def __call__(self, **overrides: Any) -> MarkedModule:
        return MarkedModule(self.factory(**overrides))


class UnpicklableError(Exception):
    """An exception that holds a lock, so it does not pickle."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class RaisingFactory:
    """Picklable: a factory whose every init raises an UnpicklableError."""

    def __init__(self, factory: mnn.MNNFactory) -> None:
        self.path, self.inputs, self.outputs = factory.path, factory.inputs, factory.outputs

    def __call__(self, **overrides: Any) -> Any:
        raise UnpicklableError(f"factory broke with {dict(overrides)}")


def marked(value: float) -> Array:
    """A valid mel input whose first value is `value`."""
    mel = demo.demo_mel(50, seed=3)
    mel.flat[0] = value
    return mel


def wait_until_serving(pool: guard.Pool, seconds: float = 60.0) -> list[guard.pool.SlotStatus]:
    """Every slot serving again (replacements started), within a bound."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = pool.status()
        if all(w.serving for w in status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"pool {pool.name!r} not serving within {seconds} s: {pool.status()}")


def open_marked(demo_paths: tuple[Path, Path], name: str, processes: int = 2) -> guard.Pool:
    """Workers (two by default) whose real modules crash, raise or sleep on marked inputs."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    factory = MarkedFactory(demo.demo_factory(threads=1))
    return guard.Pool(factory, probe, processes=processes, policy=quiet_policy(), name=name)


@pytest.fixture(scope="module")
def marked_pool(demo_paths: tuple[Path, Path]) -> Iterator[guard.Pool]:
    """Two workers whose real modules crash or raise on marked inputs."""
    with open_marked(demo_paths, "marked") as p:
        yield p


@pytest.mark.hostile
def test_request_the_worker_cannot_unpickle_is_served_as_plain_arrays(pool: guard.Pool) -> None:
    """An ndarray subclass that pickles here but not in a worker: the pool sends the plain
    array MNN reads (as a session in this process would), and no worker is lost."""
    mel = demo.demo_mel(60, seed=11)
    hostile = mel.view(Unloadable)
    with pytest.raises(RuntimeError, match="refusing to rebuild"):
        pickle.loads(pickle.dumps(hostile))
    pids, replaced = [w.pid for w in pool.status()], pool.replaced
    out = pool.run({"mel": hostile})
    assert_outputs([out], references([mel]))
    assert [w.pid for w in pool.status()] == pids and pool.replaced == replaced


@pytest.mark.hostile
def test_worker_refuses_an_undecodable_message_and_keeps_serving(
    demo_paths: tuple[Path, Path],
) -> None:
    """Bytes on a worker's pipe that do not decode get a refusal, not a dead worker."""
    from guard.pool.children import Child, Event, remove_stash, stash_probe

    probe = probes.load(demo_paths[1], model=demo_paths[0])
    path = stash_probe(probe)
    ctx = multiprocessing.get_context("spawn")
    args = (demo.demo_factory(threads=1), path, quiet_policy(), "raw")
    child = Child.spawn(ctx, worker.worker_main, args, name="mnn-guard-raw")
    try:

        def reply() -> Any:
            assert child.wait(60.0) is Event.MESSAGE
            return pickle.loads(child.conn.recv_bytes())

        assert isinstance(reply(), wire.Ready)
        child.conn.send_bytes(b"\x80\x05not a pickle")
        refused = reply()
        assert isinstance(refused, wire.Refused)
        assert "could not be decoded" in refused.reason
        mel = demo.demo_mel(50)
        child.conn.send_bytes(pickle.dumps(wire.Run({"mel": mel})))
        done = reply()
        assert isinstance(done, wire.Done)
        assert_outputs([done.outputs], references([mel]))
        child.conn.send_bytes(pickle.dumps(wire.Stop()))
        child.process.join(10.0)
        assert child.process.exitcode == 0
    finally:
        child.stop()
        remove_stash(path)


@pytest.mark.hostile
def test_request_that_kills_two_workers_is_a_poison_request(marked_pool: guard.Pool) -> None:
    """A request that segfaults MNN is retried once; after the second death it is a
    PoisonRequest, not retried again; status() lists both slots starting, then serving."""
    dead = {w.pid for w in wait_until_serving(marked_pool)}
    replaced = marked_pool.replaced
    with pytest.raises(guard.errors.PoisonRequest) as info:
        marked_pool.run({"mel": marked(SEGFAULT)})
    assert isinstance(info.value, guard.errors.WorkerFailed)
    assert str(info.value).count("was killed by SIGSEGV") == 2
    status = marked_pool.status()
    assert [w.slot for w in status] == [0, 1]
    assert all(w.state is SlotState.STARTING and not w.serving for w in status), status
    assert all((w.session, w.rung, w.requests) == (None, None, 0) for w in status), status
    assert not dead & {w.pid for w in status}
    assert all(gone(pid) for pid in dead if pid is not None)
    mel = demo.demo_mel(70, seed=5)
    assert_outputs([marked_pool.run({"mel": mel})], references([mel]))  # waits for a new worker
    wait_until_serving(marked_pool)
    assert marked_pool.replaced == replaced + 2


def ended(pid: int) -> bool:
    """True once a child has exited with every thread (waitable; left for its owner to reap)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True  # already reaped


@pytest.mark.hostile
def test_workers_that_died_while_idle_do_not_fail_the_next_request(
    marked_pool: guard.Pool,
) -> None:
    """Both workers killed between requests: the next request is not blamed for their deaths;
    it waits for a replacement and is served."""
    dead = [w.pid for w in wait_until_serving(marked_pool)]
    replaced = marked_pool.replaced
    for pid in dead:
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
    until("the killed workers' ends", lambda: all(ended(pid) for pid in dead if pid), 30)
    mel = demo.demo_mel(90, seed=8)
    assert_outputs([marked_pool.run({"mel": mel})], references([mel]))
    after = wait_until_serving(marked_pool)
    assert marked_pool.replaced == replaced + 2 and not set(dead) & {w.pid for w in after}


@pytest.mark.hostile
def test_worker_that_raises_is_replaced_and_its_error_keeps_its_type(
    marked_pool: guard.Pool,
) -> None:
    """A forward that raises in both workers: each worker is replaced, not kept, and the caller
    gets the worker's ForwardFailed itself, with notes naming the workers."""
    before = {w.pid for w in wait_until_serving(marked_pool)}
    replaced = marked_pool.replaced
    with pytest.raises(guard.errors.ForwardFailed, match="injected forward failure") as info:
        marked_pool.run({"mel": marked(RAISE)})
    notes = "\n".join(info.value.__notes__)
    assert "raised in pool 'marked' by worker" in notes
    assert "the request was retried after: worker" in notes
    assert not before & {w.pid for w in marked_pool.status()}
    after = wait_until_serving(marked_pool)
    assert marked_pool.replaced == replaced + 2 and not before & {w.pid for w in after}


@pytest.mark.hostile
def test_close_right_after_worker_deaths_is_clean_and_quiet(
    demo_paths: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """close() while replacements start: every process reaped, nothing logged about them."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    factory = MarkedFactory(demo.demo_factory(threads=1))
    p = guard.Pool(factory, probe, processes=2, policy=quiet_policy(), name="deaths")
    with pytest.raises(guard.errors.PoisonRequest):
        p.run({"mel": marked(SEGFAULT)})
    assert [w.state for w in p.status()] == [SlotState.STARTING] * 2
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="mnn_guard"):
        p.close()
    assert caplog.records == []
    assert p.status() == []
    left = [c for c in multiprocessing.active_children() if c.name.startswith("mnn-guard-deaths")]
    assert left == []


def test_fallback_worker_shows_its_rung_in_status(demo_paths: tuple[Path, Path]) -> None:
    """A worker whose static inits are degraded serves on dynamic, and status() says so."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    faulty = FaultyFactory(demo.demo_factory(threads=1), fault="noise", rate=1.0)
    policy = quiet_policy(reinit_attempts=0)
    with guard.Pool(faulty, probe, processes=1, policy=policy, name="fallback") as p:
        (slot,) = p.status()
        assert (slot.rung, slot.session, slot.state, slot.serving) == (
            "dynamic",
            guard.State.SERVING,
            SlotState.IDLE,
            True,
        )


class TurningFactory:
    """Picklable: a worker's first static module degrades after its canary and a few calls,
    every later static module is degraded at once; dynamic modules are clean."""

    def __init__(self, factory: mnn.MNNFactory) -> None:
        self.path, self.inputs, self.outputs = factory.path, factory.inputs, factory.outputs
        self.first = FaultyFactory(factory, fault="noise", rate=1.0, degrade_after=10)
        self.later = FaultyFactory(factory, fault="noise", rate=1.0)
        self.inits = 0

    def __call__(self, **overrides: Any) -> Any:
        self.inits += 1
        return (self.first if self.inits == 1 else self.later)(**overrides)


def test_readiness_shows_a_worker_that_fell_back_during_its_requests(
    demo_paths: tuple[Path, Path],
) -> None:
    """A worker whose module degrades while it serves re-checks, falls back to dynamic, and the
    pool's readiness entry shows the new rung as soon as a reply reports it."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    faulty = TurningFactory(demo.demo_factory(threads=1))
    policy = guard.Policy(promote_after=None, reinit_attempts=0, recheck_every=3)
    table = guard.health.HealthTable()
    with guard.Pool(faulty, probe, processes=1, policy=policy, name="turning", health=table) as p:
        deadline = time.monotonic() + 60
        while p.status()[0].rung == "static":
            assert time.monotonic() < deadline, "the worker never fell back"
            p.run({"mel": demo.demo_mel(40)})
        (entry,) = table.entries()
        assert [w["rung"] for w in entry["workers"]] == ["dynamic"]


@pytest.mark.hostile
def test_unpicklable_attempt_errors_still_reach_the_caller(demo_paths: tuple[Path, Path]) -> None:
    """A factory raising an exception that does not pickle: the caller still gets the worker's
    RecoveryExhausted with every attempt, each error a GuardError with the same message."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    factory = RaisingFactory(demo.demo_factory(threads=1))
    with pytest.raises(guard.RecoveryExhausted, match="factory broke") as info:
        guard.Pool(factory, probe, processes=1, policy=quiet_policy(reinit_attempts=0))
    errors = [a.error for a in info.value.attempts]
    assert [str(e) for e in errors] == [
        "factory broke with {}",
        "factory broke with {'dynamic': True}",
    ]
    assert all(type(e) is guard.GuardError for e in errors)
    assert "UnpicklableError" in "\n".join(getattr(errors[0], "__notes__", []))


# --------------------------------------------------------------------------- worker side
# The functions a spawned worker runs, called here in this process: the end-to-end tests above
# reach them only in workers, where neither coverage nor mutmut sees them.


class NeedsTwo(Exception):
    """Pickles, but does not unpickle: its __init__ wants two arguments."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a} {b}")


class BufferHolder(Exception):
    """Pickles with protocol 5 only: it holds a pickle.PickleBuffer."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.buffer = pickle.PickleBuffer(b"data")


def attempt(error: BaseException | None, index: int = 0) -> guard.ladder.Attempt:
    """A failed attempt on rung `index` of the default ladder that raised `error`."""
    return guard.ladder.Attempt(
        rung=guard.Policy().ladder[index],
        rung_index=index,
        outcome=guard.ladder.Outcome.ERROR,
        verdict=None,
        error=error,
        seconds=0.5,
    )


def test_worker_errors_cross_the_pipe_as_themselves_or_as_stand_ins() -> None:
    """An error that pickles is sent as it is; one that does not becomes a GuardError with its
    message and a note naming its type; RecoveryExhausted keeps its attempts, each portable."""
    ok = guard.InputMismatch("input 'mel' is wrong")
    assert wire.pickles(ok) and wire.portable(ok) is ok
    for bad, kind in (
        (UnpicklableError("it broke"), "UnpicklableError"),
        (NeedsTwo("a", "b"), "NeedsTwo"),
    ):
        assert not wire.pickles(bad)
        stand_in = wire.portable(bad)
        assert type(stand_in) is guard.GuardError and str(stand_in) == str(bad)
        assert stand_in.__notes__ == [f"in the worker this was a {kind}, which does not pickle"]
    attempts = [attempt(None), attempt(ok), attempt(UnpicklableError("no module"), 1)]
    exhausted = guard.RecoveryExhausted("every rung failed", attempts)
    sent = wire.portable(exhausted)
    assert type(sent) is guard.RecoveryExhausted and str(sent) == "every rung failed"
    assert sent.attempts[:2] == tuple(attempts[:2]) and sent.attempts[1].error is ok
    third = sent.attempts[2]
    assert (third.rung_index, third.seconds) == (1, 0.5)
    assert type(third.error) is guard.GuardError and str(third.error) == "no module"
    assert pickle.loads(pickle.dumps(sent)).attempts[2].error.args == ("no module",)
    # an error that pickles only with the pipe's protocol (5: out-of-band buffers) is sent as is
    buffered = BufferHolder("with a buffer")
    assert wire.pickles(buffered) and wire.portable(buffered) is buffered
    # still unpicklable once its attempts' errors are replaced (a lock in a failed output)
    locked = dataclasses.replace(attempt(None), outputs={0: {"wav": threading.Lock()}})
    stand_in = wire.portable(guard.RecoveryExhausted("locked out", [locked]))
    assert type(stand_in) is guard.GuardError and str(stand_in) == "locked out"
    assert stand_in.__notes__ == [
        "in the worker this was a RecoveryExhausted, which does not pickle"
    ]


def serving_session(
    probe: probes.Probe, factory: Callable[..., Any] | None = None
) -> guard.GuardedSession:
    """A quiet guarded demo session in this process, in no readiness table but its own."""
    return guard.wrap(
        factory or demo.demo_factory(threads=1), probe, name="in-process",
        metrics=False, policy=quiet_policy(), health=guard.health.HealthTable(),
    )  # fmt: skip


class Holding:
    """A factory of real demo modules whose forwards of over 1,000 frames wait (bounded) until
    `release` is set: the test decides what reaches the worker while such a request is served."""

    def __init__(self) -> None:
        self.factory = demo.demo_factory(threads=1)
        self.release = threading.Event()

    def __call__(self, **overrides: Any) -> mnn.Runner:
        runner, release = mnn.adapt(self.factory(**overrides)), self.release

        class Held(mnn.Runner):
            def run(self, arrays: Sequence[Array]) -> list[Array]:
                if arrays[0].shape[-1] > 1000:
                    assert release.wait(BOUND), "the held forward was never released"
                return runner.run(arrays)

        return Held()


def received(conn: Connection, seconds: float = 60.0) -> bytes:
    """The next message's bytes on `conn`, within `seconds` (a worker that died sends none)."""
    assert conn.poll(seconds), f"no reply within {seconds} s"
    return conn.recv_bytes()


def reply(conn: Connection) -> Any:
    """The next message on `conn`, unpickled."""
    assert conn.poll(BOUND), f"no reply within {BOUND:g} s"
    return pickle.loads(conn.recv_bytes())


def test_a_worker_serves_its_pipe_and_refuses_what_is_no_request(
    demo_probe: probes.Probe,
) -> None:
    """serve answers a request with outputs, a raising one with the error, undecodable bytes
    and non-requests with a refusal saying why, each with the session's report; Stop ends it."""
    parent, child = multiprocessing.Pipe()
    session = serving_session(demo_probe)
    serving = wire.Report(guard.State.SERVING, 0)
    thread = threading.Thread(target=worker.serve, args=(child, session), daemon=True)
    thread.start()
    mel = demo.demo_mel(40, seed=4)
    parent.send_bytes(pickle.dumps(wire.Run({"mel": mel})))
    done = reply(parent)
    assert type(done) is wire.Done and done.report == serving
    assert_outputs([done.outputs], references([mel]))
    parent.send_bytes(pickle.dumps(wire.Run({"spectrogram": mel})))
    raised = reply(parent)
    assert type(raised) is wire.Raised and type(raised.error) is guard.InputMismatch
    assert raised.report == serving
    parent.send_bytes(b"not a pickle")
    refused = reply(parent)
    assert type(refused) is wire.Refused and refused.report == serving
    assert refused.reason.startswith("it could not be decoded: UnpicklingError: ")
    parent.send_bytes(pickle.dumps(5))
    assert reply(parent) == wire.Refused("a int is not a request", serving)
    parent.send_bytes(pickle.dumps(wire.Run({"mel": mel})))  # still serving
    assert type(reply(parent)) is wire.Done
    parent.send_bytes(pickle.dumps(wire.Stop()))
    thread.join(BOUND)
    assert not thread.is_alive() and not parent.poll(0.1)
    session.close()


def test_a_worker_serves_its_lanes_in_order_and_drops_a_withdrawn_request(
    demo_probe: probes.Probe,
) -> None:
    """Requests through lanes: the worker answers each in its own lane (outputs the parent reads
    as owned copies), and a request withdrawn before it started gets Withdrawn, not served."""
    parent, child = multiprocessing.Pipe()
    holding = Holding()
    session = serving_session(demo_probe, holding)
    ours = (Lane.create(1), Lane.create(1))
    theirs = tuple(Lane(os.dup(lane.fd), lane.size) for lane in ours)
    thread = threading.Thread(target=worker.serve, args=(child, session, theirs), daemon=True)
    thread.start()
    slow, quick = demo.demo_mel(1500, seed=1), demo.demo_mel(60, seed=2)
    parent.send_bytes(wire.encode(wire.Run({"mel": slow}, 0), ours[0]))
    parent.send_bytes(wire.encode(wire.Run({"mel": quick}, 1), ours[1]))
    parent.send_bytes(wire.encode(wire.Withdraw(1)))  # while the slow one is served (held)
    holding.release.set()
    first, second = (wire.decode(received(parent), ours, copy=True) for _ in range(2))
    by_type = {type(first): first, type(second): second}
    assert set(by_type) == {wire.Done, wire.Withdrawn}
    done, withdrawn = by_type[wire.Done], by_type[wire.Withdrawn]
    assert isinstance(done, wire.Done) and isinstance(withdrawn, wire.Withdrawn)
    assert (done.lane, withdrawn.lane) == (0, 1)
    assert_outputs([done.outputs], references([slow]))
    parent.send_bytes(wire.encode(wire.Run({"mel": quick}, 1), ours[1]))
    again = wire.decode(received(parent), ours, copy=True)
    assert isinstance(again, wire.Done) and again.lane == 1
    assert_outputs([again.outputs], references([quick]))
    assert again.outputs["wav"].flags.owndata
    parent.send_bytes(wire.encode(wire.Stop()))
    thread.join(10)
    assert not thread.is_alive() and not parent.poll(0.1)
    session.close()


def test_a_withdrawal_drops_its_request_from_behind_one_of_another_shape(
    demo_probe: probes.Probe,
) -> None:
    """A request withdrawn while it waits behind another (arrays of another shape) is dropped
    and answered Withdrawn; the other stays (it raised a broadcast error and ended serve)."""
    session = serving_session(demo_probe)
    parent, child = multiprocessing.Pipe()
    slow = wire.Run({"mel": demo.demo_mel(1500, seed=1)}, 0)
    quick = wire.Run({"mel": demo.demo_mel(60, seed=2)}, 1)
    waiting: worker.Waiting = collections.deque([slow, quick])
    assert worker._take(child, wire.encode(wire.Withdraw(1)), waiting, session, ())
    assert len(waiting) == 1 and waiting[0] is slow
    withdrawn = wire.decode(parent.recv_bytes(), ()) if parent.poll(BOUND) else None
    assert isinstance(withdrawn, wire.Withdrawn) and withdrawn.lane == 1
    session.close()


def test_a_worker_stops_serving_when_the_parent_is_gone(demo_probe: probes.Probe) -> None:
    """serve returns when its pipe closes, and wire.send says False once nobody reads."""
    session = serving_session(demo_probe)
    parent, child = multiprocessing.Pipe()
    report = worker.report(session)
    assert report == wire.Report(guard.State.SERVING, 0)
    assert wire.send(child, wire.Ready(report)) is True
    assert reply(parent) == wire.Ready(report)
    # replies go with the highest protocol, as wire.portable checks errors with it
    assert wire.send(child, wire.Raised(BufferHolder("buffered"), report))
    assert str(reply(parent).error) == "buffered"
    thread = threading.Thread(target=worker.serve, args=(child, session), daemon=True)
    thread.start()
    parent.close()
    thread.join(BOUND)
    assert not thread.is_alive()
    assert wire.send(child, wire.Ready(report)) is False
    session.close()


def run_worker_main(
    factory: Any,
    probe_path: str,
    policy: guard.Policy,
    talk: Callable[[Connection], Any] | None = None,
) -> tuple[list[Any], Any, Any]:
    """Run worker_main here while a thread plays the parent: `talk`, then Stop. Returns the
    replies `talk` left unread, the SIGINT handler the worker set (restored after), and what
    `talk` returned."""
    parent, child = multiprocessing.Pipe()
    said: list[Any] = []
    replies: list[Any] = []

    def parent_side() -> None:  # reads on, as a pool does: a large reply fills the pipe
        if talk is not None:
            said.append(talk(parent))
        with contextlib.suppress(OSError):  # a worker that failed to start has gone already
            parent.send_bytes(pickle.dumps(wire.Stop()))
        with contextlib.suppress(EOFError, OSError):
            while True:
                replies.append(pickle.loads(parent.recv_bytes()))

    helper = threading.Thread(target=parent_side, daemon=True)
    helper.start()
    handler = signal.getsignal(signal.SIGINT)
    try:
        worker.worker_main(child, factory, probe_path, policy, "in-worker")
        ignored = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, handler)
        child.close()  # as the worker's exit does
    helper.join(BOUND)
    assert not helper.is_alive()
    return replies, ignored, said[0] if said else None


def test_a_worker_builds_its_session_serves_and_closes_it_on_stop(
    demo_probe: probes.Probe,
) -> None:
    """worker_main builds the session from the stashed probe with the pool's factory, policy
    and name, in a table of its own; says ready; serves; closes it on Stop."""
    mel = demo.demo_mel(40, seed=4)

    def talk(parent: Connection) -> Any:
        ready = reply(parent)
        threads = {t.name for t in threading.enumerate()}
        listed = set(guard.health.HEALTH.sessions())
        parent.send_bytes(pickle.dumps(wire.Run({"mel": mel})))
        return ready, threads, listed, reply(parent)

    path = guard.pool.stash_probe(demo_probe)
    faulty = FaultyFactory(demo.demo_factory(threads=1), fault="noise", rate=1.0)  # static only
    policy = guard.Policy(ladder=(guard.DYNAMIC,), promote_after=None, recheck_every=60.0)
    try:
        replies, ignored, (ready, threads, listed, done) = run_worker_main(
            faulty, path, policy, talk
        )
    finally:
        guard.pool.remove_stash(path)
    serving = wire.Report(guard.State.SERVING, 0)  # the default ladder: rung 1
    assert ready == wire.Ready(serving) and replies == []
    assert "mnn-guard-in-worker" in threads and "in-worker" not in listed
    assert type(done) is wire.Done and done.report == serving
    assert_outputs([done.outputs], references([mel]))
    assert ignored is signal.SIG_IGN  # Ctrl-C is the parent's to handle
    assert "mnn-guard-in-worker" not in {t.name for t in threading.enumerate()}


def test_a_worker_that_cannot_start_says_why_on_its_pipe(
    demo_probe: probes.Probe, tmp_path: Path
) -> None:
    """A worker whose probe cannot be loaded, or whose every rung fails, sends StartFailed
    with the error (naming the session) and serves not."""
    missing = str(tmp_path / "gone.pickle")
    replies, _, _ = run_worker_main(demo.demo_factory(threads=1), missing, quiet_policy())
    (failed,) = replies
    assert type(failed) is wire.StartFailed
    assert type(failed.error) is FileNotFoundError and failed.error.filename == missing
    path = guard.pool.stash_probe(demo_probe)
    broken = FaultyFactory(demo.demo_factory(threads=1), fault="noise", rate=1.0, affects="all")
    try:
        replies, _, _ = run_worker_main(broken, path, quiet_policy(reinit_attempts=0))
    finally:
        guard.pool.remove_stash(path)
    (failed,) = replies
    assert type(failed.error) is guard.RecoveryExhausted
    assert str(failed.error).startswith("session 'in-worker': every rung of the ladder failed")


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


# ------------------------------------------------------------------ watching and closing


def sleeping(seconds: float, *, then_raise: bool = False) -> Array:
    """A marked mel whose forward sleeps `seconds` before it is served (or raises)."""
    mel = marked(SLEEP_RAISE if then_raise else SLEEP)
    mel.flat[1] = seconds
    return mel


def socket_inodes() -> set[str]:
    """The sockets this process holds open (each worker pipe is one)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:"):
                found.add(target)
    return found


def test_workers_that_die_idle_are_replaced_without_a_request(
    demo_paths: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """The pool's watcher notices an idle worker's death on its own and replaces it, a
    replacement's death too; it is a daemon thread named after the pool, and ends with it."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    factory = demo.demo_factory(threads=1)
    caplog.set_level(logging.WARNING, logger="mnn_guard")
    p = guard.Pool(factory, probe, processes=2, policy=quiet_policy(), name="watched")
    try:
        (watcher,) = [t for t in threading.enumerate() if t.name == "mnn-guard-watched-watch"]
        assert watcher.daemon and watcher.is_alive()

        def replaced_by(n: int) -> Callable[[], bool]:
            return lambda: p.replaced == n

        for replaced in (1, 2):  # the second victim is the first one's replacement
            victim = p.status()[0].pid
            assert victim is not None
            os.kill(victim, signal.SIGKILL)
            until(f"replacement {replaced}", replaced_by(replaced), 60)
            after = wait_until_serving(p)
            assert victim not in {w.pid for w in after} and len(after) == 2
            warning = f"pool watched: worker 0 (pid {victim}) was killed by SIGKILL while idle"
            assert f"{warning}; replacing it" in caplog.messages
        assert sum(w.requests for w in p.status()) == 0  # no request found the dead workers
    finally:
        p.close()
    watcher.join(BOUND)
    assert not watcher.is_alive()


def test_close_answers_the_request_in_flight_and_is_bounded_by_a_hung_one(
    demo_paths: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """close() while one worker serves a 1 s request and the other hangs in an async call:
    the first is answered, the hung worker is killed after STOP_SECONDS (and not replaced),
    its caller gets SessionClosed, and no worker pipe is left open."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    sockets = socket_inodes()
    factory = MarkedFactory(demo.demo_factory(threads=1))
    p = guard.Pool(factory, probe, processes=2, policy=quiet_policy(), name="closing")
    answered: Future[dict[str, Array]] = Future()
    hung: Future[dict[str, Array]] = Future()

    def call(future: Future[dict[str, Array]], run: Callable[[], dict[str, Array]]) -> None:
        try:
            future.set_result(run())
        except BaseException as exc:
            future.set_exception(exc)

    mel = sleeping(1.0)
    threads = [
        threading.Thread(target=call, args=(answered, lambda: p.run({"mel": mel}))),
        threading.Thread(
            target=call, args=(hung, lambda: asyncio.run(p.arun({"mel": sleeping(600.0)})))
        ),
    ]
    for thread in threads:
        thread.start()
    until("both workers busy", lambda: all(w.busy for w in p.status()), 30)
    caplog.set_level(logging.DEBUG, logger="mnn_guard")
    closer = threading.Thread(target=p.close)
    closer.start()
    closer.join(guard.pool.STOP_SECONDS + 10.0)
    assert not closer.is_alive(), "close() waited for the hung request"
    assert_outputs([answered.result(timeout=30)], references([mel]))
    with pytest.raises(guard.errors.SessionClosed, match="pool 'closing' is closed"):
        hung.result(timeout=30)
    for thread in threads:
        thread.join(30)
    assert socket_inodes() <= sockets
    assert [r.getMessage() for r in caplog.records if r.name == "mnn_guard"] == []


def test_closing_a_pool_keeps_a_newer_pool_of_its_name_ready(
    demo_paths: tuple[Path, Path],
) -> None:
    """Two pools of one name in one health table: closing the older leaves the newer's entry."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    table = guard.health.HealthTable()
    args = (demo.demo_factory(threads=1), probe)
    kw: dict[str, Any] = {"processes": 1, "policy": quiet_policy(), "name": "twin", "health": table}
    older = guard.Pool(*args, **kw)
    with guard.Pool(*args, **kw) as newer:
        older.close()
        ready, entries = table.readiness(expect=["twin"])
        assert ready and [e["workers"][0]["pid"] for e in entries] == [newer.status()[0].pid]
    assert table.sessions() == {}


def test_map_sends_one_request_per_worker_at_a_time(demo_paths: tuple[Path, Path]) -> None:
    """map() never queues its own requests for a worker: with one worker and a 0.3 s wait
    bound, three 0.5 s requests are all served. A run() that finds the worker busy for longer
    than the bound raises Unavailable once the bound has passed, saying why."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    factory = MarkedFactory(demo.demo_factory(threads=1))
    policy = quiet_policy(wait_timeout=0.3)
    with guard.Pool(factory, probe, processes=1, policy=policy, name="one") as p:
        inputs = [sleeping(0.5) for _ in range(3)]
        assert_outputs(p.map([{"mel": x} for x in inputs]), references(inputs))
        assert p.status()[0].requests == 3
        busy = threading.Thread(target=p.run, args=({"mel": demo.demo_mel(50)},))
        with stopped(p.status()[0].pid):  # busy with that request until the bound has passed
            busy.start()
            until("a busy worker", lambda: p.status()[0].busy, 30)
            started = time.monotonic()
            with pytest.raises(guard.Unavailable) as info:
                p.run({"mel": demo.demo_mel(40)})
            assert time.monotonic() - started >= 0.3
        assert str(info.value) == (
            "pool 'one': no worker was free within 0.3 s (Policy.wait_timeout); 0 of 1 "
            "starting, the rest busy"
        )
        busy.join(30)


def test_a_factory_that_does_not_match_the_probe_is_refused_before_spawning(
    demo_probe: probes.Probe,
) -> None:
    """The probe is checked against the factory's declared inputs, as guard.wrap does."""
    factory = MarkedFactory(demo.demo_factory(threads=1))
    factory.inputs = ("spec",)
    with pytest.raises(
        probes.ProbeError, match=r"the probe's inputs \['mel'\] do not match"
    ) as info:
        guard.Pool(factory, demo_probe, processes=1, policy=quiet_policy(), name="stale")
    assert not hasattr(info.value, "__notes__")  # a worker's refusal would name the worker


class Interrupted(BaseException):
    """What a signal handler raises in the main thread, as Ctrl-C's KeyboardInterrupt does."""


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@pytest.mark.hostile
def test_an_interrupted_request_retires_its_worker(
    marked_pool: guard.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """A request interrupted in the caller's thread retires its worker, whose reply would
    otherwise reach the next caller late, and a replacement serves the next request."""
    busy = {w.pid for w in wait_until_serving(marked_pool)}
    replaced = marked_pool.replaced
    caplog.set_level(logging.WARNING, logger="mnn_guard")

    def interrupt_when_busy() -> None:
        until("a busy worker", lambda: any(w.busy for w in marked_pool.status()), 30)
        os.kill(os.getpid(), signal.SIGUSR1)  # handled in the main thread, in its wait

    previous = signal.signal(signal.SIGUSR1, _interrupt)
    try:
        interrupter = threading.Thread(target=interrupt_when_busy)
        interrupter.start()
        with pytest.raises(Interrupted):
            marked_pool.run({"mel": sleeping(30.0)})
        interrupter.join(30)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert "pool marked: a request was interrupted; replacing it" in caplog.messages
    after = wait_until_serving(marked_pool)
    assert marked_pool.replaced == replaced + 1 and len(busy - {w.pid for w in after}) == 1
    mel = demo.demo_mel(70, seed=9)
    assert_outputs([marked_pool.run({"mel": mel})], references([mel]))


# ------------------------------------------------------------------ shared memory


def lane_fds() -> int:
    """How many shared-memory lanes this process holds open (distinct files)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:mnn-guard-lane"):
                found.add(os.stat(f"/proc/self/fd/{fd}").st_ino)
    return len(found)


def shm_names() -> set[str]:
    """What /dev/shm lists."""
    return set(os.listdir("/dev/shm")) if Path("/dev/shm").is_dir() else set()


def test_outputs_are_owned_arrays_that_later_requests_leave_alone(pool: guard.Pool) -> None:
    """An output stays as it was while the same workers serve more requests: it is an owned,
    writable array, not a view of the shared memory the next reply is written to."""
    first_mel, other = mels(2, offset=700)
    first = pool.run({"mel": first_mel})["wav"]
    kept = first.copy()
    pool.map([{"mel": other}] * 6)
    np.testing.assert_array_equal(first, kept)
    assert first.flags.owndata and first.flags.writeable


def test_requests_larger_than_the_lanes_grow_them(pool: guard.Pool) -> None:
    """Requests of 20 times the probe's size (inputs and outputs) are served exactly, before
    and after small ones: the lanes grew on both ends."""
    inputs = [demo.demo_mel(2000, seed=31), demo.demo_mel(40, seed=32), demo.demo_mel(1900, 33)]
    assert_outputs(pool.map([{"mel": x} for x in inputs * 2]), references(inputs * 2))


def test_a_busy_worker_gets_its_next_request_before_it_answers(
    demo_paths: tuple[Path, Path],
) -> None:
    """With one worker serving a 1 s request, the next request is already in its other lane
    (the slot is FULL), so the worker never waits for the pool between the two."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    factory = MarkedFactory(demo.demo_factory(threads=1))
    with guard.Pool(factory, probe, processes=1, policy=quiet_policy(), name="piped") as p:
        inputs = [sleeping(1.0), demo.demo_mel(50, seed=6)]
        served: Future[list[dict[str, Array]]] = Future()
        requests = [{"mel": x} for x in inputs]
        thread = threading.Thread(target=lambda: served.set_result(p.map(requests)))
        thread.start()
        until("a full worker", lambda: p.status()[0].state is SlotState.FULL, 30)
        assert not served.done()
        assert_outputs(served.result(timeout=60), references(inputs))
        thread.join(10)
        assert (p.status()[0].state, p.status()[0].requests) == (SlotState.IDLE, 2)


@pytest.mark.hostile
def test_a_worker_killed_mid_request_leaves_no_shared_memory(
    demo_paths: tuple[Path, Path],
) -> None:
    """SIGKILL on a worker with a request in hand: the request is served by its replacement,
    /dev/shm gains nothing, this process holds the lanes of its live worker only, and none
    once the pool is closed."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    factory = MarkedFactory(demo.demo_factory(threads=1))
    base, shm = lane_fds(), shm_names()
    with guard.Pool(factory, probe, processes=1, policy=quiet_policy(), name="leak") as p:
        assert lane_fds() == base + DEPTH
        victim = p.status()[0].pid
        assert victim is not None
        mel = sleeping(1.0)
        served: Future[dict[str, Array]] = Future()
        thread = threading.Thread(target=lambda: served.set_result(p.run({"mel": mel})))
        thread.start()
        until("a busy worker", lambda: p.status()[0].busy, 30)
        os.kill(victim, signal.SIGKILL)
        assert_outputs([served.result(timeout=60)], references([mel]))
        thread.join(10)
        wait_until_serving(p)
        assert p.replaced == 1 and gone(victim)
        until("the dead worker's lanes closed", lambda: lane_fds() == base + DEPTH)
        assert shm_names() <= shm
    assert lane_fds() == base and shm_names() <= shm


def test_a_request_with_nan_is_refused_here_and_no_worker_sees_it(pool: guard.Pool) -> None:
    """A NaN in a request raises InputMismatch in the caller's thread; no worker counts it."""
    mel = mels(1, offset=1500)[0].copy()
    mel[0, 3, 5] = np.nan
    before = sum(w.requests for w in pool.status())
    with pytest.raises(guard.InputMismatch, match="NaN"):
        pool.run({"mel": mel})
    assert sum(w.requests for w in pool.status()) == before


def test_a_pool_that_does_not_check_values_serves_nan_on_a_worker(
    demo_paths: tuple[Path, Path],
) -> None:
    """With Policy(check_finite_inputs=False) a NaN request reaches a worker, which serves it
    too (the parent checks the values for its workers, or nobody does)."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    mel = mels(1, offset=1501)[0].copy()
    mel[0, 3, 5] = np.nan
    policy = quiet_policy(check_finite_inputs=False)
    with guard.Pool(demo.demo_factory(threads=1), probe, processes=1, policy=policy) as p:
        out = p.run({"mel": mel})
        assert p.status()[0].requests == 1
    assert out["wav"].shape == references([mel])[0].shape
