"""`guard.serve`: the guard's routes on a small HTTP server bounded against slow and idle clients.

One thread accepts connections and reads request heads without blocking, so an idle or
trickling client holds a socket and no thread; a complete head goes to one of
`Limits.threads` threads, which runs the WSGI app (`guard.integrations.endpoints`) and writes
the answer. Each connection has one deadline, `Limits.request_seconds` from its accept to the
last byte of its answer (not a timeout per read, which one byte now and then resets); at
most `Limits.connections` are open at once (a new one closes the longest-waiting one still
sending its head); the listen backlog is `Limits.backlog`.

>>> server = guard.serve(port=9108)  # doctest: +SKIP
>>> server.url  # doctest: +SKIP
'http://127.0.0.1:9108'
>>> server.close()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import CollectorRegistry

from guard.errors import ConfigError
from guard.health import HealthTable
from guard.integrations.endpoints import RESTART_AFTER, Endpoints, WSGIApp, wsgi_app

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = ["REQUEST_SECONDS", "Limits", "MetricsServer", "serve"]

log = logging.getLogger("mnn_guard")

REQUEST_SECONDS = 10.0  # a connection's whole life: request head in, answer out
HEAD_BYTES = 65536  # a head not ended by then goes to the parser, which refuses it


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """How `guard.serve` bounds its clients: a deadline per connection, connections, threads."""

    request_seconds: float = REQUEST_SECONDS
    connections: int = 64
    threads: int = 4
    backlog: int = 1024  # the kernel caps it at net.core.somaxconn

    def __post_init__(self) -> None:
        if not self.request_seconds > 0:
            raise ConfigError(f"request_seconds must be > 0, got {self.request_seconds!r}")
        for key in ("connections", "threads", "backlog"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be an int >= 1, got {value!r}")


@dataclass(eq=False, slots=True)
class _Connection:
    """An accepted connection: its socket, peer, deadline and the request head read so far."""

    sock: socket.socket
    address: Any
    deadline: float
    head: bytearray


class _Writer(io.BufferedIOBase):
    """Writes an answer to a socket, all of it before the connection's deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the connection's deadline passed")
        self._sock.settimeout(remaining)
        self._sock.sendall(data)
        return memoryview(data).nbytes


@dataclass(frozen=True, slots=True)
class _Site:
    """What WSGIRequestHandler asks of its server: the app and the base environ."""

    app: WSGIApp
    base_environ: dict[str, str]

    def get_app(self) -> WSGIApp:
        return self.app


class _Handler(WSGIRequestHandler):
    """Answers one request whose head was read already; logs at debug level only."""

    def __init__(self, connection: _Connection, site: _Site) -> None:
        self._connection = connection
        super().__init__(connection.sock, connection.address, site)  # type: ignore[arg-type]

    def setup(self) -> None:
        self.connection = self.request
        self.rfile = io.BytesIO(bytes(self._connection.head))
        self.wfile = _Writer(self.connection, self._connection.deadline)

    def get_environ(self) -> dict[str, Any]:
        """The WSGI environ, with the path as sent (http.server folds a leading `//`)."""
        environ: dict[str, Any] = super().get_environ()
        parts = self.requestline.split(" ")
        if len(parts) == 3 and parts[1].startswith("//"):
            environ["PATH_INFO"] = parts[1].split("?", 1)[0]
        return environ

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http %s: " + format, self.address_string(), *args)


def _ended(head: bytearray, start: int) -> bool:
    """True once the head holds its blank line (searched from `start`, a few bytes back)."""
    return head.find(b"\r\n\r\n", start) >= 0 or head.find(b"\n\n", start) >= 0


