"""`mnn-guard bench`: what checks beyond the canary cost on the hot path.

Shadow checks (`Policy(shadow_every=100)`): one session's guarded `run()` with its sampling
on against off, in alternating rounds of 100 calls (one sample in each round with it on);
this process's RSS over many calls with them on, at the start, halfway and at the end (flat:
the second half grows by less than SHADOW_RSS_MB; the first may still see the allocator
settle); and the RSS of the reference's own process.

Sentinel outputs (a probe recorded with `sentinels="auto"`): guarded `run()` of a session
whose probe has them against one whose probe has not, in alternating rounds; MNN computes
the sentinels on every forward.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import probes
from guard.errors import GuardError
from guard.ladder import Policy
from guard.session import Factory
from guard.tools.bench_hot import all_met
from guard.tools.bench_memory import rss_mb
from guard.tools.bench_timing import Inputs, Spread, judged, per_round, quiet_wrap, rounds_of
from probes import Probe, ProbeError

__all__ = [
    "SHADOW_CALLS",
    "SHADOW_EVERY",
    "SHADOW_RATIO_TARGET",
    "SHADOW_RSS_MB",
    "SentinelCost",
    "ShadowCost",
    "sentinel_cost",
    "shadow_cost",
]

SHADOW_EVERY = 100  # the sampling measured
SHADOW_RATIO_TARGET = 0.98  # throughput with shadow checks >= 0.98x without
SHADOW_CALLS = 10_000  # calls over which RSS is read with shadow checks on (a full run)
SHADOW_RSS_MB = 5.0  # flat: RSS grows less than this over the second half of those calls


@dataclass(frozen=True, slots=True, kw_only=True)
class ShadowCost:
    """Guarded `run()` with shadow checks every `every` calls against without them."""

    every: int
    shadow_us: float  # medians over the rounds
    plain_us: float
    ratio: Spread  # throughput with / without, per round
    checks: int  # samples the shadow judged during the rounds
    dropped: int  # samples dropped (its queue was full)
    calls: int  # calls run with shadow checks on for the RSS figure
    rss_start_mb: float  # after the rounds (their samples were checked)
    rss_middle_mb: float  # after half the calls: the allocator has settled
    rss_end_mb: float
    reference_mb: float  # RSS the shadowed session added here beyond a plain one
    where: str  # where the reference ran: "process" (its own) or "thread" (this process)
    process_mb: float  # the reference process's RSS (NaN on a thread)
    target: str
    met: bool | None


@dataclass(frozen=True, slots=True, kw_only=True)
class SentinelCost:
    """Guarded `run()` of a probe recorded with sentinels against one recorded without."""

    sentinels: tuple[str, ...]  # the tensors `auto` chose
    with_us: float  # medians over the rounds
    without_us: float
    added_us: Spread  # per round: with - without, per call
    ratio: Spread  # throughput with / without, per round


def shadow_cost(
    factory: Factory, probe: Probe, inputs: Inputs, policy: Policy, *, quick: bool
) -> ShadowCost:
    """One session with `shadow_every=SHADOW_EVERY` (metrics off), timed in alternating rounds
    with its sampling on and off (the same module either way: two sessions' modules differ in
    speed by more than the checks cost); then RSS over many calls with it on."""
    before = rss_mb()
    shadowed = quiet_wrap(
        factory, probe, "bench-shadow", dataclasses.replace(policy, shadow_every=SHADOW_EVERY)
    )
    between = rss_mb()  # wrap returns once the reference module is built
    plain = quiet_wrap(factory, probe, "bench-no-shadow", policy)
    reference_mb = (between - before) - (rss_mb() - between)
    plain.close()
    shadow = shadowed._shadow  # its sampling period, set per side below
    assert shadow is not None

    def sampled(every: int) -> Callable[[], object]:
        def call() -> object:
            shadow.every = every
            return shadowed.run(inputs)

        return call

    try:
        # short rounds of SHADOW_EVERY calls, many of them: each round with sampling on holds
        # exactly one sample, and the machine's drifts cancel within a pair of rounds
        with_shadow, without = rounds_of(
            [sampled(SHADOW_EVERY), sampled(sys.maxsize)],
            rounds=9 if quick else 60,
            per_round=SHADOW_EVERY,
            warmup=SHADOW_EVERY,
        )
        shadow.every = SHADOW_EVERY
        total = SHADOW_CALLS // 20 if quick else SHADOW_CALLS
        start = rss_mb()
        for _ in range(total // 2):
            shadowed.run(inputs)
        middle = rss_mb()
        for _ in range(total - total // 2):
            shadowed.run(inputs)
        end = rss_mb()
        status = shadowed.status.shadow
        pid = status.pid if status is not None else None
        process_mb = rss_mb(pid) if pid is not None else math.nan
    finally:
        shadowed.close()
    ratio = per_round(without, with_shadow, operator.truediv, 1.0)
    return ShadowCost(
        every=SHADOW_EVERY,
        shadow_us=statistics.median(with_shadow) * 1e6,
        plain_us=statistics.median(without) * 1e6,
        ratio=ratio,
        checks=status.checks if status is not None else 0,
        dropped=status.dropped if status is not None else 0,
        calls=total,
        rss_start_mb=start,
        rss_middle_mb=middle,
        rss_end_mb=end,
        reference_mb=reference_mb,
        where=str(status.where) if status is not None else "none",
        process_mb=process_mb,
        target=(
            f"throughput >= {SHADOW_RATIO_TARGET:g}x without; RSS flat over the second half "
            f"(< {SHADOW_RSS_MB:g} MB)"
        ),
        met=all_met(
            [judged(ratio, SHADOW_RATIO_TARGET, at_least=True), end - middle < SHADOW_RSS_MB]
        ),
    )


def sentinel_cost(
    factory: Factory, probe: Probe, inputs: Inputs, policy: Policy, *, quick: bool
) -> SentinelCost | str:
    """The probe's first case recorded again with `sentinels="auto"` and without, each probe
    wrapped (metrics off), their `run()` timed in alternating rounds; or why there is nothing
    to price (`auto` finds no sentinel, or this factory cannot serve one)."""
    case = probe.cases[0].inputs
    try:
        with_sentinels = probes.record(factory, case, sentinels="auto")
        chosen = tuple(with_sentinels.sentinel_names)
        if not chosen:
            return "`auto` finds no sentinel in the model (no output made by a squashing op)"
        sentinel = quiet_wrap(factory, with_sentinels, "bench-sentinels", policy)
    except (ProbeError, GuardError) as exc:
        return f"this factory cannot record or serve sentinels: {exc}"
    plain = quiet_wrap(factory, probes.record(factory, case), "bench-no-sentinels", policy)
    try:
        with_s, without_s = rounds_of(
            [lambda: sentinel.run(inputs), lambda: plain.run(inputs)],
            rounds=7 if quick else 25,
            per_round=5 if quick else 20,
        )
    finally:
        sentinel.close()
        plain.close()
    return SentinelCost(
        sentinels=chosen,
        with_us=statistics.median(with_s) * 1e6,
        without_us=statistics.median(without_s) * 1e6,
        added_us=per_round(with_s, without_s, operator.sub, 0.0).scaled(1e6),
        ratio=per_round(without_s, with_s, operator.truediv, 1.0),
    )
