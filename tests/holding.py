"""Hold a worker process still (SIGSTOP) while a test arranges what must happen before it can
answer, so that no race with the worker's speed decides the test."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def stopped(pid: int | None) -> Iterator[int]:
    """Stop process `pid` for the block and let it go on after (unless it was killed)."""
    assert pid is not None, "no process to hold"
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed in the block, and reaped
            os.kill(pid, signal.SIGCONT)
