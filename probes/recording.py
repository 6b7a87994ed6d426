"""`probes.record`, found through an entry point: recording runs modules, a runtime's job.

`probes` judges arrays and never imports the runtime that runs models; a runtime offers its
recorder under the `probes.recorders` entry point (mnn-guard's is `guard.record`).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from probes.errors import ProbeError

if TYPE_CHECKING:
    from probes.probe import Probe

__all__ = ["GROUP", "record"]

GROUP = "probes.recorders"
_found: list[Callable[..., Probe]] = []


def _recorder() -> Callable[..., Probe]:
    """The installed recorder (the first by name when several runtimes offer one)."""
    if not _found:
        points = sorted(importlib.metadata.entry_points(group=GROUP), key=lambda p: p.name)
        if not points:
            raise ProbeError(
                f"no recorder is installed (entry point group {GROUP!r}); install mnn-guard, "
                "whose guard.record records probes"
            )
        _found.append(points[0].load())
    return _found[0]


def record(
    factory: Callable[..., Any],
    inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    reference: Mapping[str, Any] | None = None,
    **options: Any,
) -> Probe:
    """Record a probe from a trusted configuration of `factory` (see `guard.record`).

    >>> probe = probes.record(factory, {"mel": mel}, reference={"dynamic": True})  # doctest: +SKIP
    """
    return _recorder()(factory, inputs, reference, **options)
