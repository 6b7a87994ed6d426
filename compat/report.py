"""Write docs/compatibility.md from the matrix's results (compat/results/*.json).

    python compat/report.py [--results compat/results] [-o docs/compatibility.md]

`make compat` runs it after every release's session.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

FACTS = {  # name -> (what is measured, what a True means for mnn-guard)
    "views_overwritten": (
        "output views overwritten",
        "`Var.read()` is a view MNN overwrites on the next forward: the guard hands out owned "
        "copies",
    ),
    "fork_hang": (
        "fork hang",
        "a child forked after its parent loaded a module hangs in MNN: the guard raises "
        "`ForkAfterLoad` and its pool spawns",
    ),
    "dynamic_on_control_flow": (
        "`dynamic=True` on control flow is a static load",
        "the dynamic rung is no fallback for such a model: the guard says so "
        "(`DynamicIgnoredWarning`, `turned_static`)",
    ),
    "thread_pool_spin": (
        "thread-pool spin",
        "after a multi-thread module ran, MNN's pool burns CPU during every forward: serve "
        "with `threads=1`",
    ),
    "zero_size_read": (
        "zero-size reads raise",
        "`Var.read()` of a tensor with a zero dimension raises `SystemError`: the guard "
        "makes an empty array of its shape",
    ),
    "get_info_expression_built": (
        "`get_info` names an expression-built model's inputs",
        "no when MNN.expr evaluates eagerly by default: a graph saved with MNN's defaults holds "
        "its outputs' values and no input at all, which `mnn-guard inspect` says; the guard "
        "builds its models inside `guard.mnn.graph_building()` (`MNN.expr.lazy_eval(True)`), "
        "whose files name their inputs on every release",
    ),
}


def _mark(value: Any) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(results: list[dict[str, Any]]) -> str:
    """The page: what is supported, the matrix, and one table of facts per release."""
    releases = [r["mnn"] for r in results]
    lines = [
        "# Compatibility",
        "",
        "mnn-guard supports every PyMNN release from 3.0 to 3.6 (`MNN>=3.0,<3.7`): "
        + ", ".join(releases)
        + ", the releases PyPI serves for CPython 3.11. The code detects what it relies on "
        "by asking MNN at run time, never by reading its version.",
        "",
        "`make compat` installs the project with each release into a fresh virtual "
        "environment (nox with uv, `noxfile.py`), runs the core suite and the real-model tests, "
        "measures the MNN facts below (`compat/facts.py`) and runs `mnn-guard demo`, then "
        "writes this page (`compat/report.py`). CI runs the oldest and the newest release on "
        "every push: the oldest release's session, and the newest release's facts and demo "
        "(`make compat-edges`), while `make test` runs the whole suite on the newest release "
        "(the range resolves to it); `make dist` installs the wheel with both and runs "
        "`mnn-guard demo` and `mnn-guard inspect` outside the source tree.",
        "",
        "No release in the range is left out: PyPI serves no 3.3 release for CPython 3.11. "
        "How to check a new release against your own probes before rolling it out: "
        "[Upgrading MNN](upgrading.md).",
        "",
        "## Latest run",
        "",
        "| release | measured | tests | demo: degraded outputs served "
        "| demo probe on a clean init |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        t = r.get("tests")
        tests = (
            "not run"
            if t is None
            else f"{t['tests'] - t['failures'] - t['errors'] - t['skipped']} passed, "
            f"{t['failures'] + t['errors']} failed, {t['skipped']} skipped ({t['seconds']:g} s)"
        )
        demo = r["facts"]["demo"]
        canary = r["facts"]["demo_canary"]
        lines.append(
            f"| {r['mnn']} | {r['measured']} | {tests} | {_mark(demo['value'])} "
            f"| {_cell(canary['detail'])} |"
        )
    lines += [
        "",
        "## MNN facts by release",
        "",
        "| fact | " + " | ".join(releases) + " |",
        "| --- | " + " | ".join("---" for _ in releases) + " |",
    ]
    for name, (title, _) in FACTS.items():
        row = [_mark(r["facts"].get(name, {}).get("value")) for r in results]
        lines.append(f"| {title} | " + " | ".join(row) + " |")
    lines += ["", "What each fact means for mnn-guard:", ""]
    lines += [f"- **{title}**: {meaning}." for title, meaning in FACTS.values()]
    lines += [
        "",
        "The facts in detail, as measured on each release (`python compat/facts.py` measures "
        "them on the MNN installed):",
    ]
    for r in results:
        lines += ["", f"### PyMNN {r['mnn']}", "", "| fact | measured |", "| --- | --- |"]
        for name, (title, _) in FACTS.items():
            fact = r["facts"].get(name, {"value": None, "detail": "not measured"})
            lines.append(f"| {title}: {_mark(fact['value'])} | {_cell(fact['detail'])} |")
        demo = r["facts"]["demo"]
        lines.append(f"| `mnn-guard demo` | {_cell(demo['detail'])} |")
    return "\n".join(lines) + "\n"


def _release(result: dict[str, Any]) -> tuple[int, ...]:
    return tuple(int(p) for p in str(result["mnn"]).split(".") if p.isdigit())


def main(argv: list[str] | None = None) -> int:
    """Read every release's results and write the page."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("-o", "--output", default=str(HERE.parent / "docs" / "compatibility.md"))
    args = parser.parse_args(argv)
    results = [json.loads(p.read_text()) for p in sorted(Path(args.results).glob("*.json"))]
    if not results:
        print(f"no results in {args.results}: run `make compat` first", file=sys.stderr)
        return 2
    Path(args.output).write_text(render(sorted(results, key=_release)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
