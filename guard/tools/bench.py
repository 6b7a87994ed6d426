"""`mnn-guard bench`: what the guard costs, measured side by side in one run.

Every comparison alternates its sides in rounds after a warm-up and reports the median of its
per-round figure with the middle half of the rounds, so that a noisy machine slows both sides
alike and says how noisy it was; a figure whose spread is larger than its effect is reported
"inconclusive". Targets are reported, not enforced (docs/performance.md).

Your model (MODEL --probe DIR, or the built-in demo vocoder) is measured on the probe's own
canary inputs, as recorded; the rows that measure built-in reference models (a small and a tiny
model, a relay model for pools, a synthetic 1 s signal) are reported apart and labelled.

`run_bench` measures (returns a `BenchReport`); `format_bench` and `bench_json` render it. The
measures live by what they measure: `bench_hot` (the hot path, dynamic=True's cost through
`guard.tools.dynamic_cost`), `bench_start` (time to healthy, cold start), `bench_pool` (pools
against raw processes), `bench_loop` (bursts of arun calls), `bench_memory`; `bench_timing`
times them, `bench_report` prints.

>>> report = run_bench(quick=True)  # doctest: +SKIP
>>> report.hot.ratio, report.tiny.added_us  # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import probes
from guard import mnn
from guard.ladder import Policy
from guard.pool import Pool
from guard.session import Factory
from guard.tools import demo
from guard.tools.bench_checks import (
    SHADOW_EVERY,
    SHADOW_RATIO_TARGET,
    SentinelCost,
    ShadowCost,
    sentinel_cost,
    shadow_cost,
)
from guard.tools.bench_hot import (
    SMALL_ADDED_US_TARGET,
    SMALL_RATIO_TARGET,
    VOCODER_RATIO_TARGET,
    ApiCompare,
    DynamicCost,
    HotPath,
    Recheck,
    Speedup,
    api_compare,
    dynamic_cost,
    hot_path,
    recheck_cost,
    small_hot_path,
    tiny_hot_path,
)
from guard.tools.bench_loop import (
    BURST_CALLS,
    GAP_P99_MS_TARGET,
    HOLD_MS_TARGET,
    LoopBurst,
    loop_burst,
)
from guard.tools.bench_memory import MEMORY_MB_TARGET, Memory, memory_growth
from guard.tools.bench_pool import (
    PARENT_CPU_US_TARGET,
    POOL_EFFICIENCY_TARGET,
    SMALL_POOL_TARGET,
    PoolThroughput,
    pool_throughput,
)
from guard.tools.bench_report import BenchReport, bench_json, format_bench
from guard.tools.bench_start import (
    HEALTHY_ADDED_MS_TARGET,
    HELP_S_TARGET,
    IMPORT_S_TARGET,
    JUDGE_MS_TARGET,
    JudgeCost,
    Startup,
    TimeToHealthy,
    reference_judge_cost,
    startup,
    time_to_healthy,
)
from guard.tools.bench_timing import REPORT, Inputs, Spread, quiet_wrap
from guard.tools.models import (
    RELAY_INPUTS,
    RELAY_OUTPUTS,
    SMALL_INPUTS,
    SMALL_OUTPUTS,
    build_relay,
    build_small,
    relay_inputs,
    small_inputs,
)
from probes import Probe

__all__ = [  # the measures and targets under their old names too
    "BURST_CALLS",
    "GAP_P99_MS_TARGET",
    "HEALTHY_ADDED_MS_TARGET",
    "HELP_S_TARGET",
    "HOLD_MS_TARGET",
    "IMPORT_S_TARGET",
    "JUDGE_MS_TARGET",
    "MEMORY_MB_TARGET",
    "PARENT_CPU_US_TARGET",
    "POOL_EFFICIENCY_TARGET",
    "REPORT",
    "SHADOW_EVERY",
    "SHADOW_RATIO_TARGET",
    "SMALL_ADDED_US_TARGET",
    "SMALL_POOL_TARGET",
    "SMALL_RATIO_TARGET",
    "VOCODER_RATIO_TARGET",
    "ApiCompare",
    "BenchReport",
    "DynamicCost",
    "HotPath",
    "JudgeCost",
    "LoopBurst",
    "Memory",
    "PoolThroughput",
    "Recheck",
    "SentinelCost",
    "ShadowCost",
    "Speedup",
    "Spread",
    "Startup",
    "TimeToHealthy",
    "bench_json",
    "format_bench",
    "run_bench",
]


def run_bench(
    *,
    quick: bool = False,
    frames: int = 100,
    factory: Factory | None = None,
    probe: Probe | None = None,
    model: str | os.PathLike[str] | None = None,
    api: str = "module",
    references: bool = True,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Measure every comparison on `factory` with `probe`'s canary inputs (default: the demo
    vocoder at `frames` frames, through MNN's `api`), then the reference measures on built-in
    models (`references=False`: the model only). With api="session" the raw Session API is
    also timed against the Module API."""
    say = progress or (lambda _: None)
    started = time.perf_counter()
    builtin = factory is None or probe is None
    if factory is None or probe is None:
        _, probe_dir = demo.ensure_demo()
        factory, probe = demo.demo_factory(threads=1), probes.load(probe_dir)
        if api == "session":
            factory = mnn.mnn_session_factory(demo.DEMO_MODEL, {"numThread": 1})
        inputs = {demo.DEMO_INPUT: demo.demo_mel(frames)}
        label = demo.DEMO_MODEL.name
    else:
        inputs = dict(probe.cases[0].inputs)
        path = model if model is not None else getattr(factory, "path", None)
        label = Path(path).name if path is not None else "model"
    policy = Policy(background=False, promote_after=None)
    with warnings.catch_warnings():  # a control-flow model: the dynamic row says so
        warnings.simplefilter("ignore", mnn.DynamicIgnoredWarning)
        measured = _measure_model(label, builtin, factory, probe, inputs, policy, quick, say)
    apis = None
    if api == "session":
        say(f"{label}: raw Session API run vs raw Module API forward")
        apis = api_compare(factory, [inputs[n] for n in probe.input_names], quick=quick)
    measured_references = _references(quick, policy, say) if references else {}
    shapes = ", ".join(f"{n} {a.dtype}{list(a.shape)}" for n, a in inputs.items())
    return BenchReport(
        quick=quick,
        model=label,
        builtin=builtin,
        inputs=shapes,
        frames=frames if builtin else None,
        cpus=os.cpu_count() or 1,
        load=os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0,
        mnn_version=mnn.mnn_version(),
        seconds=time.perf_counter() - started,
        **measured_references,
        api=api,
        apis=apis,
        **measured,
    )


