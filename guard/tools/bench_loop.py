"""`mnn-guard bench`: how long a burst of `arun` calls holds the event loop.

`calls` calls reach the loop at once (created in one iteration, as a burst of requests reaches
a server) on a pool of N workers. Measured on the loop: how long admitting all of them held it
(every call checks its inputs and writes them to a worker's lane or joins the line), and every
gap between the wake-ups of a task that sleeps 1 ms at a time, from the burst until the last
call is served: their 99th percentile and the largest, with this process's CPU time within the
largest (the rest of a gap is the operating system running something else). The garbage
collector is paused meanwhile, as a full collection of the benchmark's own heap is no pool's.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from dataclasses import dataclass

from guard.pool import Pool
from guard.tools.bench_timing import Inputs

__all__ = ["BURST_CALLS", "GAP_P99_MS_TARGET", "HOLD_MS_TARGET", "LoopBurst", "loop_burst"]

BURST_CALLS = 100
HOLD_MS_TARGET = 10.0  # admitting the whole burst, in all
GAP_P99_MS_TARGET = 5.0  # the loop's 99th-percentile gap while the burst runs
TICK = 0.001


@dataclass(frozen=True, slots=True, kw_only=True)
class LoopBurst:
    """What bursts of `calls` arun calls did to the event loop, over `bursts` bursts."""

    calls: int
    processes: int
    bursts: int
    served_s: float  # median time from a burst to its last answer
    hold_ms: float  # admitting one burst, in all: the median burst
    hold_max_ms: float  # ... and the worst
    gap_p99_ms: float  # over every gap of every burst
    gap_max_ms: float
    gap_max_cpu_ms: float  # this process's CPU time within the largest gap
    ticks: int
    target: str
    met: bool


Gaps = list[tuple[float, float]]  # (wall, this process's CPU) of each tick


async def _burst(pool: Pool, inputs: Inputs, calls: int) -> tuple[float, float, Gaps]:
    """One burst: (seconds admitting it, seconds until served, the ticker's gaps)."""
    gaps: Gaps = []
    running = True

    async def tick() -> None:
        last, cpu = time.perf_counter(), time.process_time()
        while running:
            await asyncio.sleep(TICK)
            now, used = time.perf_counter(), time.process_time()
            gaps.append((now - last, used - cpu))
            last, cpu = now, used

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0.01)
    start = time.perf_counter()
    tasks = [asyncio.ensure_future(pool.arun(inputs)) for _ in range(calls)]
    await asyncio.sleep(0)  # every call's admission runs before this resumes
    held = time.perf_counter() - start
    await asyncio.gather(*tasks)
    served = time.perf_counter() - start
    running = False
    await ticker
    return held, served, gaps


def loop_burst(pool: Pool, inputs: Inputs, *, bursts: int, calls: int = BURST_CALLS) -> LoopBurst:
    """`bursts` bursts of `calls` arun calls on `pool`, one after another."""
    held: list[float] = []
    served: list[float] = []
    gaps: Gaps = []
    asyncio.run(pool.amap([inputs] * (2 * pool.processes)))  # warm: both lanes of each worker
    for _ in range(bursts):
        gc.collect()
        gc.disable()
        try:
            hold, done, ticks = asyncio.run(_burst(pool, inputs, calls))
        finally:
            gc.enable()
        held.append(hold)
        served.append(done)
        gaps.extend(ticks)
    walls = sorted(w for w, _ in gaps)
    p99 = walls[min(len(walls) - 1, int(0.99 * len(walls)))]
    worst = max(gaps, key=lambda g: g[0])
    return LoopBurst(
        calls=calls,
        processes=pool.processes,
        bursts=bursts,
        served_s=statistics.median(served),
        hold_ms=statistics.median(held) * 1e3,
        hold_max_ms=max(held) * 1e3,
        gap_p99_ms=p99 * 1e3,
        gap_max_ms=worst[0] * 1e3,
        gap_max_cpu_ms=min(worst) * 1e3,
        ticks=len(walls),
        target=f"hold <= {HOLD_MS_TARGET:g} ms, p99 gap < {GAP_P99_MS_TARGET:g} ms",
        met=max(held) * 1e3 <= HOLD_MS_TARGET and p99 * 1e3 < GAP_P99_MS_TARGET,
    )
