"""The errors of the tools, and the exit codes of `mnn-guard` they become.

`BundleError` and `MissingExtra` are GuardErrors (a caller of `guard.tools.report` catches them
with the rest); `UsageError` is not: it is the command line's own, one line on stderr, exit 2.
"""

from __future__ import annotations

from guard.errors import GuardError

__all__ = ["EXIT_DEGRADED", "EXIT_OK", "EXIT_USAGE", "BundleError", "MissingExtra", "UsageError"]

EXIT_OK = 0  # everything checked was healthy
EXIT_DEGRADED = 1  # a degraded init, start or output was found
EXIT_USAGE = 2  # a user error: a bad argument, an unreadable input, an unwritable output


class BundleError(GuardError, ValueError):
    """A diagnosis bundle folder cannot be read: missing, not a bundle, or damaged."""


class MissingExtra(GuardError, ImportError):
    """A tool needs an optional dependency that is not installed (an extra of mnn-guard)."""


class UsageError(Exception):
    """A user error on the command line: reported as one line, exit 2."""
