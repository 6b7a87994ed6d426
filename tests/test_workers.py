"""guard.pool.children with real spawned processes: messages, exits, timeouts, kill and reap."""

from __future__ import annotations

import multiprocessing
import sys
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

import probes
from guard import pool, workers
from guard.pool.children import (
    Child,
    Event,
    load_stashed_probe,
    remove_stash,
    stash_probe,
    wait_any,
)


def say(conn: Connection, text: str) -> None:
    """Child: send one message and exit."""
    conn.send_bytes(text.encode())


def leave(conn: Connection, code: int) -> None:
    """Child: exit with `code` without a word."""
    sys.exit(code)


def hang(conn: Connection) -> None:
    """Child: wait for a message that never comes (until killed)."""
    conn.recv_bytes()


def gone(pid: int | None) -> bool:
    """True once a process is reaped."""
    return pid is not None and not Path(f"/proc/{pid}").exists()


def test_child_sees_a_message_an_exit_and_a_timeout() -> None:
    """wait() tells a message from an exit and from a bound reached; stop() kills and reaps."""
    ctx = multiprocessing.get_context("spawn")
    talker = Child.spawn(ctx, say, ("hello",), name="mnn-guard-test-say")
    quitter = Child.spawn(ctx, leave, (3,), name="mnn-guard-test-leave")
    sleeper = Child.spawn(ctx, hang, (), name="mnn-guard-test-hang")
    try:
        assert wait_any([talker, sleeper], 60.0) == [talker]
        assert talker.wait(0) is Event.MESSAGE and talker.conn.recv_bytes() == b"hello"
        assert quitter.wait(60.0) is not Event.TIMEOUT
        assert quitter.exit_text() == "exited with code 3"
        assert sleeper.wait(0.2) is Event.TIMEOUT
        sleeper.stop()
        assert sleeper.exit_text() == "was killed by SIGKILL"
        assert sleeper.conn.closed
    finally:
        for child in (talker, quitter, sleeper):
            child.stop()
    assert all(gone(c.pid) for c in (talker, quitter, sleeper))


def test_stashed_probe_round_trips_and_pool_still_exports_it(demo_probe: probes.Probe) -> None:
    """A stashed probe loads back equal; guard.pool and guard.workers keep the old names."""
    path = stash_probe(demo_probe)
    try:
        loaded = load_stashed_probe(path)
    finally:
        remove_stash(path)
    assert loaded.meta == demo_probe.meta and len(loaded.cases) == len(demo_probe.cases)
    for mine, theirs in zip(loaded.cases, demo_probe.cases, strict=True):
        for name, array in theirs.outputs.items():
            np.testing.assert_array_equal(mine.outputs[name], array)
    remove_stash(path)  # missing is fine
    assert not Path(path).exists()
    for old in (pool, workers):
        assert (old.stash_probe, old.load_stashed_probe, old.remove_stash) == (
            stash_probe,
            load_stashed_probe,
            remove_stash,
        )
    assert (workers.Child, workers.Event, workers.wait_any) == (Child, Event, wait_any)
