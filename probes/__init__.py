"""Canary probes: inputs, golden outputs, limits per judge, and the judgement of a module's outputs.

>>> import probes
>>> probe = probes.record(factory, {"mel": mel}, reference={"dynamic": True})  # doctest: +SKIP
>>> probe.save("probes/vocoder")  # doctest: +SKIP
>>> probes.load("probes/vocoder").judge({"wav": wav}).passed  # doctest: +SKIP
"""

from probes.calibration import Calibration
from probes.errors import CanaryWarning, ProbeError
from probes.judges import register_judge
from probes.limits import Limits, Thresholds
from probes.probe import Case, Probe, Verdict, load
from probes.recording import record
from probes.store import ProbeVersionWarning

__all__ = [
    "Calibration",
    "CanaryWarning",
    "Case",
    "Limits",
    "Probe",
    "ProbeError",
    "ProbeVersionWarning",
    "Thresholds",
    "Verdict",
    "load",
    "record",
    "register_judge",
]
