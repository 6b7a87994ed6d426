"""Health of guarded sessions by name, for readiness checks: a table with a process default.

Readiness: a process (or, in multiprocess mode, a set of live worker processes) is ready when
it has at least one session, every session it has is healthy, and every session named in
`expect` is there and healthy. The table keeps one `Entry` per session object: a session makes
its own from its status (`Entry.of`), a `guard.Pool` one from its worker slots. Where live
sessions share a name, readiness shows the name once, as the worst of them (`SEVERITY`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from guard.listeners import Listener
from guard.state import SEVERITY, SessionStatus, State

__all__ = [
    "HEALTH",
    "Entry",
    "HealthListener",
    "HealthTable",
    "mark_process_dead",
    "readiness",
    "stuck",
    "worker_entries",
    "worker_readiness",
    "worker_sessions",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_PREFIX = "mnn_guard_health_"
_ABANDONED = object()  # the owner of an entry whose session guard.wrap raised about


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """What readiness says of one session, or of one pool as a whole."""

    name: str
    state: State
    rung: str  # the name of the rung in use
    rung_index: int
    healthy: bool
    since: float  # wall-clock time (time.time()) the state was entered
    reasons: tuple[str, ...] = ()  # why it is not healthy, in words
    detail: Mapping[str, Any] = field(default_factory=dict)  # more fields (a pool's workers)

    @classmethod
    def of(cls, status: SessionStatus) -> Entry:
        """A session's entry, from its status."""
        return cls(
            name=status.name,
            state=status.state,
            rung=status.mode,
            rung_index=status.rung_index,
            healthy=status.healthy,
            since=status.since,
            reasons=status.verdict.reasons if status.verdict is not None else (),
        )

    def as_dict(self) -> dict[str, Any]:
        """The entry as /readyz and the health files show it."""
        return {
            "name": self.name,
            "state": self.state.value,
            "rung": self.rung,
            "rung_index": self.rung_index,
            "healthy": self.healthy,
            "since": self.since,
            "reasons": list(self.reasons),
            **self.detail,
        }


def _judge(
    entries: Iterable[dict[str, Any]], expect: Sequence[str]
) -> tuple[bool, list[dict[str, Any]]]:
    """(ready, details) by the readiness rule; an expected session nobody has is listed."""
    details = sorted(entries, key=lambda e: (e["name"], e.get("pid", 0)))
    present = {e["name"] for e in details}
    missing = [
        {"name": n, "state": "missing", "healthy": False, "reasons": ["no such session yet"]}
        for n in sorted(set(expect) - present)
    ]
    details += missing
    ready = bool(details) and all(e["healthy"] for e in details)
    return ready, details


def _alive(pid: int) -> bool:
    """True when a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worst(owned: Mapping[object, Entry]) -> Entry:
    """What readiness says of a name: the worst entry of its live sessions (or pools), with
    how many there are when several share the name."""
    worst = max(owned.values(), key=lambda e: (not e.healthy, SEVERITY[e.state]))
    if len(owned) == 1:
        return worst
    return replace(worst, detail={**worst.detail, "sessions": len(owned)})


class HealthTable:
    """The latest entry of each session (or pool), by name and by the owner that wrote it.

    One per process by default (`HEALTH`), as prometheus_client has one `REGISTRY`; pass your
    own to `guard.wrap(health=...)` and `guard.serve(health=...)` to keep sessions apart. With
    a `directory` (the default table takes `PROMETHEUS_MULTIPROC_DIR` at import), every
    change is also written to a file of this process there, so that one server can answer
    for every worker (`worker_readiness`).
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory else None
        self._lock = threading.Lock()
        # name -> owner (a session's listener, a pool) -> its latest entry
        self._sessions: dict[str, dict[object, Entry]] = {}

    def record(self, owner: object, entry: Entry) -> None:
        """Keep `entry` as the latest that `owner` wrote of its name (it replaces an abandoned
        entry of the name)."""
        with self._lock:
            owned = self._sessions.setdefault(entry.name, {})
            owned.pop(_ABANDONED, None)
            owned[owner] = entry
            self._write()

    def abandon(self, name: str, owner: object) -> None:
        """Keep the entry `owner` wrote of a session never handed out (`guard.wrap` raised) as
        the name's, until another session (or pool) of the name records one."""
        with self._lock:
            owned = self._sessions.get(name, {})
            entry = owned.pop(owner, None)
            if entry is not None:
                owned[_ABANDONED] = entry
            self._write()

    def forget(self, name: str, owner: object | None = None) -> None:
        """Drop the entry `owner` wrote of a name (every entry of the name, without `owner`)."""
        with self._lock:
            owned = self._sessions.get(name, {})
            if owner is None:
                owned.clear()
            owned.pop(owner, None)
            if not owned:
                self._sessions.pop(name, None)
            self._write()

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._sessions.clear()
            self._write()

    def sessions(self) -> dict[str, Entry]:
        """What readiness says of every name: the worst entry of its sessions (or pools)."""
        with self._lock:
            return {name: _worst(owned) for name, owned in self._sessions.items()}

    def live(self, name: str) -> int:
        """How many live sessions (or pools) have written an entry of this name."""
        with self._lock:
            return sum(owner is not _ABANDONED for owner in self._sessions.get(name, ()))

    def records(self) -> list[tuple[object, Entry]]:
        """Every entry with the owner that wrote it."""
        with self._lock:
            return [(o, e) for owned in self._sessions.values() for o, e in owned.items()]

    def entries(self) -> list[dict[str, Any]]:
        """What readiness says of each name of this table."""
        with self._lock:
            return self._entries()

    def _entries(self) -> list[dict[str, Any]]:
        """Each name's entry as readiness shows it (the caller holds the lock)."""
        return [_worst(owned).as_dict() for owned in self._sessions.values()]

    def readiness(self, expect: Sequence[str] = ()) -> tuple[bool, list[dict[str, Any]]]:
        """(ready, details) of this process's sessions, by the readiness rule."""
        return _judge(self.entries(), expect)

    def _write(self) -> None:
        """Replace this process's file in the directory (caller holds the lock)."""
        if self.directory is None:
            return
        pid = os.getpid()
        doc = {"pid": pid, "sessions": self._entries()}
        path = self.directory / f"{_PREFIX}{pid}.json"
        with contextlib.suppress(OSError):  # health files must never break serving
            fd, tmp = tempfile.mkstemp(prefix=f".{_PREFIX}", dir=self.directory)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, path)


