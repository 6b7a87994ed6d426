"""The `mnn-guard` command line's arguments: every subcommand's parser and argument types.

argparse lives here and nowhere else; `guard.tools.cli` parses with `parser()` and runs the
command. A value argparse refuses is one line naming the (sub)command, exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any, NoReturn

from guard.tools.errors import EXIT_USAGE
from guard.version import __version__

__all__ = ["CANARY_DTYPES", "DEMO_FRAMES", "HASH_HELP", "parser"]

DESCRIPTION = (
    "The `mnn-guard` command line: inspect, record, check, demo, doctor, bench, diagnose, report."
)
MAX_CANARY_ELEMENTS = 1 << 26  # per --shape input: 256 MiB of float32
DEMO_FRAMES = 100  # the demo vocoder's input length in `bench`
DIAGNOSIS_DIR = "mnn-guard-diagnosis"  # check's and doctor's bundle folder unless told otherwise
HASH_HELP = "judge another build of the model (e.g. fp16 or int8) against this probe"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the (sub)command, exit 2."""

    def error(self, message: str) -> NoReturn:
        """Print one line and exit 2 (argparse's default prints the whole usage first)."""
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------ argument types


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


def _dynamic(text: str) -> tuple[str, int, tuple[int, ...]]:
    """`mel:2=1..4000` -> ("mel", 2, (1, 4000)); `img:3=32..1024/32` -> (.., (32, 1024, 32))."""
    head, _, bounds = text.partition("=")
    name, _, axis = head.partition(":")
    span, slash, step = bounds.partition("/")
    low, _, high = span.partition("..")
    try:
        dim = (int(low), int(high), int(step)) if slash else (int(low), int(high))
        return name, int(axis), dim
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME:AXIS=MIN..MAX[/STEP], e.g. mel:2=1..4000 or img:3=32..1024/32"
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


def _config(text: str) -> tuple[str, dict[str, Any]]:
    """`precision=low,numThread=2` -> (the text, {"precision": "low", "numThread": 2})."""
    return text, dict(_option(part) for part in text.split(",")) if text else {}


# ------------------------------------------------------------------ the parser


def parser() -> argparse.ArgumentParser:
    """The `mnn-guard` parser: every subcommand and its flags, in the order --help lists them."""
    top = _Parser(prog="mnn-guard", description=DESCRIPTION)
    top.add_argument("-v", "--verbose", action="store_true", help="log every init and verdict")
    top.add_argument("--version", action="version", version=f"mnn-guard {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_inspect, _record, _check, _assess, _demo, _doctor, _bench, _diagnose, _report):
        add(sub)
    return top


def _inspect(sub: Any) -> None:
    """The `inspect` subcommand's arguments."""
    ins = sub.add_parser("inspect", help="what a model declares: inputs, outputs, control flow")
    ins.add_argument("model", help="the .mnn model file")
    _api_flag(ins, "the model as a Session-API session sees it (input and output tensors)")
    ins.add_argument("--json", action="store_true", help="print only JSON on stdout")


def _record(sub: Any) -> None:
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
        "--dynamic",
        action="append",
        default=[],
        type=_dynamic,
        help="NAME:AXIS=MIN..MAX[/STEP] a dynamic axis (STEP: sizes MIN, MIN+STEP, ...)",
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
    rec.add_argument(
        "--sentinels",
        action="append",
        default=[],
        metavar="auto|TENSOR",
        help="judge intermediate tensors too, never served (auto: the tensor before each "
        "softmax, sigmoid or tanh output; or name tensors, repeat)",
    )
    rec.add_argument(
        "--calibrate-inits",
        type=_int_in(0, 1000, "a whole number in 0..1000"),
        default=3,
        help="clean inits per configuration that calibrate the limits (0: none, fixed limits)",
    )
    rec.add_argument(
        "--processes",
        type=_int_in(0, 16, "a whole number in 0..16"),
        default=2,
        help="fresh processes that calibrate too",
    )
    rec.add_argument("--seed", type=_seed, default=0)
    rec.add_argument("--threads", type=_count, default=1)
    rec.add_argument("-o", "--out", required=True, help="probe folder to write")


def _assess(sub: Any) -> None:
    """The `assess` subcommand's arguments."""
    ass = sub.add_parser(
        "assess", help="how many weight tensors' faults the probe's canary catches (coverage)"
    )
    ass.add_argument("model", help="the .mnn model file")
    ass.add_argument("--probe", required=True, help="probe folder recorded for this model")
    ass.add_argument(
        "--relative",
        type=_fraction,
        default=0.01,
        help="Gaussian noise added to each tensor, as a share of its standard deviation",
    )
    ass.add_argument("--seed", type=_seed, default=0)
    ass.add_argument("--threads", type=_count, default=1)
    ass.add_argument("--ignore-model-hash", action="store_true", help=HASH_HELP)
    ass.add_argument("--json", action="store_true", help="print only JSON on stdout")


def _check(sub: Any) -> None:
    """The `check` subcommand's arguments."""
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
    chk.add_argument("--ignore-model-hash", action="store_true", help=HASH_HELP)
    chk.add_argument("--json", action="store_true", help="print only JSON on stdout")
    _diagnose_flags(chk)


def _demo(sub: Any) -> None:
    """The `demo` subcommand's arguments."""
    demo = sub.add_parser("demo", help="guard many inits of the demo vocoder with injected faults")
    demo.add_argument("--sessions", type=_count, default=60, help="guarded sessions to build")
    demo.add_argument("--requests", type=_count, default=4, help="requests served per session")
    demo.add_argument("--rate", type=_fraction, default=0.1, help="fraction of inits degraded")
    demo.add_argument("--seed", type=_seed, default=2026)
    demo.add_argument("--port", type=_port, default=0, help="metrics port (0 free, -1 none)")
    demo.add_argument("--json", action="store_true", help="print only JSON on stdout")
    demo.add_argument("--diagnose", metavar="DIR", help="leave a bundle per failed canary in DIR")


def _doctor(sub: Any) -> None:
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
        type=_config,
        help="KEY=VALUE[,KEY=VALUE] session config of one rung, e.g. precision=low (repeat; "
        "default: {}, precision=low, memory=low)",
    )
    doc.add_argument("--json", action="store_true", help="print only JSON on stdout")
    doc.add_argument("--ignore-model-hash", action="store_true", help=HASH_HELP)
    _diagnose_flags(doc)


