"""pytest plugin for `make mutate`: mutmut's stats call stack kept per thread, not in a ContextVar.

While it collects which tests reach which functions, mutmut 3.8 keeps the caller of each
mutated function in a ContextVar, set and reset around every call. The guard calls its
factories, canaries and judges in threads of its own; with a ContextVar set and reset there
around every call, CPython 3.11.7 crashed (SIGSEGV in the context's HAMT, copying a node
whose entries were freed) in the stats run of `make mutate MUTATE_FRESH=1`, in the same test
each time. The same tests pass without the ContextVar (plain runs, CI) and with this stack.
A thread-local stack records the same edges for code that runs in threads, which is all the
guard does; no asyncio task's caller is told apart, which mutmut uses only for its
dependency graph, not for choosing tests.
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
