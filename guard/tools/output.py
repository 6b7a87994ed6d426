"""What the tools print: progress on stderr, aligned text tables, the guard's log quieted."""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import sys
from collections.abc import Iterator, Sequence

__all__ = ["native_stdout_to_stderr", "quiet_log", "say", "text_table"]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned text table: header, a dashed rule, one line per row."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def say(text: str) -> None:
    """Progress goes to stderr, so that stdout holds only the result (--json)."""
    print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet_log(level: int = logging.ERROR, name: str = "mnn_guard") -> Iterator[None]:
    """Raise the guard logger's level for the block (faults on purpose), then restore it."""
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


def _flush_native() -> None:
    """Flush C stdio (MNN prints with printf, buffered when stdout is not a terminal)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)


def _python_on_fd1() -> bool:
    """True when `sys.stdout` writes to fd 1 (not a redirect_stdout or a test's capture)."""
    try:
        return sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def native_stdout_to_stderr() -> Iterator[None]:
    """Send what native code prints on fd 1 to stderr; Python's `print` keeps the real stdout.

    For `--json`: MNN prints diagnostics on stdout (on a failed forward, say), which would
    spoil the document.
    """
    sys.stdout.flush()
    _flush_native()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1: nothing to protect
        yield
        return
    previous = sys.stdout
    real = None
    if _python_on_fd1():
        real = io.TextIOWrapper(os.fdopen(saved, "wb", closefd=False), line_buffering=True)
        sys.stdout = real
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        _flush_native()
        sys.stdout = previous
        os.dup2(saved, 1)
        if real is not None:
            real.close()
        os.close(saved)
