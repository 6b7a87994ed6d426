"""Process-wide health of guarded sessions by name, for readiness checks."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from guard.listeners import Listener

if TYPE_CHECKING:
    from guard.session import SessionStatus

__all__ = ["HealthListener", "forget", "readiness", "sessions"]

_lock = threading.Lock()
_sessions: dict[str, SessionStatus] = {}
_owners: dict[str, HealthListener] = {}  # which session's listener wrote each entry


class HealthListener(Listener):
    """Keeps the latest status of every session in this process, whatever registry it uses.

    One listener per session (guard.wrap makes one): closing an older session of a name does
    not erase the entry of a newer one, and nothing published after a close is recorded.
    """

    def __init__(self) -> None:
        self._closed: set[str] = set()

    def on_status(self, session: str, status: SessionStatus) -> None:
        with _lock:
            if status.closed or session in self._closed:
                return
            _sessions[session] = status
            _owners[session] = self

    def on_close(self, session: str) -> None:
        with _lock:
            self._closed.add(session)
            if _owners.get(session) is self:
                _sessions.pop(session, None)
                _owners.pop(session, None)


def forget(name: str) -> None:
    """Drop a session from the readiness table, whoever recorded it."""
    with _lock:
        _sessions.pop(name, None)
        _owners.pop(name, None)


def sessions() -> dict[str, SessionStatus]:
    """A copy of the latest status of every session by name."""
    with _lock:
        return dict(_sessions)


def readiness() -> tuple[bool, list[dict[str, Any]]]:
    """(ready, details): ready when every known session is healthy."""
    details = [
        {
            "name": name,
            "rung": status.mode,
            "rung_index": status.rung,
            "healthy": status.healthy,
            "reasons": list(status.verdict.reasons) if status.verdict is not None else [],
        }
        for name, status in sorted(sessions().items())
    ]
    return all(d["healthy"] for d in details), details
