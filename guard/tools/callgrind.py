"""Instructions per call on the built-in small model, counted by callgrind (docs/performance.md).

    python -m guard.tools.callgrind [--calls 300]

Timings on a shared machine move by more than the guard's few microseconds; instruction counts
do not. This runs a Python process under `valgrind --tool=callgrind` (twice: Prometheus in one
process, then in multiprocess mode) that builds the small model and then runs, in phases of
`calls` calls each: the raw forward + copy, guarded `run()` without metrics, guarded `run()`
with metrics (in multiprocess mode, the flush interval stretched by SLOWDOWN, so that files
are written as often per call as at full speed). Callgrind dumps its counts whenever the
process calls `getppid`, which it does between phases only, so each dump holds one phase; a
phase's count over `calls` is its cost per call. Needs valgrind on the PATH.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["PHASES", "count", "main"]

SLOWDOWN = 50  # how much slower a process runs under callgrind, about
PHASES = ("raw forward + copy", "guarded run(), no metrics", "guarded run(), metrics")


def _inside(calls: int) -> None:
    """The counted process: build, warm up, then one phase per dump (`os.getppid` marks them)."""
    from prometheus_client import CollectorRegistry

    import probes
    from guard import mnn
    from guard.ladder import Policy
    from guard.tools.bench_timing import quiet_wrap, raw_call
    from guard.tools.models import SMALL_INPUTS, SMALL_OUTPUTS, build_small, small_inputs
    from guard.wrapping import wrap

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        import guard.metrics

        # the process runs about SLOWDOWN times slower under callgrind: flushes as often per
        # call as without it (a flush is due FLUSH_SECONDS after the last)
        guard.metrics.FLUSH_SECONDS *= SLOWDOWN
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "small.mnn"
        build_small(path)
        factory = mnn.mnn_factory(path, list(SMALL_INPUTS), list(SMALL_OUTPUTS), threads=1)
        inputs = small_inputs()
        probe = probes.record(factory, inputs)
        policy = Policy(background=False, promote_after=None)
        raw = raw_call(factory(), [inputs[n] for n in probe.input_names])
        quiet = quiet_wrap(factory, probe, "callgrind-quiet", policy)
        served = wrap(factory, probe, name="callgrind", policy=policy, registry=CollectorRegistry())
        sides: list[Callable[[], object]] = [
            raw,
            lambda: quiet.run(inputs),
            lambda: served.run(inputs),
        ]
        for side in sides:
            for _ in range(20):
                side()
        for side in sides:
            os.getppid()  # dump: what came before
            for _ in range(calls):
                side()
        os.getppid()
        quiet.close()
        served.close()


def count(calls: int, *, multiprocess: bool) -> dict[str, float]:
    """Instructions per call of each phase, from one process under callgrind."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind is not on the PATH (apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        if multiprocess:
            os.mkdir(Path(tmp) / "prom")
            env["PROMETHEUS_MULTIPROC_DIR"] = str(Path(tmp) / "prom")
        command = [
            valgrind,
            "--tool=callgrind",
            f"--callgrind-out-file={tmp}/cg.out",
            "--dump-before=getppid",
            sys.executable,
            "-m",
            "guard.tools.callgrind",
            "--inside",
            str(calls),
        ]
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=1800)
        dumps = sorted(Path(tmp).glob("cg.out.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
        totals = [_total(p) for p in dumps]
    if len(totals) < len(PHASES) + 1:
        raise SystemExit(f"expected {len(PHASES) + 1} dumps or more, got {len(totals)}")
    # dump 1 is the set-up; dumps 2.. are the phases, in order
    return {name: totals[1 + i] / calls for i, name in enumerate(PHASES)}


def _total(dump: Path) -> int:
    """A dump's total instruction count."""
    match = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(), re.MULTILINE)
    if match is None:
        raise SystemExit(f"no total in {dump}")
    return int(match.group(1))


def main(argv: list[str] | None = None) -> None:
    """Count both modes and print a Markdown table."""
    parser = argparse.ArgumentParser(prog="python -m guard.tools.callgrind")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--inside", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside is not None:
        _inside(args.inside)
        return
    one = count(args.calls, multiprocess=False)
    many = count(args.calls, multiprocess=True)
    raw = one[PHASES[0]]
    print(f"| per call ({args.calls} calls a phase) | instructions | added to raw | raw / it |")
    print("| --- | --- | --- | --- |")
    rows = [(PHASES[0], raw), (PHASES[1], one[PHASES[1]]), (PHASES[2], one[PHASES[2]])]
    rows.append((f"{PHASES[2]} (multiprocess mode)", many[PHASES[2]]))
    for name, value in rows:
        print(f"| {name} | {value:,.0f} | {value - raw:+,.0f} | {raw / value:.3f}x |")


if __name__ == "__main__":
    main()
