"""The benchmark runs in quick mode and reports every field; `make bench` judges the numbers.

Timings are never asserted here (they belong to `mnn-guard bench` on a quiet machine): these
tests check that every figure is measured, that each carries its spread, and that the report
says "inconclusive" where the rounds do not decide.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest

from guard.tools import bench, cli
from guard.tools.bench_timing import Spread, judged, spread

FIELDS = {
    "quick", "model", "builtin", "inputs", "frames", "cpus", "load", "mnn_version", "seconds",
    "hot", "dynamic", "healthy", "recheck", "pool", "burst", "shadow", "sentinels", "memory",
    "small", "tiny", "pools", "judge", "startup", "api", "apis",
}  # fmt: skip
SECTIONS = {
    "hot": bench.HotPath,
    "small": bench.HotPath,
    "tiny": bench.HotPath,
    "startup": bench.Startup,
    "dynamic": bench.DynamicCost,
    "healthy": bench.TimeToHealthy,
    "recheck": bench.Recheck,
    "burst": bench.LoopBurst,
    "shadow": bench.ShadowCost,
    "sentinels": bench.SentinelCost,
    "memory": bench.Memory,
    "judge": bench.JudgeCost,
}
SPREADS = {  # the sections' fields that are figures over rounds
    bench.HotPath: ("ratio", "added_us", "added_no_metrics_us"),
    bench.DynamicCost: ("ratio",),
    bench.TimeToHealthy: ("guard_ms", "versus_raw_ms"),
    bench.PoolThroughput: ("efficiency", "parent_cpu_us"),
    bench.ShadowCost: ("ratio",),
    bench.SentinelCost: ("added_us", "ratio"),
}


def field_names(cls: Any) -> set[str]:
    """The fields a dataclass declares."""
    return {f.name for f in dataclasses.fields(cls)}


@pytest.fixture(scope="module")
def report_json(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`mnn-guard bench --quick --json PATH`, run once through the real CLI."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    assert cli.main(["bench", "--quick", "--json", str(path)]) == cli.EXIT_OK
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def rebuilt(cls: Any, data: dict[str, Any]) -> Any:
    """A section rebuilt from its JSON, its spreads as Spread."""
    fields = {k: Spread(**v) if k in SPREADS.get(cls, ()) else v for k, v in data.items()}
    return cls(**fields)


def report_from(data: dict[str, Any]) -> bench.BenchReport:
    """A BenchReport rebuilt from its JSON."""
    sections = {key: rebuilt(cls, data[key]) for key, cls in SECTIONS.items()}
    pools = {
        key: tuple(rebuilt(bench.PoolThroughput, p) for p in data[key]) for key in ("pool", "pools")
    }
    return bench.BenchReport(**{**data, **sections, **pools})


def test_json_has_every_field(report_json: dict[str, Any]) -> None:
    """Every section and every field of every section is in the JSON."""
    assert set(report_json) == FIELDS
    for name, cls in SECTIONS.items():
        assert set(report_json[name]) == field_names(cls), name
    assert [p["processes"] for p in report_json["pool"]] == [1, 2]
    assert [(p["model"], p["processes"]) for p in report_json["pools"]] == [
        ("relay", 1), ("relay", 2), ("small", 1), ("small", 2),
    ]  # fmt: skip
    for p in (*report_json["pool"], *report_json["pools"]):
        assert set(p) == field_names(bench.PoolThroughput)
    assert report_json["quick"] is True
    assert (report_json["model"], report_json["builtin"]) == ("demo_vocoder.mnn", True)
    assert report_json["inputs"] == "mel float32[1, 80, 100]"


def test_every_figure_carries_its_spread(report_json: dict[str, Any]) -> None:
    """Ratios and differences come as the median of the rounds with their middle half."""
    report = report_from(report_json)
    sections: list[Any] = [report.hot, report.small, report.tiny, report.dynamic, report.healthy]
    sections += [*report.pool, *report.pools, report.shadow, report.sentinels]
    for section in sections:
        for name in SPREADS[type(section)]:
            figure = getattr(section, name)
            assert isinstance(figure, Spread), name
            assert figure.low <= figure.median <= figure.high and figure.rounds >= 3, name
            assert all(math.isfinite(x) for x in (figure.low, figure.median, figure.high))


def test_measurements_are_real_numbers(report_json: dict[str, Any]) -> None:
    """Timings and rates are finite and positive; the guard's parts of a start never exceed it."""
    for name in ("hot", "small", "tiny"):
        hot = report_json[name]
        for key in ("guarded_us", "guarded_no_metrics_us", "raw_us"):
            assert math.isfinite(hot[key]) and hot[key] > 0, (name, key)
        assert hot["ratio"]["median"] > 0
    assert report_json["hot"]["target"] != bench.REPORT  # the vocoder: 2 ms or more
    assert report_json["small"]["target"] != bench.REPORT
    assert (report_json["tiny"]["target"], report_json["tiny"]["met"]) == (bench.REPORT, None)
    healthy = report_json["healthy"]
    assert healthy["canary_forwards"] == 4  # 2 canary runs x 2 cases
    assert healthy["wrap_ms"] > 0 and healthy["raw_ms"] > 0 and healthy["judging_ms"] > 0
    assert 0 < healthy["init_ms"] < healthy["wrap_ms"]
    assert 0 < healthy["forwards_ms"] < healthy["wrap_ms"]
    assert healthy["guard_ms"]["median"] < healthy["wrap_ms"]  # a part, measured within
    assert healthy["checks_ms"] > 0 and healthy["first_ms"] > 0
    startup = report_json["startup"]
    assert 0 < startup["import_s"] < startup["help_s"]  # --help includes interpreter start
    assert report_json["judge"]["judge_ms"] > 0
    dynamic = report_json["dynamic"]
    assert dynamic["static_us"] > 0 and dynamic["dynamic_us"] > 0
    assert dynamic["dynamic_ignored"] is False
    assert report_json["recheck"]["recheck_ms"] > 0
    for p in (*report_json["pool"], *report_json["pools"]):
        assert p["requests_per_s"] > 0 and p["raw_forward_ms"] > 0
        assert p["efficiency"]["median"] > 0 and p["parent_cpu_us"]["median"] > 0
        assert (p["met"] is None) or (p["target"] != bench.REPORT)
    burst = report_json["burst"]
    assert burst["calls"] == bench.BURST_CALLS and burst["ticks"] > 0
    assert 0 < burst["hold_ms"] <= burst["hold_max_ms"]
    assert 0 < burst["gap_p99_ms"] <= burst["gap_max_ms"]
    shadow = report_json["shadow"]
    assert shadow["every"] == bench.SHADOW_EVERY and shadow["checks"] > 0
    assert shadow["calls"] > 0
    assert all(shadow[k] > 0 for k in ("rss_start_mb", "rss_middle_mb", "rss_end_mb"))
    assert math.isfinite(shadow["reference_mb"])  # reported (its size is noise-level here)
    assert shadow["where"] == "process" and shadow["process_mb"] > 10  # an interpreter with MNN
    sentinels = report_json["sentinels"]  # the vocoder's output is a tanh: auto finds its input
    assert len(sentinels["sentinels"]) == 1 and sentinels["with_us"] > 0
    memory = report_json["memory"]
    assert memory["inits"] == 2 * memory["cycles"]  # each cycle: a degraded init, then a clean one
    assert memory["rss_end_mb"] > 0


