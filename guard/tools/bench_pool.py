"""`mnn-guard bench`: `guard.Pool` against the same forwards in N raw processes.

N raw processes (spawned, each with a module of its own from the same factory) and a pool of N
workers take turns: a round runs `per_round` forwards in each raw process at once, then the same
number of requests per worker through `Pool.map`, the order alternating round by round. The
figure is the pool's rate over the raw processes' rate within each round, with its spread; the
parent's CPU time per request (every thread of this process, during the pool's turn) comes
with it. Targets are judged up to one process per core.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection

from guard import mnn
from guard.ladder import Policy
from guard.pool import Pool
from guard.pool.children import Child
from guard.session import Factory
from guard.tools.bench_hot import all_met
from guard.tools.bench_timing import REPORT, Array, Inputs, Spread, judged, spread
from probes import Probe

__all__ = [
    "PARENT_CPU_US_TARGET",
    "POOL_EFFICIENCY_TARGET",
    "SMALL_POOL_TARGET",
    "PoolThroughput",
    "pool_throughput",
]

POOL_EFFICIENCY_TARGET = 0.95  # N workers >= 0.95 x N raw processes (a model of 2 ms or more)
SMALL_POOL_TARGET = 0.8  # ... on the built-in small model (0.2 ms a forward)
PARENT_CPU_US_TARGET = 100.0  # the pool's parent: CPU time per request
SLOW_MODEL_S = 2e-3  # a forward this long or longer takes POOL_EFFICIENCY_TARGET


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolThroughput:
    """`guard.Pool` requests per second on a model, against N raw processes."""

    model: str
    processes: int
    requests: int
    requests_per_s: float  # the pool's median rate
    raw_forward_ms: float  # one raw forward + copy, median over the raw processes' rounds
    efficiency: Spread  # pool rate / the N raw processes' rate, per round
    parent_cpu_us: Spread  # this process's CPU time per request in the pool's turns
    target: str
    met: bool | None  # None: reported only (more processes than cores), or inconclusive


def _raw_main(conn: Connection, factory: Factory, arrays: Sequence[Array]) -> None:
    """A raw process: one module, then `k` forwards + copies whenever the parent says `k`."""
    runner = mnn.adapt(factory())
    runner.run(arrays)
    conn.send_bytes(b"ready")
    while True:
        try:
            count = int(conn.recv_bytes())
        except (EOFError, OSError, ValueError):
            return
        for _ in range(count):
            runner.run(arrays)
        conn.send_bytes(b"done")


def _raw_turn(raws: Sequence[Child], count: int) -> float:
    """Seconds for every raw process to run `count` forwards, all at once."""
    start = time.perf_counter()
    for raw in raws:
        raw.conn.send_bytes(str(count).encode())
    for raw in raws:
        raw.conn.recv_bytes()
    return time.perf_counter() - start


def pool_throughput(
    model: str,
    factory: Factory,
    probe: Probe,
    inputs: Inputs,
    *,
    processes: int,
    rounds: int,
    per_round: int,
    target: float = POOL_EFFICIENCY_TARGET,
    pool: Pool | None = None,
) -> PoolThroughput:
    """`guard.Pool.map` on `processes` workers (or `pool`, already serving) against as many raw
    processes, in alternating rounds of `per_round` forwards per process; the target is judged
    on models of 2 ms or more (or any model, for `target` below POOL_EFFICIENCY_TARGET), up to
    one process per core."""
    arrays = [inputs[name] for name in probe.input_names]
    ctx = multiprocessing.get_context("spawn")
    raws = [
        Child.spawn(ctx, _raw_main, (factory, arrays), name=f"mnn-guard-bench-raw-{i}")
        for i in range(processes)
    ]
    own = pool is None
    try:
        for raw in raws:
            if not raw.conn.poll(120) or raw.conn.recv_bytes() != b"ready":
                raise RuntimeError(f"a raw process for {model} did not start: {raw.exit_text()}")
        if pool is None:
            policy = Policy(background=False, promote_after=None)
            pool = Pool(factory, probe, processes=processes, policy=policy, name=f"bench-{model}")
        requests = [inputs] * (per_round * processes)
        pool.map(requests * 2)  # warm-up: every worker has served, both lanes used
        _raw_turn(raws, per_round)
        raw_s: list[float] = []
        pool_s: list[float] = []
        cpu_s: list[float] = []
        for index in range(rounds):

            def pool_turn() -> None:
                cpu = time.process_time()
                start = time.perf_counter()
                pool.map(requests)
                pool_s.append(time.perf_counter() - start)
                cpu_s.append(time.process_time() - cpu)

            if index % 2:
                pool_turn()
                raw_s.append(_raw_turn(raws, per_round))
            else:
                raw_s.append(_raw_turn(raws, per_round))
                pool_turn()
    finally:
        if own and pool is not None:
            pool.close()
        for raw in raws:
            raw.stop(grace=5.0)
    # the same work on both sides of a round: the rates' ratio is the times' inverse ratio
    efficiency = spread([r / p for r, p in zip(raw_s, pool_s, strict=True)], 1.0)
    parent = spread([c / len(requests) for c in cpu_s], 0.0).scaled(1e6)
    forward_s = statistics.median(raw_s) / per_round
    judge = processes <= (os.cpu_count() or 1) and (
        forward_s >= SLOW_MODEL_S or target < POOL_EFFICIENCY_TARGET
    )
    return PoolThroughput(
        model=model,
        processes=processes,
        requests=rounds * len(requests),
        requests_per_s=len(requests) / statistics.median(pool_s),
        raw_forward_ms=forward_s * 1e3,
        efficiency=efficiency,
        parent_cpu_us=parent,
        target=(
            f">= {target:g} x N raw processes, parent CPU <= {PARENT_CPU_US_TARGET:g} us/request"
            if judge
            else REPORT
        ),
        met=all_met(
            [
                judged(efficiency, target, at_least=True),
                judged(parent, PARENT_CPU_US_TARGET, at_least=False),
            ]
        )
        if judge
        else None,
    )
