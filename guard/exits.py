"""How a child process ended, in words, from its exit code (a negative code is a signal)."""

from __future__ import annotations

import signal

__all__ = ["exit_text"]


def exit_text(code: int | None) -> str:
    """`exited with code 3`, `was killed by SIGSEGV`; `stopped answering` while it runs (None)."""
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
