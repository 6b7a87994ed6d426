"""Building models with MNN.expr so that their placeholders stay inputs, on every PyMNN release.

PyMNN 3.0 and 3.1 evaluate expressions eagerly by default: a placeholder is a constant at
once, and `MNN.expr.save` writes the outputs' values (computed from uninitialised memory)
with no input at all. PyMNN 3.2 and later keep the graph. Whether this MNN folds
placeholders is asked of MNN itself, once per process, not read from its version.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from guard.mnn.native import F

__all__ = ["graph_building", "placeholders_fold"]

_lock = threading.Lock()
_folds: list[bool] = []  # the answer, once asked


def placeholders_fold() -> bool:
    """True when this MNN turns a new placeholder into a constant (eager evaluation)."""
    with _lock:
        if not _folds:
            _folds.append(F.placeholder([1], F.NCHW).op_type != "Input")
        return _folds[0]


@contextlib.contextmanager
def graph_building() -> Iterator[None]:
    """Build and save expression graphs in the block with their placeholders kept as inputs.

    Where this MNN evaluates eagerly, lazy evaluation is on for the block (and off after it);
    elsewhere nothing changes, so the bytes `MNN.expr.save` writes stay the release's own.

    >>> with graph_building():  # doctest: +SKIP
    ...     x = F.placeholder([1, 16], F.NCHW)
    ...     F.save([F.relu(x)], "relu.mnn")
    """
    if not placeholders_fold():
        yield
        return
    F.lazy_eval(True)
    try:
        yield
    finally:
        F.lazy_eval(False)
