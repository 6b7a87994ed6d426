"""What a replica's build publishes through: health and metrics that go live when it is served.

A hot swap builds the new model while the old one serves under the same name. Until the new
one is swapped in, its health entries are held aside and its gauges stay the old one's; a new
model that is refused is closed without ever touching them.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from guard.health import Entry, HealthTable
from guard.sinks import MetricsListener, Sink

if TYPE_CHECKING:
    from guard.integrations.replica import Spec

__all__ = ["HeldHealth", "Standby"]


class HeldHealth(HealthTable):
    """A health table that holds its entries until `go_live()`, then passes them to `target`.

    From then on every change goes straight through, so the target sees them in order.
    """

    def __init__(self, target: HealthTable, *, live: bool) -> None:
        super().__init__()
        self.target = target
        self._live = live
        self._relay = threading.Lock()

    def record(self, owner: object, entry: Entry) -> None:
        """Keep the entry; pass it on once live."""
        with self._relay:
            super().record(owner, entry)
            if self._live:
                self.target.record(owner, entry)

    def forget(self, name: str, owner: object | None = None) -> None:
        """Drop the entry here; there too once live (only if `owner` wrote it, when given)."""
        with self._relay:
            super().forget(name, owner)
            if self._live:
                self.target.forget(name, owner)

    def abandon(self, name: str, owner: object) -> None:
        """Keep the entry as the name's here; there too once live."""
        with self._relay:
            super().abandon(name, owner)
            if self._live:
                self.target.abandon(name, owner)

    def go_live(self) -> None:
        """Pass every held entry to the target; later changes go straight through."""
        with self._relay:
            if self._live:
                return
            self._live = True
            for owner, entry in self.records():
                self.target.record(owner, entry)


class Standby:
    """The health table and metrics listeners one build of a replica publishes through.

    `live=False` (a hot swap's new model): nothing reaches the replica's health table or the
    name's gauges until `go_live()`. `sink` None means the process's Prometheus registry.
    """

    def __init__(self, health: HealthTable, sink: Sink | None, *, live: bool) -> None:
        self.health = HeldHealth(health, live=live)
        self._sink = sink
        self._live = live
        self._listeners: list[MetricsListener] = []

    def metrics(self, spec: Spec) -> MetricsListener:
        """The metrics listener of a session built for `spec` (one per session)."""
        from guard import mnn
        from guard.metrics import metrics_for
        from guard.version import __version__

        sink = self._sink if self._sink is not None else metrics_for()
        info = (__version__, mnn.mnn_version(), spec.probe.meta.model_sha256 or "")
        listener = MetricsListener(
            spec.name,
            spec.policy.ladder,
            sink,
            info=info,
            standby=not self._live,
            shadow=spec.policy.shadow_every is not None,
        )
        self._listeners.append(listener)
        return listener

    def go_live(self) -> None:
        """Publish the build's health and gauges from now on, starting with its latest state."""
        self._live = True
        self.health.go_live()
        for listener in self._listeners:
            listener.go_live()
