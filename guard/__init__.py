"""mnn-guard: keeps PyMNN inference honest.

>>> import guard, probes
>>> factory = guard.mnn_factory("vocoder.mnn", ["mel"], ["wav"], threads=1)  # doctest: +SKIP
>>> session = guard.wrap(factory, probes.load("probes/vocoder"), name="vocoder")  # doctest: +SKIP
>>> session.run({"mel": mel})["wav"]  # doctest: +SKIP

The public names are listed once, in `__init__.pyi` (which type checkers read too); each is
imported on first use, so that `import guard` (and `mnn-guard --help`) does not load MNN,
scipy or prometheus_client until they are needed. Everything else lives in its submodule
(`guard.errors.SessionClosed`, `guard.health.HealthTable`, ...).
"""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path
from typing import Any

from guard.version import __version__ as __version__


def _public() -> dict[str, str]:
    """Public name -> the module that defines it, read from `__init__.pyi`."""
    stub = ast.parse(Path(__file__).with_suffix(".pyi").read_text(encoding="utf-8"))
    return {
        alias.name: node.module
        for node in stub.body
        if isinstance(node, ast.ImportFrom) and node.module is not None
        for alias in node.names
    }


_HOME = _public()
__all__ = list(_HOME)  # `guard.__version__` is there too, as dunders are, outside __all__

_MOVED = {  # names that were public here before 0.2: where they live now
    **dict.fromkeys(
        [
            *("FactoryError", "ForkAfterLoad", "ForwardFailed", "InitTimeout"),
            *("OutputMismatch", "PoisonRequest", "SessionClosed", "WorkerFailed"),
        ],
        "guard.errors",
    ),
    "HealthTable": "guard.health",
    "mark_process_dead": "guard.health",
    "DynamicIgnoredWarning": "guard.mnn",
}


def __getattr__(name: str) -> Any:
    """Import a public name, a moved one (with a DeprecationWarning) or a submodule on first use."""
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
    elif name in _MOVED:
        warnings.warn(
            f"guard.{name} is {_MOVED[name]}.{name} now (guard keeps few top-level names)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    else:
        try:
            value = importlib.import_module(f"guard.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"guard.{name}":
                raise
            raise AttributeError(f"module 'guard' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names, loaded or not."""
    return sorted({*globals(), *__all__})
