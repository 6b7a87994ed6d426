"""Input and output signatures: names, dtypes and shapes, with dynamic dimensions as ranges."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from probes.errors import ProbeError

__all__ = ["Dim", "InputSpec", "OutputSpec", "format_shape"]

Dim = int | tuple[int, int]
"""A fixed size, or an inclusive (min, max) range for a dynamic dimension."""


def format_shape(dims: Sequence[Dim]) -> str:
    """`[1, 80, 1..4000]` style text for messages."""
    return (
        "[" + ", ".join(f"{d[0]}..{d[1]}" if isinstance(d, tuple) else str(d) for d in dims) + "]"
    )


def _dims_from_json(raw: Any, what: str) -> tuple[Dim, ...]:
    if not isinstance(raw, list):
        raise ProbeError(f"{what}: shape must be a list, got {raw!r}")
    dims: list[Dim] = []
    for d in raw:
        if isinstance(d, int) and not isinstance(d, bool) and d >= 0:
            dims.append(d)
        elif (
            isinstance(d, list)
            and len(d) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in d)
            and 0 <= d[0] <= d[1]
        ):
            dims.append((d[0], d[1]))
        else:
            raise ProbeError(f"{what}: bad dimension {d!r} (expected int >= 0 or [min, max])")
    return tuple(dims)


@dataclass(frozen=True, slots=True, kw_only=True)
class InputSpec:
    """One model input: name, dtype, and per-dimension size or (min, max) range."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def accepts(self, shape: Sequence[int]) -> bool:
        """True when a concrete shape fits this spec."""
        if len(shape) != len(self.shape):
            return False
        for size, dim in zip(shape, self.shape, strict=True):
            lo, hi = dim if isinstance(dim, tuple) else (dim, dim)
            if not lo <= size <= hi:
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        """Manifest form."""
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": [list(d) if isinstance(d, tuple) else d for d in self.shape],
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> InputSpec:
        """Parse and validate the manifest form."""
        name, dtype = _name_dtype(raw, "input")
        return cls(
            name=name, dtype=dtype, shape=_dims_from_json(raw.get("shape"), f"input {name!r}")
        )


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
    def from_json(cls, raw: Mapping[str, Any]) -> OutputSpec:
        """Parse and validate the manifest form."""
        name, dtype = _name_dtype(raw, "output")
        dims = _dims_from_json(raw.get("shape"), f"output {name!r}")
        if any(isinstance(d, tuple) for d in dims):
            raise ProbeError(f"output {name!r}: shape must be fixed integers, got {dims}")
        return cls(name=name, dtype=dtype, shape=tuple(int(d) for d in dims if isinstance(d, int)))


def _name_dtype(raw: Mapping[str, Any], kind: str) -> tuple[str, str]:
    if not isinstance(raw, Mapping) or set(raw) != {"name", "dtype", "shape"}:
        raise ProbeError(
            f"each {kind} entry needs exactly the keys name, dtype, shape; got {raw!r}"
        )
    name, dtype = raw["name"], raw["dtype"]
    if not isinstance(name, str) or not name:
        raise ProbeError(f"{kind} name must be a non-empty string, got {name!r}")
    try:
        np.dtype(dtype)
    except TypeError:
        raise ProbeError(f"{kind} {name!r}: unknown dtype {dtype!r}") from None
    if not isinstance(dtype, str) or np.dtype(dtype) == np.dtype(object):
        raise ProbeError(f"{kind} {name!r}: dtype must be a numeric dtype name, got {dtype!r}")
    return name, dtype