def _references(quick: bool, policy: Policy, say: Callable[[str], None]) -> dict[str, Any]:
    """The reference measures on built-in models, by BenchReport field."""
    say("reference: the built-in small 3-input model, added microseconds per call")
    small = small_hot_path(quick)
    say("reference: the built-in tiny model, added microseconds per call")
    tiny = tiny_hot_path(quick)
    say("reference: guard.Pool on the built-in relay and small models")
    pools = _reference_pools(quick)
    judge = reference_judge_cost(policy, rounds=5 if quick else 15)
    say("reference: cold import and --help")
    started_up = startup(repeats=3 if quick else 7)
    return {"small": small, "tiny": tiny, "pools": pools, "judge": judge, "startup": started_up}


def _measure_model(
    label: str,
    builtin: bool,
    factory: Factory,
    probe: Probe,
    inputs: Inputs,
    policy: Policy,
    quick: bool,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Every measure of the model itself, by BenchReport field."""
    say(f"{label}: guarded run() vs raw forward + copy")
    target = f"throughput >= {VOCODER_RATIO_TARGET:g}x raw" if builtin else REPORT
    hot = hot_path(
        label,
        factory,
        probe,
        inputs,
        quick=quick,
        target=target,
        min_ratio=VOCODER_RATIO_TARGET if builtin else None,
    )
    say(f"{label}: static vs dynamic=True, raw forwards interleaved")
    dynamic = dynamic_cost(factory, probe, inputs, quick=quick)
    session = quiet_wrap(factory, probe, f"bench-{label}", policy)
    say(f"{label}: re-check cost")
    recheck = recheck_cost(session, repeats=5 if quick else 15, every=1000)
    session.close()
    say(f"{label}: time to healthy, init + canary vs init + the same forwards")
    healthy = time_to_healthy(factory, probe, policy, repeats=5 if quick else 31)
    say(f"{label}: guard.Pool with 1 and 2 workers against as many raw processes")
    rounds, per_round = (3, 4) if quick else (9, 20)
    one = pool_throughput(
        label, factory, probe, inputs, processes=1, rounds=rounds, per_round=per_round
    )
    with Pool(factory, probe, processes=2, policy=policy, name=f"bench-{label}") as two:
        pool = (
            one,
            pool_throughput(
                label, factory, probe, inputs, processes=2, rounds=rounds, per_round=per_round,
                pool=two,
            ),
        )  # fmt: skip
        say(f"{label}: bursts of {BURST_CALLS} arun calls on 2 workers, the event loop timed")
        burst = loop_burst(two, inputs, bursts=1 if quick else 5)
    say(f"{label}: guarded run() with shadow checks every {SHADOW_EVERY} calls vs without")
    shadow = shadow_cost(factory, probe, inputs, policy, quick=quick)
    say(f"{label}: guarded run() with sentinel outputs (recorded with sentinels='auto') vs without")
    sentinels = sentinel_cost(factory, probe, inputs, policy, quick=quick)
    say(f"{label}: memory over init/recover cycles")
    memory = memory_growth(factory, probe, cycles=20 if quick else 200)
    return {
        "hot": hot,
        "dynamic": dynamic,
        "healthy": healthy,
        "recheck": recheck,
        "pool": pool,
        "burst": burst,
        "shadow": shadow,
        "sentinels": sentinels,
        "memory": memory,
    }


def _reference_pools(quick: bool) -> tuple[PoolThroughput, ...]:
    """guard.Pool with 1 and 2 workers on the relay model (about 2 ms a forward, 100 KB in,
    250 KB out) and on the small model (0.2 ms), each against as many raw processes."""
    rounds, per_round = (3, 4) if quick else (9, 20)
    found: list[PoolThroughput] = []
    with tempfile.TemporaryDirectory(prefix="mnn-guard-bench-") as tmp:
        relay, small = Path(tmp) / "relay.mnn", Path(tmp) / "small.mnn"
        build_relay(relay)
        build_small(small)
        models = (
            ("relay", relay, RELAY_INPUTS, RELAY_OUTPUTS, relay_inputs(), POOL_EFFICIENCY_TARGET),
            ("small", small, SMALL_INPUTS, SMALL_OUTPUTS, small_inputs(), SMALL_POOL_TARGET),
        )
        for name, path, ins, outs, inputs, target in models:
            factory = mnn.mnn_factory(path, list(ins), list(outs), threads=1)
            probe = probes.record(factory, inputs)
            for processes in (1, 2):
                found.append(
                    pool_throughput(
                        name, factory, probe, inputs, processes=processes, rounds=rounds,
                        per_round=per_round * (5 if name == "small" else 1), target=target,
                    )
                )  # fmt: skip
    return tuple(found)
