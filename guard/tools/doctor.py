"""`mnn-guard doctor`: does this machine have the degraded-init problem, and what does dynamic cost?

Starts many fresh processes (spawn); in each, initialises every rung of the ladder once, judges
its canary, times the init, then times every rung's forwards in interleaved rounds on the probe's
first canary case (`guard.tools.dynamic_cost`, the measure `mnn-guard bench` uses too). Reports
per rung the degraded starts with a 95% Clopper-Pearson interval, median init and forward
times, and its time against the first rung's: the median of the rounds of every start, with
their middle half, or "inconclusive" when that spread is larger than the difference.

`run_doctor` measures (returns a `DoctorReport`); `format_doctor` and `doctor_json` render it.

>>> factory = guard.mnn_factory("vocoder.mnn", ["mel"], ["wav"], threads=1)  # doctest: +SKIP
>>> report = run_doctor(factory, probes.load("probes/vocoder"), starts=50)  # doctest: +SKIP
>>> report.rungs[0].degraded, report.rungs[1].speed_ratio  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from guard.diagnosis import DiagnosisListener
from guard.errors import ConfigError
from guard.ladder import DEFAULT_LADDER, Attempt, Outcome, Rung
from guard.pool.children import load_stashed_probe, remove_stash, stash_probe
from guard.session import Factory
from guard.tools.bench_timing import Spread
from guard.tools.output import text_table
from probes import Probe

__all__ = [
    "SESSION_CONFIGS",
    "DoctorReport",
    "RungReport",
    "doctor_json",
    "format_doctor",
    "run_doctor",
]

CONFIDENCE = 0.95
FORWARD_RUNS = 5  # interleaved rounds of forwards per start (guard.tools.dynamic_cost)
CANARY_RUNS = 2
START_TIMEOUT = 300.0  # seconds one fresh process may take for every rung before it is killed
MAX_REASONS = 3  # example reasons kept per rung
SESSION_CONFIGS: tuple[dict[str, Any], ...] = ({}, {"precision": "low"}, {"memory": "low"})
"""`doctor --api session`'s rungs unless --config names them (then the Module API, dynamic)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RungReport:
    """One rung over every start: degraded count and rate with its interval, timings, speed."""

    name: str
    overrides: dict[str, Any]
    starts: int
    degraded: int
    errors: int
    degraded_rate: float | None
    ci_low: float | None
    ci_high: float | None
    init_median_s: float | None
    forward_median_s: float | None  # median over every start's interleaved rounds
    speed_ratio: float | None  # median of the rounds' forward time over the first rung's
    worst_snr_db: float | None
    reasons: tuple[str, ...]
    loaded_static: int = 0  # starts where the rung asked for dynamic=True, MNN loaded it static
    speed: Spread | None = None  # speed_ratio with the middle half of the rounds of every start


@dataclass(frozen=True, slots=True, kw_only=True)
class DoctorReport:
    """What `mnn-guard doctor` found, per rung of the ladder."""

    starts: int
    processes: int
    seconds: float
    mnn_version: str
    confidence: float
    rungs: tuple[RungReport, ...]

    @property
    def degraded(self) -> bool:
        """True when any rung had a degraded start or one that failed to initialise."""
        return any(r.degraded or r.errors for r in self.rungs)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


def _interval(low: float | None, high: float | None) -> str:
    return "-" if low is None or high is None else f"{low:.3f}..{high:.3f}"


def _word(result: dict[str, Any]) -> str:
    """`error`, `pass` or `DEGRADED` for one rung of one start."""
    if "error" in result:
        return "error"
    return "pass" if result["passed"] else "DEGRADED"


# ------------------------------------------------------------- one fresh process


def _measure(rung: Rung, factory: Factory, probe: Probe) -> tuple[dict[str, Any], Any]:
    """Init one rung and judge its canary: the result, and the module's runner (None when it
    could not be built)."""
    from guard import mnn
    from guard.canary import run_canary

    result: dict[str, Any] = {"rung": rung.name}
    module = None
    try:
        start = time.perf_counter()
        loaded, report = mnn.load(factory, rung.overrides)
        module = mnn.adapt(loaded)
        result["init_s"] = time.perf_counter() - start
        result["loaded_static"] = report.turned_static
        canary = run_canary(module, probe, CANARY_RUNS)
        verdict = canary.verdict
        result["passed"] = verdict.passed
        if not verdict.passed:  # for a diagnosis bundle, written by the parent
            result["verdict"] = verdict
            result["outputs"] = canary.failed_outputs
        result["snr_db"] = verdict.worst_snr_db
        result["reasons"] = list(verdict.reasons[:MAX_REASONS])
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result, module


