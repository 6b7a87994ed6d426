"""Spawned child processes: the probe hand-over and one spawn/wait/stop primitive.

`guard.Pool` and `mnn-guard doctor` both start fresh processes (spawn, never fork: MNN hangs in
a process forked after a load), hand each the probe, wait for its messages or its death with a
bound, and kill and reap what does not end by itself. This module holds that once.

>>> path = stash_probe(probe)  # doctest: +SKIP
>>> child = Child.spawn(ctx, target, (path,), name="mnn-guard-x")  # doctest: +SKIP
>>> child.wait(5.0)  # doctest: +SKIP
<Event.MESSAGE: 'message'>
>>> child.stop(grace=1.0); remove_stash(path)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import enum
import os
import pickle
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

from guard.exits import exit_text
from probes import Probe, ProbeError

__all__ = ["Child", "Event", "load_stashed_probe", "remove_stash", "stash_probe", "wait_any"]

REAP_SECONDS = 5.0  # how long to wait for a killed process to be reaped


# ------------------------------------------------------------------ probe hand-over


def stash_probe(probe: Probe) -> str:
    """Pickle a probe once into a private temp file that spawned children load themselves.

    Spawn writes a child's pickled arguments into a 64 KB pipe, and Process.start() blocks
    until the child has imported its main module when they do not fit: a 270 KB probe in
    the arguments made worker start-ups run one after another.
    """
    fd, path = tempfile.mkstemp(prefix="mnn-guard-probe-", suffix=".pickle")
    with os.fdopen(fd, "wb") as f:
        pickle.dump(probe, f, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def load_stashed_probe(path: str) -> Probe:
    """The probe written by `stash_probe` (a file this user's parent process created)."""
    with open(path, "rb") as f:
        probe = pickle.load(f)
    if not isinstance(probe, Probe):
        raise ProbeError(f"{path!r} does not hold a pickled probes.Probe")
    return probe


def remove_stash(path: str) -> None:
    """Delete a stashed probe; missing is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# ------------------------------------------------------------------ children


class Event(enum.Enum):
    """What `Child.wait` saw first."""

    MESSAGE = "message"  # the pipe is readable: a message, or EOF if the child died after it
    EXITED = "exited"  # the process ended with nothing left to read
    TIMEOUT = "timeout"  # neither within the bound


@dataclass(eq=False)
class Child:
    """A spawned process and the parent's end of its pipe (the child's end is closed here)."""

    process: BaseProcess
    conn: Connection

    @classmethod
    def spawn(
        cls,
        ctx: BaseContext,
        target: Callable[..., object],
        args: Sequence[Any],
        *,
        name: str,
    ) -> Child:
        """Start `target(conn, *args)` in a new daemon process of `ctx`."""
        parent, child = ctx.Pipe(duplex=True)
        process = ctx.Process(  # type: ignore[attr-defined]
            target=target, args=(child, *args), name=name, daemon=True
        )
        try:
            process.start()
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()  # the parent keeps only its end, so a dead child reads as EOF
        return cls(process, parent)

    @property
    def pid(self) -> int | None:
        """The process id (None before start)."""
        return self.process.pid

    def wait(self, timeout: float | None) -> Event:
        """Until the child sends something, ends, or `timeout` seconds pass."""
        ready = wait([self.conn, self.process.sentinel], timeout)
        if self.conn in ready:
            return Event.MESSAGE
        return Event.EXITED if ready else Event.TIMEOUT

    def kill(self) -> None:
        """SIGKILL the process if it still runs (safe from any thread; reaping is `stop`'s)."""
        if self.process.exitcode is None:
            with contextlib.suppress(OSError, ValueError):
                self.process.kill()

    def exit_text(self) -> str:
        """How the process ended: `exited with code 3`, `was killed by SIGSEGV`."""
        self.process.join(1.0)
        return exit_text(self.process.exitcode)

    def stop(self, grace: float = 0.0, *, close: bool = True) -> None:
        """Give the process `grace` seconds to exit, kill it if it has not, reap it.

        `close` also closes the pipe: leave it open while another thread may still read it.
        """
        if grace > 0:
            self.process.join(grace)
        self.kill()
        self.process.join(REAP_SECONDS)
        if close:
            self.conn.close()


def wait_any(children: Sequence[Child], timeout: float | None) -> list[Child]:
    """The children that sent something or ended, waiting at most `timeout` seconds."""
    handles: dict[Any, Child] = {}
    for child in children:
        handles[child.conn] = child
        handles[child.process.sentinel] = child
    ready = wait(list(handles), timeout)
    return list(dict.fromkeys(handles[h] for h in ready))
