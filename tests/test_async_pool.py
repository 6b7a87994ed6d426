"""guard.Pool's async face with real asyncio tasks and real spawned workers: the event loop stays
free while 100 calls run, calls cancelled in flight or in line leave the pool serving, the
number of waiting calls and their wait are bounded, a worker killed mid-call costs no request,
and the pool's readiness entry follows its workers.

How the loop's freedom is measured: a ticker task sleeps 1 ms at a time and records each gap
between its wake-ups, and how much CPU time this process used during that gap
(`time.process_time`, every thread). The loop can be held up by this process's own work (its
callbacks, or another thread holding the GIL while it computes, as an in-process forward does)
or by the operating system not running it. On a shared 2-core CI machine the second kind
reaches 100 ms and more whatever the code does, so the bound is asserted on the first kind:
the CPU this process spent inside any one gap stays under the issue's 10 ms. The control test
shows the same measure reporting a forward's full duration when the forward runs in a thread
(`asyncio.to_thread(session.run)`), so it is no bound that passes by construction. The
garbage collector is paused during measurements (a full collection of a large test process
is unrelated to the design).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from holding import stopped
from prometheus_client import CollectorRegistry

import guard
import probes
from guard import mnn
from guard.tools import demo

Array = np.ndarray[Any, Any]
T = TypeVar("T")
FRAMES = 700  # the demo vocoder takes about 30 ms at 700 frames on a CI-type machine
LONG = 4000  # the longest input the demo probe accepts (85 to 170 ms by machine)
CANCEL = 2000  # a call long enough to be cancelled while its worker computes
STALL_BOUND = 0.010  # the bound on the loop's largest gap, here on this process's share
BOUND = 60.0  # seconds any polled condition may take on a slow, shared machine


def quiet_policy(**kw: Any) -> guard.Policy:
    """No background thread: workers do only what requests ask."""
    return guard.Policy(background=False, promote_after=None, **kw)


def reference(x: Array) -> Array:
    """The clean output of a fresh dynamic module in this process."""
    return mnn.adapt(demo.demo_factory(threads=1)(dynamic=True)).run([x])[0]


async def until(what: str, check: Callable[[], T | None]) -> T:
    """Poll `check` on the loop until it returns something, within BOUND seconds."""
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        found = check()
        if found is not None:
            return found
        await asyncio.sleep(0.005)
    raise AssertionError(f"no {what} within {BOUND} s")


@dataclass
class Ticker:
    """Wakes every `tick` seconds; records each gap and this process's CPU time within it."""

    tick: float = 0.001
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (wall, process CPU)
    running: bool = True

    async def run(self) -> None:
        """Tick until stopped."""
        last, cpu = time.perf_counter(), time.process_time()
        while self.running:
            await asyncio.sleep(self.tick)
            now, used = time.perf_counter(), time.process_time()
            self.gaps.append((now - last, used - cpu))
            last, cpu = now, used

    @property
    def stall(self) -> float:
        """The most CPU this process spent within one gap (capped by the gap)."""
        return max(min(wall, cpu) for wall, cpu in self.gaps)

    def stalls_over(self, bound: float) -> int:
        """How many gaps held more than `bound` of this process's CPU."""
        return sum(min(wall, cpu) > bound for wall, cpu in self.gaps)

    def describe(self) -> str:
        """Numbers for the test log."""
        walls = sorted(w for w, _ in self.gaps)
        return (
            f"{len(walls)} ticks; gap median {statistics.median(walls) * 1e3:.2f} ms, "
            f"largest {walls[-1] * 1e3:.1f} ms; this process's CPU within one gap at most "
            f"{self.stall * 1e3:.2f} ms ({self.stalls_over(STALL_BOUND)} over "
            f"{STALL_BOUND * 1e3:.0f} ms)"
        )


