"""The only module that knows MNN: loading, the numpy-level Runner over Vars, fork bookkeeping."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np
from numpy.typing import NDArray

from guard.errors import ConfigError, FactoryError, ForkAfterLoad


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send C-level stdout to stderr (MNN prints a banner on import that would spoil --json)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 (embedded interpreters): nothing to protect
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


with _stdout_to_stderr():
    import MNN
    import MNN.expr as F
    from MNN import nn

__all__ = [
    "F",
    "MNNFactory",
    "Runner",
    "VarModule",
    "adapt",
    "check_not_forked",
    "mnn_factory",
    "mnn_version",
    "note_load",
]

_LOAD_KEYS = frozenset(
    {
        "runtime_manager",
        "dynamic",
        "shape_mutable",
        "rearrange",
        "backend",
        "memory_mode",
        "power_mode",
        "precision_mode",
    }
)
_ENUM_KEYS = {
    "precision_mode": F.PrecisionMode,
    "memory_mode": F.MemoryMode,
    "power_mode": F.PowerMode,
    "backend": F.Backend,
}
_DTYPES: dict[np.dtype[Any], Any] = {
    np.dtype(np.float32): F.float,
    np.dtype(np.int32): F.int,
    np.dtype(np.uint8): F.uint8,
    np.dtype(np.int8): F.int8,
}
SUPPORTED_DTYPES = tuple(str(d) for d in _DTYPES)

_state = threading.Lock()
_loaded_pid: int | None = None
_forked_after_load = False
_runtime_managers: dict[int, Any] = {}


def mnn_version() -> str:
    """The installed PyMNN version string."""
    return str(MNN.version())


def _after_fork_in_child() -> None:
    global _forked_after_load
    if _loaded_pid is not None:
        _forked_after_load = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def note_load() -> None:
    """Record that this process has loaded MNN modules (a later fork would hang in MNN)."""
    global _loaded_pid
    if _loaded_pid is None:
        _loaded_pid = os.getpid()


def check_not_forked() -> None:
    """Raise ForkAfterLoad in a process forked after its parent loaded MNN modules."""
    if _forked_after_load:
        raise ForkAfterLoad(
            f"process {os.getpid()} was forked after its parent (pid {_loaded_pid}) loaded MNN "
            "modules; MNN hangs forever in such a child. Create guarded sessions after the fork, "
            "use the 'spawn' or 'forkserver' start method (multiprocessing.get_context('spawn'), "
            "guard.Pool does), and do not run gunicorn with --preload."
        )


def _runtime_manager(threads: int) -> Any:
    """One runtime manager per thread count and process (MNN ignores `thread_num`)."""
    with _state:
        if threads not in _runtime_managers:
            _runtime_managers[threads] = nn.create_runtime_manager(({"numThread": threads},))
        return _runtime_managers[threads]


def _load_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Validate load keywords and turn enum names given as strings into MNN enums."""
    unknown = sorted(set(kwargs) - _LOAD_KEYS - {"threads"})
    if unknown:
        raise ConfigError(
            f"unknown MNN load option(s) {unknown}; expected some of {sorted(_LOAD_KEYS)} "
            "or 'threads' (MNN would silently ignore them)"
        )
    out = dict(kwargs)
    threads = out.pop("threads", None)
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be a positive int, got {threads!r}")
        out["runtime_manager"] = _runtime_manager(threads)
    manager = out.get("runtime_manager")
    if manager is not None and not isinstance(manager, nn.RuntimeManager):
        raise ConfigError(
            f"runtime_manager={manager!r}; expected one made by "
            "MNN.nn.create_runtime_manager, or threads=N"
        )
    for key, enum in _ENUM_KEYS.items():
        value = out.get(key)
        if not isinstance(value, (str, int)):
            continue
        names = {n.lower(): n for n in dir(enum) if not n.startswith("_") and n[0].isupper()}
        if isinstance(value, int) or value.lower() not in names:  # MNN loads any int unchecked
            raise ConfigError(f"{key}={value!r}; expected one of {sorted(names.values())}")
        out[key] = getattr(enum, names[value.lower()])
    return out


