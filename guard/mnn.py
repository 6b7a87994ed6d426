"""The only module that knows MNN: loading, the numpy-level Runner over Vars, fork bookkeeping."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    "STATIC_LOAD_NOTE",
    "DynamicIgnoredWarning",
    "F",
    "LoadReport",
    "MNNFactory",
    "ModelInfo",
    "Runner",
    "TensorInfo",
    "VarModule",
    "adapt",
    "captured_output",
    "check_names",
    "check_not_forked",
    "inspect",
    "load",
    "mnn_dtype",
    "mnn_factory",
    "mnn_version",
    "note_load",
    "notes_of",
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
_WIDER = {np.dtype(np.float64): np.dtype(np.float32), np.dtype(np.int64): np.dtype(np.int32)}


def mnn_dtype(dtype: np.dtype[Any]) -> str:
    """The dtype MNN takes for arrays of `dtype`: itself, or float32 for float64, int32 for int64.

    Raises ConfigError for any other dtype (MNN would misread it).
    """
    found = dtype if dtype in _DTYPES else _WIDER.get(dtype)
    if found is None:
        raise ConfigError(
            f"dtype {dtype} is not supported by MNN's Python API; use one of {SUPPORTED_DTYPES}"
        )
    return str(found)


_state = threading.Lock()
_loaded_pid: int | None = None
_forked_after_load = False
_runtime_managers: dict[int, Any] = {}

STATIC_LOAD_NOTE = "turn back to static load"
"""What MNN prints when it loads a model with control flow statically despite dynamic=True."""
MAX_NOTES = 40  # lines of MNN output kept per load (the rest are counted)
CAPTURE_WAIT = 30.0  # seconds to wait for another thread's capture before loading uncaptured
_FORMAT_NAMES = {"NCHW", "NHWC", "NC4HW4"}
_DTYPE_NAMES = {
    "float": "float32",
    "double": "float64",
    "int": "int32",
    "int64": "int64",
    "int8": "int8",
    "uint8": "uint8",
}


class DynamicIgnoredWarning(UserWarning):
    """MNN loads this model statically even with dynamic=True: a dynamic rung is no fallback."""


# ----------------------------------------------------- what MNN prints on fd 1 and 2

_capture_lock = threading.RLock()
_capturing = threading.local()


try:
    _LIBC: Any = ctypes.CDLL(None)
except OSError:  # no C library to open by name: stdio buffers are left to flush themselves
    _LIBC = None


def _flush_c_stdio() -> None:
    """Flush C stdio buffers (MNN prints with printf, fully buffered when fd 1 is not a tty)."""
    if _LIBC is not None:
        _LIBC.fflush(None)


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte to `fd` (os.write may write part of it)."""
    view = memoryview(data)
    with contextlib.suppress(OSError):
        while view:
            view = view[os.write(fd, view) :]


@contextlib.contextmanager
def captured_output(*, echo: bool = True) -> Iterator[list[str]]:
    """Collect what native code prints on fd 1 and 2 in the block, as lines; then echo it.

    The list yielded is filled when the block ends. fds 1 and 2 are process-wide, so captures
    take turns under one lock; what other threads print meanwhile is collected too and, with
    `echo`, re-emitted on the real stderr afterwards (nothing is lost, some of it is late).
    A nested capture in the same thread yields an empty list (the outer one collects).
    """
    lines: list[str] = []
    if getattr(_capturing, "active", False) or not _capture_lock.acquire(timeout=CAPTURE_WAIT):
        yield lines
        return
    try:
        _capturing.active = True
        with tempfile.TemporaryFile() as sink:
            sys.stdout.flush()
            sys.stderr.flush()
            _flush_c_stdio()
            try:
                saved = (os.dup(1), os.dup(2))
            except OSError:  # no fd 1 or 2 (embedded interpreters): nothing to capture
                yield lines
                return
            try:
                os.dup2(sink.fileno(), 1)
                os.dup2(sink.fileno(), 2)
                yield lines
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                _flush_c_stdio()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
                sink.seek(0)
                data = sink.read()
                if echo:
                    _write_all(2, data)
                lines.extend(_lines(data.decode("utf-8", "replace")))
    finally:
        _capturing.active = False
        _capture_lock.release()


