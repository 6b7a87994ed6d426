"""Running a probe's canary cases on a module and judging each run."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from numpy.typing import NDArray

from guard.mnn import Runner, adapt
from probes import Probe, Verdict

__all__ = ["Canary", "init_and_check", "run_canary"]

Outputs = dict[str, NDArray[Any]]


@dataclass(frozen=True, slots=True)
class Canary:
    """A canary's merged verdict, and the outputs of its first failing judgement per case."""

    verdict: Verdict
    failed_outputs: dict[int, Outputs] = field(default_factory=dict)


def init_and_check(
    factory: Callable[..., Any], overrides: Mapping[str, Any], probe: Probe, runs: int
) -> tuple[Runner, Canary]:
    """Call the factory with `overrides` and run the canary on what it built."""
    runner = adapt(factory(**overrides))
    return runner, run_canary(runner, probe, runs)


def run_canary(
    runner: Runner,
    probe: Probe,
    runs: int,
    *,
    gate: AbstractContextManager[Any] | None = None,
    stop_at_failure: bool = False,
) -> Canary:
    """Run every canary case `runs` times, interleaved, on owned copies; one merged verdict.

    Interleaving cases catches a module that hands back the previous call's output; repeating
    them catches MNN's first-run/second-run differences. With `gate` (entered around each
    forward: a live module's lock), judging happens outside it, so callers wait one forward at
    most; `stop_at_failure` ends at the first failing judgement.
    """
    verdicts: list[Verdict] = []
    labels: list[str] = []
    failed: dict[int, Outputs] = {}
    held = gate if gate is not None else contextlib.nullcontext()
    for run in range(runs):
        for index, case in enumerate(probe.cases):
            with held:
                outputs = runner.run([case.inputs[n] for n in probe.input_names])
            verdicts.append(probe.judge(outputs, case=index))
            labels.append(f"canary run {run + 1} case {index}")
            if not verdicts[-1].passed and index not in failed:
                failed[index] = dict(zip(probe.output_names, outputs, strict=False))
                if stop_at_failure:
                    return Canary(Verdict.merge(verdicts, labels), failed)
    return Canary(Verdict.merge(verdicts, labels), failed)
