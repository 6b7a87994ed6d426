"""The `mnn-guard` command line: inspect, record, check, demo, doctor, bench, diagnose, report.

argparse lives here and nowhere else. A subcommand imports its tool (and MNN) when it runs, so
`mnn-guard --help` stays fast. A user error (a bad argument, a model or probe that cannot be
read, an output path that cannot be written) is one line on stderr and exit 2; exit 1 means
"degraded"; a bug in mnn-guard itself keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from guard.canary import Canary
    from guard.diagnosis import DiagnosisListener
    from guard.mnn import MNNFactory, MNNSessionFactory
    from probes import Probe

__all__ = ["EXIT_DEGRADED", "EXIT_OK", "EXIT_USAGE", "UsageError", "main"]

EXIT_OK = 0  # everything checked was healthy
EXIT_DEGRADED = 1  # a degraded init, start or output was found
EXIT_USAGE = 2  # a user error: a bad argument, an unreadable input, an unwritable output
MAX_CANARY_ELEMENTS = 1 << 26  # per --shape input: 256 MiB of float32
DEMO_FRAMES = 100  # the demo vocoder's input length in `bench`
DIAGNOSIS_DIR = "mnn-guard-diagnosis"  # check's and doctor's bundle folder unless told otherwise


class UsageError(Exception):
    """A user error on the command line: reported as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the (sub)command, exit 2."""

    def error(self, message: str) -> NoReturn:
        """Print one line and exit 2 (argparse's default prints the whole usage first)."""
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------- argument types


def _int_in(low: int, high: float, what: str) -> Callable[[str], int]:
    """An argparse type: an integer in low..high."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_count = _int_in(1, math.inf, "a whole number >= 1")
_seed = _int_in(0, math.inf, "a whole number >= 0")
_port = _int_in(-1, 65535, "a port in 0..65535, 0 for a free one or -1 for none")


def _fraction(text: str) -> float:
    """An argparse type: a number in 0..1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in 0..1, got {text!r}")
    return value


CANARY_DTYPES = ("float32", "float64", "int32", "int64", "int8", "uint8")
INT_CANARY_HIGH = 10  # random integer canary values are drawn from 0..9


def _shape(text: str) -> tuple[str, str | None, tuple[int, ...]]:
    """`mel=1,80,100` -> ("mel", None, (1, 80, 100)); `ids=int64:1,50` names the dtype;
    `flag=int64:` (no sizes) is a scalar."""
    name, _, spec = text.partition("=")
    dtype: str | None = None
    if ":" in spec:
        dtype, _, spec = spec.partition(":")
    try:
        shape = tuple(int(d) for d in spec.split(",")) if spec else ()
    except ValueError:
        shape = (-1,)
    bad_dtype = dtype is not None and dtype not in CANARY_DTYPES
    if not name or bad_dtype or (not shape and dtype is None) or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=[DTYPE:]D1,D2,... with positive integer sizes (DTYPE one "
            f"of {', '.join(CANARY_DTYPES)}; NAME=DTYPE: alone is a scalar)"
        )
    if math.prod(shape) > MAX_CANARY_ELEMENTS:
        raise argparse.ArgumentTypeError(
            f"{text!r} has {math.prod(shape)} elements; a canary input holds at most "
            f"{MAX_CANARY_ELEMENTS}"
        )
    return name, dtype, shape


def _derive(text: str) -> tuple[str, int | None]:
    """`mel:2` -> ("mel", 2); `mel` -> ("mel", None): its last dynamic axis, else its last."""
    name, sep, axis = text.partition(":")
    try:
        return (name, int(axis) if sep else None) if name else _bad_derive(text)
    except ValueError:
        return _bad_derive(text)


def _bad_derive(text: str) -> NoReturn:
    raise argparse.ArgumentTypeError(f"{text!r}: expected NAME or NAME:AXIS, e.g. mel:2")


def _dynamic(text: str) -> tuple[str, int, tuple[int, int]]:
    """`mel:2=1..4000` -> ("mel", 2, (1, 4000))."""
    head, _, bounds = text.partition("=")
    name, _, axis = head.partition(":")
    low, _, high = bounds.partition("..")
    try:
        return name, int(axis), (int(low), int(high))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME:AXIS=MIN..MAX, e.g. mel:2=1..4000"
        ) from None


