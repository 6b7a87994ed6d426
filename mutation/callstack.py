"""pytest plugin for `make mutate`: mutmut's stats call stack kept per thread, not in a ContextVar.

While it collects which tests reach which functions, mutmut 3.8 keeps the caller of each
mutated function in a ContextVar, set and reset around every call. Under CPython 3.11 a
ContextVar.set can start a garbage collection while it copies the context's tree; a finalizer
or weakref callback that sets a ContextVar meanwhile frees the tree being copied (CPython
gh-148891). Under mutmut the guard's finalizers and weakref callbacks (a dropped session's
`_released`, a probe's `_forget_checked`) are wrapped too, so they set the variable: the stats
run of `make mutate MUTATE_FRESH=1` crashed (SIGSEGV in the HAMT) in the guard's init
threads. A standalone script with reused threads and such a callback, without MNN, crashes
the same way. A thread-local stack records the same edges for code that runs in threads,
which is all the guard does; no asyncio task's caller is told apart, which mutmut uses only
for its dependency graph, not for choosing tests.
"""

from __future__ import annotations

import threading
from typing import Any


class ThreadStack:
    """The ContextVar interface mutmut's call stack uses (get, set, reset), kept per thread."""

    def __init__(self, default: Any) -> None:
        self._local = threading.local()
        self._default = default

    def get(self) -> Any:
        """This thread's current value."""
        return getattr(self._local, "value", self._default)

    def set(self, value: Any) -> Any:
        """Set this thread's value; the token is the value it had."""
        token = self.get()
        self._local.value = value
        return token

    def reset(self, token: Any) -> None:
        """Put back the value `set` returned."""
        self._local.value = token


try:
    from mutmut.core import MutmutCallStack
except ImportError:  # not under mutmut
    pass
else:
    MutmutCallStack._ctx = ThreadStack(MutmutCallStack._ctx.get())  # type: ignore[assignment]
