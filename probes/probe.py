"""A probe: canary inputs, golden outputs, thresholds, and metadata that tells when it is stale."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from probes import store
from probes.calibration import Calibration
from probes.errors import ProbeError, brief
from probes.judges import OutputScore, judge_output
from probes.limits import DEFAULT_LIMITS, Limits, Thresholds
from probes.signature import (
    MAX_DIM,
    MAX_RANK,
    NUMERIC_DTYPES,
    InputSpec,
    OutputSpec,
    check_dtype,
)

__all__ = ["KIND", "MAX_RUNS", "SCHEMA_VERSION", "Case", "Probe", "ProbeMeta", "Verdict", "load"]

SCHEMA_VERSION = 2
READ_VERSIONS = (1, 2)
"""Schema 1 (thresholds by field) is still read; schema 2 (limits by judge name) is written."""
KIND = "mnn-guard-probe"
MAX_RUNS = 10_000
"""The most reference inits a manifest may claim (`record` uses 3)."""
Array = NDArray[Any]


def _same_arrays(a: Mapping[str, Array], b: Mapping[str, Array]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k], equal_nan=True) for k in a
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    """One canary: inputs by name and the golden outputs they must produce."""

    inputs: Mapping[str, Array]
    outputs: Mapping[str, Array]

    __hash__ = None  # type: ignore[assignment]  # arrays are mutable: a Case is not hashable

    def __eq__(self, other: object) -> bool:
        """Equal when the same names hold arrays of the same dtype, shape and values."""
        if not isinstance(other, Case):
            return NotImplemented
        return _same_arrays(self.inputs, other.inputs) and _same_arrays(self.outputs, other.outputs)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeMeta:
    """Where a probe came from: model hash, MNN version and how it was recorded."""

    schema_version: int = field(
        default=SCHEMA_VERSION, compare=False
    )  # of the file it was read from
    model_sha256: str | None = None
    mnn_version: str | None = None
    reference: Mapping[str, Any] = field(default_factory=dict)
    runs: int = 0
    created: str = ""
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Verdict:
    """The judgement of one set of outputs: truthy when every output passed."""

    passed: bool
    scores: Mapping[str, OutputScore]
    reasons: tuple[str, ...]

    def __bool__(self) -> bool:
        return self.passed

    @property
    def worst_snr_db(self) -> float:
        """The lowest SNR over all outputs (-inf when an output is missing, NaN or misshapen)."""
        values = [s.snr_db if s.finite else -math.inf for s in self.scores.values()]
        if not values and not self.passed:
            return -math.inf
        return min(values, default=math.inf)

    @classmethod
    def failed(cls, reason: str) -> Verdict:
        """A verdict for a canary that could not even produce outputs."""
        return cls(False, {}, (reason,))

    @classmethod
    def merge(
        cls,
        verdicts: Iterable[Verdict],
        labels: Iterable[str] | None = None,
        *,
        cases: Iterable[int] | None = None,
    ) -> Verdict:
        """One verdict over several canary runs: passes only when all pass; keeps the worst scores.

        The reasons are those of the first failing run of each case (`cases`: the case of each
        run; without it, of the first failing run), then a count of the failing runs.
        """
        items = list(verdicts)
        if not items:
            return cls.failed("no canary run was judged")
        names = list(labels) if labels is not None else [f"run {i + 1}" for i in range(len(items))]
        keys = list(cases) if cases is not None else [0] * len(items)
        runs = zip(names, items, keys, strict=True)
        failing = [(name, v, key) for name, v, key in runs if not v.passed]
        worst = min(items, key=lambda v: (v.passed, v.worst_snr_db))
        if not failing:
            return cls(True, worst.scores, ())
        reasons: list[str] = []
        told: set[int] = set()
        for name, verdict, key in failing:
            if key not in told:
                told.add(key)
                reasons += [f"{name}: {r}" for r in verdict.reasons]
        if len(items) > 1:
            reasons.append(f"{len(failing)} of {len(items)} canary runs failed")
        return cls(False, worst.scores, tuple(reasons))

    def describe(self) -> str:
        """One line: PASSED/FAILED, the worst SNR, and the reasons."""
        head = "PASSED" if self.passed else "FAILED"
        snr = self.worst_snr_db
        tail = f" worst SNR {snr:.1f} dB" if math.isfinite(snr) else ""
        return head + tail + ("" if self.passed else ": " + "; ".join(self.reasons))


@dataclass(frozen=True, kw_only=True)
class Probe:
    """Canary cases plus golden outputs, thresholds and metadata; judges a module's outputs.

    >>> verdict = probe.judge({"wav": wav})  # doctest: +SKIP
    >>> bool(verdict), verdict.reasons  # doctest: +SKIP
    """

    cases: tuple[Case, ...]
    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...]
    thresholds: Mapping[str, float] = DEFAULT_LIMITS
    per_output: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    meta: ProbeMeta = field(default_factory=ProbeMeta)
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", Limits.of(self.thresholds))
        if not isinstance(self.per_output, Mapping):
            raise ProbeError(
                f"per_output must map output names to limits, got {brief(self.per_output)}"
            )
        per = {name: Limits.of(limits) for name, limits in self.per_output.items()}
        object.__setattr__(self, "per_output", per)
        if not self.cases:
            raise ProbeError("a probe needs at least one canary case")
        in_names = [s.name for s in self.inputs]
        out_names = [s.name for s in self.outputs]
        flags = [s.sentinel for s in self.outputs]
        if not flags or flags[0] or flags != sorted(flags):
            raise ProbeError(
                f"outputs {out_names}: the served outputs come first, then the sentinels, and "
                "at least one output is served"
            )
        unknown = sorted(set(self.per_output) - set(out_names))
        if unknown:
            raise ProbeError(
                f"per-output thresholds for unknown outputs {unknown}; outputs are {out_names}"
            )
        calibrated = set(self.calibration.outputs) if self.calibration is not None else set()
        if calibrated - set(out_names):
            raise ProbeError(
                f"calibration of unknown outputs {sorted(calibrated - set(out_names))}; "
                f"outputs are {out_names}"
            )
        for i, case in enumerate(self.cases):
            if sorted(case.inputs) != sorted(in_names):
                raise ProbeError(
                    f"case {i}: inputs {sorted(case.inputs)} differ from the signature {in_names}"
                )
            if sorted(case.outputs) != sorted(out_names):
                raise ProbeError(
                    f"case {i}: outputs {sorted(case.outputs)} differ from {out_names}"
                )
            for spec in self.inputs:
                arr = case.inputs[spec.name]
                if str(arr.dtype) != spec.dtype or not spec.accepts(arr.shape):
                    raise ProbeError(
                        f"case {i}: input {spec.name!r} is {arr.dtype}{list(arr.shape)}, which the "
                        f"signature {spec.dtype}{list(spec.shape)} does not accept"
                    )
            for name, arr in case.outputs.items():
                dtype = getattr(arr, "dtype", None)
                if not isinstance(arr, np.ndarray) or str(dtype) not in NUMERIC_DTYPES:
                    raise ProbeError(
                        f"case {i}: golden output {name!r} is a {type(arr).__name__} of "
                        f"{dtype}, not an array of one of {sorted(NUMERIC_DTYPES)}"
                    )
                if not np.all(np.isfinite(arr)):
                    raise ProbeError(
                        f"case {i}: golden output {name!r} holds NaN or Inf; re-record the probe"
                    )

    @property
    def input_names(self) -> list[str]:
        """Input names in the model's order."""
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        """Every output the probe judges, in load order: the served ones, then the sentinels."""
        return [s.name for s in self.outputs]

    @property
    def served_names(self) -> list[str]:
        """The outputs a session hands to callers (every one but the sentinels)."""
        return [s.name for s in self.outputs if not s.sentinel]

    @property
    def sentinel_names(self) -> list[str]:
        """The intermediate tensors judged on the serving module but never handed out."""
        return [s.name for s in self.outputs if s.sentinel]

    def thresholds_for(self, output: str) -> Limits:
        """The limits that apply to one output, by judge name."""
        return Limits.of(self.per_output.get(output, self.thresholds))

    def limits_for(self, output: str, tier: str = "tight") -> Limits:
        """The limits of one output: "loose" (set or default) or "tight" (loose, with the
        calibrated ones in their place where the probe is calibrated)."""
        loose = self.thresholds_for(output)
        if tier == "loose" or self.calibration is None:
            return loose
        if tier != "tight":
            raise ProbeError(f"tier must be 'tight' or 'loose', got {brief(tier)}")
        return Limits({**loose, **self.calibration.limits_for(output)})

    def with_thresholds(
        self, default: Mapping[str, float] | None = None, **per_output: Mapping[str, float]
    ) -> Probe:
        """A copy with new default and/or per-output limits (`wav={"snr_db": 30}` or
        `wav=Thresholds(...)`); a limit set here wins over a calibrated one for that judge."""
        thresholds = self.thresholds if default is None else Limits.of(default)  # {} too
        new = {**self.per_output, **per_output}
        touched = {n for n in self.output_names if default is not None and n not in new}
        touched |= set(per_output)
        calibration = self.calibration
        if calibration is not None:
            limits = {n: Limits.of(new.get(n, thresholds)) for n in touched}
            calibration = calibration.without({n for n in touched if "snr_db" in limits[n]})
        return replace(self, thresholds=thresholds, per_output=new, calibration=calibration)

    def judge(
        self,
        outputs: Mapping[str, Array] | Sequence[Array],
        case: int = 0,
        *,
        goldens: Mapping[str, Array] | None = None,
        tier: str = "tight",
        retry_margin_db: float = 0.0,
    ) -> Verdict:
        """Judge outputs (by name, or a list in output order) against case `case`'s goldens.

        The "tight" tier holds a calibrated probe to what clean inits compute; "loose" to the
        probe's set (or default) limits. `goldens` judges against other goldens (a reference
        module's on this machine); `retry_margin_db` raises every SNR limit (a re-init after a
        failed one must do better than a borderline pass).
        """
        golden = self.cases[case].outputs if goldens is None else goldens
        if not isinstance(outputs, Mapping):
            outputs = list(outputs)
            if len(outputs) != len(self.outputs):
                return Verdict.failed(
                    f"got {len(outputs)} outputs, expected {len(self.outputs)} {self.output_names}"
                )
            outputs = dict(zip(self.output_names, outputs, strict=True))
        reasons: list[str] = []
        scores: dict[str, OutputScore] = {}
        for name in self.output_names:
            if name not in outputs:
                reasons.append(f"output {name!r} is missing")
                continue
            limits = self.limits_for(name, tier)
            if retry_margin_db and "snr_db" in limits:
                limits = Limits({**limits, "snr_db": limits["snr_db"] + retry_margin_db})
            score = judge_output(name, golden[name], outputs[name], limits)
            scores[name] = score
            reasons.extend(score.reasons)
        extra = sorted(set(outputs) - set(self.output_names))
        reasons.extend(f"unexpected output {n!r}" for n in extra)
        return Verdict(not reasons, scores, tuple(reasons))

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write `manifest.json` and `arrays.npz` into `directory` (created if needed)."""
        arrays: dict[str, Array] = {}
        cases = []
        for i, case in enumerate(self.cases):
            entry: dict[str, dict[str, Any]] = {"inputs": {}, "outputs": {}}
            for side, values in (("inputs", case.inputs), ("outputs", case.outputs)):
                for name, arr in values.items():
                    key = _key(i, side, name)
                    arrays[key] = arr
                    entry[side][name] = {
                        "key": key,
                        "dtype": str(arr.dtype),
                        "shape": list(arr.shape),
                    }
            cases.append(entry)
        meta = self.meta
        manifest = {
            "kind": KIND,
            "schema_version": SCHEMA_VERSION,
            "model_sha256": meta.model_sha256,
            "mnn_version": meta.mnn_version,
            "recorded": {
                "reference": dict(meta.reference),
                "runs": meta.runs,
                "created": meta.created,
                "notes": list(meta.notes),
            },
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "limits": Limits.of(self.thresholds).to_json(),
            "per_output": {k: Limits.of(v).to_json() for k, v in self.per_output.items()},
            "calibration": None if self.calibration is None else self.calibration.to_json(),
            "cases": cases,
        }
        store.write(directory, manifest, arrays)


# ---------------------------------------------------------------- loading

_COMMON = frozenset(
    {"kind", "schema_version", "model_sha256", "mnn_version", "recorded", "inputs", "outputs"}
    | {"per_output", "cases", "arrays"}
)
_KEYS = {1: _COMMON | {"thresholds"}, 2: _COMMON | {"limits", "calibration"}}
"""The top-level keys of a manifest, by schema version."""
_RECORDED_KEYS = frozenset({"reference", "runs", "created", "notes"})
_MAX_TEXT = 1000  # characters in a version, a date, a note or a reference value


def _key(case: int, side: str, name: str) -> str:
    return f"case{case}/{side}/{name}"


def _check_header(manifest: Mapping[str, Any]) -> int:
    """Kind, schema version and the top-level keys; the schema version."""
    if manifest.get("kind") != KIND:
        raise ProbeError(
            f"{store.MANIFEST} is not an mnn-guard probe manifest "
            f"(kind {brief(manifest.get('kind'))})"
        )
    version = manifest.get("schema_version")
    if type(version) is not int or version not in READ_VERSIONS:
        raise ProbeError(
            f"schema version {brief(version)} is not supported "
            f"(this mnn-guard reads the integers {', '.join(map(str, READ_VERSIONS))})"
        )
    keys = _KEYS[version]
    missing, extra = sorted(keys - set(manifest)), sorted(set(manifest) - keys)
    if missing or extra:
        raise ProbeError(f"{store.MANIFEST} has missing keys {missing} and unknown keys {extra}")
    return version


def _limits(raw: Any, version: int, what: str) -> Limits:
    """Limits from a manifest: by field in schema 1, by judge name in schema 2."""
    if version == 1:
        return Thresholds.from_json(raw).limits()
    if not isinstance(raw, dict):
        raise ProbeError(f"{what} must be an object of judge name -> limit, got {brief(raw)}")
    return Limits(raw)


def _list(manifest: Mapping[str, Any], key: str) -> list[Any]:
    value = manifest[key]
    if not isinstance(value, list) or not value:
        raise ProbeError(f"'{key}' must be a non-empty list")
    return value


def _text(value: Any, what: str, *, optional: bool = False) -> Any:
    """A string of at most _MAX_TEXT characters (or None when optional)."""
    if (optional and value is None) or (isinstance(value, str) and len(value) <= _MAX_TEXT):
        return value
    raise ProbeError(
        f"{what} must be a string of at most {_MAX_TEXT} characters"
        f"{' or null' if optional else ''}, got {brief(value)}"
    )


def _scalar(value: Any, what: str) -> Any:
    """A JSON scalar: null, a bool, a number, or a short string."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str) and len(value) <= _MAX_TEXT:
        return value
    raise ProbeError(
        f"{what} must be null, a bool, a number or a string of at most {_MAX_TEXT} characters, "
        f"got {brief(value)}"
    )