async def measured(work: Awaitable[T]) -> tuple[T, Ticker]:
    """Await `work` while a ticker measures the loop, with the garbage collector paused."""
    ticker = Ticker()
    gc.collect()
    gc.disable()
    try:
        task = asyncio.ensure_future(ticker.run())
        await asyncio.sleep(0.01)
        try:
            result = await work
        finally:
            ticker.running = False
            await task
    finally:
        gc.enable()
    return result, ticker


@pytest.fixture(scope="module")
def probe(demo_paths: tuple[Path, Path]) -> probes.Probe:
    """The demo probe."""
    return probes.load(demo_paths[1], model=demo_paths[0])


@pytest.fixture(scope="module")
def table() -> guard.health.HealthTable:
    """A readiness table of the two-worker pool's own (conftest clears the process's one)."""
    return guard.health.HealthTable()


@pytest.fixture(scope="module")
def pool(probe: probes.Probe, table: guard.health.HealthTable) -> Iterator[guard.Pool]:
    """Two workers serving the clean demo vocoder."""
    with guard.Pool(
        demo.demo_factory(threads=1),
        probe,
        processes=2,
        policy=quiet_policy(),
        name="vocoder",
        health=table,
    ) as p:
        yield p


@pytest.fixture(scope="module")
def single(probe: probes.Probe) -> Iterator[guard.Pool]:
    """One worker, a 1 s wait bound and room for 30 waiting calls."""
    with guard.Pool(
        demo.demo_factory(threads=1),
        probe,
        processes=1,
        policy=quiet_policy(wait_timeout=1.0),
        name="single",
        max_waiting=30,
        health=guard.health.HealthTable(),
    ) as p:
        yield p


def test_arun_and_amap_return_owned_outputs_in_order(pool: guard.Pool) -> None:
    """amap serves 8 distinct requests in order; each output is its own writable array."""
    inputs = [demo.demo_mel(40 + 20 * i, seed=i) for i in range(8)]
    outputs = asyncio.run(pool.amap([{"mel": x} for x in inputs]))
    for x, out in zip(inputs, outputs, strict=True):
        np.testing.assert_allclose(out["wav"], reference(x), rtol=0, atol=1e-5)
        assert out["wav"].flags.writeable
    assert not np.shares_memory(outputs[0]["wav"], outputs[1]["wav"])


def test_loop_stays_free_while_100_calls_run(pool: guard.Pool) -> None:
    """100 calls of about 30 ms each, all in flight at once: this process spends under 10 ms
    of CPU within the loop's gaps (at most 2 of the thousands may exceed it: on a loaded machine
    one has taken 31 ms; a forward in the loop's process would make one per call), the loop
    ticks freely most of the time, and every output matches its reference.

    The calls start one per loop iteration, as requests reach a server; 100 calls started in
    one iteration would hold it for 100 times the per-call cost (input checks and pickling,
    0.05 to 0.2 ms by machine load). Two long calls occupy both workers first, so that all
    100 are in flight together however fast the machine is."""
    inputs = [demo.demo_mel(FRAMES, seed=i) for i in range(10)]
    expected = [reference(x) for x in inputs]
    long = demo.demo_mel(LONG, seed=11)
    long_expected = reference(long)
    flight = {"now": 0, "peak": 0}

    async def call(x: Array) -> dict[str, Array]:
        flight["now"] += 1
        flight["peak"] = max(flight["peak"], flight["now"])
        try:
            return await pool.arun({"mel": x})
        finally:
            flight["now"] -= 1

    async def hundred() -> list[dict[str, Array]]:
        blockers = [asyncio.ensure_future(pool.arun({"mel": long})) for _ in range(2)]
        await until("both workers busy", lambda: all(w.busy for w in pool.status()) or None)
        tasks = []
        for k in range(100):
            tasks.append(asyncio.ensure_future(call(inputs[k % 10])))
            await asyncio.sleep(0)
        return list(await asyncio.gather(*blockers, *tasks))  # compared after the window

    async def main() -> tuple[list[dict[str, Array]], Ticker, float]:
        await pool.amap([{"mel": x} for x in inputs[:4]])  # warm: both threads, both workers
        start = time.perf_counter()
        outputs, ticker = await measured(hundred())
        return outputs, ticker, time.perf_counter() - start

    outputs, ticker, seconds = asyncio.run(main())
    print(f"100 calls of {FRAMES} frames in {seconds:.2f} s; {ticker.describe()}")
    assert flight["peak"] == 100
    for out in outputs[:2]:
        np.testing.assert_allclose(out["wav"], long_expected, rtol=0, atol=1e-5)
    for k, out in enumerate(outputs[2:]):
        np.testing.assert_allclose(out["wav"], expected[k % 10], rtol=0, atol=1e-5)
    assert ticker.stalls_over(STALL_BOUND) <= 2, ticker.describe()
    assert statistics.median(w for w, _ in ticker.gaps) < 0.005, ticker.describe()


