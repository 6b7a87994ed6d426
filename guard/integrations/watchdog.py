"""A watchdog outside the workers: it kills a worker whose session is stuck starting, or has
been FAILED for too long, so that the server starts a fresh one (a new draw) in its place.

A worker hung inside MNN holds the GIL, so none of its own threads can end it, and gunicorn's
`timeout` starts only with a worker's first heartbeat, after its app was imported (a worker
that hangs while it builds its session at import is never timed out). The watchdog runs in
another process (gunicorn's master: `deploy/gunicorn.conf.py`) and reads what each worker
last wrote to the multiprocess directory (`guard.health`). It sees a worker from its
session's first status on: `guard.wrap` records STARTING before the first init.

>>> Watchdog(directory, Deadlines(start=600, failed=900)).start()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from guard.errors import ConfigError
from guard.health import stuck, worker_sessions
from guard.state import State

__all__ = ["Deadlines", "Kill", "Watchdog"]

log = logging.getLogger("mnn_guard")


@dataclass(frozen=True, slots=True, kw_only=True)
class Deadlines:
    """How long a worker's session may stay STARTING or FAILED before the worker is killed
    (None: never), and how often the watchdog looks.

    `start` must outlast the ladder's worst case, rungs x (1 + reinit_attempts) x init_timeout
    (480 s with the default policy); `failed` gives the session's own retries
    (`Policy.promote_after`) their chance before a fresh process is drawn.
    """

    start: float | None = 600.0
    failed: float | None = 900.0
    every: float = 1.0

    def __post_init__(self) -> None:
        for key in ("start", "failed", "every"):
            value = getattr(self, key)
            if value is None and key != "every":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"Deadlines.{key} must be > 0 seconds, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Kill:
    """A worker the watchdog killed: its pid, the session that was stuck, in what, how long."""

    pid: int
    session: str
    state: State
    seconds: float


class Watchdog:
    """Kills (SIGKILL) the workers in `directory` whose session overstayed its deadline.

    `workers`, when given, lists the pids the server owns (gunicorn's `server.WORKERS`): no
    other process is ever signalled. `check()` makes one pass; `start()` runs passes every
    `Deadlines.every` seconds in a daemon thread until `close()`.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        deadlines: Deadlines | None = None,
        *,
        workers: Callable[[], Collection[int]] | None = None,
    ) -> None:
        if not Path(directory).is_dir():
            raise ConfigError(f"watchdog directory {os.fspath(directory)!r} is not a directory")
        self.directory = Path(directory)
        self.deadlines = deadlines or Deadlines()
        self._workers = workers
        self._killed: set[int] = set()  # signalled, not yet reaped by the server
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> list[Kill]:
        """Kill every worker whose session overstayed; the kills of this pass."""
        entries = worker_sessions(self.directory)
        listed = {e["pid"] for e in entries}
        self._killed &= listed  # a reaped worker's pid may come back as a new worker's
        allowed = set(self._workers()) if self._workers is not None else None
        kills: list[Kill] = []
        limits = ((State.STARTING, self.deadlines.start), (State.FAILED, self.deadlines.failed))
        for state, limit in limits:
            if limit is None:
                continue
            for entry in stuck(entries, limit, state):
                pid = int(entry["pid"])
                if pid in self._killed or pid == os.getpid():
                    continue
                if allowed is not None and pid not in allowed:
                    continue
                seconds = self._age(entry)
                log.warning(
                    "watchdog: worker %d's session %r has been %s for %.0f s (limit %g s): "
                    "killing it; its server starts a new one",
                    pid, entry["name"], state.value, seconds, limit,
                )  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._killed.add(pid)
                kills.append(Kill(pid=pid, session=entry["name"], state=state, seconds=seconds))
        return kills

    @staticmethod
    def _age(entry: dict[str, object]) -> float:
        """Seconds since the entry's state was entered."""
        since = entry.get("since")
        return time.time() - since if isinstance(since, int | float) else 0.0

    def start(self) -> Watchdog:
        """Run a pass every `Deadlines.every` seconds in a daemon thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="mnn-guard-watchdog", daemon=True
            )
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.deadlines.every):
            try:
                self.check()
            except Exception:  # a bad pass must not end the watch
                log.exception("watchdog: a pass failed")

    def close(self) -> None:
        """Stop watching; idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
