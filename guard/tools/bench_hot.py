"""`mnn-guard bench`: the hot path, guarded `run()` against raw forward + copy, and its kin.

The model's own hot path, the built-in small and tiny reference models, what `dynamic=True`
costs (`guard.tools.dynamic_cost`, doctor's measure), the Session API against the Module API,
and a re-check's cost. Every ratio and difference comes with its spread over rounds.
"""

from __future__ import annotations

import operator
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

import probes
from guard import mnn
from guard.ladder import DYNAMIC, Policy
from guard.session import Factory, GuardedSession
from guard.tools.bench_timing import (
    REPORT,
    Array,
    Inputs,
    Spread,
    interleaved,
    judged,
    per_round,
    quiet_wrap,
    raw_call,
    rounds_of,
)
from guard.tools.dynamic_cost import relative, rung_rounds
from guard.tools.models import (
    SMALL_INPUTS,
    SMALL_OUTPUTS,
    build_small,
    build_tiny,
    small_inputs,
)
from guard.wrapping import ignored_rungs, wrap
from probes import Probe

__all__ = [
    "SMALL_ADDED_US_TARGET",
    "SMALL_RATIO_TARGET",
    "VOCODER_RATIO_TARGET",
    "ApiCompare",
    "DynamicCost",
    "HotPath",
    "Recheck",
    "Speedup",
    "api_compare",
    "dynamic_cost",
    "dynamic_speedup",
    "hot_path",
    "recheck_cost",
    "small_hot_path",
    "tiny_hot_path",
]

VOCODER_RATIO_TARGET = 0.99  # guarded / raw throughput on a model of 2 ms or more
SMALL_ADDED_US_TARGET = 8.0  # microseconds added per call on the small 3-input model (0.2 ms)
SMALL_RATIO_TARGET = 0.97  # guarded / raw throughput there


@dataclass(frozen=True, slots=True, kw_only=True)
class HotPath:
    """Guarded `run()` (metrics on, and off) against raw forward + copy on the same module."""

    model: str
    guarded_us: float  # median per call, as wrapped by default: Prometheus metrics on
    guarded_no_metrics_us: float
    raw_us: float
    ratio: Spread  # guarded throughput / raw throughput, per round
    added_us: Spread  # guarded - raw time per call, per round (drifts between rounds cancel)
    added_no_metrics_us: Spread
    target: str
    met: bool | None  # None: reported only (no target for this model), or inconclusive


@dataclass(frozen=True, slots=True, kw_only=True)
class DynamicCost:
    """Raw forwards of the static rung against raw `dynamic=True` forwards, interleaved on the
    same inputs through the same factory (doctor's measure): what a fallback would cost."""

    static_us: float  # medians over the rounds
    dynamic_us: float
    ratio: Spread  # dynamic time / static time, per round: > 1 means dynamic is slower
    dynamic_ignored: bool  # MNN loaded the dynamic module statically (control flow)


Speedup = DynamicCost  # the row's name before it was doctor's measure


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiCompare:
    """Raw Session API run (copy in, runSession, copy out) against a raw static Module forward
    + copy, on the same file and thread count (`bench --api session`)."""

    session_us: float
    module_us: float
    ratio: Spread  # session time / module time per round: < 1 means the Session API is faster


@dataclass(frozen=True, slots=True, kw_only=True)
class Recheck:
    """One re-check of the live module, and its cost per call at a given period."""

    recheck_ms: float
    every_calls: int
    per_call_us: float


def hot_path(
    model: str,
    factory: Factory,
    probe: Probe,
    inputs: Inputs,
    *,
    quick: bool,
    target: str,
    fast: bool = False,
    min_ratio: float | None = None,
    max_added_us: float | None = None,
) -> HotPath:
    """Guarded `run()`, with and without metrics, each against raw forward + copy on the very
    module its session serves (two modules of one file differ by a few microseconds a call).

    `fast` (a model of microseconds) takes many calls per round. The target is met when the
    throughput ratio is at least `min_ratio` and the added time at most `max_added_us`
    (each when given); with neither, the row is reported only.
    """
    policy = Policy(background=False, promote_after=None)
    made: list[Any] = []

    def keeping(**overrides: Any) -> Any:
        made.append(factory(**overrides))
        return made[-1]

    session = wrap(
        keeping, probe, name=f"bench-{model}", policy=policy, registry=CollectorRegistry()
    )
    served = made[-1]
    quiet = quiet_wrap(keeping, probe, f"bench-{model}-quiet", policy)
    quiet_served = made[-1]
    arrays = [inputs[name] for name in probe.input_names]
    rounds = (7 if quick else 25) if fast else (5 if quick else 61)  # odd: a true median pair
    calls = (200 if quick else 1000) if fast else (3 if quick else 4)
    guarded, raw, quiet_rounds, quiet_raw = rounds_of(
        [
            lambda: session.run(inputs),
            raw_call(served, arrays),
            lambda: quiet.run(inputs),
            raw_call(quiet_served, arrays),
        ],
        rounds=rounds,
        per_round=calls,
    )
    session.close()
    quiet.close()
    guarded_s, quiet_s, raw_s = (statistics.median(x) for x in (guarded, quiet_rounds, raw))
    ratio = per_round(raw, guarded, operator.truediv, 1.0)
    added_us = per_round(guarded, raw, operator.sub, 0.0).scaled(1e6)
    verdicts = []
    if min_ratio is not None:
        verdicts.append(judged(ratio, min_ratio, at_least=True))
    if max_added_us is not None:
        verdicts.append(judged(added_us, max_added_us, at_least=False))
    return HotPath(
        model=model,
        guarded_us=guarded_s * 1e6,
        guarded_no_metrics_us=quiet_s * 1e6,
        raw_us=raw_s * 1e6,
        ratio=ratio,
        added_us=added_us,
        added_no_metrics_us=per_round(quiet_rounds, quiet_raw, operator.sub, 0.0).scaled(1e6),
        target=target,
        met=all_met(verdicts),
    )


