"""`/metrics`, `/healthz` and `/readyz` as a WSGI or ASGI app, answering for one process or
for every worker of a multiprocess server.

`/metrics` is prometheus_client's own exposition (text or OpenMetrics by the Accept header,
gzip) with one gauge added, `mnn_guard_ready` (what `/readyz` says, as 1 or 0); the health
routes are added beside it, on exact paths only. `guard.serve` runs the WSGI app on a small
server of its own (`guard.integrations.server`).

>>> app.mount("/", guard.asgi_app(Endpoints(expect=["vocoder"])))  # FastAPI  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, make_asgi_app, make_wsgi_app
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from guard.errors import ConfigError
from guard.health import (
    HEALTH,
    MULTIPROC_ENV,
    HealthTable,
    reap_dead,
    stuck,
    worker_readiness,
    worker_sessions,
)
from guard.metrics import flush_runs

__all__ = ["READY", "RESTART_AFTER", "Endpoints", "asgi_app", "wsgi_app"]

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
RESTART_AFTER = 900.0  # seconds a session may stay FAILED before /healthz asks for a restart
READY = "mnn_guard_ready"  # the gauge of /readyz's answer on /metrics
Response = tuple[int, list[tuple[str, str]], bytes]


def _check_dir(path: str | os.PathLike[str], what: str) -> str:
    if not Path(path).is_dir():
        raise ConfigError(f"{what} {os.fspath(path)!r} is not a directory; create it first")
    return os.fspath(path)


class Endpoints:
    """What the three routes answer: metrics of a registry or of every worker, and readiness.

    With `multiprocess_dir` (or `PROMETHEUS_MULTIPROC_DIR` set and no `registry`), `/metrics`
    aggregates every worker's files and `/readyz` every live worker's sessions; otherwise
    both answer for this process (`registry`, default the global one, and `health`).
    `expect` names sessions that must exist and be healthy for `/readyz` to say ready;
    `workers`, how many worker processes must each have reported its sessions (the server's
    worker count: gunicorn's `workers`, uvicorn's `--workers`), more than 1 only in
    multiprocess mode. `/metrics` adds `mnn_guard_ready`, 1 while `/readyz` says ready, so
    that a process serving nothing (no session, a missing worker) is seen by its scraper.
    `/healthz` fails once a session has been FAILED (every rung failing, retries included)
    for `restart_after` seconds: MNN's degraded state comes with a process start, so a
    restart is a fresh draw. None keeps `/healthz` at 200 while the process is up.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        multiprocess_dir: str | os.PathLike[str] | None = None,
        health: HealthTable | None = None,
        expect: Sequence[str] = (),
        restart_after: float | None = RESTART_AFTER,
        workers: int = 1,
    ) -> None:
        if registry is not None and multiprocess_dir is not None:
            raise ConfigError("pass either registry or multiprocess_dir, not both")
        if isinstance(expect, str) or not all(isinstance(n, str) for n in expect):
            raise ConfigError(f"expect is a list of session names, got {expect!r}")
        if multiprocess_dir is None and registry is None and os.environ.get(MULTIPROC_ENV):
            multiprocess_dir = os.environ[MULTIPROC_ENV]
        self.directory: str | None = None
        if multiprocess_dir is not None:
            self.directory = _check_dir(multiprocess_dir, "multiprocess_dir")
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else REGISTRY
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers must be an int >= 1, got {workers!r}")
        if workers > 1 and self.directory is None:
            raise ConfigError(
                f"{workers} worker processes share readiness and metrics only in multiprocess "
                f"mode: set {MULTIPROC_ENV} (or pass multiprocess_dir)"
            )
        self.workers = workers
        # what /metrics shows: the registry's metrics, and the readiness gauge
        self.exposed = CollectorRegistry(auto_describe=False)
        self.exposed.register(_Exposition(self))
        self.health = health or HEALTH
        self.expect = tuple(expect)
        if restart_after is not None and not restart_after > 0:
            raise ConfigError(f"restart_after must be > 0 seconds or None, got {restart_after!r}")
        self.restart_after = restart_after

    def readiness(self) -> tuple[bool, list[dict[str, Any]]]:
        """(ready, details) for this process, or for every live worker in multiprocess mode
        (not ready while fewer than `workers` processes have reported)."""
        if self.directory is None:
            return self.health.readiness(self.expect)
        ready, details = worker_readiness(self.directory, self.expect)
        live = len({e["pid"] for e in details if "pid" in e})
        if live < self.workers:
            reason = f"{live} of {self.workers} worker processes have reported their sessions"
            details.append(
                {
                    "name": "workers",
                    "state": "missing",
                    "healthy": False,
                    "reasons": [reason],
                    "expected": self.workers,
                    "live": live,
                }
            )
            ready = False
        return ready, details

    def stuck(self) -> list[dict[str, Any]]:
        """Sessions FAILED for longer than `restart_after`: a new process start would help."""
        if self.restart_after is None:
            return []
        if self.directory is not None:
            entries = worker_sessions(self.directory)
        else:
            entries = self.health.entries()
        return stuck(entries, self.restart_after)

    def before_scrape(self) -> None:
        """In multiprocess mode, write this process's pending run() counts and drop the gauges
        of workers that died unannounced (uvicorn)."""
        if self.directory is not None:
            flush_runs()
            reap_dead(self.directory)

    def health_route(self, path: str) -> Response | None:
        """The answer of `/healthz` or `/readyz`, a 404 for any other path but `/metrics`."""
        if path == "/healthz":
            failed = self.stuck()
            if failed:
                names = ", ".join(sorted({e["name"] for e in failed}))
                text = f"failed for over {self.restart_after:g} s: {names}; restart me\n"
                return 503, [("Content-Type", TEXT)], text.encode()
            return 200, [("Content-Type", TEXT)], b"ok\n"
        if path == "/readyz":
            ready, sessions = self.readiness()
            body = json.dumps({"ready": ready, "sessions": sessions}).encode()
            return (200 if ready else 503), [("Content-Type", JSON)], body
        if path == "/metrics":
            return None
        return 404, [("Content-Type", TEXT)], b"not found; try /metrics /healthz /readyz\n"


