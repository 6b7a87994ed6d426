"""The states of a guarded session, the moves between them, and a snapshot of one.

The only moves (`MOVES`); `GuardedSession._to` makes every one of them (`guard.maintenance`
through it too):

    from       to         when
    STARTING   SERVING    a rung's module passes its canary (inside guard.wrap)
    STARTING   FAILED     every rung fails (guard.wrap raises RecoveryExhausted)
    SERVING    CHECKING   a re-check starts on the live module
    SERVING    SERVING    a promotion swaps in a faster rung's module that passed
    SERVING    REPLACING  a shadow check found the module diverging on live inputs
    CHECKING   SERVING    the re-check passes, or is interrupted before it finds the module bad
    CHECKING   REPLACING  the re-check fails (or is interrupted after): out of service at once
    REPLACING  SERVING    a replacement passes its canary
    REPLACING  FAILED     every rung fails, or the recovery (or re-check) was interrupted
    FAILED     SERVING    a retry (every Policy.promote_after seconds) passes
    FAILED     FAILED     the retry fails
    any        CLOSED     close(), or the session was dropped and garbage-collected

`run()` serves in SERVING and CHECKING, waits (at most `Policy.wait_timeout`) in STARTING and
REPLACING, raises a fresh `RecoveryExhausted` in FAILED and `SessionClosed` in CLOSED.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from guard.ladder import STATIC_LOAD, Attempt, Basis, Rung
from probes import Verdict

if TYPE_CHECKING:
    from guard.shadow import ShadowStatus

__all__ = ["LIVE", "MOVES", "SEVERITY", "SessionStatus", "State"]


class State(enum.Enum):
    """Where a session is in its life."""

    STARTING = "starting"  # the first init + canary is running
    SERVING = "serving"  # a module whose canary passed serves run()
    CHECKING = "checking"  # serving, while a re-check runs the canary on the live module
    REPLACING = "replacing"  # the live module failed its re-check; run() waits for a new one
    FAILED = "failed"  # every rung failed its canary; run() raises, maintenance retries
    CLOSED = "closed"  # released; run() raises SessionClosed


MOVES: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.SERVING, State.FAILED, State.CLOSED}),
    State.SERVING: frozenset(  # SERVING: promoted; REPLACING: a shadow check diverged
        {State.SERVING, State.CHECKING, State.REPLACING, State.CLOSED}
    ),
    State.CHECKING: frozenset({State.SERVING, State.REPLACING, State.CLOSED}),
    State.REPLACING: frozenset({State.SERVING, State.FAILED, State.CLOSED}),
    State.FAILED: frozenset({State.SERVING, State.FAILED, State.CLOSED}),
    State.CLOSED: frozenset(),
}
LIVE = frozenset({State.SERVING, State.CHECKING})  # the states with a module to serve
_BEST_FIRST = (
    State.SERVING, State.CHECKING, State.STARTING, State.REPLACING, State.FAILED, State.CLOSED
)  # fmt: skip
SEVERITY: dict[State, int] = {state: rank for rank, state in enumerate(_BEST_FIRST)}
"""How bad each state is: where live sessions share a name, readiness and metrics show the
worst of them."""


@dataclass(frozen=True, slots=True)
class SessionStatus:
    """A consistent snapshot: state, rung in use, the last recovery's attempts and verdict."""

    name: str
    state: State
    rung: Rung
    rung_index: int
    verdict: Verdict | None
    history: tuple[Attempt, ...]
    since: float = 0.0  # wall-clock time (time.time()) the session entered its state
    shadow: ShadowStatus | None = None  # the shadow checks so far (Policy.shadow_every)

    @property
    def mode(self) -> str:
        """The name of the rung in use ("static", "dynamic", ...)."""
        return self.rung.name

    @property
    def healthy(self) -> bool:
        """True while a module whose canary passed is serving."""
        return self.state in LIVE

    @property
    def closed(self) -> bool:
        """True once the session was closed."""
        return self.state is State.CLOSED

    @property
    def attempts(self) -> int:
        """How many inits the last recovery took."""
        return len(self.history)

    @property
    def turned_static(self) -> bool:
        """True when the rung in use asked for dynamic=True and MNN loaded it statically.

        MNN does that for models with control flow: `mode` says "dynamic", the module is not.
        """
        last = self.history[-1] if self.history else None
        return last is not None and last.rung_index == self.rung_index and last.turned_static

    @property
    def basis(self) -> Basis:
        """What the module in use was judged against: the probe's goldens, a local reference
        (this machine computes slightly differently), or a disputed one (the guard cannot tell
        whether the probe is stale here or the reference is degraded)."""
        last = self.history[-1] if self.history else None
        if last is None or last.rung_index != self.rung_index:
            return Basis.GOLDEN
        return last.basis

    def describe(self) -> str:
        """One line for logs and tables."""
        verdict = self.verdict.describe() if self.verdict is not None else "no verdict"
        tries = f"after {self.attempts} attempt(s)"
        static = f" [{STATIC_LOAD}]" if self.turned_static else ""
        if self.basis is not Basis.GOLDEN:
            static += f" [judged against a {self.basis.value} reference]"
        return (
            f"{self.state.value} on rung {self.mode!r} ({self.rung_index}){static} {tries}; "
            f"{verdict}"
        )