def all_met(verdicts: Sequence[bool | None]) -> bool | None:
    """Every target met: True; any missed: False; else None (inconclusive, or no target)."""
    if any(v is False for v in verdicts):
        return False
    if verdicts and all(v is True for v in verdicts):
        return True
    return None


def dynamic_cost(factory: Factory, probe: Probe, inputs: Inputs, *, quick: bool) -> DynamicCost:
    """A static and a `dynamic=True` module from `factory`, timed raw in interleaved rounds."""
    static_module, _ = mnn.load(factory, {})
    dynamic_module, report = mnn.load(factory, DYNAMIC.overrides)
    arrays = [inputs[n] for n in probe.input_names]
    static, dynamic = rung_rounds(
        [mnn.adapt(static_module), mnn.adapt(dynamic_module)], arrays, rounds=7 if quick else 31
    )
    return DynamicCost(
        static_us=statistics.median(static) * 1e6,
        dynamic_us=statistics.median(dynamic) * 1e6,
        ratio=relative(dynamic, static),
        dynamic_ignored=report.turned_static or bool(ignored_rungs(factory, (DYNAMIC,))),
    )


dynamic_speedup = dynamic_cost  # the old name


def recheck_cost(session: GuardedSession, *, repeats: int, every: int) -> Recheck:
    """Median time of a forced re-check of the live module; amortised over `every` calls."""
    (seconds,) = interleaved(
        [lambda: session.maintain(force_recheck=True)], rounds=repeats, per_round=1, warmup=1
    )
    return Recheck(recheck_ms=seconds * 1e3, every_calls=every, per_call_us=seconds / every * 1e6)


def api_compare(factory: Factory, arrays: Sequence[Array], *, quick: bool) -> ApiCompare:
    """A session from `factory()` against a static module from `factory(api="module")`, raw."""
    session = raw_call(factory(), arrays)
    module = raw_call(mnn.load(factory, {"api": "module"})[0], arrays)
    rounds = 5 if quick else 31
    session_rounds, module_rounds = rounds_of(
        [session, module], rounds=rounds, per_round=3 if quick else 10
    )
    return ApiCompare(
        session_us=statistics.median(session_rounds) * 1e6,
        module_us=statistics.median(module_rounds) * 1e6,
        ratio=per_round(session_rounds, module_rounds, operator.truediv, 1.0),
    )


def tiny_hot_path(quick: bool) -> HotPath:
    """A reference hot path: a tiny built-in model where per-call overhead is everything."""
    with tempfile.TemporaryDirectory(prefix="mnn-guard-bench-") as tmp:
        tiny_path = Path(tmp) / "tiny.mnn"
        build_tiny(tiny_path)
        tiny_factory = mnn.mnn_factory(tiny_path, ["x"], ["y"], threads=1)
        x = np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)
        tiny_probe = probes.record(tiny_factory, {"x": x}, derive={"x": -1})
        return hot_path(
            "tiny", tiny_factory, tiny_probe, {"x": x}, quick=quick, target=REPORT, fast=True
        )


def small_hot_path(quick: bool) -> HotPath:
    """The reference hot path with a target: a 0.2 ms model with three mixed inputs."""
    with tempfile.TemporaryDirectory(prefix="mnn-guard-bench-") as tmp:
        path = Path(tmp) / "small.mnn"
        build_small(path)
        factory = mnn.mnn_factory(path, SMALL_INPUTS, SMALL_OUTPUTS, threads=1)
        inputs = small_inputs()
        probe = probes.record(factory, inputs, derive={"audio": -1})
        return hot_path(
            "small",
            factory,
            probe,
            inputs,
            quick=quick,
            target=f"<= {SMALL_ADDED_US_TARGET:g} us added, >= {SMALL_RATIO_TARGET:g}x",
            fast=True,
            min_ratio=SMALL_RATIO_TARGET,
            max_added_us=SMALL_ADDED_US_TARGET,
        )
