"""mnn-guard: keeps PyMNN inference honest.

>>> import guard, probes
>>> factory = guard.mnn_factory("vocoder.mnn", ["mel"], ["wav"], threads=1)  # doctest: +SKIP
>>> session = guard.wrap(factory, probes.load("probes/vocoder"), name="vocoder")  # doctest: +SKIP
>>> session.run({"mel": mel})["wav"]  # doctest: +SKIP

Names are imported on first use, so that `import guard` (and `mnn-guard --help`, which imports
`guard.tools.cli`) does not load MNN, scipy or prometheus_client until they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guard.errors import (
        ConfigError,
        FactoryError,
        ForkAfterLoad,
        ForwardFailed,
        GuardError,
        InitTimeout,
        InputMismatch,
        OutputMismatch,
        PoisonRequest,
        RecoveryExhausted,
        SessionClosed,
        Unavailable,
        WorkerFailed,
    )
    from guard.health import HealthTable, mark_process_dead, readiness
    from guard.ladder import DYNAMIC, SESSION_LADDER, STATIC, Policy, Rung, session_ladder
    from guard.listeners import Listener
    from guard.mnn import (
        DynamicIgnoredWarning,
        mnn_factory,
        mnn_session_factory,
        session_factory,
    )
    from guard.pool import Pool
    from guard.recording import record
    from guard.server import asgi_app, serve, wsgi_app
    from guard.session import GuardedSession
    from guard.state import SessionStatus, State
    from guard.wrapping import wrap

from guard.version import __version__

__all__ = [
    "DYNAMIC",
    "SESSION_LADDER",
    "STATIC",
    "ConfigError",
    "DynamicIgnoredWarning",
    "FactoryError",
    "ForkAfterLoad",
    "ForwardFailed",
    "GuardError",
    "GuardedSession",
    "HealthTable",
    "InitTimeout",
    "InputMismatch",
    "Listener",
    "OutputMismatch",
    "PoisonRequest",
    "Policy",
    "Pool",
    "RecoveryExhausted",
    "Rung",
    "SessionClosed",
    "SessionStatus",
    "State",
    "Unavailable",
    "WorkerFailed",
    "__version__",
    "asgi_app",
    "mark_process_dead",
    "mnn_factory",
    "mnn_session_factory",
    "readiness",
    "record",
    "serve",
    "session_factory",
    "session_ladder",
    "wrap",
    "wsgi_app",
]

_HOME = {  # public name -> the runtime module that defines it
    "ConfigError": "errors",
    "FactoryError": "errors",
    "ForkAfterLoad": "errors",
    "ForwardFailed": "errors",
    "GuardError": "errors",
    "InitTimeout": "errors",
    "InputMismatch": "errors",
    "OutputMismatch": "errors",
    "PoisonRequest": "errors",
    "RecoveryExhausted": "errors",
    "SessionClosed": "errors",
    "Unavailable": "errors",
    "WorkerFailed": "errors",
    "HealthTable": "health",
    "readiness": "health",
    "mark_process_dead": "health",
    "DYNAMIC": "ladder",
    "SESSION_LADDER": "ladder",
    "STATIC": "ladder",
    "Policy": "ladder",
    "Rung": "ladder",
    "session_ladder": "ladder",
    "Listener": "listeners",
    "mnn_factory": "mnn",
    "mnn_session_factory": "mnn",
    "session_factory": "mnn",
    "DynamicIgnoredWarning": "mnn",
    "Pool": "pool",
    "serve": "server",
    "asgi_app": "server",
    "wsgi_app": "server",
    "GuardedSession": "session",
    "SessionStatus": "state",
    "State": "state",
    "wrap": "wrapping",
    "record": "recording",
}
_RUNTIME = frozenset(  # submodules that were attributes when this module imported them all
    {
        "canary",
        "diagnosis",
        "errors",
        "health",
        "inputs",
        "ladder",
        "listeners",
        "metrics",
        "mnn",
        "pool",
        "server",
        "session",
        "state",
        "version",
        "wrapping",
    }
)


def __getattr__(name: str) -> Any:
    """Import a public name (or a runtime submodule, `guard.ladder`) on first use."""
    if name in _HOME:
        value = getattr(importlib.import_module(f"guard.{_HOME[name]}"), name)
    elif name in _RUNTIME:
        value = importlib.import_module(f"guard.{name}")
    else:
        raise AttributeError(f"module 'guard' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names, loaded or not."""
    return sorted({*globals(), *__all__})
