"""Guarded Ray Serve deployments: a session per replica, Serve's health check, Ray's metrics.

The only module of mnn-guard that imports ray (`pip install 'mnn-guard[ray]'`).

>>> from ray import serve  # doctest: +SKIP
>>> from guard.ray_serve import application  # doctest: +SKIP
>>> factory = guard.mnn_factory("vocoder.mnn", ["mel"], ["wav"], threads=1)  # doctest: +SKIP
>>> serve.run(application(factory, probes.load("probes/vocoder"), name="vocoder",
...                       num_replicas=2))  # doctest: +SKIP
>>> await serve.get_app_handle("default").remote({"mel": mel})  # {"wav": array}  # doctest: +SKIP

Each replica builds its session in its constructor (Ray starts replica processes fresh: no fork
after a load). Serve asks `check_health` right after the constructor and then every
`health_check_period_s`; it raises while the session is not serving (exhausted, replacing,
closed), so a replica whose every init was degraded never takes a request and Ray replaces it
with a fresh process, a fresh draw. `reconfigure(user_config)` builds and judges the model and
probe the config names, then swaps them in without a restart (Serve calls it when only
`user_config` changes in a config-file deploy). The `mnn_guard_*` metrics go through Ray's
metrics system, which exports them with Ray's prefix: `ray_mnn_guard_healthy`, with the
replica's `deployment`, `replica` and `application` labels.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard.errors import (
    ConfigError,
    GuardError,
    InputMismatch,
    MissingExtra,
    RecoveryExhausted,
    SessionClosed,
    Unavailable,
)
from guard.health import HealthTable
from guard.ladder import Action, Attempt, Policy, Rung
from guard.listeners import Call, Listener
from guard.metrics import Buckets
from guard.session import Factory, GuardedSession
from guard.state import SessionStatus, State
from guard.version import __version__
from probes import Probe

try:
    from ray import serve
    from ray.serve import metrics as ray_metrics
    from ray.serve.deployment import Application
    from starlette.requests import Request
    from starlette.responses import JSONResponse
except ImportError as exc:  # pragma: no cover - the extra is installed in CI
    raise MissingExtra(
        f"guard.ray_serve needs Ray Serve: pip install 'mnn-guard[ray]' ({exc})"
    ) from exc

__all__ = ["GuardedDeployment", "RayListener", "application", "build_app"]

Array = NDArray[Any]
HEALTH_CHECK_SECONDS = 2.0  # application()'s default health_check_period_s (Ray's is 10 s)
CONFIG_KEYS = frozenset({"model", "probe", "threads", "name"})


# ------------------------------------------------------------------ metrics


class _RayMetrics:
    """The `mnn_guard_*` metrics as Ray Serve metrics, created once per process."""

    def __init__(self, buckets: Buckets) -> None:
        # Ray annotates tag_keys as tuple[str] but takes any tuple of names
        def gauge(name: str, doc: str, *tags: str) -> ray_metrics.Gauge:
            keys: Any = ("session", *tags)
            return ray_metrics.Gauge(name, doc, tag_keys=keys)

        def counter(name: str, doc: str, *tags: str) -> ray_metrics.Counter:
            keys: Any = ("session", *tags)
            return ray_metrics.Counter(name, doc, tag_keys=keys)

        def histogram(name: str, doc: str, bounds: Sequence[float]) -> ray_metrics.Histogram:
            keys: Any = ("session", "rung")
            return ray_metrics.Histogram(name, doc, boundaries=list(bounds), tag_keys=keys)

        self.info = gauge(
            "mnn_guard_session_info",
            "1 per guarded session: versions and the model file's sha256.",
            "guard_version",
            "mnn_version",
            "model_sha256",
        )
        self.inits = counter("mnn_guard_inits", "Module initialisations.", "rung")
        self.canary_checks = counter(
            "mnn_guard_canary_checks", "Canary judgements by result.", "rung", "result"
        )
        self.recoveries = counter("mnn_guard_recoveries", "Recovery actions.", "action")
        self.runs = counter("mnn_guard_runs", "run() calls by result.", "rung", "result")
        self.healthy = gauge("mnn_guard_healthy", "1 while the session serves.")
        self.rung = gauge("mnn_guard_rung", "1 for the rung in use.", "rung")
        self.state = gauge("mnn_guard_state", "1 for the session's state.", "state")
        self.loaded_static = gauge(
            "mnn_guard_rung_loaded_static", "1 when a dynamic rung loaded statically.", "rung"
        )
        self.canary_snr_db = gauge("mnn_guard_canary_snr_db", "Worst SNR of the last canary.")
        self.init_seconds = histogram("mnn_guard_init_seconds", "Init + canary.", buckets.init)
        self.run_seconds = histogram("mnn_guard_run_seconds", "run() time.", buckets.run)


_metrics: _RayMetrics | None = None
_owners: dict[str, RayListener] = {}  # session name -> the listener that owns its series
_lock = threading.Lock()


def _ray_metrics() -> _RayMetrics:
    """This process's Ray metrics (Ray registers a name once per process)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = _RayMetrics(Buckets())
        return _metrics


