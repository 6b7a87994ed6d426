"""Judges: small factories that compare a golden array with an actual one and say why it fails."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from numpy.fft import rfft  # ~1 ms, here rather than at the first judgement
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

from probes.errors import ProbeError, brief

__all__ = [
    "Check",
    "Judge",
    "OutputScore",
    "Thresholds",
    "cosine",
    "cosine_similarity",
    "finite",
    "judge_output",
    "log_spectral_distance",
    "lsd",
    "max_abs",
    "snr",
    "snr_db",
]

Array = NDArray[Any]


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


Judge = Callable[[Array, Array], Check]
"""A judge takes (golden, actual) arrays of the same shape and returns a Check."""


# Reductions use einsum, never np.dot/np.linalg.norm: those call multithreaded BLAS, whose
# spinning threads fight MNN's own pool for the cores (measured: 8 ms instead of 0.02 ms).
# They sum in float64 straight from the arrays (einsum casts in small buffers): a float64 copy
# of a long output per judge cost more than the arithmetic, each copy being fresh pages.


def _dot(x: Array, y: Array) -> float:
    return float(np.einsum("i,i->", np.ravel(x), np.ravel(y), dtype=np.float64, casting="unsafe"))


def _sum_sq(x: Array) -> float:
    return _dot(x, x)


def _same_finite(golden: Array, actual: Array) -> bool:
    """True when both are one finite array (judge_output passes an equal output so): every
    measure's value is then known without the arithmetic."""
    return actual is golden and bool(np.isfinite(golden).all())


def _difference(golden: Array, actual: Array) -> Array:
    """actual - golden, computed in float64."""
    return np.subtract(actual, golden, dtype=np.float64)


def snr_db(golden: Array, actual: Array) -> float:
    """Signal-to-noise ratio of `actual` against `golden` in dB (inf when identical, NaN if NaN)."""
    if _same_finite(golden, actual):
        return math.inf
    with np.errstate(over="ignore", invalid="ignore"):
        err = _sum_sq(_difference(golden, actual))
        sig = _sum_sq(golden)
    if math.isnan(err) or math.isnan(sig):
        return math.nan
    if err == 0.0:
        return math.inf
    if sig == 0.0 or math.isinf(err):
        return -math.inf
    return 10.0 * (math.log10(sig) - math.log10(err))


def cosine_similarity(golden: Array, actual: Array) -> float:
    """Cosine of the angle between the flattened arrays (1.0 when both are all zeros)."""
    if _same_finite(golden, actual):
        return 1.0
    sg, sa = _sum_sq(golden), _sum_sq(actual)  # einsum sets no floating-point flags
    if sg == 0.0 and sa == 0.0:
        return 1.0
    if sg == 0.0 or sa == 0.0:
        return 0.0
    dot = _dot(golden, actual)
    if dot == sg == sa:
        return 1.0  # the same sums: equal arrays, exactly 1 rather than 1 - 1 ulp
    cos = dot / (math.sqrt(sg) * math.sqrt(sa))
    return max(-1.0, min(1.0, cos)) if math.isfinite(cos) else cos


def _signal_1d(x: Array) -> Array | None:
    """The array as a 1-D signal when at most one axis is longer than 1 and it is long enough."""
    flat = np.asarray(x).reshape(-1)
    if sum(s > 1 for s in np.shape(x)) != 1 or flat.size < 64:
        return None
    return flat


def log_spectral_distance(golden: Array, actual: Array) -> float | None:
    """Mean log-spectral distance in dB between two 1-D-like signals (None for other shapes).

    Power spectra of Hann-windowed 512-sample frames with half overlap (numpy only: no
    import at first use); bins more than 80 dB below the golden's loudest bin are floored so
    that silence does not dominate.
    """
    g, a = _signal_1d(golden), _signal_1d(actual)
    if g is None or a is None or g.size != a.size:
        return None
    if np.array_equal(g, a):  # a healthy module's canary often is: every bin's ratio is 1
        return 0.0
    n = min(512, g.size)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        frames = np.stack([_frames(g, n), _frames(a, n)])
        # scaled by the golden's peak: float32 power spectra of loud or faint signals would
        # overflow or underflow, and the distance is the same at any common scale
        peak = float(np.max(np.abs(frames[0])))
        if 0.0 < peak < math.inf:
            if not _SCALABLE[0] < peak < _SCALABLE[1]:  # 1/peak would leave float32's range
                frames = frames.astype(np.float64)
            frames *= _window(n) * frames.dtype.type(1.0 / peak)
        else:
            frames *= _window(n)
        z = rfft(frames, axis=-1)
        power = z.real**2 + z.imag**2
        floor = max(float(power[0].max()), 1e-30) * 1e-8
        # 10*log10(x) as log2 (a faster ufunc than log10 in numpy builds without SIMD logs)
        diff = _DB_PER_OCTAVE * np.log2((power[0] + floor) / (power[1] + floor))
        return float(np.mean(np.sqrt(np.einsum("ij,ij->i", diff, diff) / diff.shape[-1])))


_DB_PER_OCTAVE = 10.0 * math.log10(2.0)
_SCALABLE = (1e-30, 1e30)  # peaks whose scaling stays within float32


