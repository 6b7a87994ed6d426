"""What `dynamic=True` costs: one measure, used by `mnn-guard doctor` and `mnn-guard bench`.

Both load the rungs through the same factory (so with the same threads), warm every module up
on the same inputs (the probe's first canary case; a dynamic module's first calls at a shape
cost about twice its later ones), then time raw forwards + copies of each module in
interleaved rounds, alternating their order, and compare them within each round. The figure
is the median of the per-round ratios with their middle half; doctor pools the rounds of all
its fresh processes, bench takes them from one process (docs/performance.md).

>>> times = rung_rounds([static_runner, dynamic_runner], arrays, rounds=15)  # doctest: +SKIP
>>> cost = relative(times[1], times[0])  # doctest: +SKIP
>>> cost.median, cost.inconclusive  # doctest: +SKIP
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

from numpy.typing import NDArray

from guard.mnn import Runner
from guard.tools.bench_timing import Spread, per_round, rounds_of

__all__ = ["PER_ROUND", "WARMUP", "relative", "rung_rounds"]

WARMUP = 3  # untimed calls of each module before the rounds
PER_ROUND = 3  # timed calls of each module per round


def rung_rounds(
    runners: Sequence[Runner],
    arrays: Sequence[NDArray[Any]],
    *,
    rounds: int,
    per_round: int = PER_ROUND,
    warmup: int = WARMUP,
) -> list[list[float]]:
    """Seconds per forward + copy of each runner in every round, on the same inputs, the
    runners alternated (and their order reversed) round by round."""
    return rounds_of(
        [lambda r=r: r.run(arrays) for r in runners],  # type: ignore[misc]
        rounds=rounds,
        per_round=per_round,
        warmup=warmup,
    )


def relative(times: Sequence[float], base: Sequence[float]) -> Spread:
    """How many times `base`'s time each round took (a rung against the first rung)."""
    return per_round(times, base, operator.truediv, 1.0)
