"""Listeners: side effects (logs, metrics, health) hang off session events, not the core."""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from guard.ladder import Action, Attempt, Basis, Rung
from guard.state import SessionStatus

if TYPE_CHECKING:
    from guard.shadow import ShadowCheck
    from probes import Probe

__all__ = ["CALL_OK", "Call", "Listener", "LoggingListener", "notify"]

log = logging.getLogger("mnn_guard")


class Call(enum.StrEnum):
    """How one `run()` call ended (the `result` label of `mnn_guard_runs_total`)."""

    OK = "ok"  # served
    ERROR = "error"  # the forward raised or returned the wrong number of outputs
    INVALID = "invalid"  # the inputs did not match the probe's signature (InputMismatch)
    UNAVAILABLE = "unavailable"  # no replacement module within Policy.wait_timeout
    FAILED = "failed"  # the session had no module: every rung failed (RecoveryExhausted)
    CLOSED = "closed"  # the session was closed (SessionClosed)

    __hash__ = str.__hash__  # hashed on every call (metrics): str's C hash, not Enum's Python one


CALL_OK = Call.OK
"""`Call.OK` as a module global for the hot path (the enum class's attribute is a descriptor
call)."""


class Listener:
    """No-op base: override only the events you need."""

    def on_init(self, session: str, rung: Rung) -> None:
        """The factory is about to be called on `rung`."""

    def on_attempt(self, session: str, attempt: Attempt) -> None:
        """An init + canary finished (passed, failed, raised or timed out)."""

    def on_check(self, session: str, attempt: Attempt) -> None:
        """A periodic re-check of the live module finished."""

    def on_recover(self, session: str, action: Action, from_rung: Rung, to_rung: Rung) -> None:
        """The guard re-initialised, fell back or promoted."""

    def on_status(self, session: str, status: SessionStatus) -> None:
        """The session's state, rung or verdict changed: `status` is the latest snapshot."""

    def on_run(self, session: str, rung: Rung, seconds: float, result: Call) -> None:
        """One `run()` call finished, served or refused; `rung` is the one in use."""

    def on_shadow(self, session: str, check: ShadowCheck) -> None:
        """A sampled live call was judged against the reference (or dropped: queue full)."""

    def on_canary(self, session: str, probe: Probe) -> None:
        """The session's canary grew: a diverging live call joined it (`probe` is the new one)."""

    def on_close(self, session: str) -> None:
        """The session was closed (or dropped and collected)."""


def notify(listeners: Iterable[Listener], event: str, *args: object) -> None:
    """Call `event` on every listener; a listener that raises is logged, never fatal."""
    for listener in listeners:
        try:
            getattr(listener, event)(*args)
        except Exception:
            log.exception("listener %r failed on %s", listener, event)


class LoggingListener(Listener):
    """Logs every init, verdict and recovery to the `mnn_guard` logger."""

    def on_init(self, session: str, rung: Rung) -> None:
        log.debug("session %s: init on rung %s", session, rung.name)

    def on_attempt(self, session: str, attempt: Attempt) -> None:
        disputed = attempt.basis is Basis.DISPUTED
        level = logging.INFO if attempt.passed and not disputed else logging.WARNING
        log.log(
            level, "session %s: init %s in %.3f s", session, attempt.describe(), attempt.seconds
        )

    def on_check(self, session: str, attempt: Attempt) -> None:
        level = logging.DEBUG if attempt.passed else logging.WARNING
        log.log(level, "session %s: re-check %s", session, attempt.describe())

    def on_recover(self, session: str, action: Action, from_rung: Rung, to_rung: Rung) -> None:
        log.warning(
            "session %s: %s from rung %r to rung %r",
            session,
            action.value,
            from_rung.name,
            to_rung.name,
        )

    def on_status(self, session: str, status: SessionStatus) -> None:
        log.info("session %s: %s", session, status.describe())

    def on_shadow(self, session: str, check: ShadowCheck) -> None:
        if check.result.value == "fail":
            reasons = "; ".join(check.verdict.reasons) if check.verdict is not None else ""
            log.warning(
                "session %s: shadow check failed: a live call diverged from the reference, "
                "worst SNR %.1f dB (%s); the module leaves service and the call joins the canary",
                session,
                check.worst_snr_db,
                reasons,
            )
        elif check.result.value == "pass":
            log.debug(
                "session %s: shadow check passed (worst SNR %.1f dB)", session, check.worst_snr_db
            )

    def on_close(self, session: str) -> None:
        log.info("session %s: closed", session)