def _meta(manifest: Mapping[str, Any], version: int) -> ProbeMeta:
    rec = manifest["recorded"]
    if not isinstance(rec, dict) or set(rec) != _RECORDED_KEYS:
        raise ProbeError(f"'recorded' needs exactly the keys {sorted(_RECORDED_KEYS)}")
    sha = manifest["model_sha256"]
    if sha is not None and not store.is_sha256(sha):
        raise ProbeError(f"model_sha256 must be 64 hex digits or null, got {brief(sha)}")
    runs, reference, notes = rec["runs"], rec["reference"], rec["notes"]
    if type(runs) is not int or not 0 <= runs <= MAX_RUNS:
        raise ProbeError(f"'recorded.runs' must be an integer in 0..{MAX_RUNS}, got {brief(runs)}")
    if not isinstance(reference, dict) or not isinstance(notes, list):
        raise ProbeError("'recorded.reference' must be an object and 'recorded.notes' a list")
    return ProbeMeta(
        schema_version=version,
        model_sha256=sha,
        mnn_version=_text(manifest["mnn_version"], "mnn_version", optional=True),
        reference={k: _scalar(v, f"'recorded.reference.{k}'") for k, v in reference.items()},
        runs=runs,
        created=_text(rec["created"], "'recorded.created'"),
        notes=tuple(_text(n, "each of 'recorded.notes'") for n in notes),
    )


