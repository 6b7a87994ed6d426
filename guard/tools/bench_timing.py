"""How `mnn-guard bench` times: sides alternated in rounds, paired medians, the raw side.

Every comparison alternates its sides (and their order) in rounds after a warm-up and reports
medians, so that a noisy machine slows both sides alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from numpy.typing import NDArray

from guard import mnn
from guard.ladder import Policy
from guard.session import Factory, GuardedSession
from guard.wrapping import wrap
from probes import Probe

__all__ = [
    "REPORT",
    "Array",
    "Inputs",
    "interleaved",
    "paired",
    "quiet_wrap",
    "raw_call",
    "rounds_of",
]

REPORT = "report"  # a measure reported without a target

Array = NDArray[Any]
Inputs = dict[str, Array]


def interleaved(
    sides: Sequence[Callable[[], object]], *, rounds: int, per_round: int, warmup: int = 3
) -> list[float]:
    """Median seconds per call of each side, alternating sides (and their order) every round."""
    return [
        statistics.median(s)
        for s in rounds_of(sides, rounds=rounds, per_round=per_round, warmup=warmup)
    ]


def rounds_of(
    sides: Sequence[Callable[[], object]], *, rounds: int, per_round: int, warmup: int = 3
) -> list[list[float]]:
    """Seconds per call of each side in every round, alternating sides (and their order)."""
    for fn in sides:
        for _ in range(warmup):
            fn()
    samples: list[list[float]] = [[] for _ in sides]
    order = list(range(len(sides)))
    for _ in range(rounds):
        for i in order:
            fn = sides[i]
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            samples[i].append((time.perf_counter() - start) / per_round)
        order.reverse()
    return samples


def paired(a: Sequence[float], b: Sequence[float], op: Callable[[float, float], float]) -> float:
    """Median over rounds of `op(a, b)` within each round: drifts between rounds cancel."""
    return statistics.median(op(x, y) for x, y in zip(a, b, strict=True))


def raw_call(module: Any, arrays: Sequence[Array]) -> Callable[[], list[Array]]:
    """What a user does without the guard: Vars in, forward, copy every output out."""
    runner = mnn.adapt(module)
    return lambda: runner.run(arrays)


def quiet_wrap(factory: Factory, probe: Probe, name: str, policy: Policy) -> GuardedSession:
    """A guarded session without the Prometheus listener (its cost is measured with it on)."""
    return wrap(factory, probe, name=name, policy=policy, metrics=False)
