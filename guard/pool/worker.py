"""A pool's worker process: build one guarded session, then answer requests from the pipe.

`worker_main` is what a pool spawns; `serve` is its loop. Both speak only through
`guard.pool.wire`.
"""

from __future__ import annotations

import signal
from multiprocessing.connection import Connection

from guard.health import HealthTable
from guard.ladder import Policy
from guard.pool import wire
from guard.pool.children import load_stashed_probe
from guard.session import Factory, GuardedSession
from guard.wrapping import wrap

__all__ = ["report", "serve", "worker_main"]


def report(session: GuardedSession) -> wire.Report:
    """What the parent hears of the session with every reply: its state and rung."""
    status = session.status
    return wire.Report(status.state, status.rung_index)


def serve(conn: Connection, session: GuardedSession) -> None:
    """Answer requests until the parent says stop or goes away; an undecodable one is refused."""
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the parent is gone
        try:
            message = wire.decode(data)
        except Exception as exc:
            reason = f"it could not be decoded: {type(exc).__name__}: {exc}"
            if not wire.send(conn, wire.Refused(reason, report(session))):
                return
            continue
        if isinstance(message, wire.Stop):
            return
        if not isinstance(message, wire.Run):
            reason = f"a {type(message).__name__} is not a request"
            if not wire.send(conn, wire.Refused(reason, report(session))):
                return
            continue
        try:
            reply: wire.Reply = wire.Done(session.run(message.arrays), report(session))
        except Exception as exc:
            reply = wire.Raised(wire.portable(exc), report(session))
        if not wire.send(conn, reply):
            return


def worker_main(
    conn: Connection, factory: Factory, probe_path: str, policy: Policy, name: str
) -> None:
    """A worker process: build one guarded session here, then serve requests from the pipe."""
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
            serve(conn, session)
    finally:
        session.close()