@dataclass(frozen=True, slots=True)
class MNNFactory:
    """A picklable factory: `factory(**overrides)` loads the model with updated load options."""

    path: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    load_kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, **overrides: Any) -> Any:
        """Load a fresh module; `overrides` update the load keywords (e.g. dynamic=True)."""
        check_not_forked()
        if not os.path.isfile(self.path):
            raise FactoryError(f"model file {self.path!r} does not exist")
        kwargs = _load_kwargs({**self.load_kwargs, **overrides})
        module = nn.load_module_from_file(
            self.path, list(self.inputs), list(self.outputs), **kwargs
        )
        note_load()
        if module is None:
            raise FactoryError(f"MNN could not load {self.path!r} (corrupt or not an .mnn file?)")
        return module


def mnn_factory(
    path: str | os.PathLike[str],
    inputs: Sequence[str],
    outputs: Sequence[str],
    **load_kwargs: Any,
) -> MNNFactory:
    """Build a picklable factory for `MNN.nn.load_module_from_file`.

    `threads=n` really sets MNN's thread count (through a runtime manager); other keywords
    (dynamic, shape_mutable, precision_mode, ...) go to `load_module_from_file`.

    >>> factory = mnn_factory("vocoder.mnn", ["mel"], ["wav"], threads=1)
    >>> module = factory(dynamic=True)  # doctest: +SKIP
    """
    if isinstance(inputs, str) or isinstance(outputs, str):
        raise ConfigError("inputs and outputs are lists of names, not a single string")
    _load_kwargs({k: v for k, v in load_kwargs.items() if k != "threads"})  # fail early on typos
    return MNNFactory(os.fspath(path), tuple(inputs), tuple(outputs), dict(load_kwargs))


def to_var(array: NDArray[Any]) -> Any:
    """An MNN Var holding a copy of a C-contiguous array of a supported dtype (NCHW)."""
    dtype = _DTYPES.get(array.dtype)
    if dtype is None:
        raise ConfigError(
            f"dtype {array.dtype} cannot be given to MNN; use one of {SUPPORTED_DTYPES}"
        )
    return F.const(np.ascontiguousarray(array), list(array.shape), F.NCHW, dtype)


def to_numpy(var: Any) -> NDArray[Any]:
    """An owned numpy copy of a Var (Var.read() is a view MNN overwrites on the next forward)."""
    if var.data_format == F.NC4HW4:
        var = F.convert(var, F.NCHW)
    return np.array(var.read(), copy=True)


class Runner(Protocol):
    """A module seen at the numpy level: arrays in model input order in, owned arrays out."""

    def run(self, arrays: Sequence[NDArray[Any]]) -> list[NDArray[Any]]:
        """Run one forward."""
        ...


@dataclass(frozen=True, slots=True)
class VarModule:
    """A module with `.forward(list_of_vars) -> list_of_vars` (an MNN Module) as a Runner."""

    module: Any

    def run(self, arrays: Sequence[NDArray[Any]]) -> list[NDArray[Any]]:
        """Convert to Vars, forward (always with a list), and copy every output out of MNN."""
        check_not_forked()
        result = self.module.forward([to_var(a) for a in arrays])
        if result is None:
            return []
        if not isinstance(result, (list, tuple)):
            result = [result]
        return [to_numpy(v) for v in result]


def adapt(module: Any) -> Runner:
    """The numpy-level Runner for what a factory returned (and note that MNN is loaded here).

    An object with `.forward(list_of_vars)` is an MNN-style module; one that already has
    `.run(list_of_arrays)` (a fault injector, say) is a Runner as it is.
    """
    note_load()
    if callable(getattr(module, "forward", None)):
        return VarModule(module)
    if callable(getattr(module, "run", None)):
        return cast(Runner, module)
    raise FactoryError(
        f"the factory returned a {type(module).__name__} without a forward() method; "
        "expected a module with .forward(list_of_vars) -> list_of_vars"
    )