def _lines(text: str) -> list[str]:
    """Non-empty stripped lines, repeats dropped, at most MAX_NOTES (the rest counted)."""
    lines = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if len(lines) > MAX_NOTES:
        lines = [*lines[:MAX_NOTES], f"... and {len(lines) - MAX_NOTES} more line(s)"]
    return lines


def notes_of(exc: BaseException) -> tuple[str, ...]:
    """The notes attached to an exception (`add_note`): what MNN printed, for instance."""
    return tuple(str(n) for n in getattr(exc, "__notes__", ()))


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What MNN printed while loading one module, and whether it ignored dynamic=True."""

    notes: tuple[str, ...] = ()
    turned_static: bool = False


_last_load = threading.local()


def load(factory: Callable[..., Any], overrides: Mapping[str, Any]) -> tuple[Any, LoadReport]:
    """Call `factory(**overrides)`; the module and what MNN said while an MNNFactory loaded it.

    A factory that wraps an `MNNFactory` (a fault injector, say) reports through it; any other
    factory gets an empty report.
    """
    _last_load.report = None
    try:
        module = factory(**overrides)
        report: LoadReport | None = _last_load.report
    finally:
        _last_load.report = None
    return module, report or LoadReport()


# ------------------------------------------------------------ what a model file holds


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorInfo:
    """One model input as the file declares it (-1 where a size is left open)."""

    name: str
    shape: tuple[int, ...] | None  # None when the file declares no shape
    dtype: str
    format: str

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        shape = None if self.shape is None else list(self.shape)
        return {"name": self.name, "shape": shape, "dtype": self.dtype, "format": self.format}


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelInfo:
    """What an .mnn file declares: inputs, outputs, versions, and whether it has control flow."""

    path: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[str, ...]
    mnn_version: str  # recorded in the file by the converter or MNN.expr.save
    biz_code: str
    control_flow: bool  # MNN turns dynamic=True back to a static load for this model
    notes: tuple[str, ...]  # what MNN printed while loading it

    @property
    def input_names(self) -> list[str]:
        """Input names in the model's order."""
        return [t.name for t in self.inputs]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "path": self.path,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": list(self.outputs),
            "mnn_version": self.mnn_version,
            "biz_code": self.biz_code,
            "control_flow": self.control_flow,
            "dynamic_honoured": not self.control_flow,
            "notes": list(self.notes),
        }


_infos: dict[tuple[str, int, int], ModelInfo] = {}
_tensors: dict[tuple[str, int, int], frozenset[str]] = {}
_info_lock = threading.Lock()
_MAX_CACHED = 64


def _file_key(path: str) -> tuple[str, int, int]:
    """(real path, mtime ns, size) of a model file; FactoryError if it is not a readable file."""
    try:
        st = os.stat(path)
    except OSError:
        raise FactoryError(f"model file {path!r} does not exist") from None
    if not os.path.isfile(path):
        raise FactoryError(f"model {path!r} is not a file")
    return os.path.realpath(path), st.st_mtime_ns, st.st_size


def _enum_name(value: Any) -> str:
    """`dtype.float` -> "float"."""
    return str(value).rsplit(".", 1)[-1]


def _tensor_info(name: str, var: Any) -> TensorInfo:
    shape: tuple[int, ...] | None
    try:
        shape = tuple(int(d) for d in var.shape)
    except Exception:  # MNN raises when a Var has no shape information
        shape = None
    dtype = _enum_name(var.dtype)
    fmt = _enum_name(var.data_format)
    return TensorInfo(
        name=name,
        shape=shape,
        dtype=_DTYPE_NAMES.get(dtype, dtype),
        format=fmt if fmt in _FORMAT_NAMES else "unknown",
    )


