"""A probe: canary inputs, golden outputs, thresholds, and metadata that tells when it is stale."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from probes.errors import ProbeError
from probes.judges import OutputScore, Thresholds, judge_output
from probes.signature import InputSpec, OutputSpec

__all__ = ["SCHEMA_VERSION", "Case", "Probe", "ProbeMeta", "Verdict"]

SCHEMA_VERSION = 1
Array = NDArray[Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    """One canary: inputs by name and the golden outputs they must produce."""

    inputs: Mapping[str, Array]
    outputs: Mapping[str, Array]


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeMeta:
    """Where a probe came from: model hash, MNN version and how it was recorded."""

    schema_version: int = SCHEMA_VERSION
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
    def merge(cls, verdicts: Iterable[Verdict], labels: Iterable[str] | None = None) -> Verdict:
        """One verdict over several canary runs: passes only when all pass; keeps the worst scores.

        The reasons are those of the first failing run, then a count of the failing runs.
        """
        items = list(verdicts)
        if not items:
            return cls.failed("no canary run was judged")
        names = list(labels) if labels is not None else [f"run {i + 1}" for i in range(len(items))]
        failing = [(n, v) for n, v in zip(names, items, strict=True) if not v.passed]
        worst = min(items, key=lambda v: (v.passed, v.worst_snr_db))
        if not failing:
            return cls(True, worst.scores, ())
        first_name, first = failing[0]
        reasons = [f"{first_name}: {r}" for r in first.reasons]
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
    thresholds: Thresholds = field(default_factory=Thresholds)
    per_output: Mapping[str, Thresholds] = field(default_factory=dict)
    meta: ProbeMeta = field(default_factory=ProbeMeta)

    def __post_init__(self) -> None:
        if not self.cases:
            raise ProbeError("a probe needs at least one canary case")
        in_names = [s.name for s in self.inputs]
        out_names = [s.name for s in self.outputs]
        unknown = sorted(set(self.per_output) - set(out_names))
        if unknown:
            raise ProbeError(
                f"per-output thresholds for unknown outputs {unknown}; outputs are {out_names}"
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
        """Output names in the model's order."""
        return [s.name for s in self.outputs]

    def thresholds_for(self, output: str) -> Thresholds:
        """The limits that apply to one output."""
        return self.per_output.get(output, self.thresholds)

    def with_thresholds(self, default: Thresholds | None = None, **per_output: Thresholds) -> Probe:
        """A copy with a new default and/or per-output thresholds (`wav=Thresholds(...)`)."""
        return replace(
            self,
            thresholds=default or self.thresholds,
            per_output={**self.per_output, **per_output},
        )

    def judge(self, outputs: Mapping[str, Array] | Sequence[Array], case: int = 0) -> Verdict:
        """Judge outputs (by name, or a list in output order) against case `case`'s goldens."""
        golden = self.cases[case].outputs
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
            score = judge_output(name, golden[name], outputs[name], self.thresholds_for(name))
            scores[name] = score
            reasons.extend(score.reasons)
        extra = sorted(set(outputs) - set(self.output_names))
        reasons.extend(f"unexpected output {n!r}" for n in extra)
        return Verdict(not reasons, scores, tuple(reasons))

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write `manifest.json` and `arrays.npz` into `directory` (created if needed)."""
        from probes.store import save

        save(self, directory)
