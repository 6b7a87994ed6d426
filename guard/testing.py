"""Fault injectors for your own tests: real MNN modules underneath, degraded for their whole life.

>>> faulty = FaultyFactory(factory, fault=Fault.NOISE, rate=0.1, seed=7)  # doctest: +SKIP
>>> session = guard.wrap(faulty, probe, name="vocoder")  # doctest: +SKIP
>>> faulty.degraded_inits  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import enum
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard import mnn
from guard.errors import ConfigError
from guard.ladder import Action, Attempt, Rung
from guard.listeners import Call, Listener
from guard.shadow import ShadowCheck
from guard.state import SessionStatus

__all__ = [
    "Affects",
    "Captured",
    "CapturingListener",
    "DegradedModule",
    "Fault",
    "FaultyFactory",
    "Frames",
    "LouderThan",
    "Trigger",
    "degrade",
]

Array = NDArray[Any]


class Affects(enum.StrEnum):
    """Which inits a FaultyFactory may degrade."""

    STATIC = "static"  # every init but dynamic=True ones, as in the field reports
    ALL = "all"


class Fault(enum.StrEnum):
    """How a degraded init misbehaves."""

    NOISE = "noise"  # additive noise at `snr_db` on every output
    ZEROS = "zeros"  # every output all zeros
    NAN = "nan"  # every output NaN
    STALE = "stale"  # every call returns the previous call's outputs (the view-reuse bug)
    SHAPE = "shape"  # outputs cut to half their last axis
    MISSING = "missing"  # forward returns no outputs (as MNN does on an internal shape error)
    SWAP = "swap"  # the init loads `replacement(**overrides)` instead (e.g. a rebuilt noisy model)
    RAISE = "raise"  # the factory raises
    HANG = "hang"  # the factory blocks for `hang_seconds`
    # the factory blocks for `hang_seconds` in a native call that holds the GIL, as a hang
    # inside MNN does: no thread of the process runs, so only another process can end it
    HANG_NATIVE = "hang_native"
    NO_FORWARD = "no_forward"  # the factory returns an object without forward()


Trigger = Callable[[Sequence[Array]], bool]
"""Which forwards a degraded module degrades, by their inputs (None: every forward)."""


@dataclass(frozen=True, slots=True)
class LouderThan:
    """A trigger: forwards where some input's peak magnitude is above `level`."""

    level: float

    def __call__(self, arrays: Sequence[Array]) -> bool:
        return any(a.size and float(np.max(np.abs(a))) > self.level for a in arrays)


@dataclass(frozen=True, slots=True)
class Frames:
    """A trigger: forwards where some input's `axis` is exactly `count` long (another shape)."""

    count: int
    axis: int = -1

    def __call__(self, arrays: Sequence[Array]) -> bool:
        return any(a.ndim and a.shape[self.axis] == self.count for a in arrays)