def _shape(raw: Any, what: str) -> tuple[int, ...]:
    if (
        not isinstance(raw, list)
        or len(raw) > MAX_RANK
        or not all(type(d) is int and 0 <= d <= MAX_DIM for d in raw)
    ):
        raise ProbeError(
            f"{what}: shape must be a list of at most {MAX_RANK} integers in 0..{MAX_DIM}, "
            f"got {brief(raw)}"
        )
    return tuple(raw)


def _case_refs(raw_cases: list[Any]) -> tuple[list[dict[str, dict[str, str]]], store.ArrayRefs]:
    """Each case's array keys by side and name, and every key's declared dtype and shape."""
    cases: list[dict[str, dict[str, str]]] = []
    refs: dict[str, tuple[np.dtype[Any], tuple[int, ...]]] = {}
    for i, raw in enumerate(raw_cases):
        if not isinstance(raw, dict) or set(raw) != {"inputs", "outputs"}:
            raise ProbeError(f"case {i} must have exactly 'inputs' and 'outputs'")
        keys: dict[str, dict[str, str]] = {}
        for side in ("inputs", "outputs"):
            entries = raw[side]
            if not isinstance(entries, dict):
                raise ProbeError(f"case {i} {side} must be an object")
            keys[side] = {}
            for name, ref in entries.items():
                what = f"case {i} {side} {name!r}"
                if not isinstance(ref, dict) or set(ref) != {"key", "dtype", "shape"}:
                    raise ProbeError(f"{what} needs exactly key, dtype, shape")
                key = _key(i, side, name)
                if ref["key"] != key:
                    raise ProbeError(f"{what}: key must be {key!r}, got {brief(ref['key'])}")
                dtype = np.dtype(check_dtype(ref["dtype"], what))
                refs[key] = (dtype, _shape(ref["shape"], what))
                keys[side][name] = key
        cases.append(keys)
    return cases, refs


