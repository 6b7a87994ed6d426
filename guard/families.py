"""The `mnn_guard_*` metric families, declared once: name, kind, help text and label names.

Every sink (Prometheus, Ray, ...) creates its metrics from these; `guard.sinks.MetricsListener`
is the one mapping from session events to them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "BASIS",
    "CANARY_CHECKS",
    "CANARY_SNR_DB",
    "FAMILIES",
    "HEALTHY",
    "INFO",
    "INITS",
    "INIT_SECONDS",
    "LOADED_STATIC",
    "RECOVERIES",
    "RUNG",
    "RUNG_INDEX",
    "RUNS",
    "RUN_SECONDS",
    "SHADOW_CHECKS",
    "SHADOW_SNR_DB",
    "STATE",
    "Family",
    "Kind",
]


class Kind(enum.Enum):
    """What a family counts: a counter only goes up, a gauge is set, a histogram observes."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True, slots=True, kw_only=True)
class Family:
    """One metric family: its name (counters without `_total`), kind, help and label names.

    `buckets` names the `guard.metrics.Buckets` field a histogram's bounds come from.
    """

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...]
    buckets: str = ""


INFO = Family(
    name="mnn_guard_session_info",
    kind=Kind.GAUGE,
    help="1 per guarded session: versions and the model file's sha256.",
    labels=("session", "guard_version", "mnn_version", "model_sha256"),
)
INITS = Family(
    name="mnn_guard_inits",
    kind=Kind.COUNTER,
    help="Module initialisations (factory calls).",
    labels=("session", "rung"),
)
CANARY_CHECKS = Family(
    name="mnn_guard_canary_checks",
    kind=Kind.COUNTER,
    help="Canary judgements by result (pass, fail, error, timeout).",
    labels=("session", "rung", "result"),
)
RECOVERIES = Family(
    name="mnn_guard_recoveries",
    kind=Kind.COUNTER,
    help="Recovery actions (reinit, fallback, promote).",
    labels=("session", "action"),
)
HEALTHY = Family(
    name="mnn_guard_healthy",
    kind=Kind.GAUGE,
    help="1 while the session serves a module whose canary passed.",
    labels=("session",),
)
RUNG = Family(
    name="mnn_guard_rung",
    kind=Kind.GAUGE,
    help="1 for the rung the session is on, 0 for its other rungs.",
    labels=("session", "rung"),
)
RUNG_INDEX = Family(
    name="mnn_guard_rung_index",
    kind=Kind.GAUGE,
    help=(
        "Position on the ladder of the rung the session is on: 0 is the first (fastest); "
        "above 0 after a fallback, even one before the first scrape."
    ),
    labels=("session",),
)
STATE = Family(
    name="mnn_guard_state",
    kind=Kind.GAUGE,
    help="1 for the session's state, 0 for the others.",
    labels=("session", "state"),
)
LOADED_STATIC = Family(
    name="mnn_guard_rung_loaded_static",
    kind=Kind.GAUGE,
    help=(
        "1 when the rung asked for dynamic=True and MNN loaded it statically (the model has "
        "control flow): that rung is no real fallback."
    ),
    labels=("session", "rung"),
)
BASIS = Family(
    name="mnn_guard_basis",
    kind=Kind.GAUGE,
    help=(
        "1 for what the serving module's canary was judged against: golden (the probe's), "
        "local (a reference built here: this machine computes slightly differently) or "
        "disputed (every init here disagrees with the probe alike: the guard cannot tell)."
    ),
    labels=("session", "basis"),
)
CANARY_SNR_DB = Family(
    name="mnn_guard_canary_snr_db",
    kind=Kind.GAUGE,
    help="Worst SNR of the last canary judgement, in dB.",
    labels=("session",),
)
INIT_SECONDS = Family(
    name="mnn_guard_init_seconds",
    kind=Kind.HISTOGRAM,
    help="Init + canary time.",
    labels=("session", "rung"),
    buckets="init",
)
RUNS = Family(
    name="mnn_guard_runs",
    kind=Kind.COUNTER,
    help="run() calls by result (ok, error, invalid, unavailable, failed, closed).",
    labels=("session", "rung", "result"),
)
RUN_SECONDS = Family(
    name="mnn_guard_run_seconds",
    kind=Kind.HISTOGRAM,
    help="run() time.",
    labels=("session", "rung"),
    buckets="run",
)

SHADOW_CHECKS = Family(
    name="mnn_guard_shadow_checks",
    kind=Kind.COUNTER,
    help=(
        "Sampled live calls by shadow result: pass, fail (diverged from the reference) or "
        "dropped (the queue was full)."
    ),
    labels=("session", "result"),
)
SHADOW_SNR_DB = Family(
    name="mnn_guard_shadow_snr_db",
    kind=Kind.GAUGE,
    help="Worst SNR of the shadow checks of the module in use, in dB (+Inf before the first).",
    labels=("session",),
)

FAMILIES: tuple[Family, ...] = (
    INFO,
    INITS,
    CANARY_CHECKS,
    RECOVERIES,
    HEALTHY,
    RUNG,
    RUNG_INDEX,
    STATE,
    LOADED_STATIC,
    BASIS,
    CANARY_SNR_DB,
    INIT_SECONDS,
    RUNS,
    RUN_SECONDS,
    SHADOW_CHECKS,
    SHADOW_SNR_DB,
)
"""Every family, in the order the issue's table lists them."""
