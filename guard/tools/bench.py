"""`mnn-guard bench`: what the guard costs, measured side by side in one run.

Every comparison alternates its two sides in rounds after a warm-up and reports medians and
their ratio, so that a noisy machine slows both sides alike. Targets are reported, not enforced.

`run_bench` measures (returns a `BenchReport`); `format_bench` and `bench_json` render it.

>>> report = run_bench(quick=True)  # doctest: +SKIP
>>> report.vocoder.ratio, report.tiny.added_us  # doctest: +SKIP
"""

from __future__ import annotations

import gc
import json
import operator
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry

import probes
from guard import mnn
from guard.ladder import DYNAMIC, Policy
from guard.pool import Pool
from guard.session import Factory, GuardedSession
from guard.testing import Fault, FaultyFactory
from guard.tools import demo
from guard.tools.models import build_tiny
from guard.tools.output import quiet_log
from guard.wrapping import wrap
from probes import Probe

__all__ = ["BenchReport", "bench_json", "format_bench", "run_bench"]

Array = NDArray[Any]
Inputs = dict[str, Array]

VOCODER_RATIO_TARGET = 0.98  # guarded throughput / raw throughput on the demo vocoder
TINY_ADDED_US_TARGET = 30.0  # microseconds added per call on the tiny model
JUDGE_MS_TARGET = 2.0  # judging a 1 s canary at 22,050 Hz
MEMORY_MB_TARGET = 20.0  # RSS growth over the init/recover cycles
SAMPLE_RATE = 22_050


@dataclass(frozen=True, slots=True, kw_only=True)
class HotPath:
    """Guarded `run()` (metrics on, and off) against raw forward + copy on the same module."""

    model: str
    guarded_us: float  # median per call, as wrapped by default: Prometheus metrics on
    guarded_no_metrics_us: float
    raw_us: float
    ratio: float  # guarded throughput / raw throughput: median of the rounds' ratios
    added_us: float  # median of the rounds' differences (so drifts between rounds cancel)
    added_no_metrics_us: float
    target: str
    met: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Speedup:
    """Guarded on the static rung against raw `dynamic=True`: what the guard preserves."""

    guarded_static_us: float
    raw_dynamic_us: float
    speedup: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeToHealthy:
    """`guard.wrap` (init + canary) against init + the same forwards raw; judging on its own.

    The canary is each recorded case plus its derived (rolled) case, every case run twice.
    """

    canary_forwards: int
    raw_ms: float  # factory() + the canary's forwards with copies, no judging
    wrap_ms: float
    added_ms: float
    judge_ms: float  # one judgement of a 1 s output at 22,050 Hz
    judgements: int
    judging_ms: float  # every judgement of the canary
    judge_1s_canary_ms: float  # a 1 s canary judged after each of its `canary_runs` forwards
    target: str
    met: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Recheck:
    """One re-check of the live module, and its cost per call at a given period."""

    recheck_ms: float
    every_calls: int
    per_call_us: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolThroughput:
    """`guard.Pool` requests per second on the vocoder."""

    processes: int
    requests: int
    requests_per_s: float


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


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchReport:
    """Everything `mnn-guard bench` measured."""

    quick: bool
    frames: int
    cpus: int
    mnn_version: str
    seconds: float
    vocoder: HotPath
    tiny: HotPath
    dynamic: Speedup
    healthy: TimeToHealthy
    recheck: Recheck
    pool: tuple[PoolThroughput, ...]
    memory: Memory

    @property
    def missed(self) -> list[str]:
        """Names of the targets that were missed."""
        flags = {
            "vocoder": self.vocoder.met,
            "tiny": self.tiny.met,
            "judge": self.healthy.met,
            "memory": self.memory.met,
        }
        return [name for name, met in flags.items() if not met]


# ------------------------------------------------------------------ timing


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


