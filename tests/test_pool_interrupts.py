"""A pool's calls cut short are each answered once and leave no lane held: Ctrl-C in a caller's
thread while it writes a request or reads a reply, close() while a request fails or is being
written, and a watcher whose work raises (guard/pool/dispatch.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from polling import until
from test_pool import assert_outputs, mels, open_marked, references, sleeping

from guard.errors import SessionClosed
from guard.pool import wire
from guard.pool.slot import SlotState

Array = np.ndarray[Any, Any]
Outputs = dict[str, Array]


def in_thread(call: Callable[[], Outputs], name: str = "caller") -> Future[Outputs]:
    """Run `call` in a daemon thread; its outcome in a future."""
    got: Future[Outputs] = Future()

    def target() -> None:
        try:
            got.set_result(call())
        except BaseException as exc:
            got.set_exception(exc)

    threading.Thread(target=target, name=name, daemon=True).start()
    return got


def test_a_request_that_fails_while_its_pool_closes_gets_session_closed(
    demo_paths: tuple[Path, Path],
) -> None:
    """close() while a worker is about to raise for a request: its caller gets SessionClosed
    (the request failed once, and cannot be retried on a closed pool), not a bare error."""
    pool = open_marked(demo_paths, "closing-fails")
    try:
        got = in_thread(lambda: pool.run({"mel": sleeping(1.0, then_raise=True)}))
        until("request in a worker's hands", lambda: any(s.busy for s in pool.status()), 60.0)
        pool.close()
        with pytest.raises(SessionClosed, match="was closed during the request"):
            got.result(timeout=30)
    finally:
        pool.close()


def test_a_request_written_as_its_worker_died_and_its_pool_closed_gets_session_closed(
    demo_paths: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request still being written into its lane when its worker dies and the pool closes:
    its caller gets SessionClosed, rather than the request going back into a closed pool's line
    for ever."""
    pool = open_marked(demo_paths, "closing-placed", processes=1)
    real, placed, go = wire.encode, threading.Event(), threading.Event()

    def encode(message: Any, lane: Any = None) -> bytes:
        data = real(message, lane)
        if threading.current_thread().name == "writing":
            placed.set()
            go.wait(60)  # still copying its arrays
        return data

    monkeypatch.setattr(wire, "encode", encode)
    try:
        got = in_thread(lambda: pool.run({"mel": mels(1)[0]}), name="writing")
        assert placed.wait(60)
        pid = pool.status()[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        until("retirement of the dead worker", lambda: pool.status()[0].pid != pid, 60.0)
        pool.close()
        go.set()
        with pytest.raises(SessionClosed, match="was closed during the request"):
            got.result(timeout=30)
    finally:
        go.set()
        pool.close()


def test_ctrl_c_while_a_request_is_written_leaves_its_lane_free(
    demo_paths: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller interrupted while its arrays are copied into a lane: the lane is let go (the
    worker goes back to idle and serves both lanes again), not held for ever."""
    pool = open_marked(demo_paths, "interrupted-writing", processes=1)
    real, armed = wire.encode, [True]

    def encode(message: Any, lane: Any = None) -> bytes:
        data = real(message, lane)
        if armed and isinstance(message, wire.Run):
            armed.clear()
            raise KeyboardInterrupt  # as a SIGINT handled right after the copy
        return data

    monkeypatch.setattr(wire, "encode", encode)
    try:
        with pytest.raises(KeyboardInterrupt):
            pool.run({"mel": mels(1)[0]})
        until("idle worker", lambda: pool.status()[0].state is SlotState.IDLE, 10.0)
        inputs = mels(4, offset=40)
        assert_outputs(pool.map([{"mel": x} for x in inputs]), references(inputs))
        assert pool.status()[0].requests == 4  # the interrupted one never reached the worker
    finally:
        pool.close()


def test_ctrl_c_in_a_leader_that_read_another_callers_reply_leaves_that_caller_served(
    demo_paths: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The main thread leads while its request sleeps and is interrupted just after it read
    another caller's reply off a pipe: that caller's request is served again elsewhere, rather
    than waited for until request_timeout (60 s) kills a healthy worker."""
    pool = open_marked(demo_paths, "interrupted-reading")
    mel = mels(1, offset=50)[0]
    real_encode, real_decode, armed = wire.encode, wire.decode, [True]
    other: list[Future[Outputs]] = []

    def encode(message: Any, lane: Any = None) -> bytes:
        data = real_encode(message, lane)
        if not other and threading.current_thread() is threading.main_thread():
            # the main thread leads once this is sent: the other caller comes after it
            other.append(in_thread(lambda: pool.run({"mel": mel})))
        return data

    def decode(data: bytes, lanes: Any = ()) -> object:
        reply = real_decode(data, lanes)
        main = threading.current_thread() is threading.main_thread()
        if armed and main and isinstance(reply, wire.Done):
            armed.clear()
            raise KeyboardInterrupt  # Ctrl-C just after the other caller's reply was read
        return reply

    monkeypatch.setattr(wire, "encode", encode)
    monkeypatch.setattr(wire, "decode", decode)
    try:
        with pytest.raises(KeyboardInterrupt):
            pool.run({"mel": sleeping(5.0)})
        assert not armed, "the main thread never read the other caller's reply"
        assert_outputs([other[0].result(timeout=30)], references([mel]))
    finally:
        pool.close()


def test_the_watcher_goes_on_when_its_work_raises(
    demo_paths: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An error in the watcher's work is logged and the watcher goes on: an event loop's calls,
    which only the watcher answers, are still served."""
    pool = open_marked(demo_paths, "watcher-raises")
    real, calls = pool._expire, [0]

    def expire() -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("injected fault in the watcher's work")
        real()

    try:
        with caplog.at_level(logging.ERROR, logger="mnn_guard"):
            monkeypatch.setattr(pool, "_expire", expire)
            until("second round of the watcher's work", lambda: calls[0] >= 2, 60.0)
        assert "the watcher's work raised; it goes on watching" in caplog.text
        inputs = mels(3, offset=60)

        async def calls_from_a_loop() -> list[Outputs]:
            return list(await asyncio.gather(*(pool.arun({"mel": x}) for x in inputs)))

        assert_outputs(asyncio.run(asyncio.wait_for(calls_from_a_loop(), 60)), references(inputs))
    finally:
        pool.close()
