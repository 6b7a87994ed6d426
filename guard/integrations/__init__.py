"""Serving integrations on one replica core: Ray Serve, WSGI/ASGI routes, your framework's.

- `replica`: `Replica` (build, health check, hot swap, run) and `http_error` (422/503),
  which every adapter uses;
- `endpoints` and `server`: `/metrics`, `/healthz`, `/readyz` as WSGI/ASGI apps, and
  `guard.serve`'s small bounded server;
- `watchdog`: kills a worker stuck starting or FAILED too long, from outside it (gunicorn's
  master), so that its server starts a fresh one;
- `ray_serve` and `ray_metrics` (extra `ray`): `GuardedDeployment` on the core, and the Ray
  sink of the `mnn_guard_*` families.

docs/integrations.md shows how to add a framework. Names are imported on first use, so that
`guard.serve` (a gunicorn master's) never imports MNN.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guard.integrations.endpoints import Endpoints, asgi_app, wsgi_app
    from guard.integrations.replica import PoolBuild, Replica, Spec, build_session, http_error
    from guard.integrations.server import Limits, MetricsServer, serve
    from guard.integrations.watchdog import Deadlines, Watchdog

__all__ = [
    "Deadlines",
    "Endpoints",
    "Limits",
    "MetricsServer",
    "PoolBuild",
    "Replica",
    "Spec",
    "Watchdog",
    "asgi_app",
    "build_session",
    "http_error",
    "serve",
    "wsgi_app",
]

_HOME = {
    "Endpoints": "endpoints",
    "asgi_app": "endpoints",
    "wsgi_app": "endpoints",
    "PoolBuild": "replica",
    "Replica": "replica",
    "Spec": "replica",
    "build_session": "replica",
    "http_error": "replica",
    "Limits": "server",
    "MetricsServer": "server",
    "serve": "server",
    "Deadlines": "watchdog",
    "Watchdog": "watchdog",
}


def __getattr__(name: str) -> Any:
    """Import a public name on first use."""
    if name not in _HOME:
        raise AttributeError(f"module 'guard.integrations' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"guard.integrations.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names, loaded or not."""
    return sorted({*globals(), *__all__})