def hot_path(
    model: str, factory: Factory, probe: Probe, inputs: Inputs, *, quick: bool, target: str
) -> HotPath:
    """Guarded `run()`, with and without metrics, against raw forward + copy on its module."""
    policy = Policy(background=False, promote_after=None)
    session = wrap(
        factory, probe, name=f"bench-{model}", policy=policy, registry=CollectorRegistry()
    )
    quiet = quiet_wrap(factory, probe, f"bench-{model}-quiet", policy)
    arrays = [inputs[name] for name in probe.input_names]
    fast = model == "tiny"
    rounds = (7 if quick else 25) if fast else (5 if quick else 61)  # odd: a true median pair
    per_round = (200 if quick else 1000) if fast else (3 if quick else 4)
    guarded, quiet_rounds, raw = rounds_of(
        [
            lambda: session.run(inputs),
            lambda: quiet.run(inputs),
            raw_call(factory(), arrays),  # a module of the same file and options
        ],
        rounds=rounds,
        per_round=per_round,
    )
    session.close()
    quiet.close()
    guarded_s, quiet_s, raw_s = (statistics.median(x) for x in (guarded, quiet_rounds, raw))
    ratio = paired(raw, guarded, operator.truediv)
    added_us = paired(guarded, raw, operator.sub) * 1e6
    met = added_us <= TINY_ADDED_US_TARGET if fast else ratio >= VOCODER_RATIO_TARGET
    return HotPath(
        model=model,
        guarded_us=guarded_s * 1e6,
        guarded_no_metrics_us=quiet_s * 1e6,
        raw_us=raw_s * 1e6,
        ratio=ratio,
        added_us=added_us,
        added_no_metrics_us=paired(quiet_rounds, raw, operator.sub) * 1e6,
        target=target,
        met=met,
    )


# ---------------------------------------------------------------- measures


def quiet_wrap(factory: Factory, probe: Probe, name: str, policy: Policy) -> GuardedSession:
    """A guarded session without the Prometheus listener (its cost is measured with it on)."""
    return wrap(factory, probe, name=name, policy=policy, metrics=False)


def time_to_healthy(
    factory: Factory, probe: Probe, policy: Policy, *, repeats: int
) -> TimeToHealthy:
    """Fresh `guard.wrap` against a fresh `factory()` plus the canary's forwards, alternating."""
    arrays = [[case.inputs[n] for n in probe.input_names] for case in probe.cases]
    forwards = policy.canary_runs * len(arrays)

    def raw() -> None:
        module = factory()
        for _ in range(policy.canary_runs):
            for case in arrays:
                raw_call(module, case)()

    def guarded() -> None:
        quiet_wrap(factory, probe, "bench-healthy", policy).close()

    wrap_s, raw_s = interleaved([guarded, raw], rounds=repeats, per_round=1, warmup=1)
    judge_ms = judge_cost(rounds=5 if repeats < 10 else 15) * 1e3
    one_canary_ms = policy.canary_runs * judge_ms
    return TimeToHealthy(
        canary_forwards=forwards,
        raw_ms=raw_s * 1e3,
        wrap_ms=wrap_s * 1e3,
        added_ms=(wrap_s - raw_s) * 1e3,
        judge_ms=judge_ms,
        judgements=forwards,
        judging_ms=forwards * judge_ms,
        judge_1s_canary_ms=one_canary_ms,
        target=f"judging a 1 s canary's {policy.canary_runs} runs <= {JUDGE_MS_TARGET:g} ms",
        met=one_canary_ms <= JUDGE_MS_TARGET,
    )


def judge_cost(*, rounds: int) -> float:
    """Median seconds to judge a 1 s, 22,050 Hz output against its golden with every judge."""
    t = np.arange(SAMPLE_RATE, dtype=np.float64) / SAMPLE_RATE
    golden = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)[None, None]
    noisy = golden + np.float32(1e-4) * np.random.default_rng(0).standard_normal(
        golden.shape, dtype=np.float32
    )
    thresholds = probes.Thresholds()
    (median,) = interleaved(
        [lambda: probes.judge_output("wav", golden, noisy, thresholds)],
        rounds=rounds,
        per_round=20,
    )
    return median


