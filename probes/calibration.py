"""Calibration: how much clean inits of a model really differ, and the limits that follow.

Recording measures, per output, the worst SNR of any clean init (several inits of each
configuration, in this process and in fresh ones) against the golden (`spread_db`, infinite
when every init was bit-identical), and the SNR the reference gives when its float inputs are
nudged by one float32 ulp (`floor_db`: how far rounding-level differences, such as other SIMD
kernels or summation orders, move the outputs). The calibrated SNR limit is the lowest of
those and the output dtype's own precision, less a margin. A module is then judged against
what a clean init computes, not against a fixed figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from probes.errors import ProbeError, brief

__all__ = ["MARGIN_DB", "Calibration", "OutputCalibration", "calibrated_limit", "precision_db"]

MARGIN_DB = 20.0
"""How far below what clean inits and rounding-level changes give the SNR limit is set."""
_MAX_TEXT = 1000


def precision_db(dtype: np.dtype[Any]) -> float:
    """The SNR of the dtype's own rounding (20 log10 2^mantissa bits; infinite for integers)."""
    if not np.issubdtype(dtype, np.floating):
        return math.inf
    return 20.0 * math.log10(2.0 ** (np.finfo(dtype).nmant + 1))


def calibrated_limit(
    spread_db: float, floor_db: float, dtype: np.dtype[Any], margin_db: float
) -> float:
    """The SNR limit: the lowest of the spread, the floor and the dtype's precision, less the
    margin (infinite, that is bit-exact, only for integer outputs no nudge could move)."""
    return min(spread_db, floor_db, precision_db(dtype)) - margin_db


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputCalibration:
    """One output's measurements and the SNR limit calibrated from them."""

    spread_db: float  # worst SNR of a clean init against the golden (inf: all bit-identical)
    floor_db: float  # SNR of the reference with its float inputs nudged by one ulp
    limit_db: float  # the calibrated snr_db limit

    def to_json(self) -> dict[str, float | None]:
        """Manifest form (JSON has no infinity: null)."""
        return {k: _json(getattr(self, k)) for k in ("spread_db", "floor_db", "limit_db")}

    @classmethod
    def from_json(cls, raw: Any, what: str) -> OutputCalibration:
        """Parse the manifest form."""
        keys = {"spread_db", "floor_db", "limit_db"}
        if not isinstance(raw, dict) or set(raw) != keys:
            raise ProbeError(f"{what} needs exactly the keys {sorted(keys)}, got {brief(raw)}")
        return cls(**{k: _decibels(raw[k], f"{what}.{k}") for k in keys})


@dataclass(frozen=True, slots=True, kw_only=True)
class Calibration:
    """Per-output calibrated limits, the margin, how much was measured and where."""

    outputs: Mapping[str, OutputCalibration]
    margin_db: float = MARGIN_DB
    inits: int = 0  # clean inits measured in the recording process
    processes: int = 0  # fresh processes measured
    configurations: tuple[str, ...] = ()  # the factory overrides measured, as text
    provenance: Mapping[str, str] = field(default_factory=dict)  # MNN, CPU, threads, ...

    def limits_for(self, output: str) -> dict[str, float]:
        """The calibrated limits of one output ({} when it is not calibrated)."""
        found = self.outputs.get(output)
        return {} if found is None else {"snr_db": found.limit_db}

    def without(self, outputs: set[str]) -> Calibration | None:
        """This calibration without the given outputs (None when nothing is left)."""
        kept = {k: v for k, v in self.outputs.items() if k not in outputs}
        return None if not kept else _replace_outputs(self, kept)

    def to_json(self) -> dict[str, Any]:
        """Manifest form."""
        return {
            "outputs": {k: v.to_json() for k, v in self.outputs.items()},
            "margin_db": self.margin_db,
            "inits": self.inits,
            "processes": self.processes,
            "configurations": list(self.configurations),
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_json(cls, raw: Any) -> Calibration:
        """Parse the manifest form, refusing anything unexpected."""
        keys = {"outputs", "margin_db", "inits", "processes", "configurations", "provenance"}
        if not isinstance(raw, dict) or set(raw) != keys:
            raise ProbeError(f"'calibration' needs exactly the keys {sorted(keys)}")
        outputs, provenance, configurations = (
            raw["outputs"],
            raw["provenance"],
            raw["configurations"],
        )
        if not isinstance(outputs, dict) or not isinstance(provenance, dict):
            raise ProbeError("'calibration.outputs' and 'calibration.provenance' must be objects")
        if not isinstance(configurations, list):
            raise ProbeError("'calibration.configurations' must be a list")
        margin = _decibels(raw["margin_db"], "'calibration.margin_db'")
        if not math.isfinite(margin) or margin < 0:
            raise ProbeError(f"'calibration.margin_db' must be a finite number >= 0, got {margin}")
        return cls(
            outputs={
                k: OutputCalibration.from_json(v, f"'calibration.outputs.{k}'")
                for k, v in outputs.items()
            },
            margin_db=margin,
            inits=_count(raw["inits"], "'calibration.inits'"),
            processes=_count(raw["processes"], "'calibration.processes'"),
            configurations=tuple(
                _text(c, "each of 'calibration.configurations'") for c in configurations
            ),
            provenance={
                _text(k, "a 'calibration.provenance' key"): _text(
                    v, f"'calibration.provenance.{k}'"
                )
                for k, v in provenance.items()
            },
        )

    def describe(self) -> str:
        """One line: what was measured and the limits, for notes and tools."""
        limits = ", ".join(f"{k} >= {_shown(v.limit_db)} dB" for k, v in self.outputs.items())
        where = ", ".join(f"{k} {v}" for k, v in self.provenance.items())
        return (
            f"calibrated over {self.inits} init(s) and {self.processes} fresh process(es) of "
            f"{', '.join(self.configurations) or 'the reference'} (margin {self.margin_db:g} dB; "
            f"{where}): {limits}"
        )


def _replace_outputs(
    calibration: Calibration, outputs: dict[str, OutputCalibration]
) -> Calibration:
    return Calibration(
        outputs=outputs,
        margin_db=calibration.margin_db,
        inits=calibration.inits,
        processes=calibration.processes,
        configurations=calibration.configurations,
        provenance=calibration.provenance,
    )


def _json(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _shown(value: float) -> str:
    return f"{value:.1f}" if math.isfinite(value) else "bit-exact"


def _decibels(value: Any, what: str) -> float:
    """A finite number, or null for +infinity (what bit-identical inits measure)."""
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProbeError(f"{what} must be a finite number or null, got {brief(value)}")
    if float(value) != value:  # an integer a float cannot hold exactly would not read back
        raise ProbeError(f"{what} must be a number a float holds exactly, got {brief(value)}")
    return float(value)


def _count(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= 1_000_000:
        raise ProbeError(f"{what} must be an integer in 0..1000000, got {brief(value)}")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise ProbeError(
            f"{what} must be a string of at most {_MAX_TEXT} characters, got {brief(value)}"
        )
    return value
