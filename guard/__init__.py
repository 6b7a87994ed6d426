"""mnn-guard: keeps PyMNN inference honest.

>>> import guard, probes
>>> factory = guard.mnn_factory("vocoder.mnn", ["mel"], ["wav"], threads=1)  # doctest: +SKIP
>>> session = guard.wrap(factory, probes.load("probes/vocoder"), name="vocoder")  # doctest: +SKIP
>>> session.run({"mel": mel})["wav"]  # doctest: +SKIP
"""

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
from guard.health import HealthTable, readiness
from guard.ladder import DYNAMIC, STATIC, Policy, Rung
from guard.listeners import Listener
from guard.mnn import mnn_factory
from guard.pool import Pool
from guard.server import serve
from guard.session import GuardedSession
from guard.state import SessionStatus, State
from guard.wrap import wrap

__version__ = "0.1.0"

__all__ = [
    "DYNAMIC",
    "STATIC",
    "ConfigError",
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
    "mnn_factory",
    "readiness",
    "serve",
    "wrap",
]
