"""The recovery ladder: rungs from fastest to safest, the policy, and the record of each attempt."""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from types import MappingProxyType
from typing import Any

from guard.errors import ConfigError
from probes import Verdict

__all__ = [
    "DEFAULT_LADDER",
    "DYNAMIC",
    "MODULE_DYNAMIC",
    "SESSION",
    "SESSION_LADDER",
    "STATIC",
    "Action",
    "Attempt",
    "Basis",
    "Outcome",
    "Policy",
    "Rung",
    "session_ladder",
]


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


STATIC_LOAD = "loaded static: MNN ignores dynamic=True for this model (control flow)"
"""How a rung that asked for dynamic=True, and was loaded statically by MNN, is described."""

STATIC = Rung("static")
DYNAMIC = Rung("dynamic", MappingProxyType({"dynamic": True}))
DEFAULT_LADDER = (STATIC, DYNAMIC)

# Session-API ladders (guard.mnn_session_factory, guard.session_factory): rungs are
# createSession configs; the last loads the same file through the Module API, dynamic=True.
SESSION = Rung("session")
MODULE_DYNAMIC = Rung("dynamic", MappingProxyType({"api": "module", "dynamic": True}))
SESSION_LADDER = (SESSION, MODULE_DYNAMIC)


def session_ladder(*configs: Mapping[str, Any], fallback: bool = True) -> tuple[Rung, ...]:
    """A rung per session config (fastest first), then the Module API's dynamic=True.

    Each config updates the session factory's own (`{"precision": "low"}`, `{"numThread":
    2}`, `{"memory": "low"}`, `{"backend": "OPENCL"}`); a rung is named after it, e.g.
    `session:precision=low`. No configs: one rung with the factory's config as it is.

    >>> policy = guard.Policy(ladder=guard.session_ladder({"precision": "low"}, {}))
    """
    rungs = [Rung(_session_name(c), MappingProxyType(dict(c))) for c in configs or ({},)]
    if any(c.get("api", "session") != "session" for c in configs):
        raise ConfigError("session_ladder takes session configs; the Module API rung is its last")
    if fallback:
        rungs.append(MODULE_DYNAMIC)
    names = [r.name for r in rungs]
    if len(set(names)) != len(names):
        raise ConfigError(f"two session configs are the same rung: {names}")
    return tuple(rungs)


def _session_name(config: Mapping[str, Any]) -> str:
    """`session`, or `session:precision=low,numThread=2`."""
    if not config:
        return SESSION.name
    return "session:" + ",".join(f"{k}={v}" for k, v in config.items())


class Outcome(enum.StrEnum):
    """How one init + canary ended (the `result` label of the canary metric)."""

    PASS = "pass"
    FAIL = "fail"
    ERROR = "error"
    TIMEOUT = "timeout"


class Basis(enum.StrEnum):
    """What a canary was judged against (guard.judgement)."""

    GOLDEN = "golden"  # the probe's stored goldens, tight limits
    LOCAL = "local"  # a reference module built here (the goldens agree with it loosely)
    DISPUTED = "disputed"  # a reference built here that disagrees with the stored goldens

    @property
    def rank(self) -> int:
        """How far from the stored goldens the judgement had to go (higher: further)."""
        return (Basis.GOLDEN, Basis.LOCAL, Basis.DISPUTED).index(self)


