"""Diagnosis bundles: what a failed canary leaves behind for a person and for MNN's maintainers.

What a bundle holds is `guard.bundle`; this module decides when one is written and keeps the
folder bounded. Bundles are written by one background thread per folder and process, from a
bounded queue: the listener only queues a reference to the attempt's owned arrays, so no
forward ever waits for a disk. Bounds: at most `max_bundles` bundles (default 20) and
`max_bytes` bytes (default 200 MiB) in the folder, oldest removed first (only folders that are
mnn-guard bundles); a bundle whose arrays alone exceed `max_bytes` is written without them; at
most `queue_size` (8) bundles wait to be written, and a failure beyond that is counted in
`dropped`, not queued. `mnn-guard report BUNDLE` adds `report.html`, with pictures.

>>> policy = guard.Policy(diagnose="/var/lib/vocoder/diagnosis")  # doctest: +SKIP
>>> session = guard.wrap(factory, probe, policy=policy)  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import importlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guard.bundle import (
    KIND,
    MANIFEST,
    Job,
    bundle_bytes,
    describe_factory,
    history_entry,
    write_bundle,
)
from guard.errors import ConfigError
from guard.ladder import Attempt, Outcome
from guard.listeners import Listener
from guard.shadow import ShadowCheck, ShadowResult
from probes import Probe, ProbeError

__all__ = [
    "MAX_BUNDLES",
    "MAX_BYTES",
    "BundleWriter",
    "DiagnosisListener",
    "find_bundles",
    "writer_for",
]

log = logging.getLogger("mnn_guard")

MAX_BUNDLES = 20
MAX_BYTES = 200 << 20
QUEUE_SIZE = 8
HISTORY = 16  # attempts per session kept for the next bundle
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})  # errors that removing bundles may cure
IDLE_SECONDS = 5.0  # a writer thread with nothing to do for this long ends (a new one starts)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def find_bundles(folder: str | os.PathLike[str]) -> list[Path]:
    """The mnn-guard bundles directly in `folder`, oldest first (names start with a UTC time)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.name.startswith(".") or not child.is_dir():
            continue
        try:
            manifest = json.loads((child / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and manifest.get("kind") == KIND:
            found.append(child)
    return sorted(found, key=lambda p: p.name)


def prune(folder: Path, *, max_bundles: int, max_bytes: int, keep: Path) -> list[Path]:
    """Remove the oldest bundles until at most `max_bundles` and `max_bytes` remain."""
    bundles = find_bundles(folder)
    sizes = {b: _size(b) for b in bundles}
    total = sum(sizes.values())
    removed: list[Path] = []
    for bundle in bundles:
        if len(bundles) - len(removed) <= max_bundles and total <= max_bytes:
            break
        if bundle == keep:
            continue
        shutil.rmtree(bundle, ignore_errors=True)  # another process may be removing it too
        total -= sizes[bundle]
        removed.append(bundle)
    return removed


# ------------------------------------------------------------------ the background writer


class BundleWriter:
    """Writes bundles into one folder from a bounded queue, on one background thread."""

    def __init__(self, folder: Path, *, max_bundles: int, max_bytes: int, queue_size: int) -> None:
        self.folder = folder
        self.max_bundles = max_bundles
        self.max_bytes = max_bytes
        self.queue_size = queue_size
        self.written: collections.deque[Path] = collections.deque(maxlen=100)
        self.total = 0  # bundles written so far
        self.dropped = 0  # failures not written: the queue was full
        self.failed = 0  # bundles whose writing raised (said once until one is written again)
        self._jobs: collections.deque[Job] = collections.deque()
        self._busy = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._seq = 0
        self._failing = False  # the last bundle could not be written (and that was said)
        self._rotating = False  # a full disk made room by removing old bundles (said once)

    def submit(self, job: Job) -> bool:
        """Queue a bundle (never blocks); False when the queue is full and it was dropped."""
        with self._cond:
            if self._pid != os.getpid():  # a forked child has no writer thread: start afresh
                self._pid, self._thread, self._busy = os.getpid(), None, False
                self._jobs.clear()
            if len(self._jobs) >= self.queue_size:
                self.dropped += 1
                log.warning(
                    "diagnosis: %d bundle(s) already wait to be written to %s; dropped one",
                    len(self._jobs),
                    self.folder,
                )
                return False
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="mnn-guard-diagnosis", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
            return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._jobs:
                    self._cond.wait(IDLE_SECONDS)
                if not self._jobs:
                    self._thread = None
                    return
                job = self._jobs.popleft()
                self._busy = True
                self._seq += 1
                seq = self._seq
            try:
                path = self._write(job, seq)
                prune(
                    self.folder, max_bundles=self.max_bundles, max_bytes=self.max_bytes, keep=path
                )
                log.warning("session %s: diagnosis bundle written to %s", job.session, path)
                with self._cond:
                    self.written.append(path)
                    self.total += 1
            except Exception as exc:
                self._fail(exc)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _write(self, job: Job, seq: int) -> Path:
        """Write the bundle; on a full disk, remove the oldest bundles to make room for it."""
        while True:
            try:
                path = write_bundle(self.folder, job, seq=seq, max_bytes=self.max_bytes)
            except OSError as exc:
                if exc.errno not in NO_ROOM or not self._make_room(job):
                    raise
                continue
            if self._failing:
                log.warning("diagnosis: bundles are written to %s again", self.folder)
                self._failing = False
            return path

    def _make_room(self, job: Job) -> bool:
        """Remove the oldest bundle, if removing older bundles could make room for `job`'s."""
        bundles = find_bundles(self.folder)
        if not bundles:
            return False
        room = shutil.disk_usage(self.folder).free + sum(_size(b) for b in bundles)
        if room < bundle_bytes(job, max_bytes=self.max_bytes):
            return False
        shutil.rmtree(bundles[0], ignore_errors=True)
        said = "diagnosis: the disk of %s is full: the oldest bundles are removed to make room (%s)"
        log.log(logging.INFO if self._rotating else logging.WARNING, said, self.folder, bundles[0])
        self._rotating = True
        return not bundles[0].exists()

    def _fail(self, exc: Exception) -> None:
        """Count a bundle that could not be written; say so once, until one is written again."""
        self.failed += 1
        if self._failing:
            return
        self._failing = True
        message = "diagnosis: cannot write bundles to %s (%s); they are dropped until one can be"
        message += " written again (counted in writer.failed)"
        if not isinstance(exc, OSError):  # a bug in mnn-guard: its traceback, once
            log.exception(message, self.folder, f"{type(exc).__name__}: {exc}")
        elif exc.errno in NO_ROOM:
            why = "the disk is full, and removing older bundles would not make room"
            log.warning(message, self.folder, why)
        else:
            log.warning(message, self.folder, exc.strerror or exc)

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Wait until every queued bundle is written; False if `timeout` s passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def since(self, total: int) -> list[Path]:
        """The bundles written after the first `total` that still exist (the last 100 at most)."""
        with self._cond:
            new = self.total - total
            paths = list(self.written)[-new:] if new > 0 else []
        return [p for p in paths if p.is_dir()]  # the bounds may have removed the oldest


_writers_lock = threading.Lock()
_writers: dict[tuple[str, int, int, int], BundleWriter] = {}


def _folder(folder: str | os.PathLike[str]) -> Path:
    """The bundle folder, checked now and created at the first bundle (its parent must exist)."""
    path = Path(folder).absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"diagnosis folder {str(path)!r} is a file; expected a folder")
    where = path if path.exists() else path.parent
    if not where.is_dir():
        raise ConfigError(
            f"diagnosis folder {str(path)!r}: its parent folder does not exist; create it first"
        )
    if not os.access(where, os.W_OK | os.X_OK):
        raise ConfigError(f"diagnosis folder {str(path)!r}: {str(where)!r} is not writable")
    return path


def writer_for(
    folder: str | os.PathLike[str],
    *,
    max_bundles: int = MAX_BUNDLES,
    max_bytes: int = MAX_BYTES,
    queue_size: int = QUEUE_SIZE,
) -> BundleWriter:
    """The process's writer for `folder` and these bounds (one thread per folder, not session)."""
    bounds = {"max_bundles": max_bundles, "max_bytes": max_bytes, "queue_size": queue_size}
    for what, value in bounds.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{what} must be a positive int, got {value!r}")
    path = _folder(folder)
    key = (str(path), max_bundles, max_bytes, queue_size)
    with _writers_lock:
        if key not in _writers:
            _writers[key] = BundleWriter(
                path, max_bundles=max_bundles, max_bytes=max_bytes, queue_size=queue_size
            )
        return _writers[key]


# ------------------------------------------------------------------ the listener


class DiagnosisListener(Listener):
    """Leaves a bundle in `folder` for every failed canary (init or re-check), off the request path.

    `guard.wrap` adds one when `Policy.diagnose` names a folder; build one yourself for other
    bounds. `flush()` waits for the queued bundles (for tools and tests).
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        probe: Probe,
        *,
        factory: Any = None,
        max_bundles: int = MAX_BUNDLES,
        max_bytes: int = MAX_BYTES,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.writer = writer_for(
            folder, max_bundles=max_bundles, max_bytes=max_bytes, queue_size=queue_size
        )
        self.probe = probe
        self._factory = describe_factory(factory)
        self._lock = threading.Lock()
        self._history: dict[str, collections.deque[dict[str, Any]]] = {}

    @property
    def folder(self) -> Path:
        """Where the bundles go."""
        return self.writer.folder

    def _remember(self, session: str, attempt: Attempt, event: str, now: float) -> tuple[Any, ...]:
        """Add the attempt to the session's history (the last HISTORY); the history so far."""
        entry = history_entry(attempt, event, now)
        with self._lock:
            history = self._history.setdefault(session, collections.deque(maxlen=HISTORY))
            history.append(entry)
            return tuple(history)

    def record(
        self, session: str, attempt: Attempt, *, event: str = "init", mnn_log: Sequence[str] = ()
    ) -> bool:
        """Note the attempt in the session's history and queue a bundle for it (any outcome)."""
        now = time.time()
        job = Job(
            session=session,
            event=event,
            attempt=attempt,
            history=self._remember(session, attempt, event, now),
            probe=self.probe,
            factory=self._factory,
            when=now,
            mnn_log=tuple(mnn_log),
        )
        return self.writer.submit(job)

    def _note(self, session: str, attempt: Attempt, event: str) -> None:
        """A failure gets a bundle; a pass goes into the history the next bundle shows."""
        if attempt.passed:
            self._remember(session, attempt, event, time.time())
        else:
            self.record(session, attempt, event=event)

    def on_attempt(self, session: str, attempt: Attempt) -> None:
        self._note(session, attempt, "init")

    def on_check(self, session: str, attempt: Attempt) -> None:
        self._note(session, attempt, "recheck")

    def on_shadow(self, session: str, check: ShadowCheck) -> None:
        """A diverging live call gets a bundle: its inputs, the reference's and served outputs."""
        sample = check.sample
        if check.result is not ShadowResult.FAIL or sample is None or sample.rung is None:
            return
        probe = self.probe
        try:  # the live call as the bundle's one case, the reference's outputs as its golden
            live = dataclasses.replace(probe, cases=(check.case(probe),))
        except ProbeError as exc:
            log.warning("session %s: no bundle for the diverging call: %s", session, exc)
            return
        served = dict(zip(probe.served_names, sample.served, strict=True))
        attempt = Attempt(
            rung=sample.rung,
            rung_index=sample.rung_index,
            outcome=Outcome.FAIL,
            verdict=check.verdict,
            error=None,
            seconds=check.seconds,
            outputs={0: served},
        )
        now = time.time()
        job = Job(
            session=session,
            event="shadow",
            attempt=attempt,
            history=self._remember(session, attempt, "shadow", now),
            probe=live,
            factory=self._factory,
            when=now,
        )
        self.writer.submit(job)

    def on_canary(self, session: str, probe: Probe) -> None:
        self.probe = probe  # later bundles show the live calls that joined the canary

    def on_close(self, session: str) -> None:
        with self._lock:
            self._history.pop(session, None)

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Wait until every queued bundle is written; False if `timeout` s passed first."""
        return self.writer.flush(timeout)


_MOVED = frozenset({"Bundle", "read_bundle"})  # reading bundles back: guard.tools.bundles


def __getattr__(name: str) -> Any:
    """The tools' bundle reader under its old path, imported only when asked for."""
    if name not in _MOVED:
        raise AttributeError(f"module 'guard.diagnosis' has no attribute {name!r}")
    return getattr(importlib.import_module("guard.tools.bundles"), name)