class _Exposition(Collector):
    """The endpoints' registry, and `mnn_guard_ready` computed at each scrape."""

    def __init__(self, endpoints: Endpoints) -> None:
        self._endpoints = endpoints

    def collect(self) -> Iterator[Metric]:
        yield from self._endpoints.registry.collect()
        ready, _ = self._endpoints.readiness()
        yield GaugeMetricFamily(
            READY,
            "1 while /readyz says ready (every expected worker serves every session), else 0.",
            value=1.0 if ready else 0.0,
        )


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def wsgi_app(endpoints: Endpoints | None = None) -> WSGIApp:
    """A WSGI app serving the three routes (mount it in your own server, or use `serve`)."""
    ends = endpoints or Endpoints()
    metrics = make_wsgi_app(ends.exposed)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b""]
        answer = ends.health_route(environ.get("PATH_INFO", ""))
        if answer is None:
            ends.before_scrape()
            body = b"".join(metrics({**environ, "REQUEST_METHOD": "GET"}, start_response))
        else:
            code, headers, body = answer
            start_response(f"{code} {_REASONS[code]}", headers)
        return [b""] if method == "HEAD" else [body]

    return app


Message = MutableMapping[str, Any]
# the ASGI signature as Starlette and FastAPI type it, so that `app.mount(...)` type-checks
ASGIApp = Callable[
    [Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


def asgi_app(endpoints: Endpoints | None = None) -> ASGIApp:
    """An ASGI app serving the three routes, to mount in uvicorn, Starlette or FastAPI."""
    ends = endpoints or Endpoints()
    metrics = make_asgi_app(ends.exposed)

    async def app(
        scope: Message,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] == "websocket":  # no websocket routes: refuse the handshake (403)
            if (await receive())["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008})
            return
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            answer: Response | None = 405, [("Allow", "GET, HEAD")], b""
        else:
            answer = ends.health_route(scope.get("path", ""))

        async def respond(message: Message) -> None:
            if method == "HEAD" and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        if answer is None:
            ends.before_scrape()
            await metrics(scope, receive, respond)
            return
        code, headers, body = answer
        raw = [(k.encode(), v.encode()) for k, v in headers]
        await respond({"type": "http.response.start", "status": code, "headers": raw})
        await respond({"type": "http.response.body", "body": body})

    return app