def recheck_cost(session: GuardedSession, *, repeats: int, every: int) -> Recheck:
    """Median time of a forced re-check of the live module; amortised over `every` calls."""
    (seconds,) = interleaved(
        [lambda: session.maintain(force_recheck=True)], rounds=repeats, per_round=1, warmup=1
    )
    return Recheck(recheck_ms=seconds * 1e3, every_calls=every, per_call_us=seconds / every * 1e6)


def pool_throughput(
    factory: Factory, probe: Probe, inputs: Inputs, *, processes: int, requests: int
) -> PoolThroughput:
    """Requests per second through `guard.Pool.map` once every worker is up."""
    with Pool(factory, probe, processes=processes, name=f"bench-{processes}") as pool:
        pool.map([inputs] * (2 * processes))  # warm-up: every worker has served
        start = time.perf_counter()
        pool.map([inputs] * requests)
        seconds = time.perf_counter() - start
    return PoolThroughput(processes=processes, requests=requests, requests_per_s=requests / seconds)


def rss_mb() -> float:
    """Resident set size of this process in MiB (from /proc, else the peak from getrusage)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
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


# ----------------------------------------------------------------- the run


def run_bench(
    *,
    quick: bool = False,
    frames: int = 100,
    factory: Factory | None = None,
    probe: Probe | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Measure every comparison on `factory` (default: the demo vocoder) and on a tiny model."""
    say = progress or (lambda _: None)
    started = time.perf_counter()
    if factory is None or probe is None:
        _, probe_dir = demo.ensure_demo()
        factory, probe = demo.demo_factory(threads=1), probes.load(probe_dir)
    policy = Policy(background=False, promote_after=None)
    inputs = model_inputs(probe, frames)

    say("hot path: guarded run() vs raw forward + copy")
    vocoder = hot_path(
        "vocoder",
        factory,
        probe,
        inputs,
        quick=quick,
        target=f"throughput >= {VOCODER_RATIO_TARGET:g}x raw",
    )
    say("guarded static vs raw dynamic=True")
    session = quiet_wrap(factory, probe, "bench", policy)
    guarded_s, dynamic_s = interleaved(
        [
            lambda: session.run(inputs),
            raw_call(factory(**DYNAMIC.overrides), list(inputs.values())),
        ],
        rounds=5 if quick else 15,
        per_round=3 if quick else 10,
    )
    dynamic = Speedup(
        guarded_static_us=guarded_s * 1e6,
        raw_dynamic_us=dynamic_s * 1e6,
        speedup=dynamic_s / guarded_s,
    )
    say("re-check cost")
    recheck = recheck_cost(session, repeats=5 if quick else 15, every=1000)
    session.close()

    say("tiny model: added microseconds per call")
    with tempfile.TemporaryDirectory(prefix="mnn-guard-bench-") as tmp:
        tiny_path = Path(tmp) / "tiny.mnn"
        build_tiny(tiny_path)
        tiny_factory = mnn.mnn_factory(tiny_path, ["x"], ["y"], threads=1)
        x = np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)
        tiny_probe = probes.record(tiny_factory, {"x": x}, reference={"dynamic": True})
        tiny = hot_path(
            "tiny",
            tiny_factory,
            tiny_probe,
            {"x": x},
            quick=quick,
            target=f"<= {TINY_ADDED_US_TARGET:g} us added per call",
        )

    say("time to healthy: init + canary vs init + the same forwards")
    healthy = time_to_healthy(factory, probe, policy, repeats=5 if quick else 15)
    say("guard.Pool throughput with 1 and 2 processes")
    requests = 8 if quick else 100
    pool = tuple(
        pool_throughput(factory, probe, inputs, processes=n, requests=requests) for n in (1, 2)
    )
    say("memory over init/recover cycles")
    memory = memory_growth(factory, probe, cycles=20 if quick else 200)
    return BenchReport(
        quick=quick,
        frames=frames,
        cpus=os.cpu_count() or 1,
        mnn_version=mnn.mnn_version(),
        seconds=time.perf_counter() - started,
        vocoder=vocoder,
        tiny=tiny,
        dynamic=dynamic,
        healthy=healthy,
        recheck=recheck,
        pool=pool,
        memory=memory,
    )


