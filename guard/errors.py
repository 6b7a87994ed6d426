"""Every error the runtime raises; `GuardError` is the root (the tools' own: guard.tools.errors)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guard.ladder import Attempt
    from probes import Verdict

__all__ = [
    "ConfigError",
    "FactoryError",
    "ForkAfterLoad",
    "ForwardFailed",
    "GuardError",
    "InitTimeout",
    "InputMismatch",
    "OutputMismatch",
    "PoisonRequest",
    "RecoveryExhausted",
    "SessionClosed",
    "SwapRefused",
    "Unavailable",
    "WorkerFailed",
]


class GuardError(Exception):
    """Root of every error raised by mnn-guard."""


class ConfigError(GuardError, ValueError):
    """A policy, rung, factory option or probe threshold is invalid."""


class InputMismatch(GuardError, ValueError):
    """An input to `run()` does not match the probe's recorded input signature."""

    def __init__(self, message: str, *, input: str | None = None) -> None:
        super().__init__(message)
        self.input = input

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle with the input name (guard.Pool sends errors between processes)."""
        return (_input_mismatch, (str(self), self.input))


def _input_mismatch(message: str, input: str | None) -> InputMismatch:
    return InputMismatch(message, input=input)


class FactoryError(GuardError):
    """The factory raised, or returned something that is not a usable module."""


class InitTimeout(GuardError, TimeoutError):
    """A factory call or canary run did not finish within `Policy.init_timeout`."""


class ForkAfterLoad(GuardError):
    """This process was forked after MNN modules were loaded; MNN would hang here."""


class ForwardFailed(GuardError):
    """The module's forward raised."""


class OutputMismatch(GuardError):
    """The module returned fewer or more outputs than the probe names."""


class SessionClosed(GuardError):
    """The session or pool was closed; it serves no more calls."""


class SwapRefused(GuardError):
    """A hot swap's new model could not be built or failed its canary; the old one stays."""


class Unavailable(GuardError, TimeoutError):
    """No healthy module came within `Policy.wait_timeout` while a replacement was built."""


class WorkerFailed(GuardError):
    """A pool request failed on two workers (crash, timeout or error)."""


class PoisonRequest(WorkerFailed):
    """A pool request killed two workers (crash or timeout on each); it is not retried again."""


class RecoveryExhausted(GuardError):
    """Every rung of the ladder failed its canary; carries every attempt and its verdict."""

    def __init__(self, message: str, attempts: Sequence[Attempt]) -> None:
        super().__init__(message)
        self.attempts: tuple[Attempt, ...] = tuple(attempts)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle with the attempts (guard.Pool sends errors between processes)."""
        return (RecoveryExhausted, (str(self), self.attempts))

    @property
    def verdicts(self) -> list[Verdict | None]:
        """The verdict of each attempt (None where the init or canary raised)."""
        return [a.verdict for a in self.attempts]

    @property
    def verdict(self) -> Verdict | None:
        """The last attempt's verdict."""
        return self.attempts[-1].verdict if self.attempts else None


_MOVED = frozenset({"BundleError", "MissingExtra"})  # errors of the tools: guard.tools.errors


def __getattr__(name: str) -> type[GuardError]:
    """The tools' errors under their old path, imported only when asked for."""
    if name not in _MOVED:
        raise AttributeError(f"module 'guard.errors' has no attribute {name!r}")
    moved: type[GuardError] = getattr(importlib.import_module("guard.tools.errors"), name)
    return moved
