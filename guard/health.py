"""Health of guarded sessions by name, for readiness checks: a table with a process default."""

from __future__ import annotations

import threading
from typing import Any

from guard.listeners import Listener
from guard.state import SessionStatus

__all__ = ["HEALTH", "HealthListener", "HealthTable", "readiness"]


class HealthTable:
    """The latest status of each session by name, and which listener wrote it.

    One per process by default (`HEALTH`), as prometheus_client has one `REGISTRY`; pass your
    own to `guard.wrap(health=...)` and `guard.serve(health=...)` to keep sessions apart.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, SessionStatus] = {}
        self._owners: dict[str, object] = {}  # which session's listener wrote each entry

    def record(self, owner: object, status: SessionStatus) -> None:
        """Keep `status` as the latest of its session, written by `owner`."""
        with self._lock:
            self._sessions[status.name] = status
            self._owners[status.name] = owner

    def forget(self, name: str, owner: object | None = None) -> None:
        """Drop a session's entry (only if `owner` wrote it, when given)."""
        with self._lock:
            if owner is None or self._owners.get(name) is owner:
                self._sessions.pop(name, None)
                self._owners.pop(name, None)

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._sessions.clear()
            self._owners.clear()

    def sessions(self) -> dict[str, SessionStatus]:
        """A copy of the latest status of every session by name."""
        with self._lock:
            return dict(self._sessions)

    def readiness(self) -> tuple[bool, list[dict[str, Any]]]:
        """(ready, details): ready when every known session is healthy."""
        details = [
            {
                "name": name,
                "state": status.state.value,
                "rung": status.mode,
                "rung_index": status.rung_index,
                "healthy": status.healthy,
                "reasons": list(status.verdict.reasons) if status.verdict is not None else [],
            }
            for name, status in sorted(self.sessions().items())
        ]
        return all(d["healthy"] for d in details), details


HEALTH = HealthTable()


def readiness(table: HealthTable | None = None) -> tuple[bool, list[dict[str, Any]]]:
    """(ready, details) of `table` (default: the process's): ready when every session is healthy."""
    return (table or HEALTH).readiness()


class HealthListener(Listener):
    """Keeps one session's latest status in a health table.

    One listener per session (guard.wrap makes one): closing an older session of a name does
    not erase the entry of a newer one, and nothing published after a close is recorded.
    """

    def __init__(self, table: HealthTable | None = None) -> None:
        self.table = table or HEALTH
        self._closed = False

    def on_status(self, session: str, status: SessionStatus) -> None:
        if not (status.closed or self._closed):
            self.table.record(self, status)

    def on_close(self, session: str) -> None:
        self._closed = True
        self.table.forget(session, owner=self)