def _inspect_load(
    path: str, names: tuple[list[str], list[str]], dynamic: bool
) -> tuple[Any, list[str]]:
    """Load for inspection (one-thread runtime manager: no MNN thread pool, fork-safe)."""
    with captured_output(echo=False) as lines:
        try:
            module = nn.load_module_from_file(
                path, *names, dynamic=dynamic, runtime_manager=_runtime_manager(1)
            )
        except SystemError:
            module = None
    if module is None:
        said = f"; MNN says: {' | '.join(lines)}" if lines else ""
        raise FactoryError(
            f"MNN could not load {path!r} (corrupt, truncated or not an .mnn file?){said}"
        )
    return module, lines


def inspect(path: str | os.PathLike[str]) -> ModelInfo:
    """What the model file declares, read by MNN itself (cached per file and mtime).

    Loads the model with its own names (statically, then with dynamic=True to see whether MNN
    turns that back to a static load, as it does for models with control flow) on a
    one-thread runtime manager, which starts no MNN threads: a later fork stays safe.

    >>> guard.mnn.inspect("vocoder.mnn").input_names  # doctest: +SKIP
    ['mel']
    """
    path = os.fspath(path)
    key = _file_key(path)
    with _info_lock:
        found = _infos.get(key)
    if found is not None:
        return found
    module, notes = _inspect_load(path, ([], []), dynamic=False)
    raw = module.get_info()
    names = [str(n) for n in raw.get("inputNames", [])]
    outputs = tuple(str(n) for n in raw.get("outputNames", []))
    variables = list(raw.get("inputs", []))
    inputs = tuple(
        _tensor_info(n, variables[i])
        if i < len(variables)
        else TensorInfo(name=n, shape=None, dtype="unknown", format="unknown")
        for i, n in enumerate(names)
    )
    version, biz = str(raw.get("version", "")), str(raw.get("bizCode", ""))
    del module, raw, variables
    control_flow = False
    if names and outputs:
        _, said = _inspect_load(path, (names, list(outputs)), dynamic=True)
        control_flow = any(STATIC_LOAD_NOTE in line for line in said)
        notes = [*notes, *said]
    info = ModelInfo(
        path=path,
        inputs=inputs,
        outputs=outputs,
        mnn_version=version,
        biz_code=biz,
        control_flow=control_flow,
        notes=tuple(dict.fromkeys(notes)),
    )
    with _info_lock:
        if len(_infos) >= _MAX_CACHED:
            _infos.clear()
        _infos[key] = info
    return info


def _tensor_names(path: str) -> frozenset[str]:
    """Every tensor name in the model (any of them can be asked for as an extra output)."""
    key = _file_key(path)
    with _info_lock:
        found = _tensors.get(key)
    if found is not None:
        return found
    with captured_output(echo=False):  # MNN complains about tensors it cannot size: noise here
        try:
            names = frozenset(str(n) for n in F.load_as_dict(path))
        except Exception:
            names = frozenset()
    with _info_lock:
        if len(_tensors) >= _MAX_CACHED:
            _tensors.clear()
        _tensors[key] = names
    return names


def _repeated(names: Sequence[str]) -> list[str]:
    return sorted({n for n in names if list(names).count(n) > 1})


