"""Running a probe's canary cases on a module and judging each run."""

from __future__ import annotations

from typing import Any

from guard import mnn
from probes import Probe, Verdict

__all__ = ["run_canary"]


def run_canary(module: Any, probe: Probe, runs: int) -> Verdict:
    """Run every canary case `runs` times, interleaved, on owned copies; one merged verdict.

    Interleaving cases catches a module that hands back the previous call's output; repeating
    them catches MNN's first-run/second-run differences.
    """
    verdicts: list[Verdict] = []
    labels: list[str] = []
    for run in range(runs):
        for index, case in enumerate(probe.cases):
            outputs = mnn.forward(module, [case.inputs[n] for n in probe.input_names])
            verdicts.append(probe.judge(outputs, case=index))
            labels.append(f"canary run {run + 1} case {index}")
    return Verdict.merge(verdicts, labels)
