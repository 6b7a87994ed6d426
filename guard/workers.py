"""Moved to `guard.pool.children`; this path keeps the old imports working."""

from guard.pool.children import (
    REAP_SECONDS,
    Child,
    Event,
    load_stashed_probe,
    remove_stash,
    stash_probe,
    wait_any,
)

__all__ = [
    "REAP_SECONDS",
    "Child",
    "Event",
    "load_stashed_probe",
    "remove_stash",
    "stash_probe",
    "wait_any",
]