def _option(text: str) -> tuple[str, Any]:
    """`dynamic=true` -> ("dynamic", True): JSON true, false, an integer, or a name."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. dynamic=true")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if not isinstance(value, (bool, int, str)):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected true, false, an integer or a name as the value"
        )
    return key, value


# ----------------------------------------------------- checks before any work


def _load_options(flag: str, pairs: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """Load options checked by the code `guard.mnn_factory` uses; a name left over is refused."""
    from guard.errors import ConfigError
    from guard.mnn import check_load_options

    options = dict(pairs)
    try:
        loaded = check_load_options(options)
    except ConfigError as exc:
        raise UsageError(f"{flag}: {exc}") from None
    for key, value in loaded.items():
        if isinstance(value, str):  # names were turned into MNN enums: this key takes none
            raise UsageError(f"{flag} {key}={value!r}: expected true, false or an integer")
    return options


def _model_file(path: str) -> str:
    """Refuse a model path that is not a non-empty file."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"model {path!r} does not exist or is not a file")
    if file.stat().st_size == 0:
        raise UsageError(f"model {path!r} is empty; expected an .mnn file")
    return path


def _model(
    path: str, inputs: Sequence[str], outputs: Sequence[str], threads: int, api: str = "module"
) -> MNNFactory | MNNSessionFactory:
    """A factory for the model (`api`: MNN's Module or Session API), once its names are
    checked and MNN has loaded it.

    A name the model lacks (ConfigError) or a file MNN refuses (FactoryError) is a user error.
    """
    from guard.mnn import mnn_factory, mnn_session_factory

    factory: MNNFactory | MNNSessionFactory
    if api == "session":
        factory = mnn_session_factory(_model_file(path), {"numThread": threads}, inputs, outputs)
    else:
        factory = mnn_factory(_model_file(path), inputs, outputs, threads=threads)
    factory()
    return factory


def _overrides(flag: str, pairs: Sequence[tuple[str, Any]], api: str) -> dict[str, Any]:
    """--override options for `api`: load options (Module API) or session config keys
    (Session API, where dynamic=true or api=module means the Module API on the same file)."""
    if api != "session":
        return _load_options(flag, pairs)
    from guard.errors import ConfigError
    from guard.mnn import session_config, split_api

    options = dict(pairs)
    try:
        chosen, rest = split_api(options)
    except ConfigError as exc:
        raise UsageError(f"{flag}: {exc}") from None
    if chosen == "module":
        return {"api": "module", **_load_options(flag, list(rest.items()))}
    try:
        session_config(rest)
    except ConfigError as exc:
        raise UsageError(f"{flag}: {exc}") from None
    return options


def _session_configs(texts: Sequence[str]) -> list[dict[str, Any]]:
    """`--config precision=low,numThread=2` (repeated): one checked session config each."""
    from guard.errors import ConfigError
    from guard.mnn import session_config

    configs = []
    for text in texts:
        pairs = [_option(part) for part in text.split(",")] if text else []
        config = dict(pairs)
        try:
            session_config(config)
        except ConfigError as exc:
            raise UsageError(f"--config {text!r}: {exc}") from None
        configs.append(config)
    return configs


def _probe(path: str, model: str | None) -> Probe:
    """Load a probe folder (every way it can be unreadable is a ProbeError: a user error)."""
    import probes

    return probes.load(path, model=model)


