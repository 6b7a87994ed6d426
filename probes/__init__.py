"""Canary probes: inputs, golden outputs, thresholds and judges for MNN modules.

>>> import probes
>>> probe = probes.record(factory, {"mel": mel}, reference={"dynamic": True})  # doctest: +SKIP
>>> probe.save("probes/vocoder")  # doctest: +SKIP
>>> probes.load("probes/vocoder").judge({"wav": wav}).passed  # doctest: +SKIP
"""

from typing import Any

from probes.errors import ProbeError
from probes.judges import (
    OutputScore,
    Thresholds,
    cosine_similarity,
    judge_output,
    log_spectral_distance,
    snr_db,
)
from probes.probe import Case, Probe, ProbeMeta, Verdict, load
from probes.signature import InputSpec, OutputSpec
from probes.store import ProbeVersionWarning

# used by guard (wrap, demo); not part of the public API: import them from probes.store
from probes.store import check_mnn_version as check_mnn_version
from probes.store import check_model as check_model
from probes.store import file_sha256 as file_sha256

__all__ = [
    "Case",
    "InputSpec",
    "OutputScore",
    "OutputSpec",
    "Probe",
    "ProbeError",
    "ProbeMeta",
    "ProbeVersionWarning",
    "Thresholds",
    "Verdict",
    "cosine_similarity",
    "judge_output",
    "load",
    "log_spectral_distance",
    "record",
    "snr_db",
]


def __getattr__(name: str) -> Any:
    """`probes.record`: recording runs modules, so it lives with the runtime in `guard.record`."""
    if name == "record":
        from guard.record import record

        return record
    raise AttributeError(f"module 'probes' has no attribute {name!r}")
