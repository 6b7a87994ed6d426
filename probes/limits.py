"""Limits: a pass limit per judge name, and `Thresholds`, the built-in judges' named form."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from probes.errors import ProbeError, brief
from probes.judges import get_judge

__all__ = ["DEFAULT_LIMITS", "Limits", "Thresholds"]


def _finite(value: Any) -> float | None:
    """`value` as a finite float if it is a real number (not a bool), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return number if math.isfinite(number) and number == value else None  # held exactly


class Limits(Mapping[str, float]):
    """An immutable mapping of registered judge name -> finite limit.

    >>> Limits({"snr_db": 30, "top1": 1.0})  # doctest: +SKIP
    """

    __slots__ = ("_items",)
    _items: dict[str, float]

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        if items is not None and not isinstance(items, Mapping):
            raise ProbeError(f"limits must map judge names to numbers, got {brief(items)}")
        checked: dict[str, float] = {}
        for name, value in (items or {}).items():
            get_judge(name)  # ProbeError naming an unknown judge
            number = _finite(value)
            if number is None:
                raise ProbeError(
                    f"the limit of judge {name!r} must be a finite number, got {brief(value)}"
                )
            checked[name] = number
        object.__setattr__(self, "_items", checked)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Limits are immutable")

    @classmethod
    def of(cls, value: Mapping[str, Any] | None) -> Limits:
        """`value` as Limits (Limits stay as they are)."""
        return value if isinstance(value, Limits) else cls(value)

    def __getitem__(self, name: str) -> float:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other.items())

    def __repr__(self) -> str:
        return f"Limits({self._items!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as a plain dict (guard.Pool sends probes to worker processes)."""
        return (Limits, (dict(self._items),))

    def to_json(self) -> dict[str, float]:
        """Manifest form."""
        return dict(self._items)


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds(Mapping[str, float]):
    """The built-in judges' limits by field; None switches a judge off. A mapping of judge
    name -> limit (`dict(Thresholds())` is `{"snr_db": 45.0, "cosine": 0.99995, "lsd_db": 1.0}`).

    These fixed defaults are the loose bound: they pass fp16-level noise (about 55 dB SNR
    against fp32) and fail a 1% weight-noise fault (about 29 dB SNR, cosine 0.9994). SNR is
    always on: cosine alone misses gain faults.
    """

    min_snr_db: float = 45.0
    min_cosine: float | None = 0.99995
    max_lsd_db: float | None = 1.0
    max_abs: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name != "min_snr_db":
                continue
            number = _finite(value)
            if number is None:
                raise ProbeError(
                    f"threshold {f.name} must be a finite number"
                    f"{'' if f.name == 'min_snr_db' else ' or None'}, got {brief(value)}"
                )
            object.__setattr__(self, f.name, number)

    def _pairs(self) -> dict[str, float]:
        pairs = {name: getattr(self, key) for key, name in _JUDGE_OF.items()}
        return {name: value for name, value in pairs.items() if value is not None}

    def __getitem__(self, name: str) -> float:
        return self._pairs()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._pairs())

    def __len__(self) -> int:
        return len(self._pairs())

    def limits(self) -> Limits:
        """These limits by judge name."""
        return Limits(self._pairs())

    def to_json(self) -> dict[str, float | None]:
        """The schema-1 manifest form (by field)."""
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> Thresholds:
        """Parse the schema-1 manifest form, refusing unknown or missing keys."""
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, Mapping) or set(raw) != names:
            raise ProbeError(f"thresholds need exactly the keys {sorted(names)}, got {brief(raw)}")
        return cls(**raw)


_JUDGE_OF = {
    "min_snr_db": "snr_db",
    "min_cosine": "cosine",
    "max_lsd_db": "lsd_db",
    "max_abs": "max_abs",
}

DEFAULT_LIMITS = Thresholds().limits()
"""The loose bound every output gets unless the probe says otherwise."""
