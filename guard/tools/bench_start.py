"""`mnn-guard bench`: how long a start takes, from `guard.wrap` to healthy, and cold start.

Time to healthy: `guard.wrap` (until it returns a serving session; closing it is not timed)
against init + the same forwards, in alternating rounds. The
factory given to both is timed from inside (`Timed`), so each guarded start is split into its
init, its canary's forwards and the rest, the guard's own work, within the same call: the parts
never add up to more than the whole. The probe's checks and the judging, timed alone, say
what that work is made of. Also: judging a synthetic 1 s canary, and cold `import guard` /
`--help`.
"""

from __future__ import annotations

import operator
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry

import probes
from guard import mnn, session
from guard.ladder import Policy
from guard.mnn import LoadReport
from guard.session import Factory
from guard.tools.bench_timing import Spread, interleaved, judged, per_round, spread
from guard.wrapping import check_probe, wrap
from probes import Probe, store
from probes.judges import judge_output

__all__ = [
    "HEALTHY_ADDED_MS_TARGET",
    "HELP_S_TARGET",
    "IMPORT_S_TARGET",
    "JUDGE_MS_TARGET",
    "JudgeCost",
    "Startup",
    "TimeToHealthy",
    "Timed",
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
    """`guard.wrap` (init + canary) against init + the same forwards raw, and its parts.

    The canary is each recorded case (a derived one included) run `canary_runs` times.
    """

    canary_forwards: int
    raw_ms: float  # median of factory() + the canary's forwards with copies, no judging
    wrap_ms: float  # median of whole guarded starts
    init_ms: float  # median, within the guarded starts: the factory's own time
    forwards_ms: float  # median, within the guarded starts: the canary's forwards + copies
    guard_ms: Spread  # per guarded start: the whole less its init and forwards
    versus_raw_ms: Spread  # per round: the guarded start less the raw one next to it
    first_ms: float  # the guard's own work in the process's first start (nothing cached yet)
    checks_ms: float  # timed alone, cached as in every later start: hash, names, goldens
    judging_ms: float  # timed alone: every judgement of the canary, on outputs of this machine
    target: str
    met: bool | None


class Timed:
    """A factory whose modules' init and forwards are timed from inside, for `time_to_healthy`;
    it looks like the factory it wraps (path, inputs, outputs) to the guard's checks."""

    def __init__(self, factory: Factory) -> None:
        self.factory = factory
        self.init_s = 0.0
        self.forward_s = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.factory, name)

    def reset(self) -> None:
        """Start counting afresh."""
        self.init_s = self.forward_s = 0.0

    def load(self, **overrides: Any) -> tuple[Any, LoadReport]:
        """The wrapped factory's module (timed), as a runner whose forwards are timed."""
        start = time.perf_counter()
        module, report = mnn.load(self.factory, overrides)
        self.init_s += time.perf_counter() - start
        return _TimedRunner(self, mnn.adapt(module)), report

    def __call__(self, **overrides: Any) -> Any:
        return self.load(**overrides)[0]


class _TimedRunner:
    """A runner that adds its forwards' time to its factory's count."""

    def __init__(self, timed: Timed, runner: mnn.Runner) -> None:
        self.timed = timed
        self.runner = runner

    def run(self, arrays: Sequence[NDArray[Any]]) -> list[NDArray[Any]]:
        start = time.perf_counter()
        try:
            return self.runner.run(arrays)
        finally:
            self.timed.forward_s += time.perf_counter() - start


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
    alternating; the guard's own work measured inside each guarded start; the first start's
    with nothing cached; and two parts timed alone: the probe's checks before any init (as
    cached) and judging the canary's outputs from a module of this machine."""
    arrays = [[case.inputs[n] for n in probe.input_names] for case in probe.cases]
    forwards = policy.canary_runs * len(arrays)
    registry = CollectorRegistry()  # one per process, as in a server
    timed = Timed(factory)
    own: list[float] = []  # the guard's work in each guarded start
    parts: list[tuple[float, float]] = []  # (init, forwards) of each guarded start

    def raw() -> float:
        start = time.perf_counter()
        module = timed()
        for _ in range(policy.canary_runs):
            for case in arrays:
                module.run(case)
        return time.perf_counter() - start  # the module is freed after, as a session's is

    def guarded() -> float:
        timed.reset()
        start = time.perf_counter()
        guarded_session = wrap(timed, probe, name="bench-healthy", policy=policy, registry=registry)
        whole = time.perf_counter() - start  # healthy: wrap returned a serving session
        guarded_session.close()
        own.append(whole - timed.init_s - timed.forward_s)
        parts.append((timed.init_s, timed.forward_s))
        return whole

    store.forget_hashes()
    session.forget_checked()
    guarded()  # the process's first start: the model's hash and the goldens not yet known
    first = own.pop()
    parts.pop()

    def checks() -> None:
        check_probe(factory, probe)
        session.self_check(probe)

    runner = mnn.adapt(factory())
    outputs = [runner.run(case) for case in arrays]  # as this machine computes them

    def judging() -> None:
        for _ in range(policy.canary_runs):
            for index, out in enumerate(outputs):
                probe.judge(out, case=index)

    guarded()
    raw()  # warm-up
    wrap_rounds: list[float] = []
    raw_rounds: list[float] = []
    for index in range(repeats):  # alternating which side goes first
        if index % 2:
            wrap_rounds.append(guarded())
            raw_rounds.append(raw())
        else:
            raw_rounds.append(raw())
            wrap_rounds.append(guarded())
    own, parts = own[-repeats:], parts[-repeats:]  # the warm-up's start is not a round
    checks_s, judging_s = interleaved(
        [checks, judging], rounds=5 if repeats < 10 else 15, per_round=3
    )
    guard_ms = spread(own, 0.0).scaled(1e3)
    return TimeToHealthy(
        canary_forwards=forwards,
        raw_ms=statistics.median(raw_rounds) * 1e3,
        wrap_ms=statistics.median(wrap_rounds) * 1e3,
        init_ms=statistics.median(p[0] for p in parts) * 1e3,
        forwards_ms=statistics.median(p[1] for p in parts) * 1e3,
        guard_ms=guard_ms,
        versus_raw_ms=per_round(wrap_rounds, raw_rounds, operator.sub, 0.0).scaled(1e3),
        first_ms=first * 1e3,
        checks_ms=checks_s * 1e3,
        judging_ms=judging_s * 1e3,
        target=f"<= init + forwards + {HEALTHY_ADDED_MS_TARGET:g} ms",
        met=judged(guard_ms, HEALTHY_ADDED_MS_TARGET, at_least=False),
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
