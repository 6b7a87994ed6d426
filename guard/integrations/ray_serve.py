"""Guarded Ray Serve deployments: a `Replica` per Serve replica, its health check, Ray metrics.

Only this module and `guard.integrations.ray_metrics` import ray (the `ray` extra:
`pip install 'ray[serve]>=2.40'`).

>>> from ray import serve  # doctest: +SKIP
>>> from guard.ray_serve import application  # doctest: +SKIP
>>> factory = guard.mnn_factory("vocoder.mnn", ["mel"], ["wav"], threads=1)  # doctest: +SKIP
>>> serve.run(application(factory, probes.load("probes/vocoder"), name="vocoder",
...                       num_replicas=2))  # doctest: +SKIP
>>> await serve.get_app_handle("default").remote({"mel": mel})  # {"wav": array}  # doctest: +SKIP

Each replica builds its session in its constructor (Ray starts replica processes fresh: no fork
after a load). Serve asks `check_health` right after the constructor and then every
`health_check_period_s`; it raises while the session is not serving (exhausted, replacing,
closed), so a replica whose every init was degraded never takes a request: Serve replaces it
with a fresh process, a fresh draw, and after a few such starts marks the deployment failed
with the canary's reasons as its message. `reconfigure(user_config)` builds and judges the
model and probe the config names off the request path, then swaps them in without a restart
(Serve calls it when only `user_config` changes in a config-file deploy); a config that cannot
be served is logged and the model in place keeps serving. The `mnn_guard_*` metrics go
through Ray's metrics (`guard.integrations.ray_metrics`): `ray_mnn_guard_healthy`, with the
replica's `deployment`, `replica` and `application` labels.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from guard.errors import ConfigError, MissingExtra, SwapRefused
from guard.health import HealthTable
from guard.integrations.ray_metrics import RayListener, ray_sink
from guard.integrations.replica import CONFIG_KEYS, Replica, Spec
from guard.ladder import Policy
from probes import Probe

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from guard.session import Factory, GuardedSession

try:
    from ray import serve
    from ray.serve.deployment import Application
    from starlette.requests import Request
    from starlette.responses import JSONResponse
except ImportError as exc:  # pragma: no cover - the extra is installed in CI
    raise MissingExtra(
        f"guard.ray_serve needs Ray Serve: pip install 'ray[serve]>=2.40' (the ray extra) ({exc})"
    ) from exc

__all__ = ["CONFIG_KEYS", "GuardedDeployment", "RayListener", "application", "build_app"]

log = logging.getLogger("mnn_guard")
HEALTH_CHECK_SECONDS = 2.0  # application()'s default health_check_period_s (Ray's is 10 s)


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
        # nobody reads a replica's health table or prometheus_client registry: Serve asks
        # check_health, and the metrics go to Ray's sink
        self.replica = Replica(name=name, policy=self.policy, sink=ray_sink(), health=HealthTable())
        if config is not None:
            self.replica.configure(config)
        elif factory is not None and probe is not None:
            self.replica.swap(Spec(factory=factory, probe=probe, name=name, policy=self.policy))
        elif factory is not None or probe is not None:
            raise ConfigError("give both a factory and a probe, or a config")

    @property
    def session(self) -> GuardedSession | None:
        """The session serving now (None before any model was given)."""
        return self.replica.served  # type: ignore[return-value]

    async def reconfigure(self, config: Mapping[str, Any]) -> None:
        """Build and judge the model and probe `config` names off the request path, then swap.

        The old session serves until the new one passes its canary; a config that cannot be
        served (a missing file, a stale probe, every rung failing) is logged with its reason
        and the old session keeps serving. With no model yet, such a config raises (Serve
        then reports the replica's start as failed, with the reason). A config equal to the
        one in use changes nothing.
        """
        try:
            await asyncio.to_thread(self.replica.configure, config)
        except SwapRefused as exc:
            log.error("deployment %s: reconfigure refused, the model in place serves: %s",
                      self.name, exc)  # fmt: skip

    def __del__(self) -> None:
        """Serve calls this at a replica's graceful shutdown: release the module."""
        replica = getattr(self, "replica", None)
        if replica is not None:
            replica.close()

    def check_health(self) -> None:
        """Ray Serve's health check: raise unless the session serves a module that passed."""
        self.replica.check()

    def run(self, inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, NDArray[Any]]:
        """Run the current session (the new one, if a reconfigure swapped it meanwhile)."""
        return self.replica.run(inputs)

    async def arun(self, inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, NDArray[Any]]:
        """`run` in a thread; the forward holds the GIL, so this replica's loop waits for it."""
        return await self.replica.arun(inputs)

    async def __call__(self, request: Any) -> Any:
        """A handle call (a dict of arrays) or an HTTP request (JSON of nested lists)."""
        if not isinstance(request, Request):
            return await self.arun(request)
        try:
            payload = await request.json()
        except ValueError:
            payload = None
        status, body = await self.replica.answer_json(payload)
        return JSONResponse(body, status) if status != 200 else body


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