def degrade(
    arrays: Sequence[Array], fault: Fault, rng: np.random.Generator, snr_db: float
) -> list[Array]:
    """Apply an output fault to owned arrays."""
    out: list[Array] = []
    for a in arrays:
        if fault is Fault.NOISE:
            rms = float(np.sqrt(np.mean(np.square(a, dtype=np.float64)))) or 1.0
            sigma = rms / (10.0 ** (snr_db / 20.0))
            out.append((a + rng.normal(0.0, sigma, a.shape)).astype(a.dtype))
        elif fault is Fault.ZEROS:
            out.append(np.zeros_like(a))
        elif fault is Fault.NAN:
            out.append(np.full_like(a, np.nan))
        elif fault is Fault.SHAPE:
            out.append(np.ascontiguousarray(a[..., : max(1, a.shape[-1] // 2)]))
        else:
            out.append(a)
    return out


class DegradedModule:
    """Wraps a real module so that every forward after the first `after` is degraded.

    A numpy-level Runner (`run(arrays) -> arrays`): the guard uses it as it is. The module may
    be an MNN Module, a Session-API `(interpreter, session)` pair or any Runner.
    """

    def __init__(
        self,
        module: Any,
        fault: Fault,
        *,
        seed: int | None = None,
        snr_db: float = 29.0,
        after: int = 0,
        trigger: Trigger | None = None,
    ) -> None:
        self.module = module
        self.trigger = trigger
        self.runner = mnn.adapt(module)
        self.fault = fault
        self.snr_db = snr_db
        self.after = after
        self.forwards = 0
        self._rng = np.random.default_rng(seed)
        self._previous: list[Array] | None = None

    def bind(self, inputs: Sequence[str] | None, outputs: Sequence[str] | None) -> DegradedModule:
        """Bind a session's tensors to the probe's names (see `guard.mnn.adapt`); same faults."""
        self.runner = mnn.adapt(self.runner, inputs, outputs)
        return self

    def run(self, arrays: Sequence[Array]) -> list[Array]:
        """Run the real module, then degrade its outputs."""
        outputs = self.runner.run(arrays)
        self.forwards += 1
        if self.forwards <= self.after or (self.trigger is not None and not self.trigger(arrays)):
            return outputs
        if self.fault is Fault.MISSING:
            return []
        if self.fault is Fault.STALE:
            previous, self._previous = self._previous, outputs
            return previous if previous is not None else outputs
        return degrade(outputs, self.fault, self._rng, self.snr_db)


class _NoForward:
    """What a broken factory might return."""

    def __init__(self, module: Any) -> None:
        self.module = module


class FaultyFactory(mnn.Loader):
    """Wraps a real factory so that chosen inits come out degraded for their whole life.

    Which inits: an explicit `schedule` (True = degraded, by init number; clean after it ends),
    or each init independently with probability `rate`. `affects` limits faults to inits whose
    overrides it accepts; the default spares `dynamic=True` inits, as in the field reports,
    except those MNN loads statically all the same (a model with control flow: the load
    report's `turned_static`), which degrade as static ones do.
    With `degrade_after=K` a degraded module serves K clean forwards (canary runs included)
    before it turns: corruption that appears after init, for testing re-checks. A `trigger`
    (`LouderThan`, `Frames`, any picklable callable of the inputs) limits output faults to
    the forwards it accepts: a fault only live inputs show, for testing shadow checks.
    Picklable (for guard.Pool and doctor) when the wrapped factory is; with
    `per_process=True` the seed is mixed with the process id so that workers differ.
    """

    def __init__(
        self,
        factory: Callable[..., Any],
        *,
        fault: Fault | str = Fault.NOISE,
        rate: float = 0.0,
        schedule: Sequence[bool] | None = None,
        seed: int | None = 0,
        per_process: bool = False,
        snr_db: float = 29.0,
        affects: Callable[[Mapping[str, Any]], bool] | Affects | str = Affects.STATIC,
        replacement: Callable[..., Any] | None = None,
        hang_seconds: float = 3600.0,
        degrade_after: int = 0,
        trigger: Trigger | None = None,
    ) -> None:
        self.factory = factory
        self.trigger = trigger
        self.fault = Fault(fault)
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"rate must be within 0..1, got {rate}")
        if self.fault is Fault.SWAP and replacement is None:
            raise ConfigError("Fault.SWAP needs a replacement factory")
        self.rate = rate
        self.schedule = tuple(bool(s) for s in schedule) if schedule is not None else None
        self.seed = seed
        self.per_process = per_process
        self.snr_db = snr_db
        self.affects = affects if callable(affects) else Affects(affects)
        self.replacement = replacement
        self.hang_seconds = hang_seconds
        self.degrade_after = degrade_after
        self.inits = 0
        self.degraded_inits = 0
        self._rng: np.random.Generator | None = None
        self._lock = threading.Lock()

    # Mirror the wrapped factory's model description so the guard can check the probe.
    @property
    def path(self) -> Any:
        """The wrapped factory's model path, if it has one."""
        return getattr(self.factory, "path", None)

    @property
    def inputs(self) -> Any:
        """The wrapped factory's input names, if it has them."""
        return getattr(self.factory, "inputs", None)

    @property
    def outputs(self) -> Any:
        """The wrapped factory's output names, if it has them."""
        return getattr(self.factory, "outputs", None)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_lock"] = None
        state["_rng"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _applies(self, overrides: Mapping[str, Any], turned_static: bool) -> bool:
        if callable(self.affects):
            return bool(self.affects(overrides))
        static = turned_static or not overrides.get("dynamic", False)
        return self.affects is Affects.ALL or static

    def _decide(self, overrides: Mapping[str, Any], turned_static: bool) -> tuple[bool, int]:
        with self._lock:
            number = self.inits
            self.inits += 1
            if self._rng is None:
                seed = self.seed
                if self.per_process and seed is not None:
                    seed = hash((seed, os.getpid())) & 0xFFFFFFFF
                self._rng = np.random.default_rng(seed)
            draw = float(self._rng.random())
            if not self._applies(overrides, turned_static):
                return False, number
            if self.schedule is not None:
                bad = number < len(self.schedule) and self.schedule[number]
            else:
                bad = draw < self.rate
            self.degraded_inits += bad
            return bad, number

    def load(self, **overrides: Any) -> tuple[Any, mnn.LoadReport]:
        """A real module (degraded when this init is chosen) and the wrapped factory's report
        of what MNN said while loading it (`guard.mnn.load`).

        The real module is loaded first: its report says whether MNN honoured dynamic=True.
        """
        module, report = mnn.load(self.factory, overrides)
        bad, number = self._decide(overrides, report.turned_static)
        if not bad:
            return module, report
        if self.fault is Fault.RAISE:
            raise RuntimeError(f"injected factory failure on init {number}")
        if self.fault is Fault.HANG:
            time.sleep(self.hang_seconds)
            return module, report
        if self.fault is Fault.HANG_NATIVE:
            ctypes.PyDLL(None).sleep(math.ceil(self.hang_seconds))  # libc's sleep, GIL held
            return module, report
        if self.fault is Fault.SWAP:
            assert self.replacement is not None
            return mnn.load(self.replacement, overrides)
        if self.fault is Fault.NO_FORWARD:
            return _NoForward(module), report
        seed = None if self.seed is None else self.seed + number
        degraded = DegradedModule(
            module,
            self.fault,
            seed=seed,
            snr_db=self.snr_db,
            after=self.degrade_after,
            trigger=self.trigger,
        )
        return degraded, report


@dataclass(frozen=True, slots=True)
class Captured:
    """One listener event, by name: what happened, to which session, on which rung."""

    kind: str  # init, attempt, check, recover, status, run, close
    session: str
    rung: str | None = None
    outcome: str | None = None  # attempt and check: pass, fail, error, timeout
    action: str | None = None  # recover: reinit, fallback, promote
    to_rung: str | None = None  # recover
    state: str | None = None  # status: the session's State value
    healthy: bool | None = None  # status
    result: str | None = None  # run: ok, error, ...; shadow: pass, fail, dropped
    check: Any = None  # shadow: the guard.shadow.ShadowCheck


class CapturingListener(Listener):
    """Keeps every event as a `Captured` in `.events`, for tests."""

    def __init__(self) -> None:
        self.events: list[Captured] = []

    def on_init(self, session: str, rung: Rung) -> None:
        self.events.append(Captured("init", session, rung.name))

    def on_attempt(self, session: str, attempt: Attempt) -> None:
        self.events.append(
            Captured("attempt", session, attempt.rung.name, outcome=attempt.outcome.value)
        )

    def on_check(self, session: str, attempt: Attempt) -> None:
        self.events.append(
            Captured("check", session, attempt.rung.name, outcome=attempt.outcome.value)
        )

    def on_recover(self, session: str, action: Action, from_rung: Rung, to_rung: Rung) -> None:
        self.events.append(
            Captured("recover", session, from_rung.name, action=action.value, to_rung=to_rung.name)
        )

    def on_status(self, session: str, status: SessionStatus) -> None:
        self.events.append(
            Captured(
                "status", session, status.mode, state=status.state.value, healthy=status.healthy
            )
        )

    def on_run(self, session: str, rung: Rung, seconds: float, result: Call) -> None:
        self.events.append(Captured("run", session, rung.name, result=result.value))

    def on_shadow(self, session: str, check: ShadowCheck) -> None:
        self.events.append(Captured("shadow", session, result=check.result.value, check=check))

    def on_close(self, session: str) -> None:
        self.events.append(Captured("close", session))

    def of(self, kind: str) -> list[Captured]:
        """Events of one kind, in order."""
        return [e for e in self.events if e.kind == kind]