def test_forward_in_a_thread_stalls_the_loop(probe: probes.Probe) -> None:
    """Control: the same measure sees an in-process forward run with asyncio.to_thread hold
    the loop for about the forward's own CPU time, since forward holds the GIL."""
    session = guard.wrap(
        demo.demo_factory(threads=1),
        probe,
        name="in-process",
        policy=quiet_policy(),
        registry=CollectorRegistry(),
        health=guard.health.HealthTable(),
    )
    x = {"mel": demo.demo_mel(FRAMES)}
    costs = []
    for _ in range(5):
        start = time.thread_time()
        session.run(x)
        costs.append(time.thread_time() - start)
    forward = statistics.median(costs)

    async def five() -> None:
        for _ in range(5):
            await asyncio.to_thread(session.run, x)

    try:
        _, ticker = asyncio.run(measured(five()))
    finally:
        session.close()
    print(f"forward {forward * 1e3:.1f} ms CPU; {ticker.describe()}")
    assert forward > 1.25 * STALL_BOUND
    assert ticker.stall > 0.8 * forward, ticker.describe()


def test_bad_input_raises_in_the_caller_and_reaches_no_worker(pool: guard.Pool) -> None:
    """A wrong mel shape raises InputMismatch from arun; no worker serves a request for it."""
    before = sum(w.requests for w in pool.status())
    with pytest.raises(guard.InputMismatch, match="mel"):
        asyncio.run(pool.arun({"mel": demo.demo_mel(50)[:, :40]}))
    with pytest.raises(guard.InputMismatch, match="mel"):
        good = {"mel": demo.demo_mel(50)}
        asyncio.run(pool.amap([good, {"mel": np.zeros((1, 80, 10), np.int8)}, good]))
    assert sum(w.requests for w in pool.status()) - before <= 2  # amap's good ones at most


def test_a_failed_amap_leaves_no_task_running(pool: guard.Pool) -> None:
    """When one request of amap fails, amap raises its error only once every other request's
    task has ended (cancelled or served): nothing it started is left running."""
    good = {"mel": demo.demo_mel(50)}

    async def failing() -> set[asyncio.Task[Any]]:
        with pytest.raises(guard.InputMismatch, match="mel"):
            await pool.amap([good, good, {"mel": demo.demo_mel(50)[:, :40]}, good, good])
        return asyncio.all_tasks() - {asyncio.current_task()}

    assert asyncio.run(failing()) == set()


