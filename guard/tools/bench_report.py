"""`mnn-guard bench`'s report: what was measured (`BenchReport`), as Markdown tables or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from guard.tools.bench_hot import ApiCompare, HotPath, Recheck, Speedup
from guard.tools.bench_memory import Memory
from guard.tools.bench_pool import PoolThroughput
from guard.tools.bench_start import JudgeCost, Startup, TimeToHealthy
from guard.tools.bench_timing import REPORT

__all__ = ["BenchReport", "bench_json", "format_bench"]


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
    """The Markdown tables printed by `mnn-guard bench` (and pasted into docs/performance.md)."""
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
