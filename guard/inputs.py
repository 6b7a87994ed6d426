"""Checking `run()` inputs against the probe's input signature and converting them safely."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard.errors import InputMismatch
from probes import InputSpec
from probes.signature import format_shape

__all__ = ["describe", "prepare_inputs"]


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
    if (
        check_finite
        and want.kind == "f"
        and not np.isfinite(np.sum(arr))
        and not np.isfinite(arr).all()
    ):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise _mismatch(spec, f"{bad} NaN/Inf values (refused: Policy.check_finite_inputs)")
    return arr


def _check_one(spec: InputSpec, value: Any, check_finite: bool) -> NDArray[Any]:
    if not isinstance(value, np.ndarray):
        raise _mismatch(spec, f"got a {type(value).__name__}, not a numpy array")
    if value.ndim != len(spec.shape):
        raise _mismatch(
            spec, f"rank {value.ndim} (shape {list(value.shape)}), expected rank {len(spec.shape)}"
        )
    if value.size == 0:
        raise _mismatch(spec, f"the array is empty (shape {list(value.shape)})")
    if not spec.accepts(value.shape):
        for axis, (size, dim) in enumerate(zip(value.shape, spec.shape, strict=True)):
            lo, hi = dim if isinstance(dim, tuple) else (dim, dim)
            if not lo <= size <= hi:
                allowed = f"the dynamic range {lo}..{hi}" if isinstance(dim, tuple) else str(dim)
                raise _mismatch(
                    spec,
                    f"dimension {axis} is {size}, expected {allowed} (shape {list(value.shape)})",
                )
    return _cast(spec, value, check_finite)


def prepare_inputs(
    specs: Sequence[InputSpec],
    inputs: Mapping[str, Any] | Sequence[Any],
    *,
    check_finite: bool = True,
) -> list[NDArray[Any]]:
    """Inputs in model order, validated and cast; raises InputMismatch naming what is wrong."""
    names = [s.name for s in specs]
    if isinstance(inputs, Mapping):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise InputMismatch(
                f"missing input(s) {missing}; the model takes {names}", input=missing[0]
            )
        if len(inputs) != len(names):
            extra = sorted(str(k) for k in inputs if k not in names)
            raise InputMismatch(
                f"unknown input(s) {extra}; the model takes {names}", input=extra[0]
            )
        values = [inputs[n] for n in names]
    elif isinstance(inputs, (list, tuple)):
        if len(inputs) != len(names):
            raise InputMismatch(
                f"got {len(inputs)} inputs in a list, the model takes {len(names)}: {names}"
            )
        values = list(inputs)
    else:
        raise InputMismatch(
            f"inputs must be a dict by input name or a list in input order {names}, "
            f"got a {type(inputs).__name__}"
        )
    return [_check_one(s, v, check_finite) for s, v in zip(specs, values, strict=True)]
