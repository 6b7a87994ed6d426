"""`mnn-guard bench`'s report: what was measured (`BenchReport`), as Markdown tables or JSON.

Every ratio and difference is printed with its spread over rounds; one whose spread is larger
than its effect reads "inconclusive" instead of a number, and so does a target that the middle
half of the rounds neither meets nor misses.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from guard.tools.bench_checks import SentinelCost, ShadowCost
from guard.tools.bench_hot import ApiCompare, DynamicCost, HotPath, Recheck
from guard.tools.bench_loop import LoopBurst
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
    load: float  # the 1-minute load average when the run ended (how busy the machine was)
    mnn_version: str
    seconds: float
    hot: HotPath
    dynamic: DynamicCost
    healthy: TimeToHealthy
    recheck: Recheck
    pool: tuple[PoolThroughput, ...]
    burst: LoopBurst
    shadow: ShadowCost
    sentinels: SentinelCost | str  # or why there is nothing to price
    memory: Memory
    # reference measures on built-in models (None: `bench --no-reference`)
    small: HotPath | None = None  # the built-in small 3-input model (about 0.2 ms a call)
    tiny: HotPath | None = None  # the built-in tiny model
    pools: tuple[PoolThroughput, ...] = ()  # pools on the built-in relay and small models
    judge: JudgeCost | None = None  # a synthetic 1 s signal
    startup: Startup | None = None
    api: str = "module"  # MNN's API the model is measured through: module or session
    apis: ApiCompare | None = None  # with api="session": the raw Session API vs the Module API

    @property
    def flags(self) -> dict[str, bool | None]:
        """Every judged target by name: met, missed, or None (inconclusive)."""
        judged = {
            "hot": (self.hot.target, self.hot.met),
            "healthy": (self.healthy.target, self.healthy.met),
            **{f"pool {p.processes}": (p.target, p.met) for p in self.pool},
            **{f"{p.model} pool {p.processes}": (p.target, p.met) for p in self.pools},
            "burst": (self.burst.target, self.burst.met),
            "shadow": (self.shadow.target, self.shadow.met),
            "memory": (self.memory.target, self.memory.met),
            **{
                name: (part.target, part.met)
                for name, part in (
                    ("small", self.small), ("judge", self.judge), ("startup", self.startup)
                )
                if part is not None
            },
        }  # fmt: skip
        return {name: met for name, (target, met) in judged.items() if target != REPORT}

    @property
    def missed(self) -> list[str]:
        """Names of the targets that were missed."""
        return [name for name, met in self.flags.items() if met is False]

    @property
    def inconclusive(self) -> list[str]:
        """Names of the targets the rounds neither met nor missed."""
        return [name for name, met in self.flags.items() if met is None]


def _flag(target: str, met: bool | None) -> str:
    if target == REPORT:
        return ""
    if met is None:
        return "inconclusive"
    return "met" if met else "**MISSED**"


Row = tuple[str, str, str, str]  # measure, result, target, flag


def _dynamic_row(r: BenchReport) -> Row:
    """What dynamic=True costs on the model, or why there is nothing to price."""
    d = r.dynamic
    session = r.api == "session"
    measure = (
        "Session API session vs Module API `dynamic=True` (raw forwards, interleaved)"
        if session
        else "static vs `dynamic=True` (raw forwards, interleaved: doctor's measure)"
    )
    if d.dynamic_ignored:
        result = (
            f"no dynamic mode to price: MNN loads {r.model} statically even with dynamic=True "
            f"(control flow); {d.static_us / 1e3:.2f} ms vs {d.dynamic_us / 1e3:.2f} ms are "
            "two static loads"
        )
    else:
        result = (
            f"{d.static_us / 1e3:.3f} ms vs {d.dynamic_us / 1e3:.3f} ms (medians); "
            f"dynamic / static time {d.ratio.text('x', 2)}"
        )
    return measure, result, REPORT, ""


def _pool_row(p: PoolThroughput, what: str) -> Row:
    return (
        f"`guard.Pool`, {p.processes} worker(s), vs {p.processes} raw process(es){what}",
        f"{p.requests_per_s:.0f} requests/s ({p.requests} requests, raw forward "
        f"{p.raw_forward_ms:.2f} ms): {p.efficiency.text('x')} of the raw processes' rate; "
        f"parent CPU {p.parent_cpu_us.text(' us', 0)} per request",
        p.target,
        _flag(p.target, p.met),
    )


def _shadow_row(s: ShadowCost) -> Row:
    return (
        f"guarded `run()` with shadow checks (`shadow_every={s.every}`) vs without; RSS over "
        f"{s.calls:,} calls with them",
        f"{s.shadow_us / 1e3:.3f} ms vs {s.plain_us / 1e3:.3f} ms (medians); "
        f"{s.ratio.text('x')} throughput; {s.checks} samples checked, {s.dropped} dropped; "
        f"RSS {s.rss_start_mb:.1f} MB -> {s.rss_middle_mb:.1f} MB halfway -> "
        f"{s.rss_end_mb:.1f} MB ({s.rss_end_mb - s.rss_middle_mb:+.1f} MB over the second half); "
        f"the reference module about {s.reference_mb:.1f} MB here"
        + (f" and a {s.process_mb:.1f} MB process of its own" if s.where == "process" else "")
        + f" (on a {s.where})" * (s.where != "process"),
        s.target,
        _flag(s.target, s.met),
    )


def _sentinel_row(r: BenchReport) -> Row:
    s = r.sentinels
    measure = "guarded `run()` with sentinel outputs (`sentinels='auto'`) vs without"
    if isinstance(s, str):
        return measure, f"nothing to price: {s}", REPORT, ""
    return (
        measure,
        f"{s.with_us / 1e3:.3f} ms vs {s.without_us / 1e3:.3f} ms (medians; sentinels "
        f"{', '.join(s.sentinels)}); {s.added_us.text(' us', 1, sign=True)} per call, "
        f"{s.ratio.text('x')} throughput",
        REPORT,
        "",
    )


def _api_row(a: ApiCompare) -> Row:
    """The raw Session API against the raw Module API (bench --api session)."""
    return (
        "raw Session API run vs raw Module API forward (static, same file and threads)",
        f"{a.session_us / 1e3:.3f} ms vs {a.module_us / 1e3:.3f} ms (medians); "
        f"{a.ratio.text('x')} the Module API's time",
        REPORT,
        "",
    )


def _model_rows(r: BenchReport) -> list[Row]:
    """(measure, result, target, flag) for every row that measures the model."""
    v, h, m, c, b = r.hot, r.healthy, r.memory, r.recheck, r.burst
    session = r.api == "session"
    rows = [_api_row(r.apis)] if r.apis is not None else []
    return [
        *rows,
        (
            "guarded `run()` vs raw run + copy (Session API)"
            if session
            else "guarded `run()` vs raw forward + copy",
            f"{v.guarded_us / 1e3:.3f} ms vs {v.raw_us / 1e3:.3f} ms (medians); "
            f"{v.ratio.text('x')} throughput, {v.added_us.text(' us', 1, sign=True)} per call",
            v.target,
            _flag(v.target, v.met),
        ),
        _dynamic_row(r),
        (
            "time to healthy: `guard.wrap` vs init + the canary's forwards",
            f"{h.wrap_ms:.1f} ms vs {h.raw_ms:.1f} ms ({h.canary_forwards} forwards); within "
            f"each start: init {h.init_ms:.1f} ms, forwards {h.forwards_ms:.1f} ms, the guard's "
            f"own work {h.guard_ms.text(' ms', 2)}, of which (timed alone) the probe's checks "
            f"{h.checks_ms:.2f} ms and judging the canary {h.judging_ms:.2f} ms; the first "
            f"start in a process {h.first_ms:.2f} ms (model hash, goldens' self-judgement; "
            "cached after); metrics on",
            h.target,
            _flag(h.target, h.met),
        ),
        (
            "re-check of the live module (callers wait one forward at most)",
            f"{c.recheck_ms:.1f} ms; at `recheck_every={c.every_calls}`: "
            f"{c.per_call_us:.1f} us per call",
            REPORT,
            "",
        ),
        *(_pool_row(p, "") for p in r.pool),
        (
            f"a burst of {b.calls} `arun` calls at once on {b.processes} workers "
            f"({b.bursts} burst(s))",
            f"the loop held {b.hold_ms:.2f} ms admitting a burst (worst {b.hold_max_ms:.2f}); "
            f"gaps while it ran: p99 {b.gap_p99_ms:.2f} ms, largest {b.gap_max_ms:.1f} ms "
            f"({b.gap_max_cpu_ms:.1f} ms of it this process's CPU), {b.ticks} ticks; served "
            f"in {b.served_s:.2f} s",
            b.target,
            _flag(b.target, b.met),
        ),
        _shadow_row(r.shadow),
        _sentinel_row(r),
        (
            "RSS over init + recover cycles",
            f"{m.growth_mb:+.1f} MB over {m.cycles} cycles ({m.inits} inits)",
            m.target,
            _flag(m.target, m.met),
        ),
    ]


def _reference_rows(r: BenchReport) -> list[Row]:
    """The rows that measure built-in reference models, not the model benchmarked."""
    t, j, sm, st = r.tiny, r.judge, r.small, r.startup
    assert t is not None and j is not None and sm is not None and st is not None  # measured
    return [
        (
            "small built-in model (audio float32 [1, 2048], state float32 [1, 448], sr int32 "
            "scalar): guarded `run()` vs raw forward + copy, metrics and NaN checks on",
            f"{sm.guarded_us:.1f} us vs {sm.raw_us:.1f} us (medians); "
            f"{sm.added_us.text(' us', 1, sign=True)} per call "
            f"({sm.added_no_metrics_us.text(' us', 1, sign=True)} without metrics), "
            f"{sm.ratio.text('x')} throughput",
            sm.target,
            _flag(sm.target, sm.met),
        ),
        (
            "tiny built-in model (x [1, 16]): guarded `run()` vs raw forward + copy",
            f"{t.guarded_us:.1f} us vs {t.raw_us:.1f} us (medians); "
            f"{t.added_us.text(' us', 1, sign=True)} per call "
            f"({t.added_no_metrics_us.text(' us', 1, sign=True)} without metrics)",
            t.target,
            _flag(t.target, t.met),
        ),
        *(_pool_row(p, f" on the built-in {p.model} model") for p in r.pools),
        (
            "cold `import guard`; the whole `mnn-guard --help` command",
            f"{st.import_s:.3f} s; {st.help_s:.3f} s (best of fresh processes)",
            st.target,
            _flag(st.target, st.met),
        ),
        (
            "judging a synthetic 1 s canary at 22,050 Hz",
            f"{j.judge_ms:.2f} ms per judgement; {j.judge_1s_canary_ms:.2f} ms for its two runs",
            j.target,
            _flag(j.target, j.met),
        ),
    ]


def _table(rows: list[Row]) -> list[str]:
    return [
        "| measure | result | target | |",
        "| --- | --- | --- | --- |",
        *(f"| {a} | {b} | {c} | {flag} |" for a, b, c, flag in rows),
    ]


def format_bench(r: BenchReport) -> str:
    """The Markdown tables printed by `mnn-guard bench` (and pasted into docs/performance.md)."""
    what = f"the built-in demo vocoder, {r.frames} frames" if r.builtin else "its probe's canary"
    if r.api == "session":
        what = f"MNN.Interpreter sessions; {what}"
    return "\n".join(
        [
            f"mnn-guard bench, {'quick' if r.quick else 'full'} run: MNN {r.mnn_version}, "
            f"{r.cpus} CPUs, load average {r.load:.1f}, {r.seconds:.0f} s; medians of "
            "interleaved rounds with the middle half of the rounds in brackets "
            "(docs/performance.md)",
            "",
            f"**{r.model}** ({what}: {r.inputs})",
            "",
            *_table(_model_rows(r)),
            *(
                [
                    "",
                    "Reference measures on built-in models "
                    "(the same on every run, not your model):",
                    "",
                    *_table(_reference_rows(r)),
                ]
                if r.small is not None
                else []
            ),
        ]
    )


def bench_json(r: BenchReport) -> str:
    """The report as a JSON document (every field of every section)."""
    return json.dumps(asdict(r), indent=2) + "\n"