def _start_main(
    conn: Connection, factory: Factory, probe_path: str, ladder: tuple[Rung, ...], forward_runs: int
) -> None:
    """Body of one fresh process: every rung once, each result sent as soon as it is known;
    then every built rung's forwards timed in interleaved rounds (one message of them)."""
    from guard.tools.dynamic_cost import rung_rounds

    os.dup2(2, 1)  # nothing a child prints may reach the parent's stdout (--json)
    probe = load_stashed_probe(probe_path)
    built: dict[str, Any] = {}
    for rung in ladder:
        result, module = _measure(rung, factory, probe)
        if module is not None:
            built[rung.name] = module
        conn.send(result)
    if built:
        inputs = [probe.cases[0].inputs[n] for n in probe.input_names]
        try:
            times = rung_rounds(list(built.values()), inputs, rounds=forward_runs)
        except Exception:
            times = []
        if times:
            conn.send({"rounds": dict(zip(built, times, strict=True))})
    conn.close()


# ------------------------------------------------------------------ the parent


def _bundle(
    rungs: tuple[Rung, ...],
    diagnose: DiagnosisListener | None,
    written: list[int],
    result: dict[str, Any],
) -> None:
    """Leave a bundle for a start's failed canary (its outputs are dropped from the result)."""
    outputs = result.pop("outputs", None)
    verdict = result.pop("verdict", None)
    if diagnose is None or verdict is None or written[0] >= diagnose.writer.max_bundles:
        return
    index = next(i for i, r in enumerate(rungs) if r.name == result["rung"])
    attempt = Attempt(
        rungs[index], index, Outcome.FAIL, verdict, None, result.get("init_s", 0.0), outputs or {}
    )
    diagnose.record("doctor", attempt)
    diagnose.flush()  # a tool waits for its bundles; the queue never drops one
    written[0] += 1


@dataclass(eq=False)
class _Start:
    index: int
    process: BaseProcess
    conn: Connection
    began: float


def _finish(results: list[dict[str, Any]], ladder: tuple[Rung, ...], why: str) -> None:
    """Record every rung a start did not report (it crashed or timed out) as an error."""
    seen = {r["rung"] for r in results if "rung" in r}
    results.extend({"rung": r.name, "error": why} for r in ladder if r.name not in seen)


def _drain(start: _Start, results: list[dict[str, Any]]) -> bool:
    """Read every message waiting on a start's pipe; False once the pipe is closed."""
    try:
        while start.conn.poll():
            results.append(start.conn.recv())
    except (EOFError, OSError):
        return False
    return True


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _summarise(
    ladder: tuple[Rung, ...], per_start: Sequence[Sequence[dict[str, Any]]]
) -> tuple[RungReport, ...]:
    from scipy.stats import binomtest

    from guard.tools.dynamic_cost import relative

    timed = [m["rounds"] for results in per_start for m in results if "rounds" in m]
    first = ladder[0].name if ladder else ""
    rows: list[RungReport] = []
    for rung in ladder:
        mine = [r for results in per_start for r in results if r.get("rung") == rung.name]
        judged = [r for r in mine if "passed" in r]
        degraded = sum(not r["passed"] for r in judged)
        errors = len(mine) - len(judged)
        rate = low = high = None
        if judged:
            ci = binomtest(degraded, len(judged)).proportion_ci(
                confidence_level=CONFIDENCE, method="exact"
            )
            rate, low, high = degraded / len(judged), float(ci.low), float(ci.high)
        forwards = [t for rounds in timed for t in rounds.get(rung.name, ())]
        paired = [r for r in timed if rung.name in r and first in r]
        speed = (
            relative(
                [t for r in paired for t in r[rung.name]], [t for r in paired for t in r[first]]
            )
            if paired
            else None
        )
        reasons = [
            x
            for r in mine
            if r.get("error") or not r.get("passed", True)
            for x in ([r["error"]] if "error" in r else r["reasons"])
        ]
        rows.append(
            RungReport(
                name=rung.name,
                overrides=dict(rung.overrides),
                starts=len(mine),
                degraded=degraded,
                errors=errors,
                degraded_rate=rate,
                ci_low=low,
                ci_high=high,
                init_median_s=_median([r["init_s"] for r in mine if "init_s" in r]),
                forward_median_s=_median(forwards),
                speed_ratio=None if speed is None else speed.median,
                worst_snr_db=min((r["snr_db"] for r in judged), default=None),
                reasons=tuple(dict.fromkeys(reasons))[:MAX_REASONS],
                loaded_static=sum(bool(r.get("loaded_static")) for r in mine),
                speed=speed,
            )
        )
    return tuple(rows)