def _writable(flag: str, path: str, *, folder: bool) -> Path:
    """Refuse an output path that cannot be written, before any work starts."""
    target = Path(path).absolute()
    if folder and target.exists() and not target.is_dir():
        raise UsageError(f"{flag} {path!r} is an existing file; expected a folder for the probe")
    if not folder and target.is_dir():
        raise UsageError(f"{flag} {path!r} is a folder; expected a file to write")
    if not folder and not target.parent.is_dir():
        raise UsageError(f"{flag} {path!r}: folder {str(target.parent)!r} does not exist")
    place = target if target.is_dir() else target.parent
    existing = next(p for p in [place, *place.parents] if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{flag} {path!r}: {str(existing)!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UsageError(
            f"{flag} {path!r} cannot be written: no write access in {str(existing)!r} "
            f"({exc.strerror})"
        ) from None
    return target


def _canary_inputs(args: argparse.Namespace) -> dict[str, NDArray[Any]]:
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

        declared = {t.name: t.dtype for t in inspect(_model_file(args.model)).inputs}
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


def _say(text: str) -> None:
    """Progress goes to stderr, so that stdout holds only the result (--json)."""
    print(text, file=sys.stderr, flush=True)


def _diagnosis(
    folder: str | None, probe: Probe, factory: MNNFactory | MNNSessionFactory
) -> DiagnosisListener | None:
    """The bundle writer for --diagnose DIR (None with --no-diagnose); a bad folder is refused."""
    if folder is None:
        return None
    from guard.diagnosis import DiagnosisListener
    from guard.errors import ConfigError

    try:
        return DiagnosisListener(folder, probe, factory=factory)
    except ConfigError as exc:
        raise UsageError(f"--diagnose: {exc}") from None


def _diagnosis_folder(folder: str) -> None:
    """Refuse a --diagnose folder that cannot be created or written, before any work starts."""
    from guard.diagnosis import writer_for
    from guard.errors import ConfigError

    try:
        writer_for(folder)
    except ConfigError as exc:
        raise UsageError(f"--diagnose: {exc}") from None


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


def _reports(listener: DiagnosisListener | None, before: int) -> list[str]:
    """Wait for the bundles written since `before`, render their pages; one line each."""
    if listener is None:
        return []
    from guard.errors import MissingExtra

    listener.flush()
    lines = []
    for bundle in listener.writer.since(before):
        try:
            from guard.tools.report import render_report

            lines.append(f"diagnosis bundle: {bundle} (report: {render_report(bundle)})")
        except MissingExtra as exc:
            lines.append(f"diagnosis bundle: {bundle} ({exc})")
    return lines


# --------------------------------------------------------------- subcommands


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
        found = inspect_session(_model_file(args.model))
        print(session_info_json(found) if args.json else format_session_info(found))
        return EXIT_OK
    info = inspect(_model_file(args.model))
    print(model_info_json(info) if args.json else format_model_info(info))
    return EXIT_OK


def cmd_record(args: argparse.Namespace) -> int:
    """Record a probe from the reference configuration and save it."""
    out = _writable("-o", args.out, folder=True)
    factory = _model(args.model, args.input, args.output, args.threads)
    inputs = _canary_inputs(args)
    reference = _load_options("--reference", args.reference) or {"dynamic": True}
    dynamic: dict[str, dict[int, tuple[int, int]]] = {}
    for name, axis, bounds in args.dynamic:
        dynamic.setdefault(name, {})[axis] = bounds
    derive: bool | dict[str, int | None] = not args.no_derive
    if args.derive:
        derive = dict(args.derive)

    from guard.recording import record
    from probes.signature import format_shape

    probe = record(
        factory, inputs, reference=reference, runs=args.runs, dynamic=dynamic, derive=derive
    )
    probe.save(out)
    print(f"recorded {len(probe.cases)} canary case(s) for {args.model} into {args.out}")
    for spec in probe.inputs:
        print(f"  input  {spec.name}: {spec.dtype}{format_shape(spec.shape)}")
    for output in probe.outputs:
        print(f"  output {output.name}: {output.dtype}{list(output.shape)}")
    for note in probe.meta.notes:
        print(f"  note: {note}")
    return EXIT_OK


def _checked_model(
    args: argparse.Namespace,
) -> tuple[Probe, MNNFactory | MNNSessionFactory, DiagnosisListener | None, int]:
    """The probe, the model's factory checked against it, and the --diagnose bundle writer
    with its count so far: what `check` and `doctor` start from."""
    probe = _probe(args.probe, None if args.ignore_model_hash else _model_file(args.model))
    factory = _model(args.model, probe.input_names, probe.output_names, args.threads, args.api)

    from guard.wrapping import check_probe

    check_probe(factory, probe, model_hash=not args.ignore_model_hash)
    listener = _diagnosis(args.diagnose, probe, factory)
    return probe, factory, listener, listener.writer.total if listener is not None else 0


def cmd_check(args: argparse.Namespace) -> int:
    """Initialise the model N times on one rung and print every init's scores and reasons."""
    overrides = _overrides("--override", args.override, args.api)
    probe, factory, listener, before = _checked_model(args)

    from guard.tools.check import check_json, format_check, run_check

    report = run_check(
        factory,
        probe,
        overrides,
        inits=args.inits,
        model=args.model,
        api=args.api,
        on_failure=_bundler(listener, overrides) if listener is not None else None,
    )
    print(check_json(report) if args.json else format_check(report))
    for line in _reports(listener, before):
        _say(line) if args.json else print(line)
    return EXIT_DEGRADED if report.degraded else EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Guard many inits of the demo vocoder with injected faults; exit 1 if any was served."""
    from guard.tools.demo_job import demo_json, format_demo, run_demo

    if args.diagnose is not None:
        _diagnosis_folder(args.diagnose)
    report = run_demo(
        sessions=args.sessions,
        requests=args.requests,
        rate=args.rate,
        seed=args.seed,
        port=None if args.port < 0 else args.port,
        quiet=not args.verbose,
        progress=_say,
        diagnose=args.diagnose,
    )
    print(demo_json(report) if args.json else format_demo(report))
    if report.bundles:
        from guard.errors import MissingExtra
        from guard.tools.report import render_report

        try:
            pages = [render_report(b) for b in report.bundles]
            line = f"diagnosis: {len(pages)} bundle(s) with report.html in {args.diagnose}"
        except MissingExtra as exc:
            line = f"diagnosis: {len(report.bundles)} bundle(s) in {args.diagnose} ({exc})"
        _say(line) if args.json else print(line)
    return EXIT_DEGRADED if report.degraded else EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    """Many fresh processes per rung: the report as a table, or JSON with --json."""
    if args.config and args.api != "session":
        raise UsageError("--config sets the rungs of --api session")
    configs = _session_configs(args.config)
    probe, factory, listener, before = _checked_model(args)

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
        progress=_say,
        diagnose=listener,
    )
    print(doctor_json(report) if args.json else format_doctor(report, args.model))
    for line in _reports(listener, before):
        _say(line)  # stdout holds only the report (--json)
    return EXIT_DEGRADED if report.degraded else EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write JSON when asked; targets are only reported."""
    json_path = None if args.json is None else _writable("--json", args.json, folder=False)
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
        probe = _probe(args.probe, _model_file(args.model))
        factory = _model(args.model, probe.input_names, probe.output_names, 1, args.api)

    from guard.tools.bench import bench_json, format_bench, run_bench

    report = run_bench(
        quick=args.quick,
        frames=args.frames or DEMO_FRAMES,
        factory=factory,
        model=args.model,
        probe=probe,
        api=args.api,
        progress=lambda text: _say(f"  ... {text}"),
    )
    print(format_bench(report))
    if json_path is not None:
        json_path.write_text(bench_json(report))
    return EXIT_OK


def cmd_diagnose(args: argparse.Namespace) -> int:
    """Compare every named tensor of the suspect and reference configurations; exit 1 if any
    diverges."""
    probe = _probe(args.probe, None if args.ignore_model_hash else _model_file(args.model))
    overrides = _load_options("--override", args.override)
    reference = _load_options("--reference", args.reference) if args.reference else None
    reference_model = _model_file(args.reference_model) if args.reference_model else None
    bundle = None
    if args.bundle is not None:
        from guard.diagnosis import read_bundle

        bundle = read_bundle(args.bundle).path  # a BundleError is a user error
    _model(args.model, probe.input_names, probe.output_names, args.threads)

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
        progress=_say,
    )
    print(diagnosis_json(found) if args.json else format_diagnosis(found))
    if bundle is not None:
        from guard.errors import MissingExtra
        from guard.tools.report import render_report

        (bundle / "diagnosis.json").write_text(diagnosis_json(found))
        try:
            _say(f"diagnosis added to {bundle} (report: {render_report(bundle)})")
        except MissingExtra as exc:
            _say(f"diagnosis added to {bundle} ({exc})")
    return EXIT_DEGRADED if found.diverged else EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    """Write the HTML page of a bundle (or of every bundle in a folder)."""
    from guard.tools.report import render_folder, render_report

    if args.out is not None:
        out = _writable("-o", args.out, folder=False)
        print(render_report(args.bundle, out))
        return EXIT_OK
    for page in render_folder(args.bundle):
        print(page)
    return EXIT_OK


# ------------------------------------------------------------------ the parser


HASH_HELP = "judge another build of the model (e.g. fp16 or int8) against this probe"


def _add_record(sub: Any) -> None:
    """The `record` subcommand's arguments."""
    rec = sub.add_parser("record", help="record a probe (canary + golden outputs) for a model")
    rec.add_argument("model", help="the .mnn model file")
    rec.add_argument("--input", action="append", required=True, help="input name (repeat in order)")
    rec.add_argument(
        "--output", action="append", required=True, help="output name (repeat in order)"
    )
    src = rec.add_mutually_exclusive_group(required=True)
    src.add_argument("--canary", help=".npz with one array per input name")
    src.add_argument(
        "--shape",
        action="append",
        type=_shape,
        help="NAME=[DTYPE:]D1,D2,... random canary (dtype: the model's; NAME=DTYPE: a scalar)",
    )
    rec.add_argument(
        "--dynamic", action="append", default=[], type=_dynamic, help="NAME:AXIS=MIN..MAX"
    )
    der = rec.add_mutually_exclusive_group()
    der.add_argument(
        "--derive",
        action="append",
        default=[],
        type=_derive,
        help="NAME[:AXIS] input the derived canary rolls (repeat; default: inputs with --dynamic)",
    )
    der.add_argument("--no-derive", action="store_true", help="record no derived canary")
    rec.add_argument(
        "--reference",
        action="append",
        default=[],
        type=_option,
        help="KEY=VALUE load option of the reference (default dynamic=true)",
    )
    rec.add_argument(
        "--runs",
        type=_int_in(2, math.inf, "a whole number >= 2"),
        default=3,
        help="fresh reference inits that must agree",
    )
    rec.add_argument("--seed", type=_seed, default=0)
    rec.add_argument("--threads", type=_count, default=1)
    rec.add_argument("-o", "--out", required=True, help="probe folder to write")
    rec.set_defaults(func=cmd_record)


def _add_doctor(sub: Any, hash_help: str) -> None:
    """The `doctor` subcommand's arguments."""
    doc = sub.add_parser(
        "doctor", help="does this machine have the degraded-init problem, what does dynamic cost?"
    )
    doc.add_argument("model", help="the .mnn model file")
    doc.add_argument("--probe", required=True, help="probe folder recorded for this model")
    doc.add_argument("--starts", type=_count, default=100, help="fresh processes to start")
    doc.add_argument("--processes", type=_count, default=2, help="processes running at a time")
    doc.add_argument("--threads", type=_count, default=1, help="MNN threads per process")
    _api_flag(doc, "a rung per session config (--config), then the Module API's dynamic=True")
    doc.add_argument(
        "--config",
        action="append",
        default=[],
        help="KEY=VALUE[,KEY=VALUE] session config of one rung, e.g. precision=low (repeat; "
        "default: {}, precision=low, memory=low)",
    )
    doc.add_argument("--json", action="store_true", help="print only JSON on stdout")
    doc.add_argument("--ignore-model-hash", action="store_true", help=hash_help)
    _diagnose_flags(doc)
    doc.set_defaults(func=cmd_doctor)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mnn-guard", description=__doc__.split("\n", 1)[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log every init and verdict")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    hash_help = HASH_HELP

    ins = sub.add_parser("inspect", help="what a model declares: inputs, outputs, control flow")
    ins.add_argument("model", help="the .mnn model file")
    _api_flag(ins, "the model as a Session-API session sees it (input and output tensors)")
    ins.add_argument("--json", action="store_true", help="print only JSON on stdout")
    ins.set_defaults(func=cmd_inspect)

    _add_record(sub)

    chk = sub.add_parser("check", help="initialise a model N times and judge each init's canary")
    chk.add_argument("model", help="the .mnn model file")
    chk.add_argument("--probe", required=True, help="probe folder recorded for this model")
    chk.add_argument("--inits", type=_count, default=1, help="fresh inits to judge")
    chk.add_argument(
        "--override",
        action="append",
        default=[],
        type=_option,
        help="KEY=VALUE load option, e.g. dynamic=true (--api session: a session config key, "
        "e.g. precision=low)",
    )
    _api_flag(chk, "initialise MNN.Interpreter sessions (numThread=--threads)")
    chk.add_argument("--threads", type=_count, default=1)
    chk.add_argument("--ignore-model-hash", action="store_true", help=hash_help)
    chk.add_argument("--json", action="store_true", help="print only JSON on stdout")
    _diagnose_flags(chk)
    chk.set_defaults(func=cmd_check)

    demo = sub.add_parser("demo", help="guard many inits of the demo vocoder with injected faults")
    demo.add_argument("--sessions", type=_count, default=60, help="guarded sessions to build")
    demo.add_argument("--requests", type=_count, default=4, help="requests served per session")
    demo.add_argument("--rate", type=_fraction, default=0.1, help="fraction of inits degraded")
    demo.add_argument("--seed", type=_seed, default=2026)
    demo.add_argument("--port", type=_port, default=0, help="metrics port (0 free, -1 none)")
    demo.add_argument("--json", action="store_true", help="print only JSON on stdout")
    demo.add_argument("--diagnose", metavar="DIR", help="leave a bundle per failed canary in DIR")
    demo.set_defaults(func=cmd_demo)

    _add_doctor(sub, hash_help)

    bench = sub.add_parser("bench", help="measure what the guard costs, side by side with raw MNN")
    bench.add_argument("model", nargs="?", help="a .mnn model (default: the demo vocoder)")
    bench.add_argument("--probe", help="probe folder for MODEL")
    bench.add_argument(
        "--frames", type=_count, help=f"demo vocoder input length (default {DEMO_FRAMES})"
    )
    bench.add_argument("--quick", action="store_true", help="fewer rounds (for tests)")
    _api_flag(bench, "measure MNN.Interpreter sessions, and the Session API against the Module API")
    bench.add_argument("--json", help="also write the report as JSON to this file")
    bench.set_defaults(func=cmd_bench)

    _diagnosis_commands(sub, hash_help)
    return parser


