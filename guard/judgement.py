"""Judging a canary by what a clean init computes here: the stored goldens, then a local reference.

A calibrated probe holds a module to what clean inits computed where the probe was recorded
(the "tight" limits). On another machine a clean module may compute slightly differently
(other SIMD kernels, thread counts, an MNN upgrade): an output that fails the tight limits
against the stored golden but passes the loose ones is judged again, tightly, against a
reference module built here from the probe's reference configuration (for example
`dynamic=True`), whose outputs are computed once per session and kept. It must then pass the
tight limits against the reference and the loose ones against the golden (basis LOCAL).

When every rung fails and every init of every rung computed the same outputs, outputs that
are no silence or noise (above 0 dB against the goldens) yet beyond the loose limits, the
guard cannot tell whether the probe is stale for this machine or every init is degraded the
same way. It says so (basis DISPUTED, in status, logs and metrics) and judges against what
they agree on, rather than taking a fleet down on a new machine.

Where the stored golden passes, nothing else runs (basis GOLDEN).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard import mnn
from guard.ladder import Basis
from guard.sentinels import loading
from probes import Probe, Verdict
from probes.measures import snr_db

__all__ = ["Agreement", "Basis", "Judgement", "Reference"]

Array = NDArray[Any]
Outputs = Mapping[str, Array]


MAX_BUILDS = 3  # reference inits tried per session before judging by the goldens alone


class Agreement(enum.StrEnum):
    """How a reference's outputs for one case compare with the stored goldens."""

    TIGHT = "tight"  # within the tight limits: this machine computes as the recording one did
    LOOSE = "loose"  # within the loose limits only: it computes slightly differently
    NONE = "none"  # beyond the loose limits: the goldens or the reference are wrong here


@dataclass(frozen=True, slots=True)
class Reference:
    """A reference module's outputs for every canary case, and how they compare with the goldens."""

    outputs: tuple[dict[str, Array], ...]  # by case
    agreement: tuple[Agreement, ...]  # by case
    note: str  # how it was built, for logs


