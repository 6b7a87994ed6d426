"""The `mnn-guard` command line: record, check, demo, doctor, bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from guard.errors import GuardError
from probes import ProbeError
from probes.signature import format_shape

__all__ = ["main"]

EXIT_OK, EXIT_DEGRADED, EXIT_USAGE = 0, 1, 2


class UsageError(GuardError):
    """A command-line argument is malformed."""


def _shape_arg(text: str) -> tuple[str, tuple[int, ...]]:
    name, _, dims = text.partition("=")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        raise UsageError(f"--shape {text!r}: expected NAME=D1,D2,... with integers") from None
    if not name or not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--shape {text!r}: expected NAME=D1,D2,... with positive sizes")
    return name, shape


def _dynamic_arg(text: str) -> tuple[str, int, tuple[int, int]]:
    """`mel:2=1..4000` -> ("mel", 2, (1, 4000))."""
    try:
        head, _, rng = text.partition("=")
        name, _, axis = head.partition(":")
        lo, _, hi = rng.partition("..")
        return name, int(axis), (int(lo), int(hi))
    except ValueError:
        raise UsageError(
            f"--dynamic {text!r}: expected NAME:AXIS=MIN..MAX, e.g. mel:2=1..4000"
        ) from None


def _override_arg(text: str) -> tuple[str, Any]:
    """`dynamic=true` -> ("dynamic", True); values are parsed as JSON when they can be."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"{text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _canary_inputs(args: argparse.Namespace) -> dict[str, np.ndarray[Any, Any]]:
    if args.canary:
        path = Path(args.canary)
        if not path.is_file():
            raise UsageError(f"--canary {str(path)!r} does not exist")
        try:
            with np.load(path, allow_pickle=False) as npz:
                inputs = {k: npz[k] for k in npz.files}
        except (ValueError, OSError) as exc:
            raise UsageError(
                f"--canary {str(path)!r} is not a readable .npz of arrays: {exc}"
            ) from None
    else:
        rng = np.random.default_rng(args.seed)
        inputs = {}
        for text in args.shape:
            name, shape = _shape_arg(text)
            inputs[name] = rng.standard_normal(shape).astype(np.float32)
    missing = sorted(set(args.input) - set(inputs))
    extra = sorted(set(inputs) - set(args.input))
    if missing or extra:
        raise UsageError(f"canary inputs {sorted(inputs)} do not match --input {args.input}")
    return inputs


def cmd_record(args: argparse.Namespace) -> int:
    """Record a probe from the reference configuration and save it."""
    import probes
    from guard.mnn import mnn_factory

    factory = mnn_factory(args.model, args.input, args.output, threads=args.threads)
    dynamic: dict[str, dict[int, tuple[int, int]]] = {}
    for text in args.dynamic:
        name, axis, bounds = _dynamic_arg(text)
        dynamic.setdefault(name, {})[axis] = bounds
    reference = dict(_override_arg(t) for t in args.reference) or {"dynamic": True}
    probe = probes.record(
        factory, _canary_inputs(args), reference=reference, runs=args.runs, dynamic=dynamic
    )
    probe.save(args.out)
    print(f"recorded {len(probe.cases)} canary case(s) for {args.model} into {args.out}")
    for spec in probe.inputs:
        print(f"  input  {spec.name}: {spec.dtype}{format_shape(spec.shape)}")
    for out in probe.outputs:
        print(f"  output {out.name}: {out.dtype}{list(out.shape)}")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """Initialise the model N times on one rung and print each canary verdict."""
    import probes
    from guard.canary import init_and_check
    from guard.mnn import mnn_factory
    from guard.wrap import check_probe

    probe = probes.load(args.probe, model=None if args.ignore_model_hash else args.model)
    factory = mnn_factory(args.model, probe.input_names, probe.output_names, threads=args.threads)
    check_probe(factory, probe, model_hash=not args.ignore_model_hash)
    overrides = dict(_override_arg(t) for t in args.override)
    rows = []
    degraded = 0
    for init in range(1, args.inits + 1):
        _, verdict = init_and_check(factory, overrides, probe, runs=2)
        degraded += not verdict.passed
        score = min(verdict.scores.values(), key=lambda s: s.snr_db, default=None)
        rows.append(
            (
                str(init),
                "pass" if verdict.passed else "FAIL",
                f"{verdict.worst_snr_db:.1f}",
                f"{score.cosine:.6f}" if score else "-",
                f"{score.lsd_db:.3f}" if score and score.lsd_db is not None else "-",
                "; ".join(verdict.reasons)[:100],
            )
        )
    print(_table(("init", "verdict", "SNR dB", "cosine", "LSD dB", "reasons"), rows))
    what = f"{args.model}, overrides {overrides or 'none'}"
    print(f"{degraded} of {args.inits} init(s) degraded ({what})")
    return EXIT_DEGRADED if degraded else EXIT_OK


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the main job on the bundled demo vocoder."""
    from guard.tools.demo_job import run_demo

    return run_demo(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnn-guard", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every init and verdict")
    sub = parser.add_subparsers(dest="command", required=True)

    rec = sub.add_parser("record", help="record a probe (canary + golden outputs) for a model")
    rec.add_argument("model")
    rec.add_argument("--input", action="append", required=True, help="input name (repeat in order)")
    rec.add_argument(
        "--output", action="append", required=True, help="output name (repeat in order)"
    )
    src = rec.add_mutually_exclusive_group(required=True)
    src.add_argument("--canary", help=".npz with one array per input name")
    src.add_argument("--shape", action="append", help="NAME=D1,D2,... random canary (float32)")
    rec.add_argument("--dynamic", action="append", default=[], help="NAME:AXIS=MIN..MAX")
    rec.add_argument(
        "--reference", action="append", default=[], help="KEY=VALUE (default dynamic=true)"
    )
    rec.add_argument("--runs", type=int, default=3, help="fresh reference inits that must agree")
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--threads", type=int, default=1)
    rec.add_argument("-o", "--out", required=True, help="probe folder to write")
    rec.set_defaults(func=cmd_record)

    chk = sub.add_parser("check", help="initialise a model N times and judge each init's canary")
    chk.add_argument("model")
    chk.add_argument("--probe", required=True)
    chk.add_argument("--inits", type=int, default=1)
    chk.add_argument(
        "--override", action="append", default=[], help="KEY=VALUE load option, e.g. dynamic=true"
    )
    chk.add_argument("--threads", type=int, default=1)
    chk.add_argument(
        "--ignore-model-hash",
        action="store_true",
        help="judge another build of the model (e.g. fp16 or int8) against this probe",
    )
    chk.set_defaults(func=cmd_check)

    demo = sub.add_parser("demo", help="guard many inits of the demo vocoder with injected faults")
    demo.add_argument("--sessions", type=int, default=60, help="guarded sessions to build")
    demo.add_argument("--requests", type=int, default=4, help="requests served per session")
    demo.add_argument("--rate", type=float, default=0.1, help="fraction of inits degraded")
    demo.add_argument("--seed", type=int, default=2026)
    demo.add_argument(
        "--port", type=int, default=0, help="metrics port (0 picks a free one, -1 none)"
    )
    demo.set_defaults(func=cmd_demo)

    for module_name in ("guard.tools.doctor", "guard.tools.bench"):
        try:
            module = __import__(module_name, fromlist=["add_parser"])
        except ImportError:
            continue
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mnn-guard` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        code: int = args.func(args)
    except (GuardError, ProbeError) as exc:
        print(f"mnn-guard {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return code


if __name__ == "__main__":
    sys.exit(main())
