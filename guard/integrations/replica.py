"""The replica core every serving integration adapts: build, health, hot swap, run, HTTP errors.

A framework's worker (a Ray Serve replica, an ASGI app's process, a BentoML service, a Triton
Python backend instance) holds one `Replica`. It builds a guarded session (or a `guard.Pool`)
from a `Spec` or a JSON config, answers the framework's health check (`check`), swaps in a new
model only once it passed its canary (`swap`, `configure`), runs requests on whichever model
serves now (`run`, `arun`), and maps the guard's errors to HTTP statuses (`http_error`).

>>> replica = Replica(name="vocoder")  # doctest: +SKIP
>>> replica.configure({"model": "vocoder.mnn", "probe": "probes/vocoder"})  # doctest: +SKIP
>>> replica.check()  # raises while no passing module serves  # doctest: +SKIP
>>> status, body = await replica.answer_json({"mel": mel.tolist()})  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from guard.errors import (
    ConfigError,
    GuardError,
    InputMismatch,
    RecoveryExhausted,
    SessionClosed,
    SwapRefused,
    Unavailable,
)
from guard.health import HEALTH, HealthTable
from guard.integrations.standby import Standby
from guard.ladder import Policy
from guard.sinks import Sink
from guard.state import State
from probes import Probe, ProbeError

if TYPE_CHECKING:
    from guard.pool import Pool
    from guard.session import Factory, GuardedSession

__all__ = [
    "CONFIG_KEYS",
    "Build",
    "PoolBuild",
    "Replica",
    "Served",
    "Spec",
    "build_session",
    "http_error",
    "not_serving",
]

Array = NDArray[Any]
Inputs = Mapping[str, Any] | Sequence[Any]
CONFIG_KEYS = frozenset({"model", "probe", "threads", "name"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Spec:
    """What a replica serves: a factory and the probe that judges it, under a name and policy."""

    factory: Factory
    probe: Probe
    name: str = "default"
    policy: Policy = field(default_factory=Policy)

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], *, name: str = "default", policy: Policy | None = None
    ) -> Spec:
        """A spec from a JSON config: `{"model": path, "probe": dir, "threads": 1, "name": ...}`.

        Raises ConfigError for a config of the wrong shape, ProbeError for a missing model or
        a probe that does not belong to it.
        """
        from guard.mnn import mnn_factory
        from probes import load

        if not isinstance(config, Mapping) or not {"model", "probe"} <= set(config):
            raise ConfigError(f"the config needs 'model' and 'probe' paths, got {config!r}")
        unknown = sorted(set(config) - CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known: {sorted(CONFIG_KEYS)}")
        probe = load(config["probe"], model=config["model"])
        factory = mnn_factory(
            config["model"], probe.input_names, probe.output_names, threads=config.get("threads", 1)
        )
        return cls(
            factory=factory,
            probe=probe,
            name=str(config.get("name", name)),
            policy=policy or Policy(),
        )


class Served(Protocol):
    """What a replica serves: a `GuardedSession` or a `guard.Pool`."""

    name: str

    def run(self, inputs: Inputs) -> dict[str, Array]:
        """Outputs of a module whose canary passed, or a GuardError."""

    def close(self) -> None:
        """Release it; idempotent."""


@runtime_checkable
class _AsyncServed(Protocol):
    async def arun(self, inputs: Inputs) -> dict[str, Array]: ...


class Build(Protocol):
    """Builds what serves `spec`, publishing through `standby` (its health table, metrics)."""

    def __call__(self, spec: Spec, standby: Standby) -> Served: ...


def build_session(spec: Spec, standby: Standby) -> GuardedSession:
    """A guarded session in this process; one whose every rung failed is returned FAILED."""
    from guard.wrapping import wrap

    return wrap(
        spec.factory,
        spec.probe,
        policy=spec.policy,
        name=spec.name,
        listeners=[standby.metrics(spec)],
        metrics=False,  # the standby's listener publishes them, once this session is served
        health=standby.health,
        raise_exhausted=False,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolBuild:
    """Builds a `guard.Pool` of `processes` workers (their sessions publish their own metrics)."""

    processes: int = 2
    request_timeout: float | None = 60.0

    def __call__(self, spec: Spec, standby: Standby) -> Pool:
        from guard.pool import Pool

        return Pool(
            spec.factory,
            spec.probe,
            processes=self.processes,
            policy=spec.policy,
            name=spec.name,
            request_timeout=self.request_timeout,
            health=standby.health,
        )


def not_serving(served: Served) -> GuardError | None:
    """Why `served` cannot serve a request now (an error to raise), or None when it can.

    A session serves in SERVING and CHECKING (RecoveryExhausted when FAILED); a pool while
    any of its workers does.
    """
    from guard.session import GuardedSession

    if isinstance(served, GuardedSession):
        status = served.status
        if status.state is State.FAILED:
            return RecoveryExhausted(
                f"session {status.name!r} is exhausted: {status.describe()}", status.history
            )
        if not status.healthy:
            return Unavailable(f"session {status.name!r} is not serving: {status.describe()}")
        return None
    workers: list[Any] = served.status()  # type: ignore[attr-defined]
    if any(w.serving for w in workers):
        return None
    down = ", ".join(f"worker {w.slot} (pid {w.pid}) is {w.state.value}" for w in workers)
    return Unavailable(f"pool {served.name!r} is not serving: {down or 'closed'}")


def http_error(exc: GuardError) -> tuple[int, str]:
    """The HTTP status and message for an error a request raised.

    422 for inputs that do not match the probe (InputMismatch: the client's fault, its
    message names the input); 503 for every other GuardError (Unavailable,
    RecoveryExhausted, SessionClosed, WorkerFailed, ...: no module whose canary passed could
    answer in time), so that a degraded output is never sent and clients or load balancers
    retry elsewhere.
    """
    if isinstance(exc, InputMismatch):
        return 422, str(exc)
    return 503, f"{type(exc).__name__}: {exc}"


class Replica:
    """One guarded model served by a framework's worker: build, health, hot swap, run.

    `build` makes what serves a spec (`build_session` by default, `PoolBuild(processes=n)`
    for worker processes); a session's health goes to `health` (default: the process's table,
    which `guard.serve` and `guard.asgi_app` answer for) and its metrics to `sink` (default:
    the process's Prometheus registry). `name` and `policy` apply to configs (`configure`).
    """

    def __init__(
        self,
        spec: Spec | None = None,
        *,
        name: str = "default",
        policy: Policy | None = None,
        build: Build = build_session,
        sink: Sink | None = None,
        health: HealthTable | None = None,
    ) -> None:
        self.name = name
        self.policy = policy or Policy()
        self._build = build
        self._sink = sink
        self._health = HEALTH if health is None else health
        self._lock = threading.Lock()  # guards _served and _config
        self._swapping = threading.RLock()  # one build at a time (configure holds it too)
        self._served: Served | None = None
        self._config: dict[str, Any] | None = None
        if spec is not None:
            self.swap(spec)

    @property
    def served(self) -> Served | None:
        """What serves now (None before any model was given)."""
        return self._served

    def swap(self, spec: Spec) -> None:
        """Build `spec` off the request path, then serve it if it passed its canary.

        The first model is served as built: a session whose every rung failed stays in place,
        so that `check` says why (and it retries every `Policy.promote_after` seconds). Later,
        the model in place serves until the new one passes; one that cannot be built or fails
        is closed and SwapRefused raised (saying why), the old one untouched.
        """
        with self._swapping:
            old = self._served
            standby = Standby(self._health, self._sink, live=old is None)
            if old is None:
                self._install(self._build(spec, standby))
                return
            try:
                new = self._build(spec, standby)
            except (GuardError, ProbeError) as exc:
                raise self._refused(spec, exc) from exc
            why = not_serving(new)
            if why is not None:
                new.close()
                raise self._refused(spec, why) from why
            standby.go_live()
            self._install(new)
            old.close()

    def _refused(self, spec: Spec, why: Exception) -> SwapRefused:
        return SwapRefused(
            f"model {spec.name!r} was not swapped in ({type(why).__name__}: {why}); "
            "the model in place stays"
        )

    def _install(self, served: Served) -> None:
        with self._lock:
            self._served = served

    def configure(self, config: Mapping[str, Any]) -> bool:
        """Serve the model and probe a JSON config names (`Spec.from_config`), by `swap`.

        Returns False for the config already in use. While a model serves, a config that
        cannot be served raises SwapRefused and changes nothing.
        """
        if not isinstance(config, Mapping):
            raise ConfigError(f"the config is a mapping with 'model' and 'probe', got {config!r}")
        wanted = {"threads": 1, "name": self.name, **config}
        with self._swapping:
            if wanted == self._config:
                return False
            try:
                spec = Spec.from_config(wanted, name=self.name, policy=self.policy)
            except (GuardError, ProbeError) as exc:
                if self._served is None:
                    raise
                raise SwapRefused(f"config {dict(config)!r} refused: {exc}") from exc
            self.swap(spec)
            with self._lock:
                self._config = wanted
            return True

    def check(self) -> None:
        """A health check: raise (RecoveryExhausted, Unavailable) unless a passing module serves."""
        served = self._served
        if served is None:
            raise Unavailable(f"replica {self.name!r} has no model: give a spec or a config")
        why = not_serving(served)
        if why is not None:
            raise why

    def run(self, inputs: Inputs) -> dict[str, Array]:
        """Run on what serves now (the new model, if a swap closed the old one meanwhile)."""
        served = self._served
        if served is None:
            raise Unavailable(f"replica {self.name!r} has no model yet")
        try:
            return served.run(inputs)
        except SessionClosed:
            current = self._served
            if current is served or current is None:
                raise
            return current.run(inputs)

    async def arun(self, inputs: Inputs) -> dict[str, Array]:
        """`run` for asyncio: a pool waits in its own threads, a session's forward in one."""
        served = self._served
        if not isinstance(served, _AsyncServed):
            return await asyncio.to_thread(self.run, inputs)  # the forward holds the GIL
        try:
            return await served.arun(inputs)
        except SessionClosed:
            if self._served is served:
                raise
            return await self.arun(inputs)

    async def answer_json(self, payload: object) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) for a JSON request `{input: nested lists}`: the outputs as
        nested lists, or `{"error": why}` with `http_error`'s status."""
        if not isinstance(payload, dict):
            return 422, {"error": "send JSON {input name: nested lists}"}
        try:
            inputs = {str(k): np.asarray(v) for k, v in payload.items()}
        except ValueError as exc:  # ragged lists
            return 422, {"error": f"inputs must be rectangular nested lists: {exc}"}
        try:
            outputs = await self.arun(inputs)
        except GuardError as exc:
            status, message = http_error(exc)
            return status, {"error": message}
        return 200, {k: v.tolist() for k, v in outputs.items()}

    def close(self) -> None:
        """Close what serves; idempotent. Later calls raise Unavailable."""
        with self._lock:
            served, self._served = self._served, None
        if served is not None:
            served.close()