def test_cancelled_call_in_flight_leaves_the_worker_serving(single: guard.Pool) -> None:
    """A call cancelled while its worker computes: the worker is not killed, and the next call
    on that same worker gets its own output, not the cancelled call's late reply."""
    long, short = demo.demo_mel(CANCEL, seed=3), demo.demo_mel(50, seed=4)
    expected = reference(short)
    (before,) = single.status()

    async def main() -> dict[str, Array]:
        task = asyncio.ensure_future(single.arun({"mel": long}))
        await until("a busy worker", lambda: single.status()[0].busy or None)
        with stopped(before.pid):  # it cannot answer before the cancel, however slow this is
            assert task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, BOUND)
        return await single.arun({"mel": short})

    out = asyncio.run(main())
    assert out["wav"].shape == expected.shape
    np.testing.assert_allclose(out["wav"], expected, rtol=0, atol=1e-5)
    (after,) = single.status()
    assert (after.pid, single.replaced) == (before.pid, 0)
    assert after.requests == before.requests + 2  # the cancelled one was served, then dropped


def test_cancelled_call_still_in_line_is_never_sent(single: guard.Pool) -> None:
    """A call cancelled while it waits for the busy worker is dropped: the worker serves only
    the two others, and both get their own outputs."""
    a, b, c = (demo.demo_mel(n, seed=n) for n in (CANCEL, 60, 70))
    (before,) = single.status()

    async def main() -> tuple[dict[str, Array], dict[str, Array]]:
        first = asyncio.ensure_future(single.arun({"mel": a}))
        await until("a busy worker", lambda: single.status()[0].busy or None)
        with stopped(before.pid):  # the first stays in its hands: no lane frees for the third
            second = asyncio.ensure_future(single.arun({"mel": b}))
            third = asyncio.ensure_future(single.arun({"mel": c}))
            await asyncio.sleep(0)  # both submitted, in line behind the first
            assert third.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(third, BOUND)
        return await first, await second

    out_a, out_b = asyncio.run(main())
    np.testing.assert_allclose(out_b["wav"], reference(b), rtol=0, atol=1e-5)
    assert out_a["wav"].shape == reference(a).shape
    assert single.status()[0].requests == before.requests + 2


def test_waiting_calls_are_bounded_in_number_and_time(single: guard.Pool) -> None:
    """With one worker and max_waiting=30, a 32nd call is refused at once; of the 31 admitted
    calls of 85 to 170 ms each, those that found no worker within wait_timeout (1 s) raise
    Unavailable by then; the others are served; the pool serves afterwards."""
    x = demo.demo_mel(LONG, seed=5)
    expected = reference(x)

    async def timed(call: Awaitable[dict[str, Array]]) -> tuple[object, float]:
        start = time.monotonic()
        try:
            return await call, time.monotonic() - start
        except guard.Unavailable as exc:
            return exc, time.monotonic() - start

    async def main() -> tuple[list[tuple[object, float]], tuple[object, float]]:
        admitted = [asyncio.ensure_future(timed(single.arun({"mel": x}))) for _ in range(31)]
        await asyncio.sleep(0)
        refused = await timed(single.arun({"mel": x}))
        return list(await asyncio.gather(*admitted)), refused

    results, (error, seconds) = asyncio.run(main())
    assert isinstance(error, guard.Unavailable) and "max_waiting" in str(error)
    assert seconds < 0.5
    served = [r for r, _ in results if isinstance(r, dict)]
    timed_out = [(r, s) for r, s in results if isinstance(r, guard.Unavailable)]
    assert served and timed_out and len(served) + len(timed_out) == 31
    for out in served:
        np.testing.assert_allclose(out["wav"], expected, rtol=0, atol=1e-5)
    for exc, waited in timed_out:
        assert "wait_timeout" in str(exc)
        assert 1.0 <= waited < 1.0 + 5.0  # the bound, plus one request in hand on a slow machine
    again = asyncio.run(single.arun({"mel": demo.demo_mel(50)}))
    assert again["wav"].size > 0


