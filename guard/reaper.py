"""What a collected object owes, done on a thread of its own rather than where the GC struck.

A weakref finalizer runs wherever a collection happens, in whatever thread allocated: inside a
`HealthTable` update holding the table's lock, say. A finalizer that took that lock itself
(a session dropped without `close()` leaving readiness) deadlocked its thread for good. So a
finalizer only hands its work to `later`, which takes no lock (`queue.SimpleQueue.put` is
safe from finalizers), and the reaper thread does it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["later", "start"]

log = logging.getLogger("mnn_guard")
_work: queue.SimpleQueue[tuple[Callable[..., object], tuple[Any, ...]]] = queue.SimpleQueue()
_lock = threading.Lock()
_thread: threading.Thread | None = None
_pid = 0  # the process the thread was started in (a fork child starts its own)


def start() -> None:
    """Make sure this process's reaper thread runs (call it where objects are made, not from a
    finalizer)."""
    global _thread, _pid
    with _lock:
        if _thread is not None and _pid == os.getpid() and _thread.is_alive():
            return
        _thread = threading.Thread(target=_reap, name="mnn-guard-reaper", daemon=True)
        _pid = os.getpid()
        _thread.start()


def later(fn: Callable[..., object], *args: Any) -> None:
    """Have the reaper thread call `fn(*args)`; safe from a finalizer (it takes no lock)."""
    _work.put((fn, args))


def _reap() -> None:
    """Do the work handed over, one item at a time, for the process's life."""
    while True:
        fn, args = _work.get()
        try:
            fn(*args)
        except Exception:
            log.exception("mnn-guard: work owed by a collected object failed: %r", fn)
