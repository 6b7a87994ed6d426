"""What a pool and its workers say to each other over a pipe, and how it is encoded.

Every message is one of the small frozen dataclasses below, pickled by its sender with the
highest protocol and read with `decode`. Errors cross as themselves when they pickle, else as
a GuardError with their message (`portable`). The transport stays behind this module: the
parent and the worker loop send, encode and decode only through it.

A pool's requests and replies carry no arrays on the pipe: `encode` with a lane copies a Run's
or Done's arrays into that shared-memory lane (`guard.pool.shared`) and sends only where they
lie; `decode` with the worker's lanes gives them back (views in a worker, which serves them
before the lane is written again; owned copies in the parent). Without a lane, a message
carries its arrays itself, pickled.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from numpy.typing import NDArray

from guard.errors import GuardError, RecoveryExhausted
from guard.pool.shared import Lane
from guard.state import State

__all__ = [
    "REPLIES",
    "Done",
    "Raised",
    "Ready",
    "Refused",
    "Reply",
    "Report",
    "Run",
    "StartFailed",
    "Stop",
    "Withdraw",
    "Withdrawn",
    "decode",
    "encode",
    "pickles",
    "portable",
    "send",
]

Array = NDArray[Any]


@dataclass(frozen=True, slots=True)
class Report:
    """A worker session's state and rung index, sent with every reply."""

    state: State
    rung_index: int


@dataclass(frozen=True, slots=True)
class Run:
    """Parent to worker: run one request (checked plain arrays by input name).

    `lane`: the worker's lane the arrays came through, where the reply goes (None: the
    message itself carried them, and so will the reply).
    """

    arrays: dict[str, Array]
    lane: int | None = None


@dataclass(frozen=True, slots=True)
class Withdraw:
    """Parent to worker: drop the request waiting in `lane` if it has not started."""

    lane: int


@dataclass(frozen=True, slots=True)
class Stop:
    """Parent to worker: exit once the requests sent before this one are answered."""


@dataclass(frozen=True, slots=True)
class Ready:
    """Worker to parent: the session passed its canary and serves."""

    report: Report


@dataclass(frozen=True, slots=True)
class StartFailed:
    """Worker to parent: building the session raised `error`; the worker exits."""

    error: Exception


@dataclass(frozen=True, slots=True)
class Done:
    """Worker to parent: the outputs of the request that came through `lane`."""

    outputs: dict[str, Array]
    report: Report
    lane: int | None = None


@dataclass(frozen=True, slots=True)
class Raised:
    """Worker to parent: the session raised `error` for the request in `lane`."""

    error: Exception
    report: Report
    lane: int | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    """Worker to parent: the message could not be decoded (or was no request); still serving.

    `lane`: the request's lane when the worker could tell it.
    """

    reason: str
    report: Report
    lane: int | None = None


@dataclass(frozen=True, slots=True)
class Withdrawn:
    """Worker to parent: the request in `lane` was dropped before it started."""

    lane: int
    report: Report


Message = Run | Withdraw | Stop
Reply = Ready | StartFailed | Done | Raised | Refused | Withdrawn
REPLIES = (Ready, StartFailed, Done, Raised, Refused, Withdrawn)  # what a worker may send

_SHARED = b"\xfe"  # opens a message whose arrays are in a lane (no pickle starts so)
_RUN, _DONE = 0, 1


def encode(message: Message | Reply, lane: Lane | None = None) -> bytes:
    """The bytes of one message (raises what pickling raises).

    With `lane` (the one named by a Run's or Done's `lane`), the arrays are copied into it,
    growing it if they do not fit, and the bytes say only where they lie (plain values).
    """
    if lane is None or not isinstance(message, Run | Done) or message.lane is None:
        return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if isinstance(message, Run):  # the parent's request: from the lane's start
        head: tuple[Any, ...] = (_RUN, message.lane, lane.put(message.arrays.items()), lane.size)
    else:  # the worker's reply: after the request's arrays, which the outputs may not overwrite
        layout = lane.put(message.outputs.items(), after=True)
        report = message.report
        head = (_DONE, message.lane, layout, lane.size, report.state.value, report.rung_index)
    return _SHARED + pickle.dumps(head, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes, lanes: Sequence[Lane] = (), *, copy: bool = False) -> object:
    """The message in `data` (raises what unpickling raises; the caller checks its type).

    A message whose arrays are in one of `lanes` gets them back: views of the lane, or owned
    copies with `copy`.
    """
    if data[:1] != _SHARED:
        return pickle.loads(data)
    kind, index, layout, size, *report = pickle.loads(memoryview(data)[1:])
    if not isinstance(index, int) or not 0 <= index < len(lanes):
        raise ValueError(f"the message names lane {index!r}; this end has {len(lanes)}")
    lane = lanes[index]
    lane.follow(size)
    arrays = lane.get(layout, copy=copy)
    if kind == _RUN:
        return Run(arrays, index)
    return Done(arrays, Report(State(report[0]), report[1]), index)


def send(conn: Connection, message: Message | Reply, lane: Lane | None = None) -> bool:
    """Send one message (its arrays through `lane` when given); False when the other end is
    gone."""
    try:
        conn.send_bytes(encode(message, lane))
    except OSError:
        return False
    return True


def pickles(obj: object) -> bool:
    """True when `obj` survives a pickle round trip."""
    try:
        pickle.loads(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:
        return False
    return True


def _stand_in(exc: BaseException) -> GuardError:
    """A GuardError with the message of an exception that does not pickle."""
    error = GuardError(str(exc))
    error.add_note(f"in the worker this was a {type(exc).__qualname__}, which does not pickle")
    return error


def portable(exc: Exception) -> Exception:
    """`exc` if it pickles, else with stand-ins for its attempts' errors, else a stand-in."""
    if pickles(exc):
        return exc
    if isinstance(exc, RecoveryExhausted):
        attempts = [
            a
            if a.error is None or pickles(a.error)
            else dataclasses.replace(a, error=_stand_in(a.error))
            for a in exc.attempts
        ]
        error = RecoveryExhausted(str(exc), attempts)
        if pickles(error):
            return error
    return _stand_in(exc)