def _frames(x: Array, n: int) -> Array:
    """Every frame of `n` samples that starts at a multiple of n/2, as a float32 view."""
    return sliding_window_view(x.astype(np.float32, copy=False), n)[:: n // 2]


@functools.cache
def _window(n: int) -> Array:
    """The periodic Hann window of `n` samples, as scipy.signal.get_window("hann", n)."""
    window: Array = np.hanning(n + 1)[:-1].astype(np.float32)
    return window


def _max_abs_error(golden: Array, actual: Array) -> float:
    if _same_finite(golden, actual):
        return 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        diff = _difference(golden, actual)
        return float(np.abs(diff, out=diff).max(initial=0.0))


def _limit(name: str, value: float, limit: float, *, higher_is_better: bool, unit: str) -> Check:
    ok = value >= limit if higher_is_better else value <= limit
    word = "below" if higher_is_better else "above"
    reason = "" if ok else f"{name} {value:.6g}{unit} is {word} the limit {limit:g}{unit}"
    return Check(name, ok, value, limit, reason)


def finite() -> Judge:
    """Fails when the actual array holds NaN or Inf."""

    def judge(golden: Array, actual: Array) -> Check:
        bad = int(np.size(actual) - np.count_nonzero(np.isfinite(actual)))
        reason = f"{bad} of {np.size(actual)} values are NaN or Inf" if bad else ""
        return Check("finite", bad == 0, float(bad), 0.0, reason)

    return judge


def snr(min_db: float) -> Judge:
    """Fails when the SNR against the golden output is below `min_db` (catches gain faults)."""
    return lambda g, a: _limit("snr_db", snr_db(g, a), min_db, higher_is_better=True, unit=" dB")


def cosine(min_value: float) -> Judge:
    """Fails when the cosine similarity with the golden output is below `min_value`."""
    return lambda g, a: _limit(
        "cosine", cosine_similarity(g, a), min_value, higher_is_better=True, unit=""
    )


def max_abs(max_value: float) -> Judge:
    """Fails when any element differs from the golden output by more than `max_value`."""
    return lambda g, a: _limit(
        "max_abs", _max_abs_error(g, a), max_value, higher_is_better=False, unit=""
    )


def lsd(max_db: float) -> Judge:
    """Fails when the log-spectral distance exceeds `max_db`; passes for non-signal shapes."""

    def judge(golden: Array, actual: Array) -> Check:
        value = log_spectral_distance(golden, actual)
        if value is None:
            return Check("lsd_db", True, None, max_db, "")
        return _limit("lsd_db", value, max_db, higher_is_better=False, unit=" dB")

    return judge


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
    return number if math.isfinite(number) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    """Pass limits for one output; None switches a judge off.

    The defaults pass fp16-level noise (about 55 dB SNR against fp32) with 10 dB to spare and
    fail a 1% weight-noise fault (about 29 dB SNR, cosine 0.9994). SNR is always on: cosine
    alone misses gain faults.
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

    def judges(self) -> list[Judge]:
        """The judges these limits switch on, after the finite check."""
        out = [snr(self.min_snr_db)]
        if self.min_cosine is not None:
            out.append(cosine(self.min_cosine))
        if self.max_lsd_db is not None:
            out.append(lsd(self.max_lsd_db))
        if self.max_abs is not None:
            out.append(max_abs(self.max_abs))
        return out

    def to_json(self) -> dict[str, float | None]:
        """Manifest form."""
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> Thresholds:
        """Parse the manifest form, refusing unknown or missing keys."""
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, Mapping) or set(raw) != names:
            raise ProbeError(f"thresholds need exactly the keys {sorted(names)}, got {brief(raw)}")
        return cls(**raw)


@dataclass(frozen=True, slots=True)
class OutputScore:
    """Every measurement of one output against its golden, and the checks that used them."""

    name: str
    passed: bool
    shape_ok: bool
    finite: bool
    snr_db: float
    cosine: float
    max_abs: float
    lsd_db: float | None
    checks: tuple[Check, ...]

    def __bool__(self) -> bool:
        return self.passed

    @property
    def reasons(self) -> list[str]:
        """Why this output failed, one sentence per failed check."""
        return [f"output {self.name!r}: {c.reason}" for c in self.checks if not c.passed]


def judge_output(name: str, golden: Array, actual: Array, thresholds: Thresholds) -> OutputScore:
    """Score one output: shape, then finiteness, then every judge the thresholds switch on."""
    nan = math.nan
    actual = np.asarray(actual)
    if actual.shape != golden.shape:
        reason = f"shape {list(actual.shape)} differs from the golden shape {list(golden.shape)}"
        check = Check("shape", False, None, None, reason)
        return OutputScore(name, False, False, False, nan, nan, nan, None, (check,))
    if not np.issubdtype(actual.dtype, np.number) or np.iscomplexobj(actual):
        check = Check("dtype", False, None, None, f"dtype {actual.dtype} is not a real number type")
        return OutputScore(name, False, True, False, nan, nan, nan, None, (check,))
    fin = finite()(golden, actual)
    if not fin:
        return OutputScore(name, False, True, False, nan, nan, nan, None, (fin,))
    if np.array_equal(golden, actual):  # a healthy module's canary often is, bit for bit
        actual = golden  # the measures know the values of one finite array against itself
    checks = (fin, *(j(golden, actual) for j in thresholds.judges()))
    measured = {c.judge: c.value for c in checks}

    def value(key: str, measure: Callable[[Array, Array], float | None]) -> float | None:
        return measured[key] if key in measured else measure(golden, actual)

    return OutputScore(
        name=name,
        passed=all(checks),
        shape_ok=True,
        finite=True,
        snr_db=float(value("snr_db", snr_db) or 0.0),
        cosine=float(value("cosine", cosine_similarity) or 0.0),
        max_abs=float(value("max_abs", _max_abs_error) or 0.0),
        lsd_db=value("lsd_db", log_spectral_distance),
        checks=checks,
    )