def load(
    directory: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    mnn_version: str | None = None,
    strict_version: bool = False,
) -> Probe:
    """Load and validate a probe; raise ProbeError saying what is wrong.

    With `model`, refuse a probe recorded for other model bytes (sha256 differs). A probe
    recorded with an MNN version other than `mnn_version` warns (ProbeVersionWarning); with
    `strict_version` it is refused, and `mnn_version` defaults to the installed MNN's.

    >>> probe = probes.load("probes/vocoder", model="vocoder.mnn")  # doctest: +SKIP
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise ProbeError(
            f"probe folder {str(folder)!r} does not exist (record one with `mnn-guard record`)"
        )
    try:
        manifest = store.read_manifest(folder)
        schema = _check_header(manifest)
        inputs = tuple(InputSpec.from_json(r) for r in _list(manifest, "inputs"))
        outputs = tuple(OutputSpec.from_json(r) for r in _list(manifest, "outputs"))
        limits_key = "thresholds" if schema == 1 else "limits"
        thresholds = _limits(manifest[limits_key], schema, f"'{limits_key}'")
        per = manifest["per_output"]
        if not isinstance(per, dict):
            raise ProbeError("'per_output' must be an object")
        per_output = {k: _limits(v, schema, f"'per_output.{k}'") for k, v in per.items()}
        meta = _meta(manifest, schema)
        raw_calibration = manifest.get("calibration")
        calibration = None if raw_calibration is None else Calibration.from_json(raw_calibration)
        keys, refs = _case_refs(_list(manifest, "cases"))
        arrays = store.read_arrays(folder, manifest["arrays"], refs)
        probe = Probe(
            cases=tuple(
                Case(
                    inputs={n: arrays[k] for n, k in case["inputs"].items()},
                    outputs={n: arrays[k] for n, k in case["outputs"].items()},
                )
                for case in keys
            ),
            inputs=inputs,
            outputs=outputs,
            thresholds=thresholds,
            per_output=per_output,
            meta=meta,
            calibration=calibration,
        )
    except ProbeError as exc:
        raise ProbeError(
            f"probe {str(folder)!r}: {exc}; re-record it with `mnn-guard record`"
        ) from None
    store.check_model(probe, model)
    version = mnn_version
    if version is None and strict_version:
        version = store.installed_mnn_version()
        if version is None:
            raise ProbeError(
                "strict_version=True, but no installed MNN was found to compare the probe's "
                f"MNN {probe.meta.mnn_version} with; pass mnn_version="
            )
    store.check_mnn_version(probe, version, strict=strict_version)
    return probe
