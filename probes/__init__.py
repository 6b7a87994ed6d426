"""Canary probes: inputs, golden outputs, thresholds and judges for MNN modules.

>>> import probes
>>> probe = probes.record(factory, {"mel": mel}, reference={"dynamic": True})  # doctest: +SKIP
>>> probe.save("probes/vocoder")  # doctest: +SKIP
>>> probes.load("probes/vocoder").judge({"wav": wav}).passed  # doctest: +SKIP
"""

from typing import Any

from probes.errors import ProbeError
from probes.judges import (
    Check,
    Judge,
    OutputScore,
    Thresholds,
    cosine,
    cosine_similarity,
    finite,
    judge_output,
    log_spectral_distance,
    lsd,
    max_abs,
    snr,
    snr_db,
)
from probes.probe import SCHEMA_VERSION, Case, Probe, ProbeMeta, Verdict
from probes.signature import Dim, InputSpec, OutputSpec
from probes.store import ProbeVersionWarning, check_mnn_version, check_model, file_sha256, load

__all__ = [
    "SCHEMA_VERSION",
    "Case",
    "Check",
    "Dim",
    "InputSpec",
    "Judge",
    "OutputScore",
    "OutputSpec",
    "Probe",
    "ProbeError",
    "ProbeMeta",
    "ProbeVersionWarning",
    "Thresholds",
    "Verdict",
    "check_mnn_version",
    "check_model",
    "cosine",
    "cosine_similarity",
    "file_sha256",
    "finite",
    "judge_output",
    "load",
    "log_spectral_distance",
    "lsd",
    "max_abs",
    "record",
    "snr",
    "snr_db",
]


def __getattr__(name: str) -> Any:
    """`probes.record`: recording runs modules, so it lives with the runtime in `guard.record`."""
    if name == "record":
        from guard.record import record

        return record
    raise AttributeError(f"module 'probes' has no attribute {name!r}")
