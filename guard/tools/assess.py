"""`mnn-guard assess`: how much of a model the probe's canary sees (coverage).

Each weight tensor in turn is perturbed (Gaussian noise of `relative` times its standard
deviation, 1% by default) in a copy of the model file; the canary runs on a fresh static
load of the copy and the probe judges it, as the guard would on the recording machine. A
tensor whose fault the probe refuses is covered; the others are blind. With sentinels in the
probe (intermediate tensors it judges too), coverage is reported with and without them.

>>> report = run_assess("classifier.mnn", probe)  # doctest: +SKIP
>>> report.coverage, report.blind  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guard import mnn
from guard.mnn.weights import Weights
from guard.tools.output import text_table
from probes import Probe, Verdict
from probes.probe import Case

__all__ = ["AssessReport", "TensorAssessment", "assess_json", "format_assess", "run_assess"]

TARGET = 0.9  # below this share of covered tensors, assess says what to do
RELATIVE = 0.01  # the default perturbation: noise of 1% of each tensor's standard deviation


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorAssessment:
    """One weight tensor's fault: how far it moves the outputs, and whether the probe sees it."""

    name: str
    shape: tuple[int, ...]
    snr_db: float  # the worst output SNR of the perturbed model against the goldens
    caught: bool  # the probe refuses it (every output it judges, sentinels included)
    caught_without_sentinels: bool  # judged on the served outputs only


@dataclass(frozen=True, slots=True, kw_only=True)
class AssessReport:
    """Coverage of a probe over a model's weight tensors."""

    model: str
    relative: float
    tensors: tuple[TensorAssessment, ...]
    sentinels: tuple[str, ...]
    control_snr_db: float  # the unperturbed copy against the goldens
    faithful: bool  # the unperturbed copy passes the probe (else faults are judged against it)

    @property
    def coverage(self) -> float:
        """The share of weight tensors whose fault the probe catches (sentinels included)."""
        return _share([t.caught for t in self.tensors])

    @property
    def coverage_without_sentinels(self) -> float:
        """The same share, judged on the served outputs only."""
        return _share([t.caught_without_sentinels for t in self.tensors])

    @property
    def blind(self) -> list[str]:
        """The tensors whose fault passes the probe."""
        return [t.name for t in self.tensors if not t.caught]


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def _served_only(probe: Probe) -> Probe:
    """The probe without its sentinel outputs."""
    served = [s.name for s in probe.outputs if not s.sentinel]
    cases = tuple(
        Case(inputs=c.inputs, outputs={n: c.outputs[n] for n in served}) for c in probe.cases
    )
    calibration = probe.calibration
    if calibration is not None:
        calibration = calibration.without({s.name for s in probe.outputs if s.sentinel})
    return Probe(
        cases=cases,
        inputs=probe.inputs,
        outputs=tuple(s for s in probe.outputs if not s.sentinel),
        thresholds=probe.thresholds,
        per_output={k: v for k, v in probe.per_output.items() if k in served},
        meta=probe.meta,
        calibration=calibration,
    )


def _canary(path: Path, probe: Probe, threads: int) -> list[dict[str, Any]]:
    """Every case's outputs (sentinels included) from one fresh static load of `path`."""
    factory = mnn.mnn_factory(path, probe.input_names, probe.output_names, threads=threads)
    runner = mnn.adapt(factory(), probe.input_names, probe.output_names)
    return [
        dict(
            zip(
                probe.output_names,
                runner.run([c.inputs[n] for n in probe.input_names]),
                strict=True,
            )
        )
        for c in probe.cases
    ]


def _judged(
    probe: Probe, outputs: list[dict[str, Any]], goldens: list[dict[str, Any]] | None
) -> tuple[bool, float]:
    """(passed on every case, worst SNR over outputs and cases), against the probe's goldens
    or, when given, other ones (the unperturbed copy's)."""
    verdicts = [
        probe.judge(out, k, goldens=None if goldens is None else goldens[k])
        for k, out in enumerate(outputs)
    ]
    return all(verdicts), Verdict.merge(verdicts).worst_snr_db


