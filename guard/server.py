"""The guard's HTTP routes and server, kept at their first import path.

They live in `guard.integrations.endpoints` (`Endpoints`, `wsgi_app`, `asgi_app`) and
`guard.integrations.server` (`MetricsServer`, `serve`, `Limits`).
"""

from __future__ import annotations

from guard.integrations.endpoints import RESTART_AFTER, Endpoints, asgi_app, wsgi_app
from guard.integrations.server import REQUEST_SECONDS, Limits, MetricsServer, serve

__all__ = [
    "REQUEST_SECONDS",
    "RESTART_AFTER",
    "Endpoints",
    "Limits",
    "MetricsServer",
    "asgi_app",
    "serve",
    "wsgi_app",
]
