"""A pool's worker process: build one guarded session, then answer requests from the pipe.

`worker_main` is what a pool spawns; `serve` is its loop. Both speak only through
`guard.pool.wire`. Requests come through the worker's shared-memory lanes and are served in
the order they came; the parent sends the next one while this one runs, so the worker never
waits for it, and may withdraw one that has not started.
"""

from __future__ import annotations

import select
import signal
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection

from guard.health import HealthTable
from guard.ladder import Policy
from guard.pool import wire
from guard.pool.children import load_stashed_probe
from guard.pool.shared import Lane
from guard.session import Factory, GuardedSession
from guard.wrapping import wrap

__all__ = ["report", "serve", "worker_main"]

Waiting = deque[wire.Run | wire.Stop]


def report(session: GuardedSession) -> wire.Report:
    """What the parent hears of the session with every reply: its state and rung."""
    status = session.status
    return wire.Report(status.state, status.rung_index)


def _take(
    conn: Connection, data: bytes, waiting: Waiting, session: GuardedSession, lanes: Sequence[Lane]
) -> bool:
    """Line up one message (a request or a stop), or act on it at once (a withdrawal, or a
    refusal of what is none); False when the parent is gone."""
    try:
        message = wire.decode(data, lanes)
    except Exception as exc:
        reason = f"it could not be decoded: {type(exc).__name__}: {exc}"
        return wire.send(conn, wire.Refused(reason, report(session)))
    if isinstance(message, wire.Run | wire.Stop):
        waiting.append(message)
        return True
    if isinstance(message, wire.Withdraw):
        # by position, not deque.remove: a Run's == compares its arrays element by element
        for at, queued in enumerate(waiting):
            if isinstance(queued, wire.Run) and queued.lane == message.lane:
                del waiting[at]
                return wire.send(conn, wire.Withdrawn(message.lane, report(session)))
        return True  # started already: its reply comes as usual
    reason = f"a {type(message).__name__} is not a request"
    return wire.send(conn, wire.Refused(reason, report(session)))


def _answer(
    conn: Connection, request: wire.Run, session: GuardedSession, lanes: Sequence[Lane]
) -> bool:
    """Serve one request and send its reply through its lane; False when the parent is gone."""
    index = request.lane
    try:
        reply: wire.Reply = wire.Done(session.run(request.arrays), report(session), index)
    except Exception as exc:
        reply = wire.Raised(wire.portable(exc), report(session), index)
    lane = lanes[index] if index is not None and 0 <= index < len(lanes) else None
    try:
        data = wire.encode(reply, lane)
    except OSError as exc:  # no memory to grow the lane
        data = wire.encode(wire.Raised(wire.portable(exc), report(session), index))
    try:
        conn.send_bytes(data)
    except OSError:
        return False
    return True


def serve(conn: Connection, session: GuardedSession, lanes: Sequence[Lane] = ()) -> None:
    """Answer requests in order until the parent says stop or goes away; an undecodable message
    is refused, a withdrawn request dropped."""
    waiting: Waiting = deque()
    poller = select.poll()  # one for the loop's life: Connection.poll builds a selector a call
    poller.register(conn.fileno(), select.POLLIN)
    while True:
        try:
            if not waiting and not _take(conn, conn.recv_bytes(), waiting, session, lanes):
                return
            while poller.poll(0):  # what came meanwhile: the next request, or a withdrawal
                if not _take(conn, conn.recv_bytes(), waiting, session, lanes):
                    return
        except (EOFError, OSError):
            return  # the parent is gone
        if not waiting:
            continue
        message = waiting.popleft()
        if isinstance(message, wire.Stop) or not _answer(conn, message, session, lanes):
            return


def worker_main(
    conn: Connection,
    factory: Factory,
    probe_path: str,
    policy: Policy,
    name: str,
    lanes: Sequence[Lane] = (),
) -> None:
    """A worker process: build one guarded session here, then serve requests from the pipe
    (their arrays through `lanes`, shared with the parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        # the parent answers for its workers' readiness (one entry per pool): a private table
        # keeps this session out of PROMETHEUS_MULTIPROC_DIR's health files
        probe = load_stashed_probe(probe_path)
        session = wrap(factory, probe, policy=policy, name=name, health=HealthTable())
    except Exception as exc:
        wire.send(conn, wire.StartFailed(wire.portable(exc)))
        return
    try:
        if wire.send(conn, wire.Ready(report(session))):
            serve(conn, session, lanes)
    finally:
        session.close()
