"""Names of sessions and pools: bounded in length, and a duplicate said out loud."""

from __future__ import annotations

import logging

from guard.errors import ConfigError
from guard.health import HealthTable

__all__ = ["MAX_NAME", "check_name"]

log = logging.getLogger("mnn_guard")

MAX_NAME = 128
"""The longest name, in characters: a name labels every metric series and readiness entry."""


def check_name(name: object, health: HealthTable) -> str:
    """`name` if it can name a session or pool: a str of at most MAX_NAME characters.

    A name that a live session or pool of `health` already has is allowed (a hot swap builds
    the new one beside the old) and logged as a warning: readiness and the name's gauges then
    show the worst of them until one is closed.
    """
    if not isinstance(name, str):
        raise ConfigError(f"a session name is a str, got {type(name).__name__}")
    if len(name) > MAX_NAME:
        raise ConfigError(
            f"a session name has at most {MAX_NAME} characters (it labels every metric series "
            f"and readiness entry), got one of {len(name)}: {name[:40]!r}..."
        )
    if health.live(name):
        log.warning(
            "session %r: a live session or pool of this name exists already; readiness and the "
            "name's metrics show the worst of them until one is closed",
            name,
        )
    return name
