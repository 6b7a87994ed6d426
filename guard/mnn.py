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


# ------------------------------------------------------------------------------- diagnosis
# What a diagnosis needs from MNN: every named tensor of a model file, a forward with any of
# them as extra outputs, the weights, the build and what MNN prints.

GRAPH_SOURCES = frozenset({"Input", "Const"})  # op types that compute nothing


@dataclass(frozen=True, slots=True)
class TensorNode:
    """One named tensor of a model file: its operator type and the tensors it reads."""

    name: str
    op_type: str
    inputs: tuple[str, ...]


def tensor_graph(path: str | os.PathLike[str]) -> list[TensorNode]:
    """Every named tensor of a model file, in the file's (execution) order."""
    check_not_forked()
    with _stdout_to_stderr():
        variables = F.load_as_list(os.fspath(path))
    note_load()
    return [
        TensorNode(str(v.name), str(v.op_type), tuple(str(i.name) for i in v.inputs))
        for v in variables
    ]


def constant_arrays(path: str | os.PathLike[str]) -> dict[str, NDArray[Any]]:
    """The values of a model file's constant tensors (its weights), by name."""
    check_not_forked()
    with _stdout_to_stderr():
        variables = F.load_as_list(os.fspath(path))
    note_load()
    return {str(v.name): to_numpy(v) for v in variables if v.op_type == "Const"}


def run_tensors(
    path: str | os.PathLike[str],
    inputs: Sequence[str],
    arrays: Sequence[NDArray[Any]],
    names: Sequence[str],
    **load_kwargs: Any,
) -> dict[str, NDArray[Any]]:
    """Load the model with `names` (any named tensors) as its outputs, forward once, copy out."""
    check_not_forked()
    known = {node.name for node in tensor_graph(path)}
    unknown = sorted(set(inputs) - known) + sorted(set(names) - known)
    if unknown:  # an unknown name crashes the dynamic load (DESIGN.md)
        raise ConfigError(f"model {os.fspath(path)!r} has no tensor(s) named {unknown}")
    kwargs = _load_kwargs(load_kwargs)
    module = nn.load_module_from_file(os.fspath(path), list(inputs), list(names), **kwargs)
    note_load()
    if module is None:
        raise FactoryError(f"MNN could not load {os.fspath(path)!r} with outputs {list(names)}")
    result = VarModule(module).run(arrays)
    if len(result) != len(names):
        raise FactoryError(f"MNN returned {len(result)} of the {len(names)} tensors asked for")
    return dict(zip(names, result, strict=True))


_build_info: dict[str, str] = {}


def build_info() -> dict[str, str]:
    """The installed MNN: version, wheel tags, and each native library's size and sha256."""
    import hashlib
    import importlib.metadata

    if _build_info:
        return dict(_build_info)
    info = {"version": mnn_version()}
    try:
        dist = importlib.metadata.distribution("MNN")
    except importlib.metadata.PackageNotFoundError:
        return info
    wheel = dist.read_text("WHEEL") or ""
    info["wheel_tags"] = " ".join(line[5:] for line in wheel.splitlines() if line[:5] == "Tag: ")
    for file in dist.files or ():
        if file.name.endswith((".so", ".pyd", ".dylib")):
            located = file.locate()
            with contextlib.suppress(OSError), open(located, "rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
                info[file.name] = f"{os.path.getsize(located)} bytes, sha256 {digest}"
    _build_info.update(info)  # computed once per process (hashing the libraries takes ~0.1 s)
    return info


@contextlib.contextmanager
def captured_output() -> Iterator[list[str]]:
    """Collect what is printed on fds 1 and 2 during the block (MNN's log); pass it on to stderr.

    Process-wide: for tools that run one thing at a time, never for a serving process.
    """
    import tempfile

    lines: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(1), os.dup(2)
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield lines
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace")
            sys.stderr.write(text)
            lines.extend(line for line in text.splitlines() if line.strip())
