"""`mnn-guard check`: initialise a model N times on one rung and judge each init's canary.

`run_check` measures (returns a `CheckReport`); `format_check` and `check_json` render it,
with every score of every output on every init, and reasons in full. Each init is judged as
a guarded session judges it (the stored goldens, then a local reference for a near miss).
With a probe recorded under another MNN release the report says so and how far each output
moved from the goldens (`Upgrade`): the upgrade check of docs/upgrading.md.

>>> report = run_check(factory, probe, {}, inits=3)  # doctest: +SKIP
>>> report.degraded  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from guard import mnn
from guard.canary import Canary, init_and_check
from guard.judgement import Judgement
from guard.ladder import STATIC_LOAD
from guard.tools.output import text_table
from probes import Probe
from probes.judges import REPORTED, OutputScore
from probes.measures import snr_db

__all__ = ["CheckReport", "InitCheck", "Upgrade", "check_json", "format_check", "run_check"]

CANARY_RUNS = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class InitCheck:
    """One fresh init: its verdict, the scores of every output, and what MNN printed."""

    init: int
    passed: bool
    scores: Mapping[str, OutputScore]
    reasons: tuple[str, ...]
    notes: tuple[str, ...]
    loaded_static: bool  # asked for dynamic=True; MNN loaded the model statically
    basis: str = "golden"  # what the canary was judged against: golden, local or disputed


@dataclass(frozen=True, slots=True, kw_only=True)
class Upgrade:
    """A probe recorded under another MNN release: how far this one's outputs moved."""

    recorded: str  # the MNN release the probe was recorded with
    running: str  # the MNN release installed here
    moved_db: Mapping[str, float]  # per output, the worst SNR to the goldens over every init
    tight_db: Mapping[str, float | None]  # per output, the SNR limit a session holds it to
    loose_db: Mapping[str, float | None]  # per output, the loose SNR limit

    def verdicts(self) -> dict[str, str]:
        """Per output, what the move means for a guarded session."""
        return {name: self._verdict(name, moved) for name, moved in self.moved_db.items()}

    def _verdict(self, name: str, moved: float) -> str:
        tight, loose = self.tight_db.get(name), self.loose_db.get(name)
        if tight is None or moved >= tight:
            return "within the calibrated limit: judged against the goldens, as before"
        if loose is None or moved >= loose:
            return (
                "computes slightly differently: a session judges it against a local reference "
                "(basis local); re-record the probe under this release to judge it tightly again"
            )
        return (
            "moved beyond the loose limit: this release changes what the model computes; "
            "look at the outputs, then re-record the probe under this release"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckReport:
    """Every init of one `mnn-guard check` run."""

    model: str
    outputs: tuple[str, ...]
    overrides: Mapping[str, Any]
    inits: tuple[InitCheck, ...]
    api: str = "module"  # MNN's API the factory uses: module or session
    upgrade: Upgrade | None = None  # the probe was recorded under another MNN release

    @property
    def degraded(self) -> int:
        """How many inits failed their canary."""
        return sum(not i.passed for i in self.inits)


def run_check(
    factory: Callable[..., Any],
    probe: Probe,
    overrides: Mapping[str, Any],
    *,
    inits: int,
    model: str = "",
    api: str = "module",
    on_failure: Callable[[Canary, float], None] | None = None,
) -> CheckReport:
    """Initialise `factory(**overrides)` `inits` times; judge each init's canary (2 runs) as a
    session would, and measure how far the outputs moved when the probe is from another MNN.

    `on_failure(canary, seconds)` is told of every failed canary (a diagnosis bundle, say).
    """
    judgement = Judgement(probe, factory)
    running = mnn.mnn_version()
    recorded = probe.meta.mnn_version
    moved = {name: math.inf for name in probe.output_names}
    results = []
    for init in range(1, inits + 1):
        start = time.perf_counter()
        runner, canary = init_and_check(factory, overrides, probe, CANARY_RUNS, judgement=judgement)
        if recorded is not None and recorded != running:
            for case in probe.cases:
                outs = runner.run([case.inputs[n] for n in probe.input_names])
                for name, out in zip(probe.output_names, outs, strict=False):
                    golden = case.outputs[name]
                    found = snr_db(golden, out) if out.shape == golden.shape else -math.inf
                    moved[name] = min(moved[name], found)
        verdict = canary.verdict
        if on_failure is not None and not verdict.passed:
            on_failure(canary, time.perf_counter() - start)
        results.append(
            InitCheck(
                init=init,
                passed=verdict.passed,
                scores=dict(verdict.scores),
                reasons=verdict.reasons,
                notes=canary.notes,
                loaded_static=canary.turned_static,
                basis=canary.basis.value,
            )
        )
    upgrade = None
    if recorded is not None and recorded != running:
        upgrade = Upgrade(
            recorded=recorded,
            running=running,
            moved_db=moved,
            tight_db={n: probe.limits_for(n).get("snr_db") for n in probe.output_names},
            loose_db={n: probe.limits_for(n, "loose").get("snr_db") for n in probe.output_names},
        )
    return CheckReport(
        model=model,
        outputs=tuple(probe.output_names),
        overrides=dict(overrides),
        inits=tuple(results),
        api=api,
        upgrade=upgrade,
    )


_FORMATS = {"snr_db": ".1f", "cosine": ".7f", "max_abs": ".3g", "lsd_db": ".3f"}  # else .4g
_HEADINGS = {"snr_db": "SNR dB", "cosine": "cosine", "max_abs": "max abs", "lsd_db": "LSD dB"}


def _number(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}" if math.isfinite(value) else str(value)


def _measures(report: CheckReport) -> list[str]:
    """Every measure any score holds: the reported ones first, then other judges by name."""
    seen = {k for init in report.inits for s in init.scores.values() for k in s.values}
    return [*REPORTED, *sorted(seen - set(REPORTED))]


def _row(init: InitCheck, name: str, measures: list[str]) -> tuple[str, ...]:
    word = "pass" if init.passed else "FAIL"
    score = init.scores.get(name)
    if score is None:
        return (str(init.init), name, word, "missing", *["-"] * (len(measures) - 1))
    values = (_number(score.values.get(m), _FORMATS.get(m, ".4g")) for m in measures)
    return (str(init.init), name, word, *values)


def format_check(report: CheckReport) -> str:
    """A table with one row per init and output (every score), then reasons and notes in full."""
    measures = _measures(report)
    header = ("init", "output", "verdict", *(_HEADINGS.get(m, m) for m in measures))
    rows = [_row(init, name, measures) for init in report.inits for name in report.outputs]
    lines = [text_table(header, rows)]
    for init in report.inits:
        if init.loaded_static:
            lines.append(f"init {init.init}: {STATIC_LOAD}")
        if init.basis != "golden":
            lines.append(f"init {init.init}: judged against a {init.basis} reference")
        lines += [f"init {init.init}: {reason}" for reason in init.reasons]
        lines += [f"init {init.init}: {note}" for note in init.notes]
    api = ", Session API" if report.api == "session" else ""
    what = f"{report.model}{api}, overrides {dict(report.overrides) or 'none'}"
    lines.append(f"{report.degraded} of {len(report.inits)} init(s) degraded ({what})")
    lines += upgrade_lines(report.upgrade)
    return "\n".join(lines)


def upgrade_lines(upgrade: Upgrade | None) -> list[str]:
    """What a probe from another MNN release says about this one: per output, how far the
    outputs moved from the goldens (dB) and what that means."""
    if upgrade is None:
        return []
    lines = [
        f"probe recorded with MNN {upgrade.recorded}, running MNN {upgrade.running}; "
        "how far the outputs moved from the goldens (worst SNR of every init):"
    ]
    for name, verdict in upgrade.verdicts().items():
        moved, tight = upgrade.moved_db[name], upgrade.tight_db.get(name)
        limit = f" (limit {_number(tight, '.1f')} dB)" if tight is not None else ""
        lines.append(f"  {name}: {_number(moved, '.1f')} dB{limit}: {verdict}")
    return lines


def _finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    return value if value is not None and math.isfinite(value) else None


def score_dict(score: OutputScore) -> dict[str, Any]:
    """One output's scores as JSON-ready data (every measure by judge name)."""
    return {
        "passed": score.passed,
        "shape_ok": score.shape_ok,
        "finite": score.finite,
        **{judge: _finite(value) for judge, value in score.values.items()},
        "reasons": score.reasons,
    }


def check_json(report: CheckReport) -> str:
    """The report as a JSON document (non-finite scores are null)."""
    upgrade = report.upgrade
    data = {
        "model": report.model,
        "api": report.api,
        "mnn": None
        if upgrade is None
        else {
            "probe": upgrade.recorded,
            "running": upgrade.running,
            "moved_db": {n: _finite(v) for n, v in upgrade.moved_db.items()},
            "bit_exact": [n for n, v in upgrade.moved_db.items() if v == math.inf],
            "verdicts": upgrade.verdicts(),
        },
        "overrides": dict(report.overrides),
        "degraded": report.degraded,
        "inits": [
            {
                "init": i.init,
                "passed": i.passed,
                "loaded_static": i.loaded_static,
                "basis": i.basis,
                "scores": {n: score_dict(s) for n, s in i.scores.items()},
                "missing": [n for n in report.outputs if n not in i.scores],
                "reasons": list(i.reasons),
                "notes": list(i.notes),
            }
            for i in report.inits
        ],
    }
    return json.dumps(data, indent=2, allow_nan=False, default=str)