def _run_starts(
    factory: Factory,
    probe_path: str,
    rungs: tuple[Rung, ...],
    starts: int,
    processes: int,
    forward_runs: int,
    start_timeout: float,
    say: Callable[[str], None],
    on_result: Callable[[dict[str, Any]], None],
) -> list[list[dict[str, Any]]]:
    """Run every start in its own spawned process, `processes` at a time; results per start."""
    ctx = multiprocessing.get_context("spawn")
    per_start: list[list[dict[str, Any]]] = [[] for _ in range(starts)]
    running: list[_Start] = []
    queued = list(range(starts))
    done = 0
    began = time.perf_counter()
    try:
        while queued or running:
            while queued and len(running) < processes:
                index = queued.pop(0)
                parent, child = ctx.Pipe(duplex=False)
                process = ctx.Process(
                    target=_start_main,
                    args=(child, factory, probe_path, rungs, forward_runs),
                    name=f"mnn-guard-doctor-{index}",
                    daemon=True,
                )
                process.start()
                child.close()
                running.append(_Start(index, process, parent, time.perf_counter()))
            wait([s.conn for s in running], timeout=1.0)
            for start in list(running):
                results = per_start[start.index]
                seen = len(results)
                open_ = _drain(start, results)
                for result in results[seen:]:
                    if "rung" in result:
                        on_result(result)
                late = time.perf_counter() - start.began > start_timeout
                if open_ and not late:
                    continue  # a start is done when its process closes the pipe
                start.process.join(0 if late else 10.0)
                if start.process.is_alive():
                    start.process.kill()
                    start.process.join()
                start.conn.close()
                running.remove(start)
                code = start.process.exitcode
                why = (
                    f"the process exceeded {start_timeout:g} s and was killed"
                    if late
                    else f"the process ended early (exit code {code})"
                )  # (for the rungs it never reported)
                _finish(results, rungs, why)
                done += 1
                summary = ", ".join(f"{r['rung']} {_word(r)}" for r in results if "rung" in r)
                elapsed = time.perf_counter() - began
                say(f"doctor: start {done}/{starts}: {summary} ({elapsed:.1f} s)")
    finally:
        for start in running:  # interrupted: leave no process behind
            start.process.kill()
            start.process.join()
            start.conn.close()
    return per_start


def run_doctor(
    factory: Factory,
    probe: Probe,
    *,
    starts: int = 100,
    processes: int = 2,
    ladder: Sequence[Rung] = DEFAULT_LADDER,
    forward_runs: int = FORWARD_RUNS,
    start_timeout: float = START_TIMEOUT,
    progress: Callable[[str], None] | None = None,
    diagnose: DiagnosisListener | None = None,
) -> DoctorReport:
    """Run `starts` fresh spawned processes, at most `processes` at a time; summarise per rung.

    `factory` must pickle (it is sent to every process). `progress` gets one line per finished
    start. With `diagnose`, each failed canary leaves a bundle (the first `max_bundles` of them).
    """
    from guard.mnn import mnn_version

    counts = {"starts": starts, "processes": processes, "forward_runs": forward_runs}
    for key, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a positive int, got {value!r}")
    rungs = tuple(ladder)
    if not rungs:
        raise ConfigError("the ladder needs at least one rung")
    began = time.perf_counter()
    probe_path = stash_probe(probe)
    try:
        per_start = _run_starts(
            factory,
            probe_path,
            rungs,
            starts,
            processes,
            forward_runs,
            start_timeout,
            progress or (lambda _: None),
            partial(_bundle, rungs, diagnose, [0]),
        )
    finally:
        remove_stash(probe_path)
    return DoctorReport(
        starts=starts,
        processes=processes,
        seconds=time.perf_counter() - began,
        mnn_version=mnn_version(),
        confidence=CONFIDENCE,
        rungs=_summarise(rungs, per_start),
    )