def check_names(
    path: str | os.PathLike[str], inputs: Sequence[str], outputs: Sequence[str]
) -> ModelInfo:
    """Refuse input or output names the model does not have, before MNN sees them.

    MNN's static loader raises a bare SystemError on an unknown name and its dynamic loader
    crashes the process (SIGSEGV). Inputs must be the model's inputs, each once, in any order;
    outputs the model's outputs or any other tensor of the model, each once. Empty lists mean
    the model's own names.
    """
    path = os.fspath(path)
    info = inspect(path)
    problems = []
    if inputs:
        unknown = [n for n in inputs if n not in info.input_names]
        missing = [n for n in info.input_names if n not in inputs]
        if unknown:
            problems.append(f"no input(s) {unknown}")
        if missing:
            problems.append(f"input(s) {missing} not given")
        if _repeated(inputs):
            problems.append(f"input(s) {_repeated(inputs)} given twice")
    if outputs:
        unknown = [n for n in outputs if n not in info.outputs]
        if unknown:
            tensors = _tensor_names(path)
            unknown = [n for n in unknown if n not in tensors]
        if unknown:
            problems.append(f"no output or tensor named {unknown}")
        if _repeated(outputs):
            problems.append(f"output(s) {_repeated(outputs)} given twice")
    if problems:
        raise ConfigError(
            f"model {path!r}: {'; '.join(problems)}. Its inputs are {info.input_names} and its "
            f"outputs {list(info.outputs)} (see `mnn-guard inspect {path}`)"
        )
    return info


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
        """Load a fresh module; `overrides` update the load keywords (e.g. dynamic=True).

        The names are checked against the model first (MNN crashes on unknown ones); what MNN
        prints while loading is echoed to stderr and kept (`guard.mnn.load` returns it).
        """
        check_not_forked()
        if not os.path.isfile(self.path):
            raise FactoryError(f"model file {self.path!r} does not exist")
        check_names(self.path, self.inputs, self.outputs)
        kwargs = _load_kwargs({**self.load_kwargs, **overrides})
        with captured_output() as lines:
            try:
                module = nn.load_module_from_file(
                    self.path, list(self.inputs), list(self.outputs), **kwargs
                )
            except SystemError:  # MNN's answer to a file or name it cannot load
                module = None
        note_load()
        turned = bool(kwargs.get("dynamic")) and any(STATIC_LOAD_NOTE in x for x in lines)
        _last_load.report = LoadReport(tuple(lines), turned)
        if module is None:
            said = f"; MNN says: {' | '.join(lines)}" if lines else ""
            error = FactoryError(
                f"MNN could not load {self.path!r} with inputs {list(self.inputs)} and outputs "
                f"{list(self.outputs)} (corrupt or not an .mnn file?){said}"
            )
            for line in lines:
                error.add_note(f"MNN while loading: {line}")
            raise error
        return module


def mnn_factory(
    path: str | os.PathLike[str],
    inputs: Sequence[str],
    outputs: Sequence[str],
    **load_kwargs: Any,
) -> MNNFactory:
    """Build a picklable factory for `MNN.nn.load_module_from_file`.

    `threads=n` really sets MNN's thread count (through a runtime manager); other keywords
    (dynamic, shape_mutable, precision_mode, ...) go to `load_module_from_file`. The names are
    checked against the model now (ConfigError naming its real ones) and again at each load.

    >>> factory = mnn_factory("vocoder.mnn", ["mel"], ["wav"], threads=1)
    >>> module = factory(dynamic=True)  # doctest: +SKIP
    """
    if isinstance(inputs, str) or isinstance(outputs, str):
        raise ConfigError("inputs and outputs are lists of names, not a single string")
    _load_kwargs({k: v for k, v in load_kwargs.items() if k != "threads"})  # fail early on typos
    path = os.fspath(path)
    if os.path.isfile(path):  # a file that is not there yet is checked when it is loaded
        check_names(path, inputs, outputs)
    return MNNFactory(path, tuple(inputs), tuple(outputs), dict(load_kwargs))


def to_var(array: NDArray[Any]) -> Any:
    """An MNN Var holding a copy of a C-contiguous array of a supported dtype (NCHW)."""
    dtype = _DTYPES.get(array.dtype)
    if dtype is None:
        raise ConfigError(
            f"dtype {array.dtype} cannot be given to MNN; use one of {SUPPORTED_DTYPES}"
        )
    data = array if array.flags.c_contiguous else np.ascontiguousarray(array)  # keeps 0-d 0-d
    return F.const(data, list(array.shape), F.NCHW, dtype)


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

    def diagnose(self, arrays: Sequence[NDArray[Any]]) -> tuple[str, ...]:
        """Run one forward again and return what MNN prints (why it returned no outputs)."""
        with captured_output() as lines, contextlib.suppress(Exception):
            self.run(arrays)
        return tuple(lines)


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
