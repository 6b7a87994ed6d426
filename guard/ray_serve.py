"""Guarded Ray Serve deployments, kept at their first import path (`guard.ray_serve:build_app`
in Serve config files).

They live in `guard.integrations.ray_serve`, on the replica core `guard.integrations.replica`;
the Ray sink of the metrics is `guard.integrations.ray_metrics`.
"""

from __future__ import annotations

from guard.integrations.ray_serve import (
    CONFIG_KEYS,
    HEALTH_CHECK_SECONDS,
    GuardedDeployment,
    RayListener,
    application,
    build_app,
)

__all__ = [
    "CONFIG_KEYS",
    "HEALTH_CHECK_SECONDS",
    "GuardedDeployment",
    "RayListener",
    "application",
    "build_app",
]