def run_assess(
    model: str | os.PathLike[str],
    probe: Probe,
    *,
    relative: float = RELATIVE,
    seed: int = 0,
    threads: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> AssessReport:
    """Perturb each weight tensor of `model` in turn and judge the canary with `probe`."""
    weights = Weights(model)
    served = _served_only(probe)
    sentinels = tuple(s.name for s in probe.outputs if s.sentinel)
    results = []
    with tempfile.TemporaryDirectory(prefix="mnn-guard-assess-") as folder:
        control = Path(folder, "control.mnn")
        weights.save(control)
        unperturbed = _canary(control, probe, threads)
        faithful, control_snr = _judged(probe, unperturbed, None)
        goldens = None if faithful else unperturbed  # judge against the copy's own outputs
        for k, tensor in enumerate(weights.tensors):
            copy = Path(folder, f"tensor{tensor.index}.mnn")
            weights.save_perturbed(copy, tensor, relative=relative, seed=seed + tensor.index)
            outputs = _canary(copy, probe, threads)
            passed, worst = _judged(probe, outputs, goldens)
            plain = [{n: o[n] for n in served.output_names} for o in outputs]
            passed_served, _ = _judged(served, plain, goldens)
            results.append(
                TensorAssessment(
                    name=tensor.name,
                    shape=tensor.shape,
                    snr_db=worst,
                    caught=not passed,
                    caught_without_sentinels=not passed_served,
                )
            )
            copy.unlink()
            if progress is not None:
                progress(k + 1, len(weights.tensors))
    return AssessReport(
        model=os.fspath(model),
        relative=relative,
        tensors=tuple(results),
        sentinels=sentinels,
        control_snr_db=control_snr,
        faithful=faithful,
    )


def _db(value: float) -> str:
    return f"{value:.1f}" if math.isfinite(value) else str(value)


def _advice(report: AssessReport) -> list[str]:
    if report.coverage >= TARGET:
        return []
    said = [
        f"coverage {report.coverage:.0%} is below {TARGET:.0%}: the canary does not see "
        f"{len(report.blind)} tensor(s) change."
    ]
    if not report.sentinels:
        said.append(
            "Record again with `--sentinels auto` (probes.record(..., sentinels='auto')): the "
            "canary then also judges intermediate tensors such as the logits before a softmax."
        )
    said.append(
        "Or record with canaries that exercise the model more (several realistic inputs, "
        "not saturated outputs)."
    )
    return said


def format_assess(report: AssessReport) -> str:
    """A table of every tensor's fault, then the coverage and what to do below the target."""
    rows = [
        (t.name, "x".join(map(str, t.shape)), _db(t.snr_db), "caught" if t.caught else "BLIND")
        for t in report.tensors
    ]
    lines = [text_table(("tensor", "shape", "SNR dB", "probe"), rows)]
    lines.append(
        f"coverage {report.coverage:.0%} ({sum(t.caught for t in report.tensors)} of "
        f"{len(report.tensors)} weight tensors; noise of {report.relative:g} x each tensor's "
        "standard deviation)"
    )
    if report.sentinels:
        lines.append(
            f"without the sentinels {list(report.sentinels)}: "
            f"{report.coverage_without_sentinels:.0%}"
        )
    if report.blind:
        lines.append(f"blind: {', '.join(report.blind)}")
    if not report.faithful:
        lines.append(
            f"note: the model saved again, unperturbed, computes {_db(report.control_snr_db)} "
            "dB from the goldens (other kernels): each fault was judged against that copy"
        )
    lines += _advice(report)
    return "\n".join(lines)


def assess_json(report: AssessReport) -> str:
    """The report as one JSON object with a `coverage` field in 0..1."""

    def number(value: float) -> float | None:
        return value if math.isfinite(value) else None

    data: Mapping[str, Any] = {
        "model": report.model,
        "perturbation": {"kind": "gaussian", "relative_to_std": report.relative},
        "coverage": report.coverage,
        "coverage_without_sentinels": report.coverage_without_sentinels,
        "sentinels": list(report.sentinels),
        "blind": report.blind,
        "control_snr_db": number(report.control_snr_db),
        "faithful_copy": report.faithful,
        "tensors": [
            {
                "name": t.name,
                "shape": list(t.shape),
                "snr_db": number(t.snr_db),
                "caught": t.caught,
                "caught_without_sentinels": t.caught_without_sentinels,
            }
            for t in report.tensors
        ],
        "advice": _advice(report),
    }
    return json.dumps(data, indent=2)