def test_closed_pool_refuses_async_calls_and_leaves_readiness(
    probe: probes.Probe,
) -> None:
    """After close(), arun raises SessionClosed and the pool's readiness entry is gone."""
    table = guard.health.HealthTable()
    pool = guard.Pool(
        demo.demo_factory(threads=1), probe, processes=1, policy=quiet_policy(), health=table
    )
    ready, entries = table.readiness()
    assert ready and [e["name"] for e in entries] == ["pool"]
    pool.close()
    assert table.readiness() == (False, [])
    with pytest.raises(guard.errors.SessionClosed, match=r"^pool 'pool' is closed$"):
        asyncio.run(pool.arun({"mel": demo.demo_mel(50)}))


def test_readiness_lists_the_pool_and_its_workers(
    pool: guard.Pool, table: guard.health.HealthTable
) -> None:
    """The pool is one ready entry, named after it, serving, listing each worker's pid."""
    ready, entries = table.readiness(expect=["vocoder"])
    assert ready
    (entry,) = entries
    assert (entry["name"], entry["state"], entry["healthy"]) == ("vocoder", "serving", True)
    assert [w["pid"] for w in entry["workers"]] == [w.pid for w in pool.status()]


async def watch_readiness(
    table: guard.health.HealthTable, victim: int, seen: list[dict[str, Any]]
) -> list[int]:
    """Record every not-ready entry until the pool is ready without `victim`: the new pids."""
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        ready, entries = table.readiness()
        if not ready:
            seen.append(entries[0])
        else:
            pids = [w["pid"] for w in entries[0]["workers"]]
            if victim not in pids:
                return pids
        await asyncio.sleep(0.005)
    raise AssertionError(f"no ready replacement within {BOUND} s")


def test_worker_killed_mid_call_costs_no_request(
    pool: guard.Pool, table: guard.health.HealthTable
) -> None:
    """SIGKILL on a worker while it serves 20 async calls (the other worker is held stopped
    with a call in hand, so they cannot all end first): every call gets its own correct output;
    readiness says not ready (starting) while the replacement starts, then ready again."""
    inputs = [demo.demo_mel(FRAMES, seed=100 + i) for i in range(4)]
    expected = [reference(x) for x in inputs]
    replaced = pool.replaced
    victim, other = (w.pid for w in pool.status())
    assert victim is not None
    served = sum(w.requests for w in pool.status())
    seen: list[dict[str, Any]] = []

    def serving_while_held() -> bool | None:
        status = pool.status()
        progress = sum(w.requests for w in status) >= served + 2
        return (progress and status[0].busy and status[1].busy) or None

    async def main() -> tuple[list[dict[str, Array]], list[int]]:
        with stopped(other):
            tasks = [asyncio.ensure_future(pool.arun({"mel": inputs[k % 4]})) for k in range(20)]
            await until("the victim serving beside the held worker", serving_while_held)
            os.kill(victim, signal.SIGKILL)
            assert not all(t.done() for t in tasks)
        watcher = asyncio.ensure_future(watch_readiness(table, victim, seen))
        outputs = list(await asyncio.gather(*tasks))
        return outputs, await watcher

    outputs, pids = asyncio.run(main())
    for k, out in enumerate(outputs):
        np.testing.assert_allclose(out["wav"], expected[k % 4], rtol=0, atol=1e-5)
    assert seen and {e["state"] for e in seen} == {"starting"}
    assert any("starting" in r for r in seen[0]["reasons"])
    assert len(pids) == 2 and victim not in pids and pool.replaced == replaced + 1


def test_idle_worker_killed_is_replaced_without_a_request(
    pool: guard.Pool, table: guard.health.HealthTable
) -> None:
    """A worker killed while idle is noticed and replaced with no request sent: readiness goes
    not ready (starting), then ready with a new pid."""
    victim = pool.status()[1].pid
    assert victim is not None
    replaced = pool.replaced
    seen: list[dict[str, Any]] = []
    os.kill(victim, signal.SIGKILL)
    pids = asyncio.run(watch_readiness(table, victim, seen))
    assert seen and seen[-1]["state"] == "starting"
    assert victim not in pids and pool.replaced == replaced + 1