def _diagnosis_commands(sub: Any, hash_help: str) -> None:
    """The `diagnose` and `report` subcommands."""
    dia = sub.add_parser(
        "diagnose", help="name the first tensors where a suspect configuration diverges"
    )
    dia.add_argument("model", help="the suspect .mnn model file")
    dia.add_argument("--probe", required=True, help="probe folder: its canary inputs are used")
    dia.add_argument(
        "--override",
        action="append",
        default=[],
        type=_option,
        help="KEY=VALUE load option of the suspect",
    )
    dia.add_argument(
        "--reference",
        action="append",
        default=[],
        type=_option,
        help="KEY=VALUE load option of the reference (default: the probe's, e.g. dynamic=true)",
    )
    dia.add_argument("--reference-model", help="the reference .mnn file (default: MODEL)")
    dia.add_argument(
        "--threshold-db", type=float, default=None, help="SNR below which a tensor diverges "
        "(default: the probe's snr_db limit)"
    )  # fmt: skip
    dia.add_argument("--tries", type=_count, default=1, help="suspect loads until one diverges")
    dia.add_argument("--threads", type=_count, default=1)
    dia.add_argument("--bundle", help="add the diagnosis to this bundle and re-render its page")
    dia.add_argument("--json", action="store_true", help="print only JSON on stdout")
    dia.add_argument("--ignore-model-hash", action="store_true", help=hash_help)
    dia.set_defaults(func=cmd_diagnose)

    rep = sub.add_parser("report", help="write the HTML page of a diagnosis bundle")
    rep.add_argument("bundle", help="a bundle folder, or a folder of bundles")
    rep.add_argument("-o", "--out", help="write the page here (one bundle only)")
    rep.set_defaults(func=cmd_report)


