"""`mnn-guard inspect`, `record` and `check`: a model, the probe recorded for it, its inits judged.

Each `cmd_*` takes the parsed arguments and returns the exit code; `guard.tools.cli` runs it.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guard.tools.arguments import CANARY_DTYPES
from guard.tools.diagnosis_commands import bundle_lines
from guard.tools.errors import EXIT_DEGRADED, EXIT_OK, UsageError
from guard.tools.output import say
from guard.tools.preflight import (
    checked_model,
    load_options,
    load_probe,
    model_factory,
    model_file,
    overrides,
    writable,
)

if TYPE_CHECKING:
    import argparse

    from numpy.typing import NDArray

    from guard.canary import Canary
    from guard.diagnosis import DiagnosisListener

__all__ = ["cmd_check", "cmd_inspect", "cmd_record"]

INT_CANARY_HIGH = 10  # random integer canary values are drawn from 0..9


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print what the model declares: inputs, outputs, versions, control flow."""
    from guard.mnn import inspect, inspect_session
    from guard.tools.inspect_model import (
        format_model_info,
        format_session_info,
        model_info_json,
        session_info_json,
    )

    if args.api == "session":
        found = inspect_session(model_file(args.model))
        print(session_info_json(found) if args.json else format_session_info(found))
        return EXIT_OK
    info = inspect(model_file(args.model))
    print(model_info_json(info) if args.json else format_model_info(info))
    return EXIT_OK


def cmd_record(args: argparse.Namespace) -> int:
    """Record a probe from the reference configuration and save it."""
    out = writable("-o", args.out, folder=True)
    factory = model_factory(args.model, args.input, args.output, args.threads)
    inputs = canary_inputs(args)
    reference = load_options("--reference", args.reference) or {"dynamic": True}
    dynamic: dict[str, dict[int, tuple[int, ...]]] = {}
    for name, axis, bounds in args.dynamic:
        dynamic.setdefault(name, {})[axis] = bounds
    derive: bool | dict[str, int | None] = not args.no_derive
    if args.derive:
        derive = dict(args.derive)

    from guard.recording import record
    from probes.signature import format_shape

    sentinels: str | list[str] | None = args.sentinels or None
    if args.sentinels and "auto" in args.sentinels:
        if args.sentinels != ["auto"]:
            raise UsageError("--sentinels auto names no tensors beside it")
        sentinels = "auto"
    probe = record(
        factory,
        inputs,
        reference=reference,
        runs=args.runs,
        dynamic=dynamic,
        derive=derive,
        sentinels=sentinels,
        calibrate_inits=args.calibrate_inits,
        processes=args.processes,
    )
    probe.save(out)
    print(f"recorded {len(probe.cases)} canary case(s) for {args.model} into {args.out}")
    for spec in probe.inputs:
        print(f"  input  {spec.name}: {spec.dtype}{format_shape(spec.shape)}")
    for output in probe.outputs:
        kind = "sentinel" if output.sentinel else "output  "
        print(f"  {kind} {output.name}: {output.dtype}{list(output.shape)}")
    for note in probe.meta.notes:
        print(f"  note: {note}")
    return EXIT_OK


def canary_inputs(args: argparse.Namespace) -> dict[str, NDArray[Any]]:
    """The canary inputs from --canary FILE.npz, or random arrays from --shape.

    A --shape without a dtype takes the dtype the model declares for that input (float32 when
    it declares none); integers are drawn from 0..9, floats from a standard normal.
    """
    import numpy as np

    inputs: dict[str, NDArray[Any]] = {}
    if args.canary:
        path = Path(args.canary)
        if not path.is_file():
            raise UsageError(f"--canary {args.canary!r} does not exist")
        try:
            with np.load(path, allow_pickle=False) as npz:
                inputs = {k: npz[k] for k in npz.files}
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
            raise UsageError(
                f"--canary {args.canary!r} is not a readable .npz of arrays ({exc})"
            ) from None
    else:
        from guard.mnn import inspect

        declared = {t.name: t.dtype for t in inspect(model_file(args.model)).inputs}
        rng = np.random.default_rng(args.seed)
        for name, dtype, shape in args.shape:
            kind = np.dtype(dtype or _canary_dtype(declared.get(name)))
            if kind.kind == "f":
                inputs[name] = rng.standard_normal(shape).astype(kind)
            else:
                inputs[name] = rng.integers(0, INT_CANARY_HIGH, shape).astype(kind)
    if sorted(inputs) != sorted(args.input):
        raise UsageError(f"canary inputs {sorted(inputs)} do not match --input {args.input}")
    return inputs


def _canary_dtype(declared: str | None) -> str:
    """The model's declared dtype for an input if a canary can have it, else float32."""
    return declared if declared in CANARY_DTYPES else "float32"


def cmd_check(args: argparse.Namespace) -> int:
    """Initialise the model N times on one rung and print every init's scores and reasons."""
    chosen = overrides("--override", args.override, args.api)
    probe, factory, listener, before = checked_model(args)

    from guard.tools.check import check_json, format_check, run_check

    report = run_check(
        factory,
        probe,
        chosen,
        inits=args.inits,
        model=args.model,
        api=args.api,
        on_failure=_bundler(listener, chosen) if listener is not None else None,
    )
    print(check_json(report) if args.json else format_check(report))
    for line in bundle_lines(listener, before):
        say(line) if args.json else print(line)
    return EXIT_DEGRADED if report.degraded else EXIT_OK


def _bundler(listener: DiagnosisListener, overrides: Mapping[str, Any]) -> Callable[..., None]:
    """`check`'s failed canaries as attempts on a rung named by the overrides, each bundled."""
    from types import MappingProxyType

    from guard.ladder import Attempt, Outcome, Rung

    named = ",".join(f"{k}={v}" for k, v in overrides.items()) or "static"
    rung = Rung(named, MappingProxyType(dict(overrides)))

    def bundle(canary: Canary, seconds: float) -> None:
        failed = Attempt(
            rung, 0, Outcome.FAIL, canary.verdict, None, seconds, canary.failed_outputs
        )
        listener.record("check", failed, mnn_log=canary.notes)
        listener.flush()  # a tool waits for its bundles; the queue never drops one

    return bundle


def cmd_assess(args: argparse.Namespace) -> int:
    """Perturb each weight tensor in turn; print how many the probe's canary catches."""
    model = model_file(args.model)
    probe = load_probe(args.probe, None if args.ignore_model_hash else model, ignorable=True)

    from guard.tools.assess import assess_json, format_assess, run_assess

    def progress(done: int, total: int) -> None:
        if not args.json and (done == total or done % 10 == 0):
            say(f"assess: {done} of {total} weight tensors")

    report = run_assess(
        model, probe, relative=args.relative, seed=args.seed, threads=args.threads,
        progress=progress,
    )  # fmt: skip
    print(assess_json(report) if args.json else format_assess(report))
    return EXIT_OK  # a low coverage is a finding, said in the output (and `coverage` in JSON)
