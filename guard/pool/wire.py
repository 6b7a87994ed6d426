"""What a pool and its workers say to each other over a pipe, and how it is encoded.

Every message is one of the small frozen dataclasses below, pickled by its sender with the
highest protocol and read with `decode`. Errors cross as themselves when they pickle, else as
a GuardError with their message (`portable`). The transport stays behind this module: the
parent and the worker loop send, encode and decode only through it.
"""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from numpy.typing import NDArray

from guard.errors import GuardError, RecoveryExhausted
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
    """Parent to worker: run one request (checked plain arrays by input name)."""

    arrays: dict[str, Array]


@dataclass(frozen=True, slots=True)
class Stop:
    """Parent to worker: exit after the request in hand."""


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
    """Worker to parent: the request's outputs."""

    outputs: dict[str, Array]
    report: Report


@dataclass(frozen=True, slots=True)
class Raised:
    """Worker to parent: the session raised `error` for the request."""

    error: Exception
    report: Report


@dataclass(frozen=True, slots=True)
class Refused:
    """Worker to parent: the message could not be decoded (or was no request); still serving."""

    reason: str
    report: Report


Reply = Ready | StartFailed | Done | Raised | Refused
REPLIES = (Ready, StartFailed, Done, Raised, Refused)  # what a worker may send


def encode(message: Run | Stop | Reply) -> bytes:
    """The bytes of one message (raises what pickling raises)."""
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> object:
    """The message in `data` (raises what unpickling raises; the caller checks its type)."""
    return pickle.loads(data)


def send(conn: Connection, message: Run | Stop | Reply) -> bool:
    """Send one message; False when the other end is gone."""
    try:
        conn.send_bytes(encode(message))
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