def _bench(sub: Any) -> None:
    """The `bench` subcommand's arguments."""
    bench = sub.add_parser("bench", help="measure what the guard costs, side by side with raw MNN")
    bench.add_argument("model", nargs="?", help="a .mnn model (default: the demo vocoder)")
    bench.add_argument("--probe", help="probe folder for MODEL")
    bench.add_argument(
        "--frames", type=_count, help=f"demo vocoder input length (default {DEMO_FRAMES})"
    )
    bench.add_argument("--quick", action="store_true", help="fewer rounds (for tests)")
    bench.add_argument(
        "--no-reference", action="store_true",
        help="measure the model only, without the reference measures on built-in models",
    )  # fmt: skip
    _api_flag(bench, "measure MNN.Interpreter sessions, and the Session API against the Module API")
    bench.add_argument("--json", help="also write the report as JSON to this file")


def _diagnose(sub: Any) -> None:
    """The `diagnose` subcommand's arguments."""
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
    dia.add_argument("--ignore-model-hash", action="store_true", help=HASH_HELP)


def _report(sub: Any) -> None:
    """The `report` subcommand's arguments."""
    rep = sub.add_parser("report", help="write the HTML page of a diagnosis bundle")
    rep.add_argument("bundle", help="a bundle folder, or a folder of bundles")
    rep.add_argument("-o", "--out", help="write the page here (one bundle only)")


def _api_flag(command: argparse.ArgumentParser, session_help: str) -> None:
    """--api module|session: which of PyMNN's two APIs runs the model."""
    command.add_argument(
        "--api",
        choices=("module", "session"),
        default="module",
        help=f"MNN's API (default module); session: {session_help}",
    )


def _diagnose_flags(command: argparse.ArgumentParser) -> None:
    """--diagnose DIR (default mnn-guard-diagnosis) and --no-diagnose."""
    group = command.add_mutually_exclusive_group()
    group.add_argument(
        "--diagnose",
        metavar="DIR",
        default=DIAGNOSIS_DIR,
        help=f"leave a bundle per failed canary in DIR (default ./{DIAGNOSIS_DIR})",
    )
    group.add_argument(
        "--no-diagnose", dest="diagnose", action="store_const", const=None, help="no bundles"
    )
