"""`mnn-guard bench`: what the guard costs, measured side by side in one run.

Every comparison alternates its two sides in rounds after a warm-up and reports medians and
their ratio, so that a noisy machine slows both sides alike. Targets are reported, not enforced.

Your model (MODEL --probe DIR, or the built-in demo vocoder) is measured on the probe's own
canary inputs, as recorded; the rows that measure built-in reference models (a tiny model, a
synthetic 1 s signal) are reported apart and labelled.

`run_bench` measures (returns a `BenchReport`); `format_bench` and `bench_json` render it.

>>> report = run_bench(quick=True)  # doctest: +SKIP
>>> report.hot.ratio, report.tiny.added_us  # doctest: +SKIP
"""

from __future__ import annotations

import gc
import json
import operator
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
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
from guard.tools.models import (
    SMALL_INPUTS,
    SMALL_OUTPUTS,
    build_small,
    build_tiny,
    small_inputs,
)
from guard.tools.output import quiet_log
from guard.wrapping import check_probe, ignored_rungs, wrap
from probes import Probe
from probes.judges import judge_output

__all__ = ["BenchReport", "bench_json", "format_bench", "run_bench"]

REPORT = "report"  # a measure reported without a target

Array = NDArray[Any]
Inputs = dict[str, Array]

VOCODER_RATIO_TARGET = 0.99  # guarded / raw throughput on a model of 2 ms or more
SMALL_ADDED_US_TARGET = 8.0  # microseconds added per call on the small 3-input model (0.2 ms)
SMALL_RATIO_TARGET = 0.97  # guarded / raw throughput there
JUDGE_MS_TARGET = 2.0  # judging a 1 s canary at 22,050 Hz
HEALTHY_ADDED_MS_TARGET = 2.0  # guard.wrap's own work beyond init + the canary's forwards
POOL_EFFICIENCY_TARGET = 0.9  # N processes >= 0.9 x N x one process's raw rate (N <= cores)
IMPORT_S_TARGET = 0.35  # `import guard`, cold
HELP_S_TARGET = 0.5  # `mnn-guard --help`, the whole command
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
    met: bool | None  # None: reported only (no target for this model)


@dataclass(frozen=True, slots=True, kw_only=True)
class Speedup:
    """Guarded on the static rung against raw `dynamic=True`: what the guard preserves."""

    guarded_static_us: float
    raw_dynamic_us: float
    speedup: float  # raw dynamic time / guarded static time: > 1 means the guarded side is faster
    dynamic_ignored: bool  # MNN loaded the dynamic module statically (control flow)


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiCompare:
    """Raw Session API run (copy in, runSession, copy out) against a raw static Module forward
    + copy, on the same file and thread count (`bench --api session`)."""

    session_us: float
    module_us: float
    ratio: float  # session time / module time: < 1 means the Session API is faster


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeToHealthy:
    """`guard.wrap` (init + canary) against init + the same forwards raw, and the judging.

    The canary is each recorded case (a derived one included) run `canary_runs` times.
    """

    canary_forwards: int
    raw_ms: float  # factory() + the canary's forwards with copies, no judging
    wrap_ms: float
    added_ms: float  # the guard's own work: probe checks, judging, bookkeeping
    checks_ms: float  # the probe's checks before any init: model hash, names, self-judging
    judging_ms: float  # every judgement of the canary, on outputs of this machine
    target: str
    met: bool | None


@dataclass(frozen=True, slots=True, kw_only=True)
class JudgeCost:
    """Judging a synthetic 1 s output at 22,050 Hz with every judge (a reference measure)."""

    judge_ms: float  # one judgement
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
    """`guard.Pool` requests per second on the model."""

    processes: int
    requests: int
    requests_per_s: float
    efficiency: float  # pool rate / (processes x the raw rate), median of paired rounds
    target: str
    met: bool | None  # None: more processes than cores, or a model under 2 ms (reported only)


