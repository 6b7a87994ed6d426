"""`mnn-guard bench`: `guard.Pool` throughput against N x one process's raw rate."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

from guard.pool import Pool
from guard.session import Factory
from guard.tools.bench_timing import REPORT, Inputs, paired, raw_call
from probes import Probe

__all__ = ["POOL_EFFICIENCY_TARGET", "PoolThroughput", "pool_throughput"]

POOL_EFFICIENCY_TARGET = 0.9  # N processes >= 0.9 x N x one process's raw rate (N <= cores)


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolThroughput:
    """`guard.Pool` requests per second on the model."""

    processes: int
    requests: int
    requests_per_s: float
    efficiency: float  # pool rate / (processes x the raw rate), median of paired rounds
    target: str
    met: bool | None  # None: more processes than cores, or a model under 2 ms (reported only)


def pool_throughput(
    factory: Factory,
    probe: Probe,
    inputs: Inputs,
    *,
    processes: int,
    rounds: int,
    per_round: int,
) -> PoolThroughput:
    """`guard.Pool.map` once every worker is up against `processes` x one process's raw
    forward rate, in alternating rounds (`per_round` raw calls, then `per_round` requests per
    worker); the target is judged for models of 2 ms or more, up to one process per core."""
    arrays = [inputs[name] for name in probe.input_names]
    raw = raw_call(factory(), arrays)
    raw_rounds: list[float] = []
    pool_rounds: list[float] = []
    with Pool(factory, probe, processes=processes, name=f"bench-{processes}") as pool:
        pool.map([inputs] * (2 * processes))  # warm-up: every worker has served
        raw()
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(per_round):
                raw()
            raw_rounds.append((time.perf_counter() - start) / per_round)
            start = time.perf_counter()
            pool.map([inputs] * (per_round * processes))
            pool_rounds.append((time.perf_counter() - start) / (per_round * processes))
    efficiency = paired(raw_rounds, pool_rounds, lambda r, p: r / (processes * p))
    judge = statistics.median(raw_rounds) >= 2e-3 and processes <= (os.cpu_count() or 1)
    return PoolThroughput(
        processes=processes,
        requests=rounds * per_round * processes,
        requests_per_s=1 / statistics.median(pool_rounds),
        efficiency=efficiency,
        target=f">= {POOL_EFFICIENCY_TARGET:g} x N x raw" if judge else REPORT,
        met=efficiency >= POOL_EFFICIENCY_TARGET if judge else None,
    )
