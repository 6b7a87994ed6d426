"""Running a probe's canary cases on a module and judging each run."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any

from numpy.typing import NDArray

from guard.judgement import Basis, Judgement
from guard.mnn import Runner, adapt, load, why_no_outputs
from guard.sentinels import loading
from probes import Probe, Verdict

__all__ = ["Canary", "init_and_check", "run_canary"]

Outputs = dict[str, NDArray[Any]]


@dataclass(frozen=True, slots=True)
class Canary:
    """A canary's merged verdict, the outputs of its first failing judgement per case, and
    what MNN printed while loading the module and on a forward that returned too few outputs."""

    verdict: Verdict
    failed_outputs: dict[int, Outputs] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    turned_static: bool = False  # MNN loaded the module statically although dynamic=True
    basis: Basis = Basis.GOLDEN  # what the canary was judged against (the furthest of its runs)


def init_and_check(
    factory: Callable[..., Any],
    overrides: Mapping[str, Any],
    probe: Probe,
    runs: int,
    *,
    judgement: Judgement | None = None,
    retry_margin_db: float = 0.0,
) -> tuple[Runner, Canary]:
    """Call the factory with `overrides` and run the canary on what it built.

    What MNN printed while loading is in the canary's notes; if the canary raises, the same
    lines are attached to the exception (`add_note`).
    """
    module, report = load(factory, loading(probe, overrides))
    runner = adapt(module, probe.input_names, probe.output_names)
    try:
        canary = run_canary(
            runner, probe, runs, judgement=judgement, retry_margin_db=retry_margin_db
        )
    except Exception as exc:
        for note in report.notes:
            exc.add_note(f"MNN while loading: {note}")
        raise
    said = (f"MNN while loading: {note}" for note in report.notes)
    notes = tuple(dict.fromkeys((*said, *canary.notes)))
    return runner, replace(canary, notes=notes, turned_static=report.turned_static)


def run_canary(
    runner: Runner,
    probe: Probe,
    runs: int,
    *,
    judgement: Judgement | None = None,
    retry_margin_db: float = 0.0,
    gate: AbstractContextManager[Any] | None = None,
    stop_at_failure: bool = False,
) -> Canary:
    """Run every canary case `runs` times, interleaved, on owned copies; one merged verdict.

    Interleaving cases catches a module that hands back the previous call's output; repeating
    them catches MNN's first-run/second-run differences. With `gate` (entered around each
    forward: a live module's lock), judging happens outside it, so callers wait one forward at
    most; `stop_at_failure` ends at the first failing judgement. `judgement` (the session's)
    judges against a local reference where the stored goldens do not decide; `retry_margin_db`
    raises the SNR limits for a re-init after a failed one.
    """
    judge = judgement if judgement is not None else Judgement(probe, None)
    basis = Basis.GOLDEN
    verdicts: list[Verdict] = []
    labels: list[str] = []
    cases: list[int] = []  # the case of each judgement
    failed: dict[int, Outputs] = {}
    notes: tuple[str, ...] = ()
    held = gate if gate is not None else contextlib.nullcontext()
    for run in range(runs):
        for index, case in enumerate(probe.cases):
            arrays = [case.inputs[n] for n in probe.input_names]
            with held:
                outputs = runner.run(arrays)
                if len(outputs) < len(probe.outputs) and not notes and gate is None:
                    said = why_no_outputs(runner, arrays)
                    notes = tuple(f"MNN on a canary forward: {line}" for line in said)
            verdict, judged = judge.judge(outputs, index, retry_margin_db=retry_margin_db)
            verdicts.append(verdict)
            basis = max(basis, judged, key=lambda b: b.rank)
            labels.append(f"canary run {run + 1} case {index}")
            cases.append(index)
            if not verdict.passed and index not in failed:
                failed[index] = dict(zip(probe.output_names, outputs, strict=False))
                if stop_at_failure:
                    merged = Verdict.merge(verdicts, labels, cases=cases)
                    return Canary(merged, failed, notes, basis=basis)
    return Canary(Verdict.merge(verdicts, labels, cases=cases), failed, notes, basis=basis)
