"""Judges by name: a registry of measures with a direction, and the scoring of one output.

A judge is a measure `measure(actual, golden) -> float` (or None where it does not apply) and
whether higher is better; a limit per judge name decides pass or fail. The built-in judges
are registered here like any user's (`register_judge`); a probe that names a judge this
process does not know is refused with that name.

>>> probes.register_judge("top5", my_top5, higher_is_better=True)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from probes.errors import ProbeError, brief
from probes.measures import (
    argmax_agreement,
    cosine_similarity,
    log_spectral_distance,
    max_abs_error,
    snr_db,
)

__all__ = [
    "REPORTED",
    "Check",
    "Judge",
    "Measure",
    "OutputScore",
    "cosine",
    "finite",
    "get_judge",
    "judge_names",
    "judge_output",
    "lsd",
    "max_abs",
    "register_judge",
    "snr",
]

Array = NDArray[Any]
Measure = Callable[[Array, Array], float | None]
"""`measure(actual, golden)`: a number, or None where the measure does not apply."""


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one judge: truthy when passed, with the measured value and the limit."""

    judge: str
    passed: bool
    value: float | None
    limit: float | None
    reason: str = ""

    def __bool__(self) -> bool:
        return self.passed


def _number(value: Any) -> float | None:
    """A measure's result as a float (None stays None); TypeError for anything else."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"returned {brief(value, 40)}, not a number or None")
    return float(value)


@dataclass(frozen=True, slots=True)
class Judge:
    """A named measure and its direction: `check(golden, actual, limit)` says pass or fail."""

    name: str
    measure: Measure
    higher_is_better: bool
    unit: str = ""

    def value(self, golden: Array, actual: Array) -> float | None:
        """The measure of `actual` against `golden` (None where it does not apply)."""
        return _number(self.measure(actual, golden))

    def check(self, golden: Array, actual: Array, limit: float) -> Check:
        """Measure and compare with `limit`; a measure that raises or gives NaN fails."""
        try:
            value = self.value(golden, actual)
        except Exception as exc:  # a user's measure: its failure fails the output, not the caller
            reason = f"judge {self.name!r} raised {type(exc).__name__}: {brief(str(exc), 120)}"
            return Check(self.name, False, None, limit, reason)
        return self.compare(value, limit)

    def compare(self, value: float | None, limit: float) -> Check:
        """The check of an already measured value against `limit`."""
        if value is None:
            return Check(self.name, True, None, limit, "")
        ok = value >= limit if self.higher_is_better else value <= limit
        word = "below" if self.higher_is_better else "above"
        unit = self.unit
        reason = "" if ok else f"{self.name} {value:.6g}{unit} is {word} the limit {limit:g}{unit}"
        return Check(self.name, ok, value, limit, reason)

    def tightest(self, *limits: float) -> float:
        """The strictest of several limits for this judge."""
        return max(limits) if self.higher_is_better else min(limits)


_registry: dict[str, Judge] = {}
_registry_lock = threading.Lock()


def register_judge(
    name: str,
    measure: Measure,
    *,
    higher_is_better: bool,
    unit: str = "",
    replace: bool = False,
) -> Judge:
    """Register `measure(actual, golden) -> float` under `name`; probes can then set limits on it.

    A name already taken is refused unless `replace=True` (a built-in's name too: pick another).
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ProbeError(f"a judge's name must be an identifier, got {brief(name)}")
    if not callable(measure):
        raise ProbeError(f"judge {name!r}: measure must be callable, got {brief(measure)}")
    if not isinstance(higher_is_better, bool):
        raise ProbeError(f"judge {name!r}: higher_is_better must be a bool")
    judge = Judge(name, measure, higher_is_better, unit)
    with _registry_lock:
        if name in _registry and not replace:
            raise ProbeError(
                f"a judge named {name!r} is already registered; pass replace=True to replace it"
            )
        _registry[name] = judge
    return judge


def get_judge(name: str) -> Judge:
    """The judge registered under `name`; ProbeError naming it and the known ones otherwise."""
    judge = _registry.get(name) if isinstance(name, str) else None
    if judge is None:
        raise ProbeError(
            f"no judge named {brief(name)} is registered in this process (known: "
            f"{', '.join(judge_names())}); register it with probes.register_judge before use"
        )
    return judge


def judge_names() -> tuple[str, ...]:
    """Every registered judge's name, sorted."""
    return tuple(sorted(_registry))


def _builtin(
    name: str, fn: Callable[[Array, Array], float | None], higher: bool, unit: str
) -> None:
    register_judge(
        name, lambda actual, golden: fn(golden, actual), higher_is_better=higher, unit=unit
    )


_builtin("snr_db", snr_db, True, " dB")  # catches gain faults, which cosine misses
_builtin("cosine", cosine_similarity, True, "")
_builtin("lsd_db", log_spectral_distance, False, " dB")  # None for shapes that are no signal
_builtin("max_abs", max_abs_error, False, "")
_builtin("top1", argmax_agreement, True, "")  # the share of rows whose argmax agrees

REPORTED = ("snr_db", "cosine", "max_abs", "lsd_db")
"""The measures every output's score holds, judged or not (the rest only when limited)."""
_ORDER = {name: rank for rank, name in enumerate(REPORTED)}


def _factory(name: str) -> Callable[[float], Callable[[Array, Array], Check]]:
    def make(limit: float) -> Callable[[Array, Array], Check]:
        return lambda golden, actual: get_judge(name).check(golden, actual, limit)

    make.__doc__ = f"A check of {name!r} against `limit`: `check(golden, actual) -> Check`."
    return make


snr = _factory("snr_db")
cosine = _factory("cosine")
lsd = _factory("lsd_db")
max_abs = _factory("max_abs")


def finite() -> Callable[[Array, Array], Check]:
    """A check that fails when the actual array holds NaN or Inf."""

    def check(golden: Array, actual: Array) -> Check:
        bad = int(np.size(actual) - np.count_nonzero(np.isfinite(actual)))
        reason = f"{bad} of {np.size(actual)} values are NaN or Inf" if bad else ""
        return Check("finite", bad == 0, float(bad), 0.0, reason)

    return check


@dataclass(frozen=True, slots=True)
class OutputScore:
    """Every measure of one output against its golden, by judge name, and the checks made."""

    name: str
    passed: bool
    shape_ok: bool
    finite: bool
    values: Mapping[str, float | None]
    checks: tuple[Check, ...]

    def __bool__(self) -> bool:
        return self.passed

    @property
    def snr_db(self) -> float:
        """The SNR against the golden in dB (NaN when it could not be measured)."""
        value = self.values.get("snr_db")
        return math.nan if value is None else value

    @property
    def reasons(self) -> list[str]:
        """Why this output failed, one sentence per failed check."""
        return [f"output {self.name!r}: {c.reason}" for c in self.checks if not c.passed]


def _unmeasured(name: str, shape_ok: bool, check: Check) -> OutputScore:
    values = {key: math.nan for key in REPORTED if key != "lsd_db"}
    return OutputScore(name, False, shape_ok, False, {**values, "lsd_db": None}, (check,))


def judge_output(
    name: str, golden: Array, actual: Array, limits: Mapping[str, float]
) -> OutputScore:
    """Score one output: shape, dtype and finiteness, then every judge `limits` names."""
    actual = np.asarray(actual)
    if actual.shape != golden.shape:
        reason = f"shape {list(actual.shape)} differs from the golden shape {list(golden.shape)}"
        return _unmeasured(name, False, Check("shape", False, None, None, reason))
    if not np.issubdtype(actual.dtype, np.number) or np.iscomplexobj(actual):
        reason = f"dtype {actual.dtype} is not a real number type"
        return _unmeasured(name, True, Check("dtype", False, None, None, reason))
    fin = finite()(golden, actual)
    if not fin:
        return _unmeasured(name, True, fin)
    if np.array_equal(golden, actual):  # a healthy module's canary often is, bit for bit
        actual = golden  # the measures know the values of one finite array against itself
    checks = [fin]
    values: dict[str, float | None] = {}
    ordered = sorted(limits.items(), key=lambda kv: _ORDER.get(kv[0], len(_ORDER)))
    for judge_name, limit in ordered:  # the reported measures first, SNR leading
        check = get_judge(judge_name).check(golden, actual, limit)
        checks.append(check)
        values[judge_name] = check.value
    for key in REPORTED:
        if key not in values:
            values[key] = get_judge(key).value(golden, actual)
    return OutputScore(name, all(checks), True, True, values, tuple(checks))
