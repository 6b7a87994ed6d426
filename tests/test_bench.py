"""The benchmark runs in quick mode and reports every field; `make bench` judges the numbers."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest

from guard.tools import bench, cli

FIELDS = {
    "quick", "frames", "cpus", "mnn_version", "seconds", "vocoder", "tiny", "dynamic",
    "healthy", "recheck", "pool", "memory",
}  # fmt: skip


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
    sections = {
        "vocoder": bench.HotPath,
        "tiny": bench.HotPath,
        "dynamic": bench.Speedup,
        "healthy": bench.TimeToHealthy,
        "recheck": bench.Recheck,
        "memory": bench.Memory,
    }
    for name, cls in sections.items():
        assert set(report_json[name]) == field_names(cls), name
    assert [p["processes"] for p in report_json["pool"]] == [1, 2]
    for p in report_json["pool"]:
        assert set(p) == field_names(bench.PoolThroughput)
    assert report_json["quick"] is True


def test_measurements_are_real_numbers(report_json: dict[str, Any]) -> None:
    """Timings and rates are finite and positive; ratios agree with the timings they come from."""
    for name in ("vocoder", "tiny"):
        hot = report_json[name]
        for key in ("guarded_us", "guarded_no_metrics_us", "raw_us", "ratio"):
            assert math.isfinite(hot[key]) and hot[key] > 0, (name, key)
        # ratio and added time are medians over the same (odd number of) rounds' pairs: they
        # agree in direction exactly (the medians per side need not, on a busy machine)
        assert (hot["ratio"] < 1.0) == (hot["added_us"] > 0.0)
        assert isinstance(hot["met"], bool)
    healthy = report_json["healthy"]
    assert healthy["canary_forwards"] == 4  # 2 canary runs x 2 cases
    assert healthy["wrap_ms"] > 0 and healthy["raw_ms"] > 0 and healthy["judge_ms"] > 0
    assert report_json["dynamic"]["speedup"] > 0
    assert report_json["recheck"]["recheck_ms"] > 0
    assert all(p["requests_per_s"] > 0 for p in report_json["pool"])
    memory = report_json["memory"]
    assert memory["inits"] == 2 * memory["cycles"]  # each cycle: a degraded init, then a clean one
    assert memory["rss_end_mb"] > 0


def test_table_lists_every_measure(report_json: dict[str, Any]) -> None:
    """The table (rebuilt from the JSON) has one row per measure and flags each target."""
    report = bench.BenchReport(
        **{
            **report_json,
            **{
                key: cls(**report_json[key])
                for key, cls in (
                    ("vocoder", bench.HotPath),
                    ("tiny", bench.HotPath),
                    ("dynamic", bench.Speedup),
                    ("healthy", bench.TimeToHealthy),
                    ("recheck", bench.Recheck),
                    ("memory", bench.Memory),
                )
            },
            "pool": tuple(bench.PoolThroughput(**p) for p in report_json["pool"]),
        }
    )
    table = bench.format_bench(report)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 9  # header + one row per measure
    flagged = [r for r in rows if r.endswith(("| met |", "| **MISSED** |"))]
    assert len(flagged) == 4  # the four targets carry a verdict
    assert table.count("MISSED") == len(report.missed)
