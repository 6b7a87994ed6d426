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


class HealthListener(Listener):
    """Keeps the latest status of every session in this process, whatever registry it uses."""

    def on_status(self, session: str, status: SessionStatus) -> None:
        with _lock:
            _sessions[session] = status

    def on_close(self, session: str) -> None:
        forget(session)


def forget(name: str) -> None:
    """Drop a session from the readiness table (it was closed)."""
    with _lock:
        _sessions.pop(name, None)


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