class MetricsServer:
    """The WSGI app served on `host:port` by a thread and a few workers; `close()` ends it."""

    def __init__(
        self, host: str, port: int, endpoints: Endpoints, *, limits: Limits | None = None
    ) -> None:
        self.host = host
        self.endpoints = endpoints
        self.limits = limits or Limits()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._listener = socket.create_server(
                (host, port),
                family=family,
                backlog=self.limits.backlog,
                dualstack_ipv6=family == socket.AF_INET6 and socket.has_dualstack_ipv6(),
            )
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        environ = {
            "SERVER_NAME": host,
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PORT": str(self.port),
            "REMOTE_HOST": "",
            "CONTENT_LENGTH": "",
            "SCRIPT_NAME": "",
        }
        self._site = _Site(wsgi_app(endpoints), environ)
        self._selector = selectors.DefaultSelector()
        self._wake, self._woken = socket.socketpair()
        self._woken.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._woken, selectors.EVENT_READ)
        self._waiting: dict[socket.socket, _Connection] = {}  # oldest first; the loop's own
        self._lock = threading.Lock()
        self._answering = 0  # connections handed to a worker, not yet closed (under _lock)
        self._closed = False
        self._stop = threading.Event()
        self._workers = ThreadPoolExecutor(
            self.limits.threads, thread_name_prefix=f"mnn-guard-http-{self.port}"
        )
        self._thread = threading.Thread(
            target=self._loop, name=f"mnn-guard-http-{self.port}", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:9108` (append `/metrics`)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # ------------------------------------------------------------------ the loop thread

    def _loop(self) -> None:
        """Accept, read heads, drop connections past their deadline, until `close()`."""
        try:
            while not self._stop.is_set():
                timeout = None
                if self._waiting:
                    first = next(iter(self._waiting.values()))
                    timeout = max(0.0, first.deadline - time.monotonic())
                for key, _ in self._selector.select(timeout):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._woken:
                        self._woken.recv(4096)
                    else:
                        self._read(key.data)
                self._expire()
        finally:
            for connection in list(self._waiting.values()):
                self._drop(connection)
            self._selector.close()
            self._listener.close()
            self._woken.close()
            self._wake.close()

    def _accept(self) -> None:
        """Take every pending connection, within `Limits.connections`."""
        while True:
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of file descriptors: make room, or wait a little
                log.debug("http: accept failed", exc_info=True)
                if self._waiting:
                    self._drop(next(iter(self._waiting.values())))
                else:
                    self._stop.wait(0.05)
                return
            with self._lock:
                full = len(self._waiting) + self._answering >= self.limits.connections
            if full and not self._waiting:
                sock.close()  # every slot is being answered: no room
                continue
            if full:
                self._drop(next(iter(self._waiting.values())))  # the longest-waiting head
            sock.setblocking(False)
            deadline = time.monotonic() + self.limits.request_seconds
            connection = _Connection(sock, address, deadline, bytearray())
            self._waiting[sock] = connection
            self._selector.register(sock, selectors.EVENT_READ, connection)

    def _read(self, connection: _Connection) -> None:
        """Read what arrived of a head; a whole one goes to a worker."""
        try:
            data = connection.sock.recv(HEAD_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # hung up (or reset) before the head ended
            self._drop(connection)
            return
        start = max(0, len(connection.head) - 3)
        connection.head += data
        if not _ended(connection.head, start) and len(connection.head) < HEAD_BYTES:
            return
        self._selector.unregister(connection.sock)
        del self._waiting[connection.sock]
        with self._lock:
            self._answering += 1
        self._workers.submit(self._answer, connection)

    def _expire(self) -> None:
        """Close the connections whose deadline passed before their head ended."""
        now = time.monotonic()
        while self._waiting:
            first = next(iter(self._waiting.values()))
            if first.deadline > now:
                return
            log.debug("http %s: no whole request within the deadline", first.address)
            self._drop(first)

    def _drop(self, connection: _Connection) -> None:
        """Close a connection still sending its head."""
        self._selector.unregister(connection.sock)
        del self._waiting[connection.sock]
        connection.sock.close()

    # ------------------------------------------------------------------ worker threads

    def _answer(self, connection: _Connection) -> None:
        """Answer one request and close its connection (a worker thread)."""
        try:
            connection.sock.setblocking(True)
            _Handler(connection, self._site)
        except Exception:  # a client that went away or stalled is not worth a traceback
            log.debug("http %s: connection ended early", connection.address, exc_info=True)
        finally:
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_WR)
            connection.sock.close()
            with self._lock:
                self._answering -= 1

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stop serving and free the port; idempotent. Answers under way end by their deadline."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake.send(b"x")
        self._thread.join(timeout=5)
        self._workers.shutdown(wait=False)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<MetricsServer {self.url} {'closed' if self._closed else 'serving'}>"


def serve(
    port: int = 9108,
    host: str = "127.0.0.1",
    registry: CollectorRegistry | None = None,
    *,
    multiprocess_dir: str | os.PathLike[str] | None = None,
    health: HealthTable | None = None,
    expect: Sequence[str] = (),
    restart_after: float | None = RESTART_AFTER,
    limits: Limits | None = None,
    workers: int = 1,
) -> MetricsServer:
    """Serve `/metrics`, `/healthz` and `/readyz` on `host:port` (0 picks a free port).

    What they answer for is `Endpoints`'s rule: `registry`, or every worker's files with
    `multiprocess_dir` or `PROMETHEUS_MULTIPROC_DIR`; `/readyz` needs a session, every
    session healthy, each name in `expect` present and `workers` worker processes reported;
    `/healthz` fails after a session has been FAILED for `restart_after` seconds. `limits`
    bounds slow and idle clients.

    >>> with guard.serve(port=0) as server:  # doctest: +SKIP
    ...     urllib.request.urlopen(server.url + "/readyz")
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port must be an int within 0..65535 (0 picks a free one), got {port!r}")
    endpoints = Endpoints(
        registry,
        multiprocess_dir=multiprocess_dir,
        health=health,
        expect=expect,
        restart_after=restart_after,
        workers=workers,
    )
    return MetricsServer(host, port, endpoints, limits=limits)
