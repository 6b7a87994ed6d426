"""Checking `run()` inputs against the probe's input signature and converting them safely."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard.errors import InputMismatch
from probes.signature import InputSpec, format_shape

__all__ = ["InputChecker", "check_input", "describe", "prepare_inputs"]


def _sum(value: NDArray[Any], _: NDArray[Any]) -> float:
    """Sum of every value: finite only if every value is (for float16, whose squares overflow)."""
    return float(np.add.reduce(value, axis=None))


_SEEN_SHAPES = 64  # shapes remembered per input as valid

# One reduction instead of isfinite().all(); a result that overflows although every value is
# finite takes the slow path, which checks each value.
# Called as test(value, value): np.vdot is the sum of squares in one BLAS pass, called directly
# (a Python wrapper around it costs as much again on the hot path).
_FINITE_TESTS: dict[str, Callable[[NDArray[Any], NDArray[Any]], Any]] = {
    "float32": np.vdot,
    "float64": np.vdot,
}


def describe(spec: InputSpec) -> str:
    """`float32[1, 80, 1..4000]`."""
    return spec.dtype + format_shape(spec.shape)


def _mismatch(spec: InputSpec, problem: str) -> InputMismatch:
    return InputMismatch(
        f"input {spec.name!r}: {problem}; expected {describe(spec)}", input=spec.name
    )


def _cast(spec: InputSpec, arr: NDArray[Any], check_finite: bool) -> NDArray[Any]:
    """Cast to the recorded dtype where no value can change meaning, else raise."""
    want = np.dtype(spec.dtype)
    got = arr.dtype
    if got != want:
        if want.kind == "f" and got.kind == "f":
            with np.errstate(over="ignore"):
                cast = arr.astype(want)
            if np.isfinite(arr).all() and not np.isfinite(cast).all():
                raise _mismatch(spec, f"{got} values overflow {want}")
            arr = cast
        elif want.kind in "iu" and got.kind in "iub":
            info = np.iinfo(want)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise _mismatch(
                    spec, f"{got} values outside the {want} range {info.min}..{info.max}"
                )
            arr = arr.astype(want)
        else:
            raise _mismatch(
                spec, f"dtype {got} cannot be cast safely to {want}; cast it explicitly"
            )
    if check_finite and want.kind == "f" and not np.isfinite(arr).all():
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise _mismatch(spec, f"{bad} NaN/Inf values (refused: Policy.check_finite_inputs)")
    return arr


def _plain(spec: InputSpec, value: np.ndarray[Any, Any]) -> NDArray[Any]:
    """The plain ndarray MNN will read from `value`: a subclass reduced to its base array.

    A masked array's mask is not something MNN can see, so masked cells are refused rather
    than handed on with whatever data lies under them.
    """
    if type(value) is np.ndarray:
        return value
    if isinstance(value, np.ma.MaskedArray):
        masked = int(np.count_nonzero(value.mask))
        if masked:
            raise _mismatch(
                spec,
                f"{masked} of {value.size} values are masked (MNN would read the data under "
                "the mask); fill them (np.ma.filled) or pass a plain array",
            )
    return np.asarray(value)


def check_input(spec: InputSpec, value: Any, *, check_finite: bool = True) -> NDArray[Any]:
    """One input checked and cast as `run()` does: the exact array MNN will be given."""
    return _check_one(spec, value, check_finite)


def _check_one(spec: InputSpec, value: Any, check_finite: bool) -> NDArray[Any]:
    """Every check on the exact array handed on: the plain array, then the cast one."""
    if not isinstance(value, np.ndarray):
        raise _mismatch(spec, f"got {type(value).__name__}, not a numpy array")
    plain = _plain(spec, value)
    if plain.size == 0 and plain.ndim == len(spec.shape):
        raise _mismatch(spec, f"the array is empty (shape {list(plain.shape)})")
    problem = spec.misfit(plain.shape)
    if problem is not None:
        raise _mismatch(spec, problem)
    return _cast(spec, plain, check_finite)


def _values(names: Sequence[str], inputs: Mapping[str, Any] | Sequence[Any]) -> list[Any]:
    """The input values in model order; raises InputMismatch for missing, extra or miscounted."""
    if isinstance(inputs, Mapping):
        missing = [n for n in names if n not in inputs]
        extra = sorted(str(k) for k in inputs if k not in names)
        if missing or extra:
            problems = [f"missing input(s) {missing}"] if missing else []
            problems += [f"unknown input(s) {extra}"] if extra else []
            raise InputMismatch(
                f"{' and '.join(problems)}; the model takes {list(names)}",
                input=(missing or extra)[0],
            )
        return [inputs[n] for n in names]
    if isinstance(inputs, (list, tuple)):
        if len(inputs) != len(names):
            raise InputMismatch(
                f"got {len(inputs)} inputs in a list, the model takes {len(names)}: {list(names)}"
            )
        return list(inputs)
    raise InputMismatch(
        f"inputs must be a dict by input name or a list in input order {list(names)}, "
        f"got {type(inputs).__name__}"
    )


class InputChecker:
    """`prepare_inputs` for one signature, with the common case (right dict, dtype and shape)
    checked in a few microseconds; anything unusual takes the detailed path."""

    def __init__(self, specs: Sequence[InputSpec], *, check_finite: bool = True) -> None:
        self.specs = tuple(specs)
        self.names = tuple(s.name for s in self.specs)
        self.check_finite = check_finite
        self._fast = tuple(
            (
                spec.name,
                np.dtype(spec.dtype),
                spec.misfit,
                _FINITE_TESTS.get(np.dtype(spec.dtype).name, _sum)
                if check_finite and np.dtype(spec.dtype).kind == "f"
                else None,
                set[tuple[int, ...]](),  # shapes that passed: one lookup instead of misfit
            )
            for spec in self.specs
        )

    def __call__(self, inputs: Mapping[str, Any] | Sequence[Any]) -> list[NDArray[Any]]:
        """Inputs in model order, validated and cast; raises InputMismatch naming what is wrong."""
        if type(inputs) is dict and len(inputs) == len(self._fast):
            out: list[NDArray[Any]] = []
            for name, dtype, misfit, finite, seen in self._fast:
                value = inputs.get(name)
                if type(value) is not np.ndarray or (
                    value.dtype is not dtype and value.dtype != dtype
                ):
                    break
                shape = value.shape
                if shape not in seen:
                    if not value.size or misfit(shape) is not None:
                        break
                    if len(seen) < _SEEN_SHAPES:
                        seen.add(shape)
                if finite is not None and not math.isfinite(finite(value, value)):
                    break
                out.append(value)
            else:
                return out
        return self.slow(inputs)

    def slow(self, inputs: Mapping[str, Any] | Sequence[Any]) -> list[NDArray[Any]]:
        """Every check, with a message for the first that fails; casts where safe."""
        values = _values(self.names, inputs)
        return [
            _check_one(s, v, self.check_finite) for s, v in zip(self.specs, values, strict=True)
        ]


def prepare_inputs(
    specs: Sequence[InputSpec],
    inputs: Mapping[str, Any] | Sequence[Any],
    *,
    check_finite: bool = True,
) -> list[NDArray[Any]]:
    """Inputs in model order, validated and cast; raises InputMismatch naming what is wrong."""
    return InputChecker(specs, check_finite=check_finite).slow(inputs)
