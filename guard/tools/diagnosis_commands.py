"""`mnn-guard diagnose` and `report`, and the bundle lines `check` and `doctor` end with.

Each `cmd_*` takes the parsed arguments and returns the exit code; `guard.tools.cli` runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from guard.tools.errors import EXIT_DEGRADED, EXIT_OK, MissingExtra
from guard.tools.output import say
from guard.tools.preflight import load_options, load_probe, model_factory, model_file, writable

if TYPE_CHECKING:
    import argparse

    from guard.diagnosis import DiagnosisListener

__all__ = ["bundle_lines", "cmd_diagnose", "cmd_report", "rendered"]


def rendered(bundle: Path) -> str:
    """Render the bundle's page: "report: PAGE", or why there is none (matplotlib missing)."""
    from guard.tools.report import render_report

    try:
        return f"report: {render_report(bundle)}"
    except MissingExtra as exc:
        return str(exc)


def bundle_lines(listener: DiagnosisListener | None, before: int) -> list[str]:
    """Wait for the bundles written since `before`, render their pages; one line each."""
    if listener is None:
        return []
    listener.flush()
    return [f"diagnosis bundle: {b} ({rendered(b)})" for b in listener.writer.since(before)]


def cmd_diagnose(args: argparse.Namespace) -> int:
    """Compare every named tensor of the suspect and reference configurations; exit 1 if any
    diverges."""
    model = None if args.ignore_model_hash else model_file(args.model)
    probe = load_probe(args.probe, model, ignorable=True)
    overrides = load_options("--override", args.override)
    reference = load_options("--reference", args.reference) if args.reference else None
    reference_model = model_file(args.reference_model) if args.reference_model else None
    bundle = None
    if args.bundle is not None:
        from guard.tools.bundles import read_bundle

        bundle = read_bundle(args.bundle).path  # a BundleError is a user error
    model_factory(args.model, probe.input_names, probe.output_names, args.threads)

    from guard.tools.diagnose import diagnosis_json, format_diagnosis, run_diagnose

    found = run_diagnose(
        args.model,
        probe,
        overrides=overrides,
        reference_model=reference_model,
        reference=reference,
        threshold_db=args.threshold_db,
        tries=args.tries,
        threads=args.threads,
        progress=say,
    )
    print(diagnosis_json(found) if args.json else format_diagnosis(found))
    if bundle is not None:
        from guard.tools.bundles import DIAGNOSIS

        (bundle / DIAGNOSIS).write_text(diagnosis_json(found))
        say(f"diagnosis added to {bundle} ({rendered(bundle)})")
    return EXIT_DEGRADED if found.diverged else EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    """Write the HTML page of a bundle (or of every bundle in a folder)."""
    from guard.tools.report import render_folder, render_report

    if args.out is not None:
        out = writable("-o", args.out, folder=False)
        print(render_report(args.bundle, out))
        return EXIT_OK
    for page in render_folder(args.bundle):
        print(page)
    return EXIT_OK
