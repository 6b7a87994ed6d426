"""Shadow checks: every N-th live call is judged, off the request path, against a reference.

The canary judges only the recorded inputs; a module degraded only for inputs unlike them (another
shape, loud audio) passes it. A session with `Policy.shadow_every=N` copies every N-th call's
inputs and served outputs into a small queue (a full queue drops the sample and counts it,
never waits). One background thread per session runs each sample's inputs on a reference
module (the probe's reference configuration, `dynamic=True` by default, built when the session
first serves and kept) and judges the served outputs against the reference's with the probe's
limits (the calibrated ones where the probe has them). The session acts on a divergence
(`GuardedSession._diverged`): the module leaves service, and the live inputs join its canary.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard import reference as references
from guard.ladder import Rung
from guard.reference import Reference, ReferenceLost, ReferenceModule, Where
from guard.sentinels import loading
from probes import Probe, Verdict
from probes.judges import OutputScore, judge_output
from probes.probe import Case

__all__ = [
    "CAPACITY",
    "MAX_CASES",
    "Reference",
    "Sample",
    "Shadow",
    "ShadowCheck",
    "ShadowResult",
    "ShadowStatus",
    "Where",
]

Array = NDArray[Any]
CAPACITY = 4  # sampled calls waiting for the shadow thread at most
MAX_CASES = 8  # diverging live calls a session adds to its canary, at most
log = logging.getLogger("mnn_guard")


class ShadowResult(enum.StrEnum):
    """How one sampled call ended (the `result` label of mnn_guard_shadow_checks_total)."""

    PASS = "pass"
    FAIL = "fail"
    DROPPED = "dropped"  # the queue was full: not checked


@dataclass(frozen=True, slots=True)
class Sample:
    """One sampled call: owned copies of its inputs (model order) and served outputs."""

    inputs: tuple[Array, ...]
    served: tuple[Array, ...]
    generation: int  # which installed module served it (the session counts installs)
    rung_index: int = 0  # the ladder rung that module is on
    rung: Rung | None = None


@dataclass(frozen=True, slots=True)
class ShadowCheck:
    """A sampled call's judgement (or its drop), for listeners."""

    result: ShadowResult
    verdict: Verdict | None = None
    sample: Sample | None = None
    reference: Mapping[str, Array] = field(default_factory=dict)  # every probe output
    seconds: float = 0.0
    module_worst_db: float = math.nan  # the worst SNR of the module in use's checks so far

    def case(self, probe: Probe) -> Case:
        """The sampled call as a canary case of `probe`: its inputs, the reference's outputs as
        the golden (ProbeError when they cannot be one, e.g. NaN)."""
        assert self.sample is not None
        inputs = dict(zip(probe.input_names, self.sample.inputs, strict=True))
        return Case(inputs=inputs, outputs=dict(self.reference))

    @property
    def worst_snr_db(self) -> float:
        """The lowest SNR of the served outputs against the reference's (NaN when unjudged)."""
        return self.verdict.worst_snr_db if self.verdict is not None else math.nan


@dataclass(frozen=True, slots=True)
class ShadowStatus:
    """A session's shadow checks so far."""

    every: int
    reference: Reference
    checks: int
    failed: int
    dropped: int
    worst_snr_db: float  # since the module in use was installed (inf: nothing checked yet)
    error: str | None = None  # why no reference could be built, or why it stopped
    where: Where = Where.NONE  # where the reference runs
    pid: int | None = None  # the reference process, when it has one


