"""Sessions on a plan: a factory whose n-th init is scripted, real demo-vocoder modules that
turn or count their forwards, and the listeners that read what a session did.

Real modules throughout; faults wrap them; only time is faked (conftest.FakeClock).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from conftest import FakeClock, reference
from prometheus_client import CollectorRegistry

import guard
import probes
from guard import mnn
from guard.ladder import Attempt
from guard.testing import Fault, FaultyFactory
from guard.tools import demo
from probes import measures

Array = np.ndarray[Any, Any]
CANARY_FORWARDS = 4  # Policy.canary_runs (2) x the demo probe's cases (2)


def sample(registry: CollectorRegistry, name: str, session: str = "p", **labels: str) -> Any:
    """One sample of session `session`, None when the series does not exist."""
    return registry.get_sample_value(name, {"session": session, **labels})


class Turning:
    """A real demo-vocoder module whose forwards after the first `after` go through `fault`."""

    def __init__(self, fault: Callable[[list[Array]], list[Array]], after: int, **kw: Any):
        self.runner = mnn.adapt(demo.demo_factory(threads=1)(**kw))
        self.fault = fault
        self.after = after
        self.forwards = 0

    def run(self, arrays: Sequence[Array]) -> list[Array]:
        """Run the real module; degrade what it returns once `after` forwards are done."""
        outputs = self.runner.run(arrays)
        self.forwards += 1
        return outputs if self.forwards <= self.after else self.fault(outputs)


def raising(outputs: list[Array]) -> list[Array]:
    """A forward that fails inside the module."""
    raise RuntimeError("injected forward failure")


class Counting:
    """A real demo-vocoder module that counts its forwards and how many ran at once; `hook`
    runs inside each forward with the forward's number."""

    def __init__(self, hook: Callable[[int], None] = lambda n: None, **kw: Any) -> None:
        self.runner = mnn.adapt(demo.demo_factory(threads=1)(**kw))
        self.hook = hook
        self.forwards = 0
        self.inside = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def run(self, arrays: Sequence[Array]) -> list[Array]:
        """Run the real module, counting."""
        with self._lock:
            self.forwards += 1
            self.inside += 1
            self.most_at_once = max(self.most_at_once, self.inside)
            number = self.forwards
        try:
            self.hook(number)
            return self.runner.run(arrays)
        finally:
            with self._lock:
                self.inside -= 1


class Plan:
    """A factory whose n-th init does what `steps[n]` says (the last step repeats).

    "clean": a real module; "turns": a real module that degrades (all zeros) once its canary
    has run; "bad": degraded (all zeros) from the start; "noisy": 29 dB noise from the start;
    "exit": the factory raises SystemExit.
    """

    def __init__(self, *steps: str) -> None:
        real = demo.demo_factory(threads=1)
        zeros: dict[str, Any] = {"fault": Fault.ZEROS, "rate": 1.0, "affects": "all"}
        self.makers: dict[str, Callable[..., Any]] = {
            "clean": real,
            "turns": FaultyFactory(real, degrade_after=CANARY_FORWARDS, **zeros),
            "bad": FaultyFactory(real, **zeros),
            "noisy": FaultyFactory(real, fault=Fault.NOISE, rate=1.0, affects="all"),
        }
        self.steps = steps
        self.inits = 0

    def __call__(self, **overrides: Any) -> Any:
        step = self.steps[min(self.inits, len(self.steps) - 1)]
        self.inits += 1
        if step == "exit":
            raise SystemExit(3)
        return self.makers[step](**overrides)


def plan_session(
    factory: Callable[..., Any],
    probe: probes.Probe,
    clock: FakeClock,
    *,
    listeners: Sequence[guard.Listener] = (),
    registry: CollectorRegistry | None = None,
    **policy: Any,
) -> guard.GuardedSession:
    """A session without a background thread, on a fake clock, named "p"."""
    settings: dict[str, Any] = {"background": False, "reinit_attempts": 0, **policy}
    return guard.wrap(
        factory,
        probe,
        name="p",
        clock=clock,
        listeners=listeners,
        registry=registry,
        metrics=registry is not None,
        policy=guard.Policy(**settings),
    )


def served_clean(session: guard.GuardedSession, seed: int = 5) -> bool:
    """True when run() serves this input's clean reference output."""
    x = demo.demo_mel(8, seed=seed)
    return bool(measures.snr_db(reference(x), session.run({"mel": x})["wav"]) > 45)


class Checks(guard.Listener):
    """Keeps every re-check's Attempt."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []

    def on_check(self, session: str, attempt: Attempt) -> None:
        self.attempts.append(attempt)


class GaugeAtEvent(guard.Listener):
    """Reads the SNR gauge and canary counters right after the Prometheus listener's update."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.seen: list[tuple[str, str, float | None, Any]] = []

    def _read(self, kind: str, attempt: Attempt) -> None:
        snr = attempt.verdict.worst_snr_db if attempt.verdict is not None else None
        gauge = sample(self.registry, "mnn_guard_canary_snr_db")
        self.seen.append((kind, attempt.outcome.value, snr, gauge))

    def on_attempt(self, session: str, attempt: Attempt) -> None:
        self._read("attempt", attempt)

    def on_check(self, session: str, attempt: Attempt) -> None:
        self._read("check", attempt)


class HangingReference:
    """A factory whose reference (dynamic) loads block until `gate` is set."""

    def __init__(self, factory: Any) -> None:
        self.factory, self.gate = factory, threading.Event()
        self.inputs, self.outputs, self.path = factory.inputs, factory.outputs, factory.path

    def __call__(self, **overrides: Any) -> Any:
        if overrides.get("dynamic"):
            self.gate.wait(60)
        return self.factory(**overrides)