class Action(enum.StrEnum):
    """What the guard did about a degraded or slow module."""

    REINIT = "reinit"
    FALLBACK = "fallback"
    PROMOTE = "promote"


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """How to recover: the ladder, re-inits per rung, canary runs, timeouts, re-checks, promotion.

    `reinit_attempts` re-initialisations follow the first init on each rung before moving down.
    `recheck_every` re-runs the canary on the live module: an int counts calls, a float or
    timedelta is seconds. `promote_after` seconds after a fallback (or a failure), the faster
    rungs are tried again off the request path. `wait_timeout` bounds how long a `run()` call
    waits for a replacement module before it raises `Unavailable`. `diagnose` names a folder
    where every failed canary leaves a diagnosis bundle (`guard.diagnosis`), written off the
    request path and bounded in count and size. `retry_margin_db` raises every SNR limit for
    a re-init of a rung that already failed in the same recovery: a fault near a limit does
    not get through by being drawn again. `shadow_every=N` judges every N-th live call,
    off the request path, against a reference module (`guard.shadow`), run in a process of
    its own unless `shadow_process` is False (`guard.reference`).
    """

    ladder: tuple[Rung, ...] = DEFAULT_LADDER
    reinit_attempts: int = 3
    canary_runs: int = 2
    init_timeout: float | None = 60.0
    wait_timeout: float = 30.0
    recheck_every: int | float | timedelta | None = None
    shadow_every: int | None = None
    shadow_process: bool = True
    promote_after: float | None = 300.0
    check_finite_inputs: bool = True
    background: bool = True
    diagnose: str | os.PathLike[str] | None = None
    retry_margin_db: float = 10.0

    def __post_init__(self) -> None:
        if not self.ladder:
            raise ConfigError("the ladder needs at least one rung")
        names = [r.name for r in self.ladder]
        if len(set(names)) != len(names):
            raise ConfigError(f"rung names must be unique, got {names}")
        if self.reinit_attempts < 0:
            raise ConfigError(f"reinit_attempts must be >= 0, got {self.reinit_attempts}")
        if self.canary_runs < 1:
            raise ConfigError(f"canary_runs must be >= 1, got {self.canary_runs}")
        shadow = self.shadow_every
        if shadow is not None and (type(shadow) is not int or shadow < 1):
            raise ConfigError(
                f"shadow_every must be a whole number of calls >= 1 or None, got {shadow!r}"
            )
        if not isinstance(self.shadow_process, bool):
            raise ConfigError(f"shadow_process must be True or False, got {self.shadow_process!r}")
        margin = self.retry_margin_db
        if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin < 1e3:
            raise ConfigError(f"retry_margin_db must be a number in 0..1000 dB, got {margin!r}")
        folder = self.diagnose
        if folder is not None and (not isinstance(folder, str | os.PathLike) or not str(folder)):
            raise ConfigError(f"diagnose must be a folder path or None, got {folder!r}")
        for key in ("init_timeout", "wait_timeout", "promote_after"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"{key} must be > 0 or None, got {value}")
        every = self.recheck_every
        if every is None:
            return
        if isinstance(every, bool) or not isinstance(every, int | float | timedelta):
            raise ConfigError(
                f"recheck_every must be an int (calls), a float or timedelta (seconds) or None, "
                f"got {every!r}"
            )
        if isinstance(every, int) and every < 1:
            raise ConfigError(f"recheck_every must be >= 1 call, got {every}")
        seconds = self.recheck_seconds
        if seconds is not None and not seconds > 0:
            raise ConfigError(f"recheck_every must be > 0 seconds, got {every!r}")

    @property
    def recheck_calls(self) -> int | None:
        """Calls between re-checks, when `recheck_every` counts calls."""
        every = self.recheck_every
        return every if isinstance(every, int) else None

    @property
    def recheck_seconds(self) -> float | None:
        """Seconds between re-checks, when `recheck_every` is a duration."""
        every = self.recheck_every
        if isinstance(every, timedelta):
            return every.total_seconds()
        return every if isinstance(every, float) else None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One init + canary on one rung: its outcome, verdict, error and duration."""

    rung: Rung
    rung_index: int
    outcome: Outcome
    verdict: Verdict | None
    error: BaseException | None
    seconds: float
    # what the module returned where the canary failed, by case (for a diagnosis)
    outputs: Mapping[int, Mapping[str, Any]] = field(
        default_factory=dict, repr=False, compare=False
    )
    notes: tuple[str, ...] = ()  # what MNN printed while loading, or on a failed canary forward
    turned_static: bool = False  # the rung asked for dynamic=True; MNN loaded it statically
    basis: Basis = Basis.GOLDEN  # what the canary was judged against

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
        static = f" [{STATIC_LOAD}]" if self.turned_static else ""
        basis = "" if self.basis is Basis.GOLDEN else f" [judged against {_BASES[self.basis]}]"
        new = [n for n in self.notes if n.split(": ", 1)[-1] not in detail]  # not said already
        said = f"; {' | '.join(new)}" if new else ""
        return f"rung {self.rung.name!r}{static}{basis}: {self.outcome.value} ({detail}){said}"


_BASES = {
    Basis.LOCAL: "a local reference (this machine computes the goldens slightly differently)",
    Basis.DISPUTED: (
        "a local reference that disagrees with the probe's goldens: the guard cannot tell "
        "whether the probe is stale for this machine or the reference is degraded"
    ),
}