class Shadow:
    """A session's shadow checker: a bounded queue, one thread, one reference module."""

    def __init__(
        self,
        name: str,
        probe: Probe,
        factory: Callable[..., Any],
        *,
        every: int,
        on_check: Callable[[ShadowCheck], None],  # a bound method
        capacity: int = CAPACITY,
        process: bool = True,
        timeout: float = 60.0,
    ) -> None:
        self.name = name
        self.probe = probe  # replaced by the session when diverging inputs join its canary
        self.every = every
        self._factory = factory
        self._overrides = dict(probe.meta.reference)
        # a bound method of the session, held weakly: this thread must not keep it alive
        self._on_check = weakref.WeakMethod(on_check)
        self._queue: queue.Queue[Sample | None] = queue.Queue(capacity)
        self._lock = threading.Lock()
        self._process = process  # the reference in a process of its own, where one can start
        self._timeout = timeout  # to build the reference, and for one reference forward
        self._module: ReferenceModule | None = None
        self._error: str | None = None
        self._checks = self._failed = self._dropped = 0
        self._worst = math.inf
        self._generation = 0  # the module in use (see `installed`)
        self._thread = threading.Thread(
            target=self._loop, name=f"mnn-guard-shadow-{name}", daemon=True
        )
        self._started = False
        self._closed = False
        self._ready = threading.Event()  # the reference was built (or could not be)

    # ------------------------------------------------------------ request path

    def start(self) -> None:
        """Start the thread (it builds the reference first, off the request path)."""
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the reference was built or found unbuildable; False if `timeout` passed."""
        return self._ready.wait(timeout)

    def offer(
        self,
        arrays: Sequence[Array],
        served: Sequence[Array],
        generation: int,
        rung: tuple[int, Rung],
    ) -> None:
        """Queue a copy of one call for checking; a full queue drops it (counted), never waits."""
        sample = Sample(
            tuple(np.array(a, copy=True) for a in arrays),
            tuple(np.array(o, copy=True) for o in served),
            generation,
            *rung,
        )
        try:
            self._queue.put_nowait(sample)
        except queue.Full:
            with self._lock:
                self._dropped += 1
            self._notify(ShadowCheck(ShadowResult.DROPPED))

    # ------------------------------------------------------------ the thread

    def _loop(self) -> None:
        try:
            self._build()
        finally:
            self._ready.set()
        while True:
            sample = self._queue.get()
            if sample is None:
                return
            try:
                check = self._check(sample)
            except Exception as exc:  # a reference forward that raised: no judgement
                log.warning("session %s: shadow check failed to run: %r", self.name, exc)
                continue
            if check is not None:
                self._notify(check)

    def _build(self) -> None:
        """Build the reference module (kept for the session's life), in a process of its own
        where one can start (else on this thread, with a warning that says what that costs)."""
        probe = self.probe
        try:
            module, refusal = references.start(
                self._factory, loading(probe, self._overrides), probe.input_names,
                probe.output_names, timeout=self._timeout, process=self._process,
            )  # fmt: skip
        except Exception as exc:
            with self._lock:
                self._error = f"the reference {self._overrides} could not be built: {exc}"
            log.error("session %s: no shadow checks: %s", self.name, self._error)
            return
        if refusal is not None:
            log.warning(
                "session %s: the shadow's reference runs on a thread of this process, not in "
                "its own: %s; each of its forwards holds the GIL, stalling requests meanwhile",
                self.name, refusal,
            )  # fmt: skip
        with self._lock:
            closed = self._closed
            if not closed:
                self._module = module
        if closed:  # the session closed while the reference was being built
            module.close()

    def _check(self, sample: Sample) -> ShadowCheck | None:
        """Run the sample on the reference and judge the served outputs against it."""
        module = self._module
        if module is None:
            return None
        probe = self.probe
        start = time.perf_counter()
        try:
            outputs = module.run(sample.inputs)
        except ReferenceLost as exc:  # the process is gone: no later sample is judged
            with self._lock:
                self._module, self._error = None, str(exc)
            if not self._closed:
                log.error("session %s: no more shadow checks: %s", self.name, exc)
            return None
        if len(outputs) != len(probe.outputs):
            log.warning(
                "session %s: the shadow reference returned %d outputs for a live call, "
                "expected %d; not judged", self.name, len(outputs), len(probe.outputs),
            )  # fmt: skip
            return None
        reference = dict(zip(probe.output_names, outputs, strict=True))
        verdict = _judge(probe, sample.served, reference)
        seconds = time.perf_counter() - start
        with self._lock:
            self._checks += 1
            self._failed += not verdict.passed
            if sample.generation == self._generation:  # not a module replaced meanwhile
                self._worst = min(self._worst, verdict.worst_snr_db)
            worst = self._worst
        result = ShadowResult.PASS if verdict.passed else ShadowResult.FAIL
        return ShadowCheck(result, verdict, sample, reference, seconds, worst)

    def _notify(self, check: ShadowCheck) -> None:
        handler = self._on_check()
        if handler is None:  # the session was collected (it closes this shadow meanwhile)
            return
        try:
            handler(check)
        except Exception:  # the session's handler: never fatal to the thread
            log.exception("session %s: the shadow check's handler failed", self.name)

    # ------------------------------------------------------------ state

    def installed(self, generation: int) -> None:
        """A new module serves (the session's `generation`-th): the worst SNR starts over."""
        with self._lock:
            self._generation = generation
            self._worst = math.inf

    @property
    def status(self) -> ShadowStatus:
        """The checks so far, and what the shadow compares against."""
        with self._lock:
            module = self._module
            return ShadowStatus(
                every=self.every,
                reference=Reference.NONE if module is None else module.kind,
                checks=self._checks,
                failed=self._failed,
                dropped=self._dropped,
                worst_snr_db=self._worst,
                error=self._error,
                where=Where.NONE if module is None else module.where,
                pid=None if module is None else module.pid,
            )

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (after the sample in hand) and drop the reference module."""
        with self._lock:
            self._closed = True
            started = self._started
        if started:
            while True:  # make room for the stop sign: pending samples are not checked
                try:
                    self._queue.put_nowait(None)
                    break
                except queue.Full:
                    with contextlib.suppress(queue.Empty):
                        self._queue.get_nowait()
            if self._thread is not threading.current_thread():
                self._thread.join(timeout)
        with self._lock:
            module, self._module = self._module, None
        if module is not None:
            module.close()


def _judge(probe: Probe, served: Sequence[Array], reference: Mapping[str, Array]) -> Verdict:
    """The served outputs against the reference's, with the probe's (tight) limits."""
    scores: dict[str, OutputScore] = {}
    reasons: list[str] = []
    for name, actual in zip(probe.served_names, served, strict=True):
        score = judge_output(name, reference[name], actual, probe.limits_for(name))
        scores[name] = score
        reasons.extend(score.reasons)
    return Verdict(not reasons, scores, tuple(reasons))