# ---------------------------------------------------------------- the report


def doctor_dict(report: DoctorReport) -> dict[str, Any]:
    """Plain JSON-ready data (NaN and infinities become None)."""
    data = asdict(report)
    data["degraded"] = report.degraded
    for rung in data["rungs"]:
        rung["reasons"] = list(rung["reasons"])
        snr = rung["worst_snr_db"]
        if snr is not None and not math.isfinite(snr):
            rung["worst_snr_db"] = None
    return data


def doctor_json(report: DoctorReport) -> str:
    """The report as a JSON document."""
    return json.dumps(doctor_dict(report), indent=2, allow_nan=False, default=str)


def static_note(report: DoctorReport) -> str | None:
    """A sentence naming the rungs MNN loaded statically although they asked for dynamic=True."""
    static = [r for r in report.rungs if r.loaded_static]
    if not static:
        return None
    parts = ", ".join(f"{r.name!r} in {r.loaded_static} of {r.starts} starts" for r in static)
    return (
        f"MNN loaded rung(s) {parts} statically although they ask for dynamic=True (the model "
        "has control flow): they are no fallback, and their speed ratio compares two static "
        "loads"
    )


def conclusion(report: DoctorReport) -> str:
    """One sentence answering: is this machine affected, and what would a fallback cost?"""
    bad = [r for r in report.rungs if r.degraded or r.errors]
    if not bad:
        worst = max((r.ci_high for r in report.rungs if r.ci_high is not None), default=None)
        bound = (
            ""
            if worst is None
            else f" (degraded rate below {worst:.1%} at {report.confidence:.0%} confidence)"
        )
        return f"no degraded start in {report.starts} fresh processes{bound}"
    parts = [
        f"{r.name}: {r.degraded} degraded and {r.errors} failed of {r.starts} starts" for r in bad
    ]
    return "DEGRADED STARTS FOUND: " + "; ".join(parts) + "; guard this model with guard.wrap"


def format_doctor(report: DoctorReport, model: str) -> str:
    """A title line, a text table with one line per rung, then a one-line conclusion."""
    first = report.rungs[0].name if report.rungs else "-"
    header = (
        "rung",
        "starts",
        "degraded",
        "errors",
        f"{report.confidence:.0%} CI",
        "init ms",
        "forward ms",
        f"vs {first}",
    )
    rows = [
        (
            f"{r.name} (loaded static)" if r.loaded_static else r.name,
            str(r.starts),
            str(r.degraded),
            str(r.errors),
            _interval(r.ci_low, r.ci_high),
            _ms(r.init_median_s),
            _ms(r.forward_median_s),
            _ratio(r),
        )
        for r in report.rungs
    ]
    title = (
        f"mnn-guard doctor: {report.starts} fresh process starts of {model} "
        f"(MNN {report.mnn_version}), {report.processes} at a time, {report.seconds:.1f} s"
    )
    note = static_note(report)
    tail = [note] if note else []
    return "\n".join([title, text_table(header, rows), "", conclusion(report), *tail])


def _ratio(rung: RungReport) -> str:
    """The speed ratio with its spread, or what stands in for it: "inconclusive" when the
    rounds do not say which rung is faster, "n/a" when MNN never ran the rung as asked."""
    if rung.loaded_static:
        return "n/a (static)"
    speed = rung.speed
    if speed is None:
        return "-"
    if speed.inconclusive:
        return f"inconclusive ({speed.low:.2f}..{speed.high:.2f})"
    return f"{speed.median:.2f}x ({speed.low:.2f}..{speed.high:.2f})"
