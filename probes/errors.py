"""The probe package's one error type, and the short reprs its messages quote."""

from __future__ import annotations

__all__ = ["CanaryWarning", "ProbeError", "brief"]


class ProbeError(ValueError):
    """A probe is missing, corrupt, stale or cannot be recorded; the message says how to fix it."""


class CanaryWarning(UserWarning):
    """A recorded canary judges little of the model (constant, silent or saturated outputs,
    lengths near zero) or saw something the guard exists for (a degraded init)."""


def brief(value: object, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters, for quoting untrusted values in messages."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond sys.get_int_max_str_digits()
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