def test_table_lists_every_measure(report_json: dict[str, Any]) -> None:
    """The model's table, then the reference table; one row per measure, every target flagged
    met, missed or inconclusive."""
    report = report_from(report_json)
    table = bench.format_bench(report)
    model_part, reference_part = table.split("Reference measures on built-in models")
    assert "**demo_vocoder.mnn** (the built-in demo vocoder, 100 frames" in model_part

    def rows(part: str) -> list[str]:
        return [line for line in part.splitlines() if line.startswith("| ") and "---" not in line]

    assert len(rows(model_part)) == 1 + 10  # header + one row per measure of the model
    assert len(rows(reference_part)) == 1 + 8  # header + small, tiny, 4 pools, judge, startup
    assert "tiny built-in model" in reference_part and "tiny" not in model_part
    assert "small built-in model" in reference_part and "built-in relay model" in reference_part
    flags = ("| met |", "| **MISSED** |", "| inconclusive |")
    flagged = [r for r in rows(table) if r.endswith(flags)]
    assert len(flagged) == len(report.flags)  # every target carries a verdict
    assert table.count("| **MISSED** |") == len(report.missed)
    assert table.count("| inconclusive |") == len(report.inconclusive)


@pytest.mark.parametrize(
    ("ratios", "words"),
    [
        ([1.30, 1.32, 1.35, 1.33, 1.31], "dynamic / static time **1.32x** (1.31..1.33, 5 rounds)"),
        ([0.90, 1.10, 1.02, 0.95, 1.08], "dynamic / static time inconclusive (1.02x; 0.95..1.08"),
    ],
)
def test_dynamic_row_prints_a_figure_only_when_the_rounds_decide(
    report_json: dict[str, Any], ratios: list[float], words: str
) -> None:
    """A clear difference is printed with its spread; one smaller than its spread is called
    inconclusive rather than printed as a result."""
    cost = bench.DynamicCost(
        static_us=3000.0, dynamic_us=3900.0, ratio=spread(ratios, 1.0), dynamic_ignored=False
    )
    report = dataclasses.replace(report_from(report_json), dynamic=cost)
    assert words in bench.format_bench(report)


@pytest.mark.parametrize(
    ("values", "target", "at_least", "verdict"),
    [
        ([0.96, 0.97, 0.98, 0.99, 1.0], 0.95, True, True),
        ([0.90, 0.91, 0.92, 0.93, 0.94], 0.95, True, False),
        ([0.93, 0.94, 0.96, 0.97, 0.98], 0.95, True, None),
        ([40.0, 50.0, 60.0, 70.0, 80.0], 100.0, False, True),
        ([90.0, 95.0, 105.0, 110.0, 120.0], 100.0, False, None),
    ],
)
def test_a_target_is_judged_on_the_middle_half_of_the_rounds(
    values: list[float], target: float, at_least: bool, verdict: bool | None
) -> None:
    """Met when the middle half of the rounds meets the target, missed when it misses it,
    inconclusive (None) when it straddles it."""
    assert judged(spread(values, 1.0), target, at_least=at_least) is verdict


def test_sentinel_row_says_when_there_is_nothing_to_price(report_json: dict[str, Any]) -> None:
    """A model in which `auto` finds no sentinel gets a row that says so, not a figure."""
    why = "`auto` finds no sentinel in the model (no output made by a squashing op)"
    report = dataclasses.replace(report_from(report_json), sentinels=why)
    assert f"| nothing to price: {why} | report |" in bench.format_bench(report)