class RayListener(Listener):
    """PrometheusListener's events, recorded as Ray metrics under the same names and labels.

    Ray cannot create a counter at 0 (it refuses `inc(0)`): counter series appear at their
    first event. Gauges start at 0; a closed session's gauges become NaN (Ray cannot remove a
    series), which no alert matches.
    """

    def __init__(self, session: str, ladder: Sequence[Rung], info: tuple[str, str, str]) -> None:
        self.metrics = m = _ray_metrics()
        self.session = session
        self._rungs = tuple(r.name for r in ladder)
        self._info = info
        with _lock:
            _owners[session] = self
        m.info.set(1, self._tags(guard_version=info[0], mnn_version=info[1], model_sha256=info[2]))
        for rung in self._rungs:
            m.rung.set(0, self._tags(rung=rung))
            m.loaded_static.set(0, self._tags(rung=rung))
        for state in State:
            m.state.set(0, self._tags(state=state.value))
        m.healthy.set(0, self._tags())

    def _tags(self, **tags: str) -> dict[str, str]:
        return {"session": self.session, **tags}

    def _owns(self) -> bool:
        with _lock:
            return _owners.get(self.session) is self

    def on_init(self, session: str, rung: Rung) -> None:
        self.metrics.inits.inc(1, self._tags(rung=rung.name))

    def _judged(self, attempt: Attempt) -> None:
        tags = self._tags(rung=attempt.rung.name, result=attempt.outcome.value)
        self.metrics.canary_checks.inc(1, tags)
        snr = attempt.verdict.worst_snr_db if attempt.verdict is not None else -math.inf
        self.metrics.canary_snr_db.set(snr, self._tags())

    def on_attempt(self, session: str, attempt: Attempt) -> None:
        self._judged(attempt)
        self.metrics.init_seconds.observe(attempt.seconds, self._tags(rung=attempt.rung.name))
        if attempt.verdict is not None:
            static = 1 if attempt.turned_static else 0
            self.metrics.loaded_static.set(static, self._tags(rung=attempt.rung.name))

    def on_check(self, session: str, attempt: Attempt) -> None:
        self._judged(attempt)

    def on_recover(self, session: str, action: Action, from_rung: Rung, to_rung: Rung) -> None:
        self.metrics.recoveries.inc(1, self._tags(action=action.value))

    def on_status(self, session: str, status: SessionStatus) -> None:
        if not self._owns():
            return
        m = self.metrics
        m.healthy.set(1 if status.healthy else 0, self._tags())
        for rung in self._rungs:
            m.rung.set(1 if rung == status.mode else 0, self._tags(rung=rung))
        for state in State:
            m.state.set(1 if state is status.state else 0, self._tags(state=state.value))

    def on_run(self, session: str, rung: Rung, seconds: float, result: Call) -> None:
        self.metrics.runs.inc(1, self._tags(rung=rung.name, result=result.value))
        if result is Call.OK:
            self.metrics.run_seconds.observe(seconds, self._tags(rung=rung.name))

    def on_close(self, session: str) -> None:
        with _lock:
            if _owners.get(session) is not self:
                return
            del _owners[session]
        m = self.metrics
        m.healthy.set(math.nan, self._tags())
        m.canary_snr_db.set(math.nan, self._tags())
        for rung in self._rungs:
            m.rung.set(math.nan, self._tags(rung=rung))
            m.loaded_static.set(math.nan, self._tags(rung=rung))
        for state in State:
            m.state.set(math.nan, self._tags(state=state.value))
        info = self._info
        m.info.set(
            math.nan, self._tags(guard_version=info[0], mnn_version=info[1], model_sha256=info[2])
        )


# ------------------------------------------------------------------ deployment


def _from_config(config: Mapping[str, Any]) -> tuple[Factory, Probe, str | None]:
    """(factory, probe, name) from a JSON config: {"model", "probe", "threads"?, "name"?}."""
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
    return factory, probe, config.get("name")