@dataclass(frozen=True, slots=True, kw_only=True)
class Startup:
    """Cold `import guard` and the whole `mnn-guard --help` command, in fresh processes."""

    import_s: float  # the best of a few fresh interpreters, interpreter start excluded
    help_s: float  # the best of a few runs of the command, interpreter start included
    target: str
    met: bool


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
    """Everything `mnn-guard bench` measured: the model's rows, then the reference rows."""

    quick: bool
    model: str  # the model's file name
    builtin: bool  # the model is the built-in demo vocoder
    inputs: str  # the canary inputs used, e.g. "mel float32[1, 80, 100]"
    frames: int | None  # the demo vocoder's input length (None for a user's model)
    cpus: int
    mnn_version: str
    seconds: float
    hot: HotPath
    dynamic: Speedup
    healthy: TimeToHealthy
    recheck: Recheck
    pool: tuple[PoolThroughput, ...]
    memory: Memory
    small: HotPath  # reference: the built-in small 3-input model (about 0.2 ms a call)
    tiny: HotPath  # reference: the built-in tiny model
    judge: JudgeCost  # reference: a synthetic 1 s signal
    startup: Startup
    api: str = "module"  # MNN's API the model is measured through: module or session
    apis: ApiCompare | None = None  # with api="session": the raw Session API vs the Module API

    @property
    def missed(self) -> list[str]:
        """Names of the targets that were missed."""
        flags = {
            "hot": self.hot.met,
            "healthy": self.healthy.met,
            **{f"pool {p.processes}": p.met for p in self.pool},
            "memory": self.memory.met,
            "small": self.small.met,
            "judge": self.judge.met,
            "startup": self.startup.met,
        }
        return [name for name, met in flags.items() if met is False]


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
    per_round = (200 if quick else 1000) if fast else (3 if quick else 4)
    guarded, raw, quiet_rounds, quiet_raw = rounds_of(
        [
            lambda: session.run(inputs),
            raw_call(served, arrays),
            lambda: quiet.run(inputs),
            raw_call(quiet_served, arrays),
        ],
        rounds=rounds,
        per_round=per_round,
    )
    session.close()
    quiet.close()
    guarded_s, quiet_s, raw_s = (statistics.median(x) for x in (guarded, quiet_rounds, raw))
    ratio = paired(raw, guarded, operator.truediv)
    added_us = paired(guarded, raw, operator.sub) * 1e6
    met: bool | None = None
    if min_ratio is not None or max_added_us is not None:
        met = (min_ratio is None or ratio >= min_ratio) and (
            max_added_us is None or added_us <= max_added_us
        )
    return HotPath(
        model=model,
        guarded_us=guarded_s * 1e6,
        guarded_no_metrics_us=quiet_s * 1e6,
        raw_us=raw_s * 1e6,
        ratio=ratio,
        added_us=added_us,
        added_no_metrics_us=paired(quiet_rounds, quiet_raw, operator.sub) * 1e6,
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
    """Fresh `guard.wrap` (metrics on) against a fresh `factory()` plus the canary's forwards,
    alternating; and two parts of the difference timed alone: the probe's checks before any
    init (model hash, names, goldens judged against themselves) and judging the canary's
    outputs from a module of this machine."""
    arrays = [[case.inputs[n] for n in probe.input_names] for case in probe.cases]
    forwards = policy.canary_runs * len(arrays)
    registry = CollectorRegistry()  # one per process, as in a server

    def raw() -> None:
        module = factory()
        for _ in range(policy.canary_runs):
            for case in arrays:
                raw_call(module, case)()

    def guarded() -> None:
        wrap(factory, probe, name="bench-healthy", policy=policy, registry=registry).close()

    def checks() -> None:
        check_probe(factory, probe)
        for index, case in enumerate(probe.cases):
            probe.judge(case.outputs, case=index)

    runner = mnn.adapt(factory())
    outputs = [runner.run(case) for case in arrays]  # as this machine computes them

    def judging() -> None:
        for _ in range(policy.canary_runs):
            for index, out in enumerate(outputs):
                probe.judge(out, case=index)

    wrap_rounds, raw_rounds = rounds_of([guarded, raw], rounds=repeats, per_round=1, warmup=1)
    checks_s, judging_s = interleaved(
        [checks, judging], rounds=5 if repeats < 10 else 15, per_round=3
    )
    added_ms = paired(wrap_rounds, raw_rounds, operator.sub) * 1e3
    return TimeToHealthy(
        canary_forwards=forwards,
        raw_ms=statistics.median(raw_rounds) * 1e3,
        wrap_ms=statistics.median(wrap_rounds) * 1e3,
        added_ms=added_ms,
        checks_ms=checks_s * 1e3,
        judging_ms=judging_s * 1e3,
        target=f"<= init + forwards + {HEALTHY_ADDED_MS_TARGET:g} ms",
        met=added_ms <= HEALTHY_ADDED_MS_TARGET,
    )


def reference_judge_cost(policy: Policy, *, rounds: int) -> JudgeCost:
    """Judging a synthetic 1 s, 22,050 Hz output (after each of the canary's runs)."""
    judge_ms = judge_cost(rounds=rounds) * 1e3
    one_canary_ms = policy.canary_runs * judge_ms
    return JudgeCost(
        judge_ms=judge_ms,
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
    limits = probes.Thresholds()
    (median,) = interleaved(
        [lambda: judge_output("wav", golden, noisy, limits)],
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


def startup(*, repeats: int) -> Startup:
    """Best of `repeats` fresh processes: `import guard` alone, and `mnn-guard --help`."""
    code = "import time; t = time.perf_counter(); import guard; print(time.perf_counter() - t)"
    imports, helps = [], []
    command = [str(Path(sys.executable).with_name("mnn-guard")), "--help"]
    for _ in range(repeats):
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        )
        imports.append(float(done.stdout.split()[-1]))
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True, timeout=60)
        helps.append(time.perf_counter() - start)
    import_s, help_s = min(imports), min(helps)
    return Startup(
        import_s=import_s,
        help_s=help_s,
        target=f"import <= {IMPORT_S_TARGET:g} s, --help < {HELP_S_TARGET:g} s",
        met=import_s <= IMPORT_S_TARGET and help_s < HELP_S_TARGET,
    )


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
    model: str | os.PathLike[str] | None = None,
    api: str = "module",
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Measure every comparison on `factory` with `probe`'s canary inputs (default: the demo
    vocoder at `frames` frames, through MNN's `api`), then the reference measures on built-in
    models. With api="session" the raw Session API is also timed against the Module API."""
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
    say("reference: the built-in small 3-input model, added microseconds per call")
    small = _small(quick)
    say("reference: the built-in tiny model, added microseconds per call")
    tiny = _tiny(quick)
    judge = reference_judge_cost(policy, rounds=5 if quick else 15)
    say("reference: cold import and --help")
    started_up = startup(repeats=3 if quick else 7)
    shapes = ", ".join(f"{n} {a.dtype}{list(a.shape)}" for n, a in inputs.items())
    return BenchReport(
        quick=quick,
        model=label,
        builtin=builtin,
        inputs=shapes,
        frames=frames if builtin else None,
        cpus=os.cpu_count() or 1,
        mnn_version=mnn.mnn_version(),
        seconds=time.perf_counter() - started,
        small=small,
        tiny=tiny,
        judge=judge,
        startup=started_up,
        api=api,
        apis=apis,
        **measured,
    )


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
        ratio=paired(session_rounds, module_rounds, operator.truediv),
    )


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
    say(f"{label}: guarded static vs raw dynamic=True")
    session = quiet_wrap(factory, probe, f"bench-{label}", policy)
    dynamic_module, report = mnn.load(factory, DYNAMIC.overrides)
    arrays = [inputs[n] for n in probe.input_names]
    guarded_s, dynamic_s = interleaved(
        [lambda: session.run(inputs), raw_call(dynamic_module, arrays)],
        rounds=5 if quick else 15,
        per_round=3 if quick else 10,
    )
    dynamic = Speedup(
        guarded_static_us=guarded_s * 1e6,
        raw_dynamic_us=dynamic_s * 1e6,
        speedup=dynamic_s / guarded_s,
        dynamic_ignored=report.turned_static or bool(ignored_rungs(factory, (DYNAMIC,))),
    )
    say(f"{label}: re-check cost")
    recheck = recheck_cost(session, repeats=5 if quick else 15, every=1000)
    session.close()
    say(f"{label}: time to healthy, init + canary vs init + the same forwards")
    healthy = time_to_healthy(factory, probe, policy, repeats=5 if quick else 31)
    say(f"{label}: guard.Pool throughput with 1 and 2 processes")
    pool = tuple(
        pool_throughput(
            factory,
            probe,
            inputs,
            processes=n,
            rounds=3 if quick else 9,
            per_round=2 if quick else 10,
        )
        for n in (1, 2)
    )
    say(f"{label}: memory over init/recover cycles")
    memory = memory_growth(factory, probe, cycles=20 if quick else 200)
    return {
        "hot": hot,
        "dynamic": dynamic,
        "healthy": healthy,
        "recheck": recheck,
        "pool": pool,
        "memory": memory,
    }


def _tiny(quick: bool) -> HotPath:
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


def _small(quick: bool) -> HotPath:
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


# -------------------------------------------------------------- reporting


def _flag(met: bool | None) -> str:
    return "" if met is None else ("met" if met else "**MISSED**")


def _times(speedup: float) -> str:
    """`1.33x faster` or `1.33x slower` (never "0.75x faster")."""
    if speedup >= 1:
        return f"**{speedup:.2f}x** faster"
    return f"**{1 / speedup:.2f}x** slower"


Row = tuple[str, str, str, bool | None]


def _model_rows(r: BenchReport) -> list[Row]:
    """(measure, result, target, met) for every row that measures the model."""
    v, h, m, d, c = r.hot, r.healthy, r.memory, r.dynamic, r.recheck
    if d.dynamic_ignored:
        dynamic = (
            f"no dynamic mode to price: MNN loads {r.model} statically even with dynamic=True "
            f"(control flow); {d.guarded_static_us / 1e3:.2f} ms vs {d.raw_dynamic_us / 1e3:.2f} "
            "ms are two static loads"
        )
    else:
        dynamic = (
            f"{d.guarded_static_us / 1e3:.2f} ms vs {d.raw_dynamic_us / 1e3:.2f} ms: "
            f"guarded {'session' if r.api == 'session' else 'static'} is {_times(d.speedup)}"
        )
    session = r.api == "session"
    rows: list[Row] = []
    if r.apis is not None:
        a = r.apis
        rows.append(
            (
                "raw Session API run vs raw Module API forward (static, same file and threads)",
                f"{a.session_us / 1e3:.3f} ms vs {a.module_us / 1e3:.3f} ms: "
                f"**{a.ratio:.3f}x** the Module API's time",
                REPORT,
                None,
            )
        )
    return [
        *rows,
        (
            "guarded `run()` vs raw run + copy (Session API)"
            if session
            else "guarded `run()` vs raw forward + copy",
            f"{v.guarded_us / 1e3:.3f} ms vs {v.raw_us / 1e3:.3f} ms (medians); "
            f"**{v.ratio:.3f}x** throughput, {v.added_us:+.1f} us/call (median of paired rounds)",
            v.target,
            v.met,
        ),
        (
            "guarded session rung vs raw Module API `dynamic=True`"
            if session
            else "guarded static rung vs raw `dynamic=True`",
            dynamic,
            REPORT,
            None,
        ),
        (
            "time to healthy: `guard.wrap` vs init + the canary's forwards",
            f"{h.wrap_ms:.1f} ms vs {h.raw_ms:.1f} ms ({h.canary_forwards} forwards): "
            f"{h.added_ms:+.2f} ms of guard work (median of pairs), of which the probe's "
            f"checks {h.checks_ms:.2f} ms and judging the canary {h.judging_ms:.2f} ms; "
            "metrics on",
            h.target,
            h.met,
        ),
        (
            "re-check of the live module (callers wait one forward at most)",
            f"{c.recheck_ms:.1f} ms; at `recheck_every={c.every_calls}`: "
            f"{c.per_call_us:.1f} us per call",
            REPORT,
            None,
        ),
        *(
            (
                f"`guard.Pool`, {p.processes} process(es), vs {p.processes} x one raw process",
                f"{p.requests_per_s:.0f} requests/s ({p.requests} requests): "
                f"**{p.efficiency:.2f}x** of {p.processes} x the raw single-process rate "
                "(median of rounds alternating with raw calls)",
                p.target,
                p.met,
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


def _reference_rows(r: BenchReport) -> list[Row]:
    """The rows that measure built-in reference models, not the model benchmarked."""
    t, j, sm, st = r.tiny, r.judge, r.small, r.startup
    return [
        (
            "small built-in model (audio float32 [1, 2048], state float32 [1, 448], sr int32 "
            "scalar): guarded `run()` vs raw forward + copy, metrics and NaN checks on",
            f"{sm.guarded_us:.1f} us vs {sm.raw_us:.1f} us (medians); "
            f"**{sm.added_us:+.1f} us**/call ({sm.added_no_metrics_us:+.1f} us without metrics), "
            f"**{sm.ratio:.3f}x** throughput",
            sm.target,
            sm.met,
        ),
        (
            "tiny built-in model (x [1, 16]): guarded `run()` vs raw forward + copy",
            f"{t.guarded_us:.1f} us vs {t.raw_us:.1f} us (medians); **{t.added_us:+.1f} us**/call "
            f"({t.added_no_metrics_us:+.1f} us without metrics)",
            t.target,
            t.met,
        ),
        (
            "cold `import guard`; the whole `mnn-guard --help` command",
            f"{st.import_s:.3f} s; {st.help_s:.3f} s (best of fresh processes)",
            st.target,
            st.met,
        ),
        (
            "judging a synthetic 1 s canary at 22,050 Hz",
            f"{j.judge_ms:.2f} ms per judgement; {j.judge_1s_canary_ms:.2f} ms for its two runs",
            j.target,
            j.met,
        ),
    ]


def _table(rows: list[Row]) -> list[str]:
    return [
        "| measure | result | target | |",
        "| --- | --- | --- | --- |",
        *(f"| {a} | {b} | {c} | {_flag(met)} |" for a, b, c, met in rows),
    ]


def format_bench(r: BenchReport) -> str:
    """The Markdown tables printed by `mnn-guard bench` (and pasted into the README)."""
    what = f"the built-in demo vocoder, {r.frames} frames" if r.builtin else "its probe's canary"
    if r.api == "session":
        what = f"MNN.Interpreter sessions; {what}"
    return "\n".join(
        [
            f"mnn-guard bench, {'quick' if r.quick else 'full'} run: MNN {r.mnn_version}, "
            f"{r.cpus} CPUs, {r.seconds:.0f} s; medians of interleaved rounds",
            "",
            f"**{r.model}** ({what}: {r.inputs})",
            "",
            *_table(_model_rows(r)),
            "",
            "Reference measures on built-in models (the same on every run, not your model):",
            "",
            *_table(_reference_rows(r)),
        ]
    )


def bench_json(r: BenchReport) -> str:
    """The report as a JSON document (every field of every section)."""
    return json.dumps(asdict(r), indent=2) + "\n"
