"""A small threaded HTTP server for `/metrics`, `/healthz` and `/readyz` (standard library only).

>>> server = guard.serve(port=9108)  # doctest: +SKIP
>>> server.url  # doctest: +SKIP
'http://127.0.0.1:9108'
>>> server.close()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from guard.errors import ConfigError
from guard.health import HEALTH, HealthTable

__all__ = ["MetricsServer", "serve"]

log = logging.getLogger("mnn_guard")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
TEXT = "text/plain; charset=utf-8"


def _check_dir(path: str | os.PathLike[str], what: str) -> str:
    if not Path(path).is_dir():
        raise ConfigError(f"{what} {os.fspath(path)!r} is not a directory; create it first")
    return os.fspath(path)


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """`/metrics`, `/healthz` and `/readyz` served from a daemon thread; `close()` stops it.

    Metrics come from `registry`, or, in multiprocess mode, from a fresh registry with a
    MultiProcessCollector over `multiprocess_dir` at every scrape (every worker's files).
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry | None,
        multiprocess_dir: str | None,
        health: HealthTable = HEALTH,
    ) -> None:
        self.host = host
        self.health = health
        self._registry = registry
        self._multiprocess_dir = multiprocess_dir
        handler = type("Handler", (_Handler,), {"owner": self})
        server_class = _Server6 if ":" in host else _Server
        try:
            self._httpd = server_class((host, port), handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self.port: int = self._httpd.server_address[1]
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},  # how quickly close() is noticed
            name=f"mnn-guard-http-{self.port}",
            daemon=True,
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:9108` (append `/metrics`)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def metrics_text(self) -> bytes:
        """The Prometheus text exposition served at `/metrics`."""
        if self._multiprocess_dir is not None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self._registry if self._registry is not None else REGISTRY)

    def close(self) -> None:
        """Stop serving and free the port; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<MetricsServer {self.url} {'closed' if self._closed else 'serving'}>"


class _Handler(BaseHTTPRequestHandler):
    """Routes GET requests to the owning MetricsServer."""

    owner: MetricsServer

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            try:
                text = self.owner.metrics_text()
            except Exception as exc:
                log.exception("/metrics failed")
                self._send(500, TEXT, f"metrics failed: {exc!r}\n".encode())
                return
            self._send(200, CONTENT_TYPE_LATEST, text)
        elif path == "/healthz":
            self._send(200, TEXT, b"ok\n")
        elif path == "/readyz":
            ready, sessions = self.owner.health.readiness()
            body = json.dumps({"ready": ready, "sessions": sessions}).encode()
            self._send(200 if ready else 503, "application/json", body)
        else:
            self._send(404, TEXT, b"not found; try /metrics /healthz /readyz\n")

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http %s: " + format, self.address_string(), *args)


def serve(
    port: int = 9108,
    host: str = "127.0.0.1",
    registry: CollectorRegistry | None = None,
    *,
    multiprocess_dir: str | os.PathLike[str] | None = None,
    health: HealthTable | None = None,
) -> MetricsServer:
    """Serve `/metrics`, `/healthz` and `/readyz` on `host:port` (0 picks a free port).

    `/metrics` shows `registry` when given; otherwise, with `multiprocess_dir` or the
    `PROMETHEUS_MULTIPROC_DIR` environment variable, every worker's files aggregated;
    otherwise the global registry. `/readyz` answers for `health` (default: this process's).

    >>> with guard.serve(port=0) as server:  # doctest: +SKIP
    ...     urllib.request.urlopen(server.url + "/readyz")
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port must be an int within 0..65535 (0 picks a free one), got {port!r}")
    if registry is not None and multiprocess_dir is not None:
        raise ConfigError("pass either registry or multiprocess_dir, not both")
    directory: str | None = None
    if multiprocess_dir is not None:
        directory = _check_dir(multiprocess_dir, "multiprocess_dir")
    elif registry is None and os.environ.get(MULTIPROC_ENV):
        directory = _check_dir(os.environ[MULTIPROC_ENV], MULTIPROC_ENV)
    return MetricsServer(host, port, registry, directory, health or HEALTH)
