"""Input and output signatures: names, dtypes and shapes, with dynamic dimensions as ranges."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from probes.errors import ProbeError, brief

__all__ = [
    "MAX_DIM",
    "MAX_RANK",
    "NUMERIC_DTYPES",
    "Dim",
    "InputSpec",
    "OutputSpec",
    "check_dim",
    "format_shape",
]

Dim = int | tuple[int, int] | tuple[int, int, int]
"""A fixed size, an inclusive (min, max) range for a dynamic dimension, or (min, max, step):
sizes min, min + step, ... up to max (a detector that takes multiples of 32)."""

NUMERIC_DTYPES = frozenset(
    ["float16", "float32", "float64"]
    + [f"{sign}int{bits}" for sign in ("", "u") for bits in (8, 16, 32, 64)]
)
"""The dtype names a probe may hold (numpy's canonical spelling; never parsed from free text)."""
MAX_DIM = 2**31 - 1  # MNN keeps dimensions in int32
MAX_RANK = 32


def _dim_text(dim: Dim) -> str:
    if not isinstance(dim, tuple):
        return str(dim)
    step = f" step {dim[2]}" if len(dim) == 3 else ""
    return f"{dim[0]}..{dim[1]}{step}"


def format_shape(dims: Sequence[Dim]) -> str:
    """`[1, 80, 1..4000]` (or `32..1024 step 32`) style text for messages."""
    return "[" + ", ".join(_dim_text(d) for d in dims) + "]"


def check_dim(lo: Any, hi: Any, step: Any, what: str) -> Dim:
    """A dynamic dimension from its bounds and step (1: every size), or ProbeError."""
    if not (_size(lo) and _size(hi) and lo <= hi):
        raise ProbeError(
            f"{what}: bad range {brief(lo)}..{brief(hi)} "
            f"(expected ints in 0..{MAX_DIM} with min <= max)"
        )
    if not (_size(step) and step >= 1):
        raise ProbeError(f"{what}: bad step {brief(step)} (expected an int >= 1)")
    return (lo, hi) if step == 1 else (lo, hi, step)


def _size(value: Any) -> bool:
    """True for a JSON integer (not a bool) in 0..MAX_DIM."""
    return type(value) is int and 0 <= value <= MAX_DIM


def _dims_from_json(raw: Any, what: str) -> tuple[Dim, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_RANK:
        raise ProbeError(
            f"{what}: shape must be a list of at most {MAX_RANK} dimensions, got {brief(raw)}"
        )
    dims: list[Dim] = []
    for d in raw:
        if _size(d):
            dims.append(d)
        elif isinstance(d, list) and len(d) in (2, 3):
            dims.append(check_dim(d[0], d[1], d[2] if len(d) == 3 else 1, what))
        else:
            raise ProbeError(
                f"{what}: bad dimension {brief(d)} (expected an int in 0..{MAX_DIM}, [min, max] "
                "with min <= max, or [min, max, step])"
            )
    return tuple(dims)


@dataclass(frozen=True, slots=True, kw_only=True)
class InputSpec:
    """One model input: name, dtype, and per-dimension size or (min, max) range."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def misfit(self, shape: Sequence[int]) -> str | None:
        """Why a concrete shape does not fit this spec, or None when it fits."""
        if len(shape) != len(self.shape):
            return f"rank {len(shape)} (shape {list(shape)}), expected rank {len(self.shape)}"
        for axis, (size, dim) in enumerate(zip(shape, self.shape, strict=True)):
            if isinstance(dim, tuple):
                step = dim[2] if len(dim) == 3 else 1
                if not dim[0] <= size <= dim[1] or (size - dim[0]) % step:
                    allowed = f"the dynamic range {_dim_text(dim)}"
                    return f"dimension {axis} is {size}, expected {allowed} (shape {list(shape)})"
            elif size != dim:
                return f"dimension {axis} is {size}, expected {dim} (shape {list(shape)})"
        return None

    def accepts(self, shape: Sequence[int]) -> bool:
        """True when a concrete shape fits this spec."""
        return self.misfit(shape) is None

    def to_json(self) -> dict[str, Any]:
        """Manifest form."""
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": [list(d) if isinstance(d, tuple) else d for d in self.shape],
        }

    @classmethod
    def from_json(cls, raw: Any) -> InputSpec:
        """Parse and validate the manifest form."""
        name, dtype = _name_dtype(raw, "input")
        return cls(name=name, dtype=dtype, shape=_dims_from_json(raw["shape"], f"input {name!r}"))


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputSpec:
    """One output the probe judges: name, dtype, the shape recorded for the first canary case,
    and whether it is a sentinel (an intermediate tensor judged on the serving module, never
    handed to callers)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    sentinel: bool = False

    def to_json(self) -> dict[str, Any]:
        """Manifest form (the sentinel key only when it is one, as schema 1 had none)."""
        raw: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.sentinel:
            raw["sentinel"] = True
        return raw

    @classmethod
    def from_json(cls, raw: Any) -> OutputSpec:
        """Parse and validate the manifest form."""
        sentinel = raw.get("sentinel", False) if isinstance(raw, Mapping) else False
        if sentinel is not True and sentinel is not False:
            raise ProbeError(f"an output's 'sentinel' must be true or false, got {brief(sentinel)}")
        plain = {k: v for k, v in raw.items() if k != "sentinel"} if sentinel else raw
        name, dtype = _name_dtype(plain, "output")
        dims = _dims_from_json(raw["shape"], f"output {name!r}")
        if any(isinstance(d, tuple) for d in dims):
            raise ProbeError(f"output {name!r}: shape must be fixed integers, got {list(dims)}")
        shape = tuple(int(d) for d in dims if isinstance(d, int))
        return cls(name=name, dtype=dtype, shape=shape, sentinel=sentinel)


def check_dtype(dtype: Any, what: str) -> str:
    """The dtype name if it is one of NUMERIC_DTYPES, else ProbeError naming the allowed ones."""
    if not isinstance(dtype, str) or dtype not in NUMERIC_DTYPES:
        raise ProbeError(
            f"{what}: dtype must be one of {sorted(NUMERIC_DTYPES)}, got {brief(dtype)}"
        )
    return dtype


def _name_dtype(raw: Any, kind: str) -> tuple[str, str]:
    if not isinstance(raw, Mapping) or set(raw) != {"name", "dtype", "shape"}:
        raise ProbeError(
            f"each {kind} entry needs exactly the keys name, dtype, shape; got {brief(raw)}"
        )
    name = raw["name"]
    if not isinstance(name, str) or not name:
        raise ProbeError(f"{kind} name must be a non-empty string, got {brief(name)}")
    return name, check_dtype(raw["dtype"], f"{kind} {name!r}")
