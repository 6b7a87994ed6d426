"""`mnn-guard bench`: RSS growth over repeated init + recover cycles."""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from guard.ladder import Policy
from guard.session import Factory
from guard.testing import Fault, FaultyFactory
from guard.tools.bench_timing import quiet_wrap
from guard.tools.output import quiet_log
from probes import Probe

__all__ = ["MEMORY_MB_TARGET", "Memory", "memory_growth", "rss_mb"]

MEMORY_MB_TARGET = 20.0  # RSS growth over the init/recover cycles


@dataclass(frozen=True, slots=True, kw_only=True)
class Memory:
    """RSS growth over repeated init + recover cycles (after a warm-up)."""

    cycles: int
    inits: int
    rss_start_mb: float
    rss_end_mb: float
    growth_mb: float
    target: str
    met: bool


def rss_mb(pid: int | None = None) -> float:
    """Resident set size of this process (or of process `pid`) in MiB, from /proc; else this
    process's peak from getrusage (NaN for another process)."""
    try:
        status = Path(f"/proc/{'self' if pid is None else pid}/status")
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    if pid is not None:
        return math.nan
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_growth(factory: Factory, probe: Probe, *, cycles: int) -> Memory:
    """RSS before and after `cycles` guarded builds whose first init is degraded (re-init)."""
    policy = Policy(background=False, promote_after=None)
    count = [0]

    def cycle() -> None:
        faulty = FaultyFactory(factory, fault=Fault.NOISE, schedule=[True])
        quiet_wrap(faulty, probe, "bench-memory", policy).close()
        count[0] += faulty.inits

    def reset() -> None:
        count[0] = 0

    with quiet_log():  # every cycle's first init fails on purpose
        return _memory_cycles(cycle, cycles, lambda: count[0], reset)


def _memory_cycles(
    cycle: Callable[[], None], cycles: int, inits: Callable[[], int], reset: Callable[[], None]
) -> Memory:
    """Warm up, then RSS before and after `cycles` calls of `cycle`."""
    for _ in range(max(3, cycles // 10)):  # warm-up: allocators and caches reach steady state
        cycle()
    gc.collect()
    reset()
    start = rss_mb()
    for _ in range(cycles):
        cycle()
    gc.collect()
    end = rss_mb()
    return Memory(
        cycles=cycles,
        inits=inits(),
        rss_start_mb=start,
        rss_end_mb=end,
        growth_mb=end - start,
        target=f"< {MEMORY_MB_TARGET:g} MB",
        met=end - start < MEMORY_MB_TARGET,
    )
