"""mnn-guard: keeps PyMNN inference honest.

>>> import guard, probes
>>> factory = guard.mnn_factory("vocoder.mnn", ["mel"], ["wav"], threads=1)  # doctest: +SKIP
>>> session = guard.wrap(factory, probes.load("probes/vocoder"), name="vocoder")  # doctest: +SKIP
>>> session.run({"mel": mel})["wav"]  # doctest: +SKIP
"""

from guard.errors import (
    CanaryTimeout,
    ConfigError,
    FactoryError,
    ForkAfterLoad,
    GuardError,
    InitTimeout,
    InputMismatch,
    RecoveryExhausted,
    SessionClosed,
    WorkerFailed,
)
from guard.health import readiness
from guard.ladder import DEFAULT_LADDER, DYNAMIC, STATIC, Action, Attempt, Outcome, Policy, Rung
from guard.listeners import CapturingListener, Listener, LoggingListener
from guard.metrics import PrometheusListener
from guard.mnn import MNNFactory, mnn_factory
from guard.pool import Pool, WorkerStatus
from guard.server import MetricsServer, serve
from guard.session import GuardedSession, SessionStatus
from guard.wrap import wrap

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LADDER",
    "DYNAMIC",
    "STATIC",
    "Action",
    "Attempt",
    "CanaryTimeout",
    "CapturingListener",
    "ConfigError",
    "FactoryError",
    "ForkAfterLoad",
    "GuardError",
    "GuardedSession",
    "InitTimeout",
    "InputMismatch",
    "Listener",
    "LoggingListener",
    "MNNFactory",
    "MetricsServer",
    "Outcome",
    "Policy",
    "Pool",
    "PrometheusListener",
    "RecoveryExhausted",
    "Rung",
    "SessionClosed",
    "SessionStatus",
    "WorkerFailed",
    "WorkerStatus",
    "__version__",
    "mnn_factory",
    "readiness",
    "serve",
    "wrap",
]
