"""The benchmark runs in quick mode and reports every field; `make bench` judges the numbers."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest

from guard.tools import bench, cli

FIELDS = {
    "quick", "model", "builtin", "inputs", "frames", "cpus", "mnn_version", "seconds", "hot",
    "dynamic", "healthy", "recheck", "pool", "memory", "small", "tiny", "judge", "startup",
    "api", "apis",
}  # fmt: skip
SECTIONS = {
    "hot": bench.HotPath,
    "small": bench.HotPath,
    "tiny": bench.HotPath,
    "startup": bench.Startup,
    "dynamic": bench.Speedup,
    "healthy": bench.TimeToHealthy,
    "recheck": bench.Recheck,
    "memory": bench.Memory,
    "judge": bench.JudgeCost,
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


def test_json_has_every_field(report_json: dict[str, Any]) -> None:
    """Every section and every field of every section is in the JSON."""
    assert set(report_json) == FIELDS
    for name, cls in SECTIONS.items():
        assert set(report_json[name]) == field_names(cls), name
    assert [p["processes"] for p in report_json["pool"]] == [1, 2]
    for p in report_json["pool"]:
        assert set(p) == field_names(bench.PoolThroughput)
    assert report_json["quick"] is True
    assert (report_json["model"], report_json["builtin"]) == ("demo_vocoder.mnn", True)
    assert report_json["inputs"] == "mel float32[1, 80, 100]"


def test_measurements_are_real_numbers(report_json: dict[str, Any]) -> None:
    """Timings and rates are finite and positive; ratios agree with the timings they come from."""
    for name in ("hot", "small", "tiny"):
        hot = report_json[name]
        for key in ("guarded_us", "guarded_no_metrics_us", "raw_us", "ratio"):
            assert math.isfinite(hot[key]) and hot[key] > 0, (name, key)
        # ratio and added time are medians over the same (odd number of) rounds' pairs: they
        # agree in direction exactly (the medians per side need not, on a busy machine)
        assert (hot["ratio"] < 1.0) == (hot["added_us"] > 0.0)
    assert isinstance(report_json["hot"]["met"], bool)  # the vocoder: a model of 2 ms or more
    assert isinstance(report_json["small"]["met"], bool)
    assert report_json["tiny"]["met"] is None  # reported only
    healthy = report_json["healthy"]
    assert healthy["canary_forwards"] == 4  # 2 canary runs x 2 cases
    assert healthy["wrap_ms"] > 0 and healthy["raw_ms"] > 0 and healthy["judging_ms"] > 0
    assert 0 < healthy["checks_ms"] < healthy["wrap_ms"]
    assert healthy["met"] is (healthy["added_ms"] <= bench.HEALTHY_ADDED_MS_TARGET)
    startup = report_json["startup"]
    assert 0 < startup["import_s"] < startup["help_s"]  # --help includes interpreter start
    assert report_json["judge"]["judge_ms"] > 0
    assert report_json["dynamic"]["speedup"] > 0
    assert report_json["dynamic"]["dynamic_ignored"] is False
    assert report_json["recheck"]["recheck_ms"] > 0
    assert all(p["requests_per_s"] > 0 for p in report_json["pool"])
    for p in report_json["pool"]:  # efficiency against N x the raw single-process rate
        assert p["efficiency"] > 0 and (p["met"] is None) == (p["target"] == bench.REPORT)
    memory = report_json["memory"]
    assert memory["inits"] == 2 * memory["cycles"]  # each cycle: a degraded init, then a clean one
    assert memory["rss_end_mb"] > 0


def report_from(data: dict[str, Any]) -> bench.BenchReport:
    """A BenchReport rebuilt from its JSON."""
    sections = {key: cls(**data[key]) for key, cls in SECTIONS.items()}
    pool = tuple(bench.PoolThroughput(**p) for p in data["pool"])
    return bench.BenchReport(**{**data, **sections, "pool": pool})


def test_table_lists_every_measure(report_json: dict[str, Any]) -> None:
    """The model's table, then the reference table; one row per measure, each target flagged."""
    report = report_from(report_json)
    table = bench.format_bench(report)
    model_part, reference_part = table.split("Reference measures on built-in models")
    assert "**demo_vocoder.mnn** (the built-in demo vocoder, 100 frames" in model_part

    def rows(part: str) -> list[str]:
        return [line for line in part.splitlines() if line.startswith("| ") and "---" not in line]

    assert len(rows(model_part)) == 1 + 7  # header + one row per measure of the model
    assert len(rows(reference_part)) == 1 + 4  # header + small, tiny, 1 s judgement, startup
    assert "tiny built-in model" in reference_part and "tiny" not in model_part
    assert "small built-in model" in reference_part
    flagged = [r for r in rows(table) if r.endswith(("| met |", "| **MISSED** |"))]
    judged = [p for p in report.pool if p.met is not None]
    assert len(flagged) == 6 + len(judged)  # every target carries a verdict
    assert table.count("MISSED") == len(report.missed)


@pytest.mark.parametrize(
    ("static_us", "dynamic_us", "words"),
    [(3000.0, 4000.0, "**1.33x** faster"), (4000.0, 3000.0, "**1.33x** slower")],
)
def test_dynamic_row_says_faster_or_slower(
    report_json: dict[str, Any], static_us: float, dynamic_us: float, words: str
) -> None:
    """The guarded static side is "1.33x slower", never "0.75x faster", when it is slower."""
    speedup = bench.Speedup(
        guarded_static_us=static_us,
        raw_dynamic_us=dynamic_us,
        speedup=dynamic_us / static_us,
        dynamic_ignored=False,
    )
    report = dataclasses.replace(report_from(report_json), dynamic=speedup)
    assert f"guarded static is {words}" in bench.format_bench(report)
