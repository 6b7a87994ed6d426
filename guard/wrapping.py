"""`guard.wrap`: check the probe against the factory, wire listeners, build the session."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from guard import mnn
from guard.errors import GuardError
from guard.health import HEALTH, HealthListener, HealthTable
from guard.ladder import Policy, Rung
from guard.listeners import Listener, LoggingListener
from guard.metrics import Buckets, PrometheusListener
from guard.names import check_name
from guard.sentinels import check_factory
from guard.session import Factory, GuardedSession
from guard.version import __version__
from probes import Probe, ProbeError
from probes.store import check_mnn_version, check_model

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["check_probe", "ignored_rungs", "wrap"]


def check_probe(factory: Factory, probe: Probe, *, model_hash: bool = True) -> None:
    """Refuse a probe that is stale for this factory's model file or input/output names."""
    if not isinstance(probe, Probe):
        raise ProbeError(
            f"expected a probes.Probe, got {type(probe).__name__} (use probes.load(dir))"
        )
    if model_hash:
        check_model(probe, getattr(factory, "path", None))
    for kind, names in (("inputs", probe.input_names), ("outputs", probe.served_names)):
        declared = getattr(factory, kind, None)
        if kind == "outputs" and declared is not None and list(declared) == probe.output_names:
            continue  # a factory that loads the sentinels itself
        if declared is not None and sorted(declared) != sorted(names):
            raise ProbeError(
                f"the probe's {kind} {names} do not match the model's {list(declared)}; "
                "re-record the probe for this model"
            )
        if isinstance(factory, mnn.MNNFactory) and list(declared or ()) != list(names):
            raise ProbeError(  # its modules take and give arrays by position, not by name
                f"the factory lists its {kind} as {list(declared or ())}, the probe as {names}; "
                f"build the factory with the probe's order "
                "(guard.mnn_factory(path, probe.input_names, probe.output_names))"
            )
    check_mnn_version(probe, mnn.mnn_version())
    check_factory(factory, probe)


def ignored_rungs(factory: Factory, ladder: Sequence[Rung]) -> list[Rung]:
    """The rungs asking for dynamic=True on a model MNN always loads statically (control flow)."""
    path = getattr(factory, "path", None)
    dynamic = [r for r in ladder if r.overrides.get("dynamic")]
    if not dynamic or not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return []
    try:
        info = mnn.inspect(path)
    except GuardError:  # a file MNN cannot load: every rung's own attempt will say so
        return []
    return dynamic if info.control_flow else []


def wrap(
    factory: Factory,
    probe: Probe,
    *,
    policy: Policy | None = None,
    name: str = "default",
    registry: CollectorRegistry | None = None,
    listeners: Sequence[Listener] = (),
    metrics: bool = True,
    buckets: Buckets | None = None,
    health: HealthTable | None = None,
    raise_exhausted: bool = True,
    clock: Callable[[], float] = time.monotonic,
) -> GuardedSession:
    """Initialise a guarded session now: canary after every init, recovery down the ladder.

    Warns `DynamicIgnoredWarning` when MNN would load the ladder's dynamic rung statically
    (a model with control flow). Raises RecoveryExhausted (a GuardError) when every rung fails
    its canary; with `raise_exhausted=False` it returns the session in FAILED instead (not
    ready, `run()` raises, retried every `Policy.promote_after` seconds), so a server can stay
    up; a session that raised stays FAILED in readiness and metrics until another session of
    its name starts. The session's health goes to `health` (default: the process's table,
    which `guard.serve` answers for); its metrics to `registry` (default: the global one),
    with `buckets`. `name` has at most `guard.names.MAX_NAME` characters (ConfigError); a
    name a live session already has is logged as a warning (both show, the worst first).

    >>> factory = guard.mnn_factory("vocoder.mnn", ["mel"], ["wav"], threads=1)  # doctest: +SKIP
    >>> probe = probes.load("probes/vocoder")  # doctest: +SKIP
    >>> session = guard.wrap(factory, probe, name="vocoder")  # doctest: +SKIP
    >>> session.run({"mel": mel})["wav"]  # doctest: +SKIP
    """
    check_name(name, HEALTH if health is None else health)
    check_probe(factory, probe)
    health_listener = HealthListener(health)
    chain: list[Listener] = [LoggingListener(), health_listener]
    policy = policy or Policy()
    ignored = ignored_rungs(factory, policy.ladder)
    if ignored:
        names = [r.name for r in ignored]
        warnings.warn(
            mnn.DynamicIgnoredWarning(
                f"session {name!r}: MNN loads {getattr(factory, 'path', '')!r} statically even "
                f"with dynamic=True (the model has control flow), so rung(s) {names} are "
                "static loads: the ladder has no real dynamic fallback for this model"
            ),
            stacklevel=2,
        )
    metrics_listener = None
    if metrics:
        info = (__version__, mnn.mnn_version(), probe.meta.model_sha256 or "")
        metrics_listener = PrometheusListener(
            name,
            policy.ladder,
            registry=registry,
            buckets=buckets,
            info=info,
            shadow=policy.shadow_every is not None,
        )
        chain.append(metrics_listener)
    if policy.diagnose is not None:  # bundles for failed canaries, written off the request path
        from guard.diagnosis import DiagnosisListener

        chain.append(DiagnosisListener(policy.diagnose, probe, factory=factory))
    chain.extend(listeners)
    try:
        return GuardedSession(
            factory,
            probe,
            policy=policy,
            name=name,
            listeners=chain,
            clock=clock,
            raise_exhausted=raise_exhausted,
        )
    except BaseException:  # no session to close: its last word stands until a newer one's
        health_listener.abandon(name)
        if metrics_listener is not None:
            metrics_listener.abandon()
        raise
