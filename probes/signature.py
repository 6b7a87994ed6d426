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
    "format_shape",
]

Dim = int | tuple[int, int]
"""A fixed size, or an inclusive (min, max) range for a dynamic dimension."""

NUMERIC_DTYPES = frozenset(
    ["float16", "float32", "float64"]
    + [f"{sign}int{bits}" for sign in ("", "u") for bits in (8, 16, 32, 64)]
)
"""The dtype names a probe may hold (numpy's canonical spelling; never parsed from free text)."""
MAX_DIM = 2**31 - 1  # MNN keeps dimensions in int32
MAX_RANK = 32


def format_shape(dims: Sequence[Dim]) -> str:
    """`[1, 80, 1..4000]` style text for messages."""
    return (
        "[" + ", ".join(f"{d[0]}..{d[1]}" if isinstance(d, tuple) else str(d) for d in dims) + "]"
    )


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
        elif isinstance(d, list) and len(d) == 2 and _size(d[0]) and _size(d[1]) and d[0] <= d[1]:
            dims.append((d[0], d[1]))
        else:
            raise ProbeError(
                f"{what}: bad dimension {brief(d)} (expected an int in 0..{MAX_DIM} or [min, max] "
                "with min <= max)"
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
                if not dim[0] <= size <= dim[1]:
                    allowed = f"the dynamic range {dim[0]}..{dim[1]}"
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
    """One model output: name, dtype and the shape recorded for the first canary case."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        """Manifest form."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, raw: Any) -> OutputSpec:
        """Parse and validate the manifest form."""
        name, dtype = _name_dtype(raw, "output")
        dims = _dims_from_json(raw["shape"], f"output {name!r}")
        if any(isinstance(d, tuple) for d in dims):
            raise ProbeError(f"output {name!r}: shape must be fixed integers, got {list(dims)}")
        return cls(name=name, dtype=dtype, shape=tuple(int(d) for d in dims if isinstance(d, int)))


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