class Judgement:
    """A session's judge of canary outputs: stored goldens first, a local reference when needed."""

    def __init__(
        self,
        probe: Probe,
        factory: Callable[..., Any] | None,
        *,
        reference: Mapping[str, Any] | None = None,
    ) -> None:
        self.probe = probe
        self._factory = factory
        self._overrides = dict(probe.meta.reference if reference is None else reference)
        self._lock = threading.Lock()
        self._reference: Reference | None = None
        self._builds = 0  # reference inits tried (a degraded one is dropped, up to MAX_BUILDS)
        self._unavailable: str | None = None  # why no reference can be built (then: goldens only)
        self._disputed: tuple[dict[str, Array], ...] | None = None

    def with_probe(self, probe: Probe, reference: Mapping[str, Array]) -> Judgement:
        """This judgement for `probe`, which has one more case (a live one: its goldens are
        `reference`, computed here), keeping what was built or agreed for the others."""
        new = Judgement(probe, self._factory, reference=self._overrides)
        with self._lock:
            new._builds, new._unavailable = self._builds, self._unavailable
            if self._reference is not None:
                new._reference = Reference(
                    (*self._reference.outputs, dict(reference)),
                    (*self._reference.agreement, Agreement.TIGHT),
                    self._reference.note,
                )
            if self._disputed is not None:
                new._disputed = (*self._disputed, dict(reference))
        return new

    @property
    def disputed(self) -> bool:
        """True once the session judges against outputs its every init agreed on."""
        return self._disputed is not None

    def judge(
        self, outputs: Sequence[Array], case: int, *, retry_margin_db: float = 0.0
    ) -> tuple[Verdict, Basis]:
        """The verdict on one case's outputs and what it was judged against."""
        probe = self.probe
        verdict = probe.judge(outputs, case, retry_margin_db=retry_margin_db)
        if verdict.passed or probe.calibration is None or len(outputs) != len(probe.outputs):
            return verdict, Basis.GOLDEN
        named = dict(zip(probe.output_names, outputs, strict=True))
        if self._disputed is not None:
            local = probe.judge(
                named, case, goldens=self._disputed[case], retry_margin_db=retry_margin_db
            )
            return _relabel(local, "against what every init here agreed on"), Basis.DISPUTED
        if not probe.judge(named, case, tier="loose").passed:
            return verdict, Basis.GOLDEN  # a gross fault: no machine computes that differently
        reference = self.reference()
        if reference is None or reference.agreement[case] is Agreement.TIGHT:
            return verdict, Basis.GOLDEN  # this machine computes the goldens: a real fault
        local = probe.judge(
            named, case, goldens=reference.outputs[case], retry_margin_db=retry_margin_db
        )
        return _both(local, probe.judge(named, case, tier="loose")), Basis.LOCAL

    def reference(self) -> Reference | None:
        """The reference's outputs for every case, built when first needed (None when no
        usable one can be built: an init beyond the loose limits is dropped and built again)."""
        with self._lock:
            while self._reference is None and self._unavailable is None:
                self._builds += 1
                try:
                    first = self._run_once()
                except Exception as exc:  # the reference config fails here: goldens only
                    self._unavailable = f"the reference {self._overrides} failed: {exc!r}"
                    break
                agreement = tuple(self._agreement(out, k) for k, out in enumerate(first))
                if Agreement.NONE not in agreement:
                    note = f"reference {self._overrides}, init {self._builds}"
                    self._reference = Reference(first, agreement, note)
                elif self._builds >= MAX_BUILDS:
                    self._unavailable = (
                        f"{MAX_BUILDS} inits of the reference {self._overrides} were all beyond "
                        "the loose limits of the goldens"
                    )
            return self._reference

    @property
    def unavailable(self) -> str | None:
        """Why no local reference could be built, if one was tried and failed."""
        return self._unavailable

    def dispute(self, failed: Sequence[Mapping[int, Mapping[str, Array]]]) -> str | None:
        """After every rung failed: when the failed inits (two or more) all computed the same
        outputs for every case, outputs above 0 dB against the goldens and not constant, judge
        against those from now on (DISPUTED) and say why; else None (the ladder is exhausted)."""
        probe = self.probe
        cases = range(len(probe.cases))
        complete = [f for f in failed if all(k in f for k in cases)]
        if probe.calibration is None or self._disputed is not None or len(complete) < 2:
            return None
        if len(complete) != len(failed):
            return None  # an init that raised or returned nothing is no agreement
        first = complete[0]
        for other in complete[1:]:
            if not all(probe.judge(other[k], k, goldens=first[k]).passed for k in cases):
                return None  # inits that differ: degraded ones, as the guard exists to catch
        for k in cases:
            for name in probe.output_names:
                out, golden = first[k][name], probe.cases[k].outputs[name]
                if out.shape != golden.shape or np.ptp(out) == 0 or not snr_db(golden, out) > 0:
                    return None  # silence, a constant or noise: broken, not another machine
        self._disputed = tuple(dict(first[k]) for k in cases)
        worst = min(
            snr_db(probe.cases[k].outputs[n], first[k][n])
            for k in cases
            for n in probe.output_names
        )
        return (
            f"all {len(complete)} inits computed the same outputs, {worst:.1f} dB from the "
            "probe's goldens (beyond their loose limits): the probe may be stale for this "
            "machine or MNN, or every init is degraded the same way; the guard cannot tell, "
            "and judges against what the inits agree on (basis disputed)"
        )

    def _agreement(self, outputs: Outputs, case: int) -> Agreement:
        if self.probe.judge(outputs, case).passed:
            return Agreement.TIGHT
        return Agreement.LOOSE if self.probe.judge(outputs, case, tier="loose") else Agreement.NONE

    def _run_once(self) -> tuple[dict[str, Array], ...]:
        """One fresh reference init and one forward per case."""
        if self._factory is None:
            raise RuntimeError("no factory to build a reference with")
        probe = self.probe
        loaded, _ = mnn.load(self._factory, loading(probe, self._overrides))
        runner = mnn.adapt(loaded, probe.input_names, probe.output_names)
        results = []
        for case in probe.cases:
            outs = runner.run([case.inputs[n] for n in probe.input_names])
            if len(outs) != len(probe.outputs):
                raise RuntimeError(f"the reference returned {len(outs)} outputs")
            results.append(dict(zip(probe.output_names, outs, strict=True)))
        return tuple(results)


def _relabel(verdict: Verdict, where: str) -> Verdict:
    return Verdict(verdict.passed, verdict.scores, tuple(f"{r} ({where})" for r in verdict.reasons))


def _both(local: Verdict, loose: Verdict) -> Verdict:
    """Passes when both pass: the scores against the reference, every reason of either."""
    reasons = (
        *(f"{r} (against the local reference)" for r in local.reasons),
        *(f"{r} (against the stored golden, loose limits)" for r in loose.reasons),
    )
    return Verdict(local.passed and loose.passed, local.scores, reasons)