def worker_entries(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every live process's sessions in `directory`, each with its `pid`; dead pids are reaped."""
    reap_dead(directory)
    entries: list[dict[str, Any]] = []
    for path in sorted(Path(directory).glob(f"{_PREFIX}*.json")):
        try:
            doc = json.loads(path.read_text())
            pid = int(doc["pid"])
            sessions = list(doc["sessions"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced, or not ours
        if _alive(pid):
            entries.append({"pid": pid, "sessions": sessions})
    return entries


def worker_sessions(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every live process's sessions in `directory`, each with its process's `pid`."""
    return [{**e, "pid": w["pid"]} for w in worker_entries(directory) for e in w["sessions"]]


def worker_readiness(
    directory: str | os.PathLike[str], expect: Sequence[str] = ()
) -> tuple[bool, list[dict[str, Any]]]:
    """(ready, details) over every live process's file in `directory`; dead pids are skipped.

    With `expect`, each live process must have each expected session healthy.
    """
    entries: list[dict[str, Any]] = []
    for worker in worker_entries(directory):
        pid, sessions = worker["pid"], worker["sessions"]
        entries += [{**entry, "pid": pid} for entry in sessions]
        entries += [
            {
                "name": name,
                "pid": pid,
                "state": "missing",
                "healthy": False,
                "reasons": ["no such session in this worker yet"],
            }
            for name in sorted(set(expect) - {e["name"] for e in sessions})
        ]
    return _judge(entries, expect)


def stuck(
    entries: Iterable[dict[str, Any]], after: float, state: State = State.FAILED
) -> list[dict[str, Any]]:
    """The sessions that have been in `state` (FAILED) for longer than `after` seconds (wall
    clock)."""
    now = time.time()
    return [e for e in entries if e["state"] == state.value and now - e.get("since", now) > after]


_PID_FILE = re.compile(r"_(\d+)\.(?:db|json)$")


def reap_dead(directory: str | os.PathLike[str]) -> None:
    """Forget every process whose files are in `directory` but which no longer exists."""
    pids = {int(m.group(1)) for n in os.listdir(directory) if (m := _PID_FILE.search(n))}
    for pid in sorted(pids):
        if not _alive(pid):
            mark_process_dead(pid, directory)


def mark_process_dead(pid: int, directory: str | os.PathLike[str] | None = None) -> None:
    """Forget a dead worker: its health file and its live gauges (gunicorn's `child_exit`)."""
    from prometheus_client import multiprocess

    folder = directory or os.environ.get(MULTIPROC_ENV)
    if not folder:
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, f"{_PREFIX}{pid}.json"))
    multiprocess.mark_process_dead(pid, path=os.fspath(folder))  # type: ignore[no-untyped-call]


HEALTH = HealthTable(os.environ.get(MULTIPROC_ENV) or None)


def readiness(
    table: HealthTable | None = None, expect: Sequence[str] = ()
) -> tuple[bool, list[dict[str, Any]]]:
    """(ready, details) of `table` (default: the process's), by the readiness rule."""
    return (table or HEALTH).readiness(expect)


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
            self.table.record(self, Entry.of(status))

    def on_close(self, session: str) -> None:
        self._closed = True
        self.table.forget(session, owner=self)

    def abandon(self, session: str) -> None:
        """The session was never handed out (`guard.wrap` raised): its last entry stays the
        name's until another session of the name records one."""
        self._closed = True
        self.table.abandon(session, owner=self)