class GuardedDeployment:
    """A Ray Serve deployment class serving one guarded session per replica.

    Give it a factory and a probe (built in the replica's constructor), or a config
    `{"model": path, "probe": dir, "threads": 1, "name": ...}` as constructor `config=` or as
    the deployment's `user_config` (then `reconfigure` builds it). Handle calls take a dict of
    arrays and return owned arrays; HTTP requests take JSON `{input: nested lists}` and answer
    JSON (422 for bad inputs, 503 while no healthy module serves). Subclass it to serve your
    own request format: call `self.run(inputs)` (or `await self.arun(inputs)`).

    >>> @serve.deployment(num_replicas=2, health_check_period_s=2)  # doctest: +SKIP
    ... class Vocoder(GuardedDeployment):
    ...     async def __call__(self, request):
    ...         return (await self.arun({"mel": await mel_from(request)}))["wav"].tobytes()
    >>> serve.run(Vocoder.bind(factory, probe, name="vocoder"))  # doctest: +SKIP
    """

    def __init__(
        self,
        factory: Factory | None = None,
        probe: Probe | None = None,
        *,
        name: str = "default",
        policy: Policy | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.policy = policy or Policy()
        self._lock = threading.Lock()
        self._session: GuardedSession | None = None
        self._config: dict[str, Any] | None = None
        if config is not None:
            self.reconfigure(config)
        elif factory is not None and probe is not None:
            self._session = self._build(factory, probe, name)
        elif factory is not None or probe is not None:
            raise ConfigError("give both a factory and a probe, or a config")

    def _build(self, factory: Factory, probe: Probe, name: str) -> GuardedSession:
        """A session for this replica: a FAILED one stays (check_health reports it)."""
        from guard import mnn
        from guard.wrapping import wrap

        info = (__version__, mnn.mnn_version(), probe.meta.model_sha256 or "")
        return wrap(
            factory,
            probe,
            policy=self.policy,
            name=name,
            listeners=[RayListener(name, self.policy.ladder, info)],
            metrics=False,  # nobody scrapes a replica's prometheus_client registry
            health=HealthTable(),
            raise_exhausted=False,
        )

    @property
    def session(self) -> GuardedSession | None:
        """The session serving now (None before any model was given)."""
        return self._session

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        """Build and judge the model and probe `config` names, then swap them in.

        The old session serves until the new one passes its canary; a config that cannot be
        served (a stale probe, every rung failing) raises and leaves the old one serving.
        A config equal to the one in use changes nothing.
        """
        wanted = {"threads": 1, "name": self.name, **config}
        if wanted == self._config:
            return
        factory, probe, name = _from_config(wanted)
        session = self._build(factory, probe, name or self.name)
        if not session.status.healthy:
            status = session.status
            session.close()
            raise RecoveryExhausted(
                f"reconfigure: the new model failed: {status.describe()}", status.history
            )
        with self._lock:
            old, self._session, self._config = self._session, session, wanted
        if old is not None:
            old.close()

    def __del__(self) -> None:
        """Serve calls this at a replica's graceful shutdown: release the module."""
        session = getattr(self, "_session", None)
        if session is not None:
            session.close()

    def check_health(self) -> None:
        """Ray Serve's health check: raise unless the session serves a module that passed."""
        session = self._session
        if session is None:
            raise ConfigError("no model: give a factory and a probe, or a config")
        status = session.status
        if status.state is State.FAILED:
            raise RecoveryExhausted(
                f"session {status.name!r} is exhausted: {status.describe()}", status.history
            )
        if not status.healthy:
            raise Unavailable(f"session {status.name!r} is not serving: {status.describe()}")

    def run(self, inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, Array]:
        """Run the current session (the new one, if a reconfigure swapped it meanwhile)."""
        session = self._session
        if session is None:
            raise Unavailable("no model yet: give a factory and a probe, or a config")
        try:
            return session.run(inputs)
        except SessionClosed:
            current = self._session
            if current is session or current is None:
                raise
            return current.run(inputs)

    async def arun(self, inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, Array]:
        """`run` in a thread; the forward holds the GIL, so this replica's loop waits for it."""
        return await asyncio.to_thread(self.run, inputs)

    async def __call__(self, request: Any) -> Any:
        """A handle call (a dict of arrays) or an HTTP request (JSON of nested lists)."""
        if not isinstance(request, Request):
            return await self.arun(request)
        try:
            payload = await request.json()
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            return JSONResponse({"error": "send JSON {input name: nested lists}"}, 422)
        try:
            outputs = await self.arun({k: np.asarray(v) for k, v in payload.items()})
        except InputMismatch as exc:
            return JSONResponse({"error": str(exc)}, 422)
        except GuardError as exc:
            return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, 503)
        return {k: v.tolist() for k, v in outputs.items()}


def application(
    factory: Factory,
    probe: Probe,
    *,
    name: str = "default",
    policy: Policy | None = None,
    **options: Any,
) -> Application:
    """A Serve application of one guarded model: `serve.run(application(...))`.

    `options` go to `serve.deployment` (num_replicas, ray_actor_options, ...);
    health_check_period_s defaults to HEALTH_CHECK_SECONDS.
    """
    options.setdefault("health_check_period_s", HEALTH_CHECK_SECONDS)
    deployment = serve.deployment(name=name, **options)(GuardedDeployment)
    return deployment.bind(factory, probe, name=name, policy=policy)


def build_app(args: dict[str, Any]) -> Application:
    """An application builder for Serve config files: `import_path: guard.ray_serve:build_app`.

    `args` is the config (`model`, `probe`, optional `threads`, `name`); the deployment is
    named `name` (default "vocoder"), its replicas' options come from the config file's
    `deployments:` entry, and a `user_config` there of the same form swaps the model.
    """
    name = str(args.get("name", "vocoder"))
    deployment = serve.deployment(name=name)(GuardedDeployment)
    return deployment.bind(name=name, config={**args, "name": name})
