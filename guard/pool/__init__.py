"""A pool of guarded worker processes, started with spawn so that MNN never meets a fork.

>>> with guard.Pool(guard.mnn_factory("vocoder.mnn", ["mel"], ["wav"]), probe, processes=2) as pool:
...     wavs = pool.map([{"mel": m} for m in mels])  # doctest: +SKIP
...     wav = (await pool.arun({"mel": mel}))["wav"]  # in a coroutine  # doctest: +SKIP

One concept per module: `parent` (the `Pool`), `dispatch` (requests to workers' lanes and
replies back; the watcher thread), `job` (a request's steps, the line), `shared` (the
shared-memory lanes), `slot` (a worker's place in the pool, its states and moves), `wire`
(what crosses a pipe), `worker` (the worker process's loop) and `children` (spawning, waiting
for and stopping processes; the probe hand-over).
"""

from guard.pool.children import load_stashed_probe, remove_stash, stash_probe
from guard.pool.parent import (
    IMPORT_SECONDS,
    MAX_WAITING,
    START_METHODS,
    STOP_SECONDS,
    WATCH_SECONDS,
    Pool,
)
from guard.pool.slot import SlotState, SlotStatus, WorkerStatus

# load_stashed_probe, remove_stash and stash_probe live in guard.pool.children; importable here
__all__ = [
    "IMPORT_SECONDS",
    "MAX_WAITING",
    "START_METHODS",
    "STOP_SECONDS",
    "WATCH_SECONDS",
    "Pool",
    "SlotState",
    "SlotStatus",
    "WorkerStatus",
    "load_stashed_probe",
    "remove_stash",
    "stash_probe",
]