def model_inputs(probe: Probe, frames: int) -> Inputs:
    """The first canary inputs, cut or tiled to `frames` along a dynamic last axis."""
    out: Inputs = {}
    for spec in probe.inputs:
        array = probe.cases[0].inputs[spec.name]
        last = spec.shape[-1] if spec.shape else None
        if isinstance(last, tuple) and array.shape[-1] != frames:
            reps = -(-frames // array.shape[-1])
            array = np.ascontiguousarray(np.tile(array, reps)[..., :frames])
        out[spec.name] = array
    return out


# -------------------------------------------------------------- reporting


def _flag(met: bool | None) -> str:
    return "" if met is None else ("met" if met else "**MISSED**")


def _rows(r: BenchReport) -> list[tuple[str, str, str, bool | None]]:
    """(measure, result, target, met) for every line of the table."""
    v, t, h, m, d, c = r.vocoder, r.tiny, r.healthy, r.memory, r.dynamic, r.recheck
    return [
        (
            f"vocoder ({r.frames} frames): guarded `run()` vs raw forward + copy",
            f"{v.guarded_us / 1e3:.2f} ms vs {v.raw_us / 1e3:.2f} ms (medians); "
            f"**{v.ratio:.3f}x** throughput (median of paired rounds)",
            v.target,
            v.met,
        ),
        (
            "tiny model: guarded `run()` vs raw forward + copy",
            f"{t.guarded_us:.1f} us vs {t.raw_us:.1f} us (medians); **{t.added_us:+.1f} us**/call "
            f"({t.added_no_metrics_us:+.1f} us without metrics)",
            t.target,
            t.met,
        ),
        (
            "guarded static rung vs raw `dynamic=True`",
            f"{d.guarded_static_us / 1e3:.2f} ms vs {d.raw_dynamic_us / 1e3:.2f} ms: "
            f"**{d.speedup:.2f}x** faster",
            "report",
            None,
        ),
        (
            "time to healthy: `guard.wrap` vs init + the canary's forwards",
            f"{h.wrap_ms:.1f} ms vs {h.raw_ms:.1f} ms ({h.canary_forwards} forwards): "
            f"{h.added_ms:+.1f} ms",
            "report",
            None,
        ),
        (
            "judging a 1 s canary at 22,050 Hz",
            f"{h.judge_ms:.2f} ms per judgement; {h.judge_1s_canary_ms:.2f} ms for its two runs; "
            f"{h.judging_ms:.2f} ms for all {h.judgements} judgements of this probe's canary",
            h.target,
            h.met,
        ),
        (
            "re-check of the live module (callers wait one forward at most)",
            f"{c.recheck_ms:.1f} ms; at `recheck_every={c.every_calls}`: "
            f"{c.per_call_us:.1f} us per call",
            "report",
            None,
        ),
        *(
            (
                f"`guard.Pool`, {p.processes} process(es)",
                f"{p.requests_per_s:.0f} requests/s ({p.requests} requests)",
                "report",
                None,
            )
            for p in r.pool
        ),
        (
            "RSS over init + recover cycles",
            f"{m.growth_mb:+.1f} MB over {m.cycles} cycles ({m.inits} inits)",
            m.target,
            m.met,
        ),
    ]


def format_bench(r: BenchReport) -> str:
    """The Markdown table printed by `mnn-guard bench` (and pasted into the README)."""
    lines = [
        f"mnn-guard bench, {'quick' if r.quick else 'full'} run: MNN {r.mnn_version}, "
        f"{r.cpus} CPUs, {r.seconds:.0f} s; medians of interleaved rounds",
        "",
        "| measure | result | target | |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {a} | {b} | {c} | {_flag(met)} |" for a, b, c, met in _rows(r)]
    return "\n".join(lines)


def bench_json(r: BenchReport) -> str:
    """The report as a JSON document (every field of every section)."""
    return json.dumps(asdict(r), indent=2) + "\n"
