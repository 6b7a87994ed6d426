"""How `mnn-guard bench` times: sides alternated in rounds, paired figures with their spread.

Every comparison alternates its sides (and their order) in rounds after a warm-up, so that a
noisy machine slows both sides alike, and computes its figure (a ratio, a difference) within
each round. A figure is the median of those per-round values with their spread, the middle
half of them (`Spread`); when the spread is larger than the effect, the rounds do not say which
side is faster, and the row says "inconclusive" instead of a number. A target is met when the
middle half of the rounds meets it, missed when it misses it, and inconclusive otherwise
(docs/performance.md).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    "Spread",
    "interleaved",
    "judged",
    "paired",
    "per_round",
    "quiet_wrap",
    "raw_call",
    "rounds_of",
    "spread",
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


@dataclass(frozen=True, slots=True, kw_only=True)
class Spread:
    """A figure measured in every round: the median of the rounds' values and the middle half
    of them (first to third quartile). `null` is the value that means no effect: 1 for a
    ratio, 0 for a difference."""

    median: float
    low: float
    high: float
    rounds: int
    null: float

    @property
    def inconclusive(self) -> bool:
        """True when the spread (half the middle half's width) is larger than the effect."""
        return (self.high - self.low) / 2 > abs(self.median - self.null)

    def scaled(self, factor: float) -> Spread:
        """The same figure in other units (seconds to microseconds, say)."""
        low, high = sorted((self.low * factor, self.high * factor))
        return Spread(
            median=self.median * factor,
            low=low,
            high=high,
            rounds=self.rounds,
            null=self.null * factor,
        )

    def text(self, unit: str = "x", digits: int = 3, *, sign: bool = False) -> str:
        """`1.034x (0.998..1.071, 15 rounds)`, or `inconclusive (1.01x; 0.97..1.05, ...)`."""
        form = f"{{:{'+' if sign else ''}.{digits}f}}"
        middle = f"{form.format(self.low)}..{form.format(self.high)}, {self.rounds} rounds"
        if self.inconclusive:
            return f"inconclusive ({form.format(self.median)}{unit}; {middle})"
        return f"**{form.format(self.median)}{unit}** ({middle})"


def spread(values: Sequence[float], null: float) -> Spread:
    """The median and middle half of per-round values."""
    ordered = sorted(values)
    if len(ordered) >= 2:
        low, _, high = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        low = high = ordered[0]
    return Spread(
        median=statistics.median(ordered), low=low, high=high, rounds=len(ordered), null=null
    )


def per_round(
    a: Sequence[float], b: Sequence[float], op: Callable[[float, float], float], null: float
) -> Spread:
    """`op(a, b)` within each round, as a Spread (a ratio: null 1; a difference: null 0)."""
    return spread([op(x, y) for x, y in zip(a, b, strict=True)], null)


def judged(figure: Spread, target: float, *, at_least: bool) -> bool | None:
    """Whether the middle half of the rounds meets `target` (True), misses it (False), or
    straddles it (None: inconclusive)."""
    low, high = (figure.low, figure.high) if at_least else (-figure.high, -figure.low)
    bound = target if at_least else -target
    if low >= bound:
        return True
    if high < bound:
        return False
    return None


def raw_call(module: Any, arrays: Sequence[Array]) -> Callable[[], list[Array]]:
    """What a user does without the guard: Vars in, forward, copy every output out."""
    runner = mnn.adapt(module)
    return lambda: runner.run(arrays)


def quiet_wrap(factory: Factory, probe: Probe, name: str, policy: Policy) -> GuardedSession:
    """A guarded session without the Prometheus listener (its cost is measured with it on)."""
    return wrap(factory, probe, name=name, policy=policy, metrics=False)
