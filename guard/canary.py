"""Running a probe's canary cases on a module and judging each run."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from guard import mnn
from probes import Probe, Verdict

__all__ = ["run_canary"]


def run_canary(
    module: Any,
    probe: Probe,
    runs: int,
    *,
    gate: Callable[[], AbstractContextManager[Any]] | None = None,
    stop_at_failure: bool = False,
) -> Verdict:
    """Run every canary case `runs` times, interleaved, on owned copies; one merged verdict.

    Interleaving cases catches a module that hands back the previous call's output; repeating
    them catches MNN's first-run/second-run differences. With `gate` (entered around each
    forward: a live module's lock), judging happens outside it, so callers wait one forward at
    most; `stop_at_failure` ends at the first failing judgement.
    """
    verdicts: list[Verdict] = []
    labels: list[str] = []
    for run in range(runs):
        for index, case in enumerate(probe.cases):
            with gate() if gate is not None else contextlib.nullcontext():
                outputs = mnn.forward(module, [case.inputs[n] for n in probe.input_names])
            verdicts.append(probe.judge(outputs, case=index))
            labels.append(f"canary run {run + 1} case {index}")
            if stop_at_failure and not verdicts[-1].passed:
                return Verdict.merge(verdicts, labels)
    return Verdict.merge(verdicts, labels)
