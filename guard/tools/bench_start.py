"""`mnn-guard bench`: how long a start takes, from `guard.wrap` to healthy, and cold start.

Time to healthy (init + canary against init + the same forwards, with the probe's checks and
the judging timed alone), judging a synthetic 1 s canary, and cold `import guard` / `--help`.
"""

from __future__ import annotations

import operator
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

import probes
from guard import mnn
from guard.ladder import Policy
from guard.session import Factory
from guard.tools.bench_timing import interleaved, paired, raw_call, rounds_of
from guard.wrapping import check_probe, wrap
from probes import Probe
from probes.judges import judge_output

__all__ = [
    "HEALTHY_ADDED_MS_TARGET",
    "HELP_S_TARGET",
    "IMPORT_S_TARGET",
    "JUDGE_MS_TARGET",
    "JudgeCost",
    "Startup",
    "TimeToHealthy",
    "judge_cost",
    "reference_judge_cost",
    "startup",
    "time_to_healthy",
]

JUDGE_MS_TARGET = 2.0  # judging a 1 s canary at 22,050 Hz
HEALTHY_ADDED_MS_TARGET = 2.0  # guard.wrap's own work beyond init + the canary's forwards
IMPORT_S_TARGET = 0.35  # `import guard`, cold
HELP_S_TARGET = 0.5  # `mnn-guard --help`, the whole command
SAMPLE_RATE = 22_050


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
class Startup:
    """Cold `import guard` and the whole `mnn-guard --help` command, in fresh processes."""

    import_s: float  # the best of a few fresh interpreters, interpreter start excluded
    help_s: float  # the best of a few runs of the command, interpreter start included
    target: str
    met: bool


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
