"""Judging a canary by what a clean init computes here: the stored goldens, then a local reference.

A calibrated probe holds a module to what clean inits computed where the probe was recorded
(the "tight" limits). On another machine a clean module may compute slightly differently
(other SIMD kernels, thread counts, an MNN upgrade). So an output that fails the tight limits
against the stored golden but passes the loose ones is judged again, tightly, against a
reference module built here from the probe's reference configuration (for example
`dynamic=True`), whose outputs are computed once per session and kept:

- the reference agrees with the stored golden within the loose limits: the module must pass
  the tight limits against the reference and the loose ones against the golden (basis LOCAL);
- it does not: the guard cannot tell whether the probe is stale for this machine or the
  reference is degraded. It says so (basis DISPUTED, in status, logs and metrics) and judges
  against a reference that two fresh inits agree on, rather than failing every rung.

Where the stored golden passes, nothing else runs (basis GOLDEN).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from numpy.typing import NDArray

from guard import mnn
from guard.ladder import Basis
from probes import Probe, Verdict

__all__ = ["Agreement", "Basis", "Judgement", "Reference"]

Array = NDArray[Any]
Outputs = Mapping[str, Array]


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
        self._unavailable: str | None = None  # why no reference can be built (then: goldens only)

    def judge(
        self, outputs: Sequence[Array], case: int, *, retry_margin_db: float = 0.0
    ) -> tuple[Verdict, Basis]:
        """The verdict on one case's outputs and what it was judged against."""
        probe = self.probe
        verdict = probe.judge(outputs, case, retry_margin_db=retry_margin_db)
        if verdict.passed or probe.calibration is None or len(outputs) != len(probe.outputs):
            return verdict, Basis.GOLDEN
        reference = self.reference()
        if reference is None or reference.agreement[case] is Agreement.TIGHT:
            return verdict, Basis.GOLDEN  # this machine computes the goldens: a real fault
        named = dict(zip(probe.output_names, outputs, strict=True))
        local = probe.judge(
            named, case, goldens=reference.outputs[case], retry_margin_db=retry_margin_db
        )
        if reference.agreement[case] is Agreement.NONE:
            return _relabel(local, "against the local reference"), Basis.DISPUTED
        return _both(local, probe.judge(named, case, tier="loose")), Basis.LOCAL

    def reference(self) -> Reference | None:
        """The reference's outputs for every case, built once (None when it cannot be built)."""
        with self._lock:
            if self._reference is not None or self._unavailable is not None:
                return self._reference
            try:
                self._reference = self._build()
            except Exception as exc:  # the reference config fails here: judge by the goldens
                self._unavailable = f"the reference {self._overrides} could not be built: {exc!r}"
            return self._reference

    @property
    def unavailable(self) -> str | None:
        """Why no local reference could be built, if one was tried and failed."""
        return self._unavailable

    def _agreement(self, outputs: Outputs, case: int) -> Agreement:
        if self.probe.judge(outputs, case).passed:
            return Agreement.TIGHT
        return Agreement.LOOSE if self.probe.judge(outputs, case, tier="loose") else Agreement.NONE

    def _build(self) -> Reference:
        if self._factory is None:
            raise RuntimeError("no factory to build a reference with")
        first = self._run_once()
        agreement = tuple(self._agreement(out, k) for k, out in enumerate(first))
        if Agreement.NONE not in agreement:
            return Reference(first, agreement, f"reference {self._overrides}, one init")
        # the goldens are in dispute: trust a reference only when a second fresh init agrees
        second = self._run_once()
        for k, (a, b) in enumerate(zip(first, second, strict=True)):
            if not self.probe.judge(b, k, goldens=a).passed:
                raise RuntimeError(
                    f"two inits of the reference {self._overrides} disagree on case {k}; "
                    "nothing here computes a stable answer"
                )
        return Reference(first, agreement, f"reference {self._overrides}, two inits that agree")

    def _run_once(self) -> tuple[dict[str, Array], ...]:
        """One fresh reference init and one forward per case."""
        assert self._factory is not None
        probe = self.probe
        loaded, _ = mnn.load(self._factory, self._overrides)
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