def _api_flag(parser: argparse.ArgumentParser, session_help: str) -> None:
    """--api module|session: which of PyMNN's two APIs runs the model."""
    parser.add_argument(
        "--api",
        choices=("module", "session"),
        default="module",
        help=f"MNN's API (default module); session: {session_help}",
    )


def _diagnose_flags(parser: argparse.ArgumentParser) -> None:
    """--diagnose DIR (default mnn-guard-diagnosis) and --no-diagnose."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--diagnose",
        metavar="DIR",
        default=DIAGNOSIS_DIR,
        help=f"leave a bundle per failed canary in DIR (default ./{DIAGNOSIS_DIR})",
    )
    group.add_argument(
        "--no-diagnose", dest="diagnose", action="store_const", const=None, help="no bundles"
    )


def _refuse(command: str, message: str) -> int:
    """A user error: one line on stderr, exit 2."""
    print(f"mnn-guard {command}: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mnn-guard` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    from guard.errors import GuardError, RecoveryExhausted
    from guard.tools.output import native_stdout_to_stderr
    from probes.errors import ProbeError

    clean = getattr(args, "json", None) is True  # the --json flag, not bench's --json PATH
    try:
        with native_stdout_to_stderr() if clean else contextlib.nullcontext():
            code: int = args.func(args)
    except UsageError as exc:
        return _refuse(args.command, str(exc))
    except RecoveryExhausted as exc:  # every rung of the model failed its canary
        print(f"mnn-guard {args.command}: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_DEGRADED
    except (GuardError, ProbeError) as exc:
        return _refuse(args.command, f"{type(exc).__name__}: {exc}")
    return code


if __name__ == "__main__":
    sys.exit(main())
