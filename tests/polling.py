"""One bounded poller for the tests that wait on background work (threads, processes, Ray)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
BOUND = 30.0  # seconds a wait may take at most: a hang fails the test instead of blocking CI


def until(what: str, check: Callable[[], T | None], bound: float = BOUND, every: float = 0.01) -> T:
    """Poll `check` every `every` seconds until it returns something other than None or False,
    and return that; AssertionError naming `what` after `bound` seconds."""
    deadline = time.monotonic() + bound
    while True:
        found = check()
        if found is not None and found is not False:
            return found
        if time.monotonic() >= deadline:
            raise AssertionError(f"no {what} within {bound:g} s")
        time.sleep(every)
