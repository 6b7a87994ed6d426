"""Listeners: side effects (logs, metrics, health) hang off session events, not the core."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from guard.ladder import Action, Attempt, Rung

if TYPE_CHECKING:
    from guard.session import SessionStatus

__all__ = ["CapturingListener", "Listener", "LoggingListener", "notify"]

log = logging.getLogger("mnn_guard")


class Listener:
    """No-op base: override only the events you need."""

    def on_init(self, session: str, rung: Rung, rung_index: int) -> None:
        """The factory is about to be called on `rung`."""

    def on_attempt(self, session: str, attempt: Attempt) -> None:
        """An init + canary finished (passed, failed, raised or timed out)."""

    def on_check(self, session: str, attempt: Attempt) -> None:
        """A periodic re-check of the live module finished."""

    def on_recover(self, session: str, action: Action, from_rung: int, to_rung: int) -> None:
        """The guard re-initialised, fell back or promoted."""

    def on_status(self, session: str, status: SessionStatus) -> None:
        """The session's rung, health or verdict changed."""

    def on_run(self, session: str, rung: int, rung_name: str, seconds: float, ok: bool) -> None:
        """One `run()` call finished."""

    def on_close(self, session: str) -> None:
        """The session was closed."""


def notify(listeners: Iterable[Listener], event: str, *args: object) -> None:
    """Call `event` on every listener; a listener that raises is logged, never fatal."""
    for listener in listeners:
        try:
            getattr(listener, event)(*args)
        except Exception:
            log.exception("listener %r failed on %s", listener, event)


class LoggingListener(Listener):
    """Logs every init, verdict and recovery to the `mnn_guard` logger."""

    def on_init(self, session: str, rung: Rung, rung_index: int) -> None:
        log.debug("session %s: init on rung %s (%d)", session, rung.name, rung_index)

    def on_attempt(self, session: str, attempt: Attempt) -> None:
        level = logging.INFO if attempt.passed else logging.WARNING
        log.log(
            level, "session %s: init %s in %.3f s", session, attempt.describe(), attempt.seconds
        )

    def on_check(self, session: str, attempt: Attempt) -> None:
        level = logging.DEBUG if attempt.passed else logging.WARNING
        log.log(level, "session %s: re-check %s", session, attempt.describe())

    def on_recover(self, session: str, action: Action, from_rung: int, to_rung: int) -> None:
        log.warning(
            "session %s: %s from rung %d to rung %d", session, action.value, from_rung, to_rung
        )

    def on_status(self, session: str, status: SessionStatus) -> None:
        log.info("session %s: %s", session, status.describe())

    def on_close(self, session: str) -> None:
        log.info("session %s: closed", session)


class CapturingListener(Listener):
    """Keeps every event as a tuple in `.events`, for tests."""

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def on_init(self, session: str, rung: Rung, rung_index: int) -> None:
        self.events.append(("init", session, rung.name))

    def on_attempt(self, session: str, attempt: Attempt) -> None:
        self.events.append(("attempt", session, attempt.rung, attempt.outcome.value))

    def on_check(self, session: str, attempt: Attempt) -> None:
        self.events.append(("check", session, attempt.rung, attempt.outcome.value))

    def on_recover(self, session: str, action: Action, from_rung: int, to_rung: int) -> None:
        self.events.append(("recover", session, action.value, from_rung, to_rung))

    def on_status(self, session: str, status: SessionStatus) -> None:
        self.events.append(("status", session, status.mode, status.healthy))

    def on_run(self, session: str, rung: int, rung_name: str, seconds: float, ok: bool) -> None:
        self.events.append(("run", session, rung_name, ok))

    def on_close(self, session: str) -> None:
        self.events.append(("close", session))

    def of(self, kind: str) -> list[tuple[object, ...]]:
        """Events of one kind."""
        return [e for e in self.events if e[0] == kind]
