"""The recovery ladder: rungs from fastest to safest, the policy, and the record of each attempt."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from types import MappingProxyType
from typing import Any

from guard.errors import ConfigError
from probes import Verdict

__all__ = ["DEFAULT_LADDER", "DYNAMIC", "STATIC", "Action", "Attempt", "Outcome", "Policy", "Rung"]


@dataclass(frozen=True, slots=True)
class Rung:
    """One factory configuration: a name and the keyword overrides passed to the factory."""

    name: str
    overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle the overrides as a dict (a mappingproxy cannot cross to guard.Pool workers)."""
        return (_rung, (self.name, dict(self.overrides)))


def _rung(name: str, overrides: dict[str, Any]) -> Rung:
    """Rebuild a pickled Rung with read-only overrides."""
    return Rung(name, MappingProxyType(overrides))


STATIC = Rung("static")
DYNAMIC = Rung("dynamic", MappingProxyType({"dynamic": True}))
DEFAULT_LADDER = (STATIC, DYNAMIC)


class Outcome(enum.StrEnum):
    """How one init + canary ended (the `result` label of the canary metric)."""

    PASS = "pass"
    FAIL = "fail"
    ERROR = "error"
    TIMEOUT = "timeout"


class Action(enum.StrEnum):
    """What the guard did about a degraded or slow module."""

    REINIT = "reinit"
    FALLBACK = "fallback"
    PROMOTE = "promote"


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """How to recover: the ladder, re-inits per rung, canary runs, timeouts, re-checks, promotion.

    `reinit_attempts` re-initialisations follow the first init on each rung before moving down.
    `recheck_every_calls` / `recheck_every_seconds` re-run the canary on the live module
    (`recheck_every` sets one of them: an int counts calls, a float or timedelta is seconds);
    `promote_after` seconds after a fallback, a faster rung is tried off the request path.
    """

    ladder: tuple[Rung, ...] = DEFAULT_LADDER
    reinit_attempts: int = 3
    canary_runs: int = 2
    init_timeout: float | None = 60.0
    recheck_every: int | float | timedelta | None = None
    recheck_every_calls: int | None = None
    recheck_every_seconds: float | None = None
    promote_after: float | None = 300.0
    check_finite_inputs: bool = True
    background: bool = True

    def __post_init__(self) -> None:
        self._split_recheck_every()
        if not self.ladder:
            raise ConfigError("the ladder needs at least one rung")
        names = [r.name for r in self.ladder]
        if len(set(names)) != len(names):
            raise ConfigError(f"rung names must be unique, got {names}")
        if self.reinit_attempts < 0:
            raise ConfigError(f"reinit_attempts must be >= 0, got {self.reinit_attempts}")
        if self.canary_runs < 1:
            raise ConfigError(f"canary_runs must be >= 1, got {self.canary_runs}")
        for key in ("init_timeout", "recheck_every_seconds", "promote_after"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{key} must be > 0 or None, got {value}")
        if self.recheck_every_calls is not None and self.recheck_every_calls < 1:
            raise ConfigError(
                f"recheck_every_calls must be >= 1 or None, got {self.recheck_every_calls}"
            )


    def _split_recheck_every(self) -> None:
        """Turn `recheck_every` into `recheck_every_calls` (int) or `..._seconds` (float)."""
        every = self.recheck_every
        if every is None:
            return
        if isinstance(every, bool) or not isinstance(every, int | float | timedelta):
            raise ConfigError(
                f"recheck_every must be an int (calls), a float or timedelta (seconds) or None, "
                f"got {every!r}"
            )
        value: float
        if isinstance(every, int):
            key, value = "recheck_every_calls", every
        else:
            seconds = every.total_seconds() if isinstance(every, timedelta) else every
            key, value = "recheck_every_seconds", seconds
        if getattr(self, key) not in (None, value):
            raise ConfigError(f"recheck_every={every!r} contradicts {key}={getattr(self, key)}")
        object.__setattr__(self, key, value)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One init + canary on one rung: its outcome, verdict, error and duration."""

    rung: str
    rung_index: int
    outcome: Outcome
    verdict: Verdict | None
    error: BaseException | None
    seconds: float

    @property
    def passed(self) -> bool:
        """True when the canary passed."""
        return self.outcome is Outcome.PASS

    def describe(self) -> str:
        """One line for logs and error messages."""
        if self.verdict is not None:
            detail = self.verdict.describe()
        else:
            detail = f"{type(self.error).__name__}: {self.error}"
        return f"rung {self.rung!r}: {self.outcome.value} ({detail})"
