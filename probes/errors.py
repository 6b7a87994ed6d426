"""The probe package's one error type."""

from __future__ import annotations

__all__ = ["ProbeError"]


class ProbeError(ValueError):
    """A probe is missing, corrupt, stale or cannot be recorded; the message says how to fix it."""
