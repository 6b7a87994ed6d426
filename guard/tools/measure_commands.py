"""`mnn-guard demo`, `doctor` and `bench`: many inits, starts or calls, measured and reported.

Each `cmd_*` takes the parsed arguments and returns the exit code; `guard.tools.cli` runs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from guard.tools.arguments import DEMO_FRAMES
from guard.tools.diagnosis_commands import bundle_lines
from guard.tools.errors import EXIT_DEGRADED, EXIT_OK, MissingExtra, UsageError
from guard.tools.output import say
from guard.tools.preflight import (
    checked_model,
    diagnosis_folder,
    load_probe,
    model_factory,
    model_file,
    writable,
)

if TYPE_CHECKING:
    import argparse

    from guard.mnn import MNNFactory, MNNSessionFactory
    from probes import Probe

__all__ = ["cmd_bench", "cmd_demo", "cmd_doctor"]


def cmd_demo(args: argparse.Namespace) -> int:
    """Guard many inits of the demo vocoder with injected faults; exit 1 if any was served."""
    from guard.tools.demo_job import demo_json, format_demo, run_demo

    if args.diagnose is not None:
        diagnosis_folder(args.diagnose)
    report = run_demo(
        sessions=args.sessions,
        requests=args.requests,
        rate=args.rate,
        seed=args.seed,
        port=None if args.port < 0 else args.port,
        quiet=not args.verbose,
        progress=say,
        diagnose=args.diagnose,
    )
    print(demo_json(report) if args.json else format_demo(report))
    if report.bundles:
        from guard.tools.report import render_report

        try:
            pages = [render_report(b) for b in report.bundles]
            line = f"diagnosis: {len(pages)} bundle(s) with report.html in {args.diagnose}"
        except MissingExtra as exc:
            line = f"diagnosis: {len(report.bundles)} bundle(s) in {args.diagnose} ({exc})"
        say(line) if args.json else print(line)
    return EXIT_DEGRADED if report.degraded else EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    """Many fresh processes per rung: the report as a table, or JSON with --json."""
    if args.config and args.api != "session":
        raise UsageError("--config sets the rungs of --api session")
    configs = session_configs(args.config)
    probe, factory, listener, before = checked_model(args)

    from guard.ladder import DEFAULT_LADDER, Rung, session_ladder
    from guard.tools.doctor import SESSION_CONFIGS, doctor_json, format_doctor, run_doctor

    ladder: tuple[Rung, ...] = DEFAULT_LADDER
    if args.api == "session":
        ladder = session_ladder(*(configs or SESSION_CONFIGS))
    report = run_doctor(
        factory,
        probe,
        ladder=ladder,
        starts=args.starts,
        processes=args.processes,
        progress=say,
        diagnose=listener,
    )
    print(doctor_json(report) if args.json else format_doctor(report, args.model))
    for line in bundle_lines(listener, before):
        say(line)  # stdout holds only the report (--json)
    return EXIT_DEGRADED if report.degraded else EXIT_OK


def session_configs(given: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each `--config precision=low,numThread=2`, checked as a session config."""
    from guard.errors import ConfigError
    from guard.mnn import session_config

    for text, config in given:
        try:
            session_config(config)
        except ConfigError as exc:
            raise UsageError(f"--config {text!r}: {exc}") from None
    return [config for _, config in given]


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write JSON when asked; targets are only reported."""
    json_path = None if args.json is None else writable("--json", args.json, folder=False)
    if (args.model is None) != (args.probe is None):
        raise UsageError("MODEL and --probe DIR go together (neither: the demo vocoder)")
    if args.model is not None and args.frames is not None:
        raise UsageError(
            "--frames sets the demo vocoder's input length; MODEL is measured on its probe's "
            "canary inputs, as recorded"
        )
    factory: MNNFactory | MNNSessionFactory | None = None
    probe: Probe | None = None
    if args.model is not None:
        probe = load_probe(args.probe, model_file(args.model))
        factory = model_factory(args.model, probe.input_names, probe.output_names, 1, args.api)

    from guard.tools.bench import bench_json, format_bench, run_bench

    report = run_bench(
        quick=args.quick,
        frames=args.frames or DEMO_FRAMES,
        factory=factory,
        model=args.model,
        probe=probe,
        api=args.api,
        references=not args.no_reference,
        progress=lambda text: say(f"  ... {text}"),
    )
    print(format_bench(report))
    if json_path is not None:
        json_path.write_text(bench_json(report))
    return EXIT_OK
