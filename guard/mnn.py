"""The only module that knows MNN: loading, the numpy-level Runners (over a Module's Vars or a
Session's tensors), fork bookkeeping."""

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

from guard.errors import ConfigError, FactoryError, ForkAfterLoad, ForwardFailed, InputMismatch


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
    "SESSION_KEYS",
    "STATIC_LOAD_NOTE",
    "DynamicIgnoredWarning",
    "F",
    "LoadReport",
    "MNNFactory",
    "MNNSessionFactory",
    "ModelInfo",
    "Runner",
    "SessionFactory",
    "SessionInfo",
    "SessionModule",
    "TensorInfo",
    "VarModule",
    "adapt",
    "captured_output",
    "check_names",
    "check_not_forked",
    "inspect",
    "inspect_session",
    "load",
    "mnn_dtype",
    "mnn_factory",
    "mnn_session_factory",
    "mnn_version",
    "note_load",
    "notes_of",
    "session_config",
    "session_factory",
    "session_pair",
    "split_api",
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


def adapt(
    module: Any, inputs: Sequence[str] | None = None, outputs: Sequence[str] | None = None
) -> Runner:
    """The numpy-level Runner for what a factory returned (and note that MNN is loaded here).

    An object with `.forward(list_of_vars)` is an MNN-style module; an `(MNN.Interpreter,
    MNN.Session)` pair (or an object with `.interpreter` and `.session`) is a `SessionModule`;
    one that already has `.run(list_of_arrays)` (a fault injector, say) is a Runner as it is.
    `inputs` and `outputs` (the probe's names) bind a session's tensors to the order the
    caller uses; a module loaded by name keeps the order it was loaded with.
    """
    note_load()
    if isinstance(module, SessionModule):  # keeps its names unless the caller gives others
        return module.bind(inputs, outputs)
    if callable(getattr(module, "forward", None)):
        return VarModule(module)
    pair = session_pair(module)
    if pair is not None:
        return SessionModule(*pair, inputs=inputs, outputs=outputs)
    if callable(getattr(module, "run", None)):
        bind = getattr(module, "bind", None)
        if callable(bind) and (inputs is not None or outputs is not None):
            return cast(Runner, bind(inputs, outputs))
        return cast(Runner, module)
    raise FactoryError(
        f"the factory returned a {type(module).__name__} without a forward() method; "
        "expected a module with .forward(list_of_vars) -> list_of_vars, or an "
        "(MNN.Interpreter, MNN.Session) pair"
    )


# ============================================================ the Session API (MNN.Interpreter)
# PyMNN's other inference API: `MNN.Interpreter(path)`, `createSession(config)`, and per call
# `copyFrom` into the session's input tensors, `runSession`, `copyToHostTensor` out of its output
# tensors. A session owns its tensors and reuses them on every run (inputs and outputs alike),
# so every array handed out is copied out of a host tensor into memory numpy owns.
# `runSession` releases the GIL (a Module's forward does not); calls are still serialised.

SESSION_KEYS = frozenset({"backend", "numThread", "precision", "memory", "power", "saveTensors"})
"""The `createSession` config keys the guard passes on (MNN silently ignores any other key)."""
SESSION_BACKENDS = ("CPU", "OPENCL", "OPENGL", "VULKAN", "METAL", "TRT", "CUDA", "HIAI", "AUTO")
_SESSION_MODES: dict[str, dict[str, int]] = {  # MNN::BackendConfig's enums, by name
    "precision": {"normal": 0, "high": 1, "low": 2, "low_bf16": 3},
    "memory": {"normal": 0, "high": 1, "low": 2},
    "power": {"normal": 0, "high": 1, "low": 2},
}
_MODULE_ONLY = (_LOAD_KEYS - {"backend"}) | {"threads"}  # keys that mean the Module API
APIS = ("session", "module")
_SESSION_ERRORS = {  # MNN::ErrorCode, as runSession returns it
    1: "OUT_OF_MEMORY",
    2: "NOT_SUPPORT",
    3: "COMPUTE_SIZE_ERROR",
    4: "NO_EXECUTION",
    5: "INVALID_VALUE",
    10: "INPUT_DATA_ERROR",
    11: "CALL_BACK_STOP",
    20: "TENSOR_NOT_SUPPORT",
    21: "TENSOR_NEED_DIVIDE",
}
_HALIDE: tuple[tuple[Any, np.dtype[Any]], ...] = (  # no int8 or float64 tensors in PyMNN
    (MNN.Halide_Type_Float, np.dtype(np.float32)),
    (MNN.Halide_Type_Int, np.dtype(np.int32)),
    (MNN.Halide_Type_Uint8, np.dtype(np.uint8)),
    (MNN.Halide_Type_Int64, np.dtype(np.int64)),
)
_CAFFE = MNN.Tensor_DimensionType_Caffe
_FORMATS = {
    MNN.Tensor_DimensionType_Caffe: "NCHW",
    MNN.Tensor_DimensionType_Caffe_C4: "NC4HW4",
    MNN.Tensor_DimensionType_Tensorflow: "NHWC",
}


def _numpy_dtype(halide: Any) -> np.dtype[Any] | None:
    """The numpy dtype of an MNN tensor type (None for a type PyMNN cannot hand over)."""
    return next((d for h, d in _HALIDE if h is halide or h == halide), None)


def split_api(overrides: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """("session" or "module", the other overrides): `api=` if given, else "module" when any
    Module-API-only load option (dynamic=True, shape_mutable, ...) is present."""
    rest = dict(overrides)
    api = rest.pop("api", None)
    module_only = sorted(set(rest) & _MODULE_ONLY)
    if api is None:
        api = "module" if module_only else "session"
    if api not in APIS:
        raise ConfigError(f"api={api!r}; expected one of {list(APIS)}")
    if api == "session" and module_only:
        raise ConfigError(
            f"{module_only} are Module API load options; a session takes some of "
            f"{sorted(SESSION_KEYS)} (use api='module' for the Module API)"
        )
    return api, rest


def session_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a `createSession` config; mode names become MNN's numbers.

    MNN takes unknown keys, precision names it does not know and `numThread=0` without a
    word; here each is a ConfigError. Modes take names (`precision="low"`) or MNN's numbers.
    """
    unknown = sorted(set(config) - SESSION_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown session option(s) {unknown}; expected some of {sorted(SESSION_KEYS)} "
            "(MNN would silently ignore them)"
        )
    out = dict(config)
    threads = out.get("numThread")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)):
        raise ConfigError(f"numThread must be a positive int, got {threads!r}")
    if threads is not None and threads < 1:
        raise ConfigError(f"numThread must be a positive int, got {threads!r}")
    backend = out.get("backend")
    if backend is not None:
        if not isinstance(backend, str) or backend.upper() not in SESSION_BACKENDS:
            raise ConfigError(f"backend={backend!r}; expected one of {list(SESSION_BACKENDS)}")
        out["backend"] = backend.upper()
    for key, names in _SESSION_MODES.items():
        value = out.get(key)
        if value is None:
            continue
        if isinstance(value, str) and value.lower() in names:
            out[key] = names[value.lower()]
        elif isinstance(value, bool) or not isinstance(value, int) or value not in names.values():
            raise ConfigError(f"{key}={value!r}; expected one of {sorted(names)} (or its number)")
    saved = out.get("saveTensors")
    if saved is not None:
        if isinstance(saved, str) or not all(isinstance(n, str) for n in saved):
            raise ConfigError(f"saveTensors must be a list of tensor names, got {saved!r}")
        out["saveTensors"] = tuple(saved)
    return out


def session_pair(made: Any) -> tuple[Any, Any] | None:
    """(interpreter, session) from an `(MNN.Interpreter, MNN.Session)` pair or an object with
    `.interpreter` and `.session`; None for anything else."""
    if isinstance(made, (tuple, list)) and len(made) == 2:
        interpreter, session = made
    else:
        interpreter = getattr(made, "interpreter", None)
        session = getattr(made, "session", None)
    if isinstance(interpreter, MNN.Interpreter) and isinstance(session, MNN.Session):
        return interpreter, session
    if isinstance(made, (tuple, list)) and len(made) == 2 and isinstance(made[0], MNN.Session):
        raise FactoryError(
            "the factory returned (session, interpreter); return (interpreter, session)"
        )
    return None


def _bind(kind: str, wanted: Sequence[str] | None, own: Sequence[str]) -> tuple[str, ...]:
    """The names a SessionModule uses: `wanted` (each one of the session's), else its own."""
    if wanted is None:
        return tuple(own)
    names = tuple(wanted)
    unknown = [n for n in names if n not in own]
    missing = [n for n in own if n not in names] if kind == "input" else []
    if unknown or missing or _repeated(names):
        extra = " (an intermediate tensor needs saveTensors in the session config)"
        hint = extra if kind == "output" and unknown else ""
        raise ConfigError(f"the session's {kind}s are {sorted(own)}, not {list(names)}{hint}")
    return names


class SessionModule:
    """An `MNN.Interpreter` and one of its sessions as a Runner: arrays in, owned arrays out.

    Each call resizes the inputs whose shape changed (`resizeTensor`, then one
    `resizeSession`), copies every array in through a host tensor, runs the session and
    copies every output out through a host tensor into an array numpy owns (the session
    reuses its tensors on the next run). A failed `runSession` returns no outputs, as a
    Module's forward does on a shape error. Calls are serialised.
    """

    def __init__(
        self,
        interpreter: Any,
        session: Any,
        inputs: Sequence[str] | None = None,
        outputs: Sequence[str] | None = None,
    ) -> None:
        self.interpreter = interpreter
        self.session = session
        own_inputs = interpreter.getSessionInputAll(session)
        own_outputs = interpreter.getSessionOutputAll(session)
        self.input_names = _bind("input", inputs, list(own_inputs))
        self.output_names = _bind("output", outputs, list(own_outputs))
        self._inputs = [own_inputs[n] for n in self.input_names]
        self._types: list[tuple[Any, np.dtype[Any], Any]] = []
        for name, tensor in zip(self.input_names, self._inputs, strict=True):
            halide = tensor.getDataType()
            dtype = _numpy_dtype(halide)
            if dtype is None:
                raise FactoryError(f"session input {name!r} has a type PyMNN cannot fill")
            self._types.append((halide, dtype, _host_format(tensor)))
        self._stale = False  # a run failed: resize every input again on the next call
        self._outputs = [own_outputs[n] for n in self.output_names]
        self._hosts: dict[tuple[int, tuple[int, ...]], Any] = {}
        self._lock = threading.Lock()
        self.last_error = 0  # what the last runSession returned (0: no error)

    def bind(self, inputs: Sequence[str] | None, outputs: Sequence[str] | None) -> SessionModule:
        """This session with its tensors in the order of `inputs` and `outputs` (the probe's)."""
        same_in = inputs is None or tuple(inputs) == self.input_names
        if same_in and (outputs is None or tuple(outputs) == self.output_names):
            return self
        bound = SessionModule(
            self.interpreter,
            self.session,
            self.input_names if inputs is None else inputs,
            self.output_names if outputs is None else outputs,
        )
        bound._lock = self._lock  # one session: its runs are serialised whoever holds it
        return bound

    def run(self, arrays: Sequence[NDArray[Any]]) -> list[NDArray[Any]]:
        """Resize if a shape changed, copy in, run, copy every output out ([] if MNN failed)."""
        check_not_forked()
        if len(arrays) != len(self._inputs):
            raise ConfigError(
                f"the session takes {len(self._inputs)} inputs {list(self.input_names)}, "
                f"got {len(arrays)} arrays"
            )
        for name, array, (_, dtype, _) in zip(self.input_names, arrays, self._types, strict=True):
            if array.dtype != dtype:
                raise InputMismatch(
                    f"input {name!r}: the session takes {dtype}, got {array.dtype}", input=name
                )
        with self._lock:
            self._resize(arrays)
            for array, tensor, (halide, _, fmt) in zip(
                arrays, self._inputs, self._types, strict=True
            ):
                tensor.copyFrom(MNN.Tensor(array.shape, halide, array, fmt))
            self.last_error = int(self.interpreter.runSession(self.session))
            if self.last_error:  # the next call resizes again (and MNN says again why it fails)
                self._stale = True
                return []
            return [self._copy_out(i, t) for i, t in enumerate(self._outputs)]

    def _resize(self, arrays: Sequence[NDArray[Any]]) -> None:
        """`resizeTensor` every input whose shape differs from its tensor's (as MNN reports
        it: never copy into a tensor of another size), then `resizeSession` once."""
        force, changed, self._stale = self._stale, False, False
        for tensor, array in zip(self._inputs, arrays, strict=True):
            if force or array.shape != tuple(tensor.getShape()):
                self.interpreter.resizeTensor(tensor, array.shape)
                changed = True
        if changed:
            self.interpreter.resizeSession(self.session)
            get = self.interpreter.getSessionOutput
            self._outputs = [get(self.session, n) for n in self.output_names]

    def _copy_out(self, index: int, tensor: Any) -> NDArray[Any]:
        """One output, copied to a host tensor (kept per shape) and from there into numpy."""
        shape = tuple(tensor.getShape())
        host = self._hosts.get((index, shape))
        if host is None:
            halide = tensor.getDataType()
            dtype = _numpy_dtype(halide)
            if dtype is None:
                raise ForwardFailed(
                    f"session output {self.output_names[index]!r} has a type PyMNN cannot read"
                )
            zeros = np.zeros(shape, dtype)
            host = MNN.Tensor(shape, halide, zeros, _host_format(tensor))
            if len(self._hosts) >= 4 * len(self._outputs):
                self._hosts.clear()
            self._hosts[index, shape] = host
        tensor.copyToHostTensor(host)
        return np.array(host.getNumpyData(), copy=True)

    def diagnose(self, arrays: Sequence[NDArray[Any]]) -> tuple[str, ...]:
        """Run once more and return what MNN prints, and the error code runSession returned."""
        with captured_output() as lines, contextlib.suppress(Exception):
            self.run(arrays)
        code = self.last_error
        said = (f"runSession returned {_SESSION_ERRORS.get(code, 'error')} ({code})",)
        return tuple(lines) + (said if code else ())


def _host_format(tensor: Any) -> Any:
    """The layout of a host tensor for `tensor`: its own, with NC4HW4 read as NCHW."""
    kind = tensor.getDimensionType()
    return _CAFFE if kind == MNN.Tensor_DimensionType_Caffe_C4 else kind


def _no_control_flow(path: str, info: ModelInfo) -> None:
    """Refuse a model the Session API cannot run (control-flow subgraphs need a Module)."""
    if info.control_flow:
        raise ConfigError(
            f"model {path!r} has control flow (ONNX If/Loop): MNN's Session API cannot run it "
            '("please use MNN::Express::Module"); use guard.mnn_factory'
        )


@dataclass(frozen=True, slots=True)
class MNNSessionFactory:
    """A picklable Session-API factory: `factory(**overrides)` creates an interpreter and a
    session with the config updated by `overrides`; `api="module"` (or any Module-API-only
    option, such as `dynamic=True`) loads the same file through the Module API instead."""

    path: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    config: dict[str, Any] = field(default_factory=dict)

    def __call__(self, **overrides: Any) -> Any:
        """A fresh SessionModule (or, for the Module API, a fresh module)."""
        check_not_forked()
        api, rest = split_api(overrides)
        if api == "module":
            threads = self.config.get("numThread")
            kwargs = {"threads": threads} if threads and "runtime_manager" not in rest else {}
            return MNNFactory(self.path, self.inputs, self.outputs)(**{**kwargs, **rest})
        if not os.path.isfile(self.path):
            raise FactoryError(f"model file {self.path!r} does not exist")
        info = check_names(self.path, self.inputs, self.outputs)
        _no_control_flow(self.path, info)
        config = session_config({**self.config, **rest})
        inputs = self.inputs or tuple(info.input_names)
        outputs = self.outputs or info.outputs
        extra = [n for n in outputs if n not in info.outputs]  # intermediate tensors
        if extra:
            config["saveTensors"] = tuple(dict.fromkeys([*config.get("saveTensors", ()), *extra]))
        interpreter = session = None
        with captured_output() as lines:
            try:
                interpreter = MNN.Interpreter(self.path)
                session = interpreter.createSession(config)
            except Exception:  # MNN raises a bare Exception and prints the reason
                session = None
        note_load()
        _last_load.report = LoadReport(tuple(lines))
        if session is None:
            said = f"; MNN says: {' | '.join(lines)}" if lines else ""
            error = FactoryError(
                f"MNN could not create a session for {self.path!r} with config {config}{said}"
            )
            for line in lines:
                error.add_note(f"MNN while loading: {line}")
            raise error
        return SessionModule(interpreter, session, inputs, outputs)


def mnn_session_factory(
    path: str | os.PathLike[str],
    config: Mapping[str, Any] | None = None,
    inputs: Sequence[str] = (),
    outputs: Sequence[str] = (),
) -> MNNSessionFactory:
    """Build a picklable factory for the Session API (`MNN.Interpreter` + `createSession`).

    `config` is `createSession`'s dict, checked (`numThread` really sets the thread count;
    precision, memory and power take names such as "low"); a rung's overrides update it.
    `api="module"` or `dynamic=True` loads the same file through the Module API (with the
    config's numThread), so the default ladder's dynamic rung is a real fallback. Names are
    checked against the model (empty: the model's own); other tensors may be outputs.

    >>> factory = mnn_session_factory("vocoder.mnn", {"numThread": 1}, ["mel"], ["wav"])
    >>> session = guard.wrap(factory, probe, name="vocoder")  # doctest: +SKIP
    """
    if isinstance(inputs, str) or isinstance(outputs, str):
        raise ConfigError("inputs and outputs are lists of names, not a single string")
    config = dict(config or {})
    session_config(config)  # fail early on typos
    path = os.fspath(path)
    names = (tuple(inputs), tuple(outputs))
    if os.path.isfile(path):  # a file that is not there yet is checked when it is loaded
        info = check_names(path, inputs, outputs)
        _no_control_flow(path, info)
        names = (names[0] or tuple(info.input_names), names[1] or info.outputs)
    return MNNSessionFactory(path, *names, config)


@dataclass(frozen=True, slots=True)
class SessionFactory:
    """Your factory returning `(interpreter, session)`, as a guard factory of SessionModules.

    Overrides other than the Module API's go to your factory. With `path`, `api="module"`
    (or `dynamic=True`) loads that file through the Module API: the ladder keeps its fallback.
    Picklable when your factory is (a module-level function).
    """

    make: Callable[..., Any]
    path: str | None = None
    inputs: tuple[str, ...] | None = None
    outputs: tuple[str, ...] | None = None

    def __call__(self, **overrides: Any) -> Any:
        """Call your factory (or load the file with the Module API) and adapt the result."""
        check_not_forked()
        api, rest = split_api(overrides)
        if api == "module":
            if self.path is None:
                raise ConfigError(
                    f"overrides {dict(overrides)} ask for the Module API; give "
                    "guard.session_factory(..., path=MODEL) so it can load the file"
                )
            return MNNFactory(self.path, self.inputs or (), self.outputs or ())(**rest)
        made = self.make(**rest)
        note_load()
        pair = session_pair(made)
        if pair is None:
            raise FactoryError(
                f"the session factory returned a {type(made).__name__}; expected an "
                "(MNN.Interpreter, MNN.Session) pair or an object with .interpreter and .session"
            )
        return SessionModule(*pair, inputs=self.inputs, outputs=self.outputs)


def session_factory(
    make: Callable[..., Any],
    *,
    path: str | os.PathLike[str] | None = None,
    inputs: Sequence[str] | None = None,
    outputs: Sequence[str] | None = None,
) -> SessionFactory:
    """Guard your own Session-API factory: `make(**overrides) -> (interpreter, session)`.

    With `path` (the .mnn file `make` opens) the probe is checked against the file, names
    against the model (default: the model's own, in its order) and the ladder's Module API
    rungs (`guard.SESSION_LADDER`'s last) load that file. Without names a session's tensors
    are bound by the probe's names.

    >>> factory = guard.session_factory(make_session, path="vocoder.mnn")  # doctest: +SKIP
    """
    if not callable(make):
        raise ConfigError(f"make must be callable, got {type(make).__name__}")
    if isinstance(inputs, str) or isinstance(outputs, str):
        raise ConfigError("inputs and outputs are lists of names, not a single string")
    ins = None if inputs is None else tuple(inputs)
    outs = None if outputs is None else tuple(outputs)
    if path is None:
        return SessionFactory(make, None, ins, outs)
    path = os.fspath(path)
    info = check_names(path, ins or (), outs or ())
    _no_control_flow(path, info)
    return SessionFactory(make, path, ins or tuple(info.input_names), outs or info.outputs)


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionInfo:
    """A model as MNN's Session API sees it: the session's input and output tensors."""

    path: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]  # shapes None while an input has an open size
    notes: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "path": self.path,
            "api": "session",
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "notes": list(self.notes),
        }


def _session_tensor(name: str, tensor: Any, known: bool) -> TensorInfo:
    dtype = _numpy_dtype(tensor.getDataType())
    return TensorInfo(
        name=name,
        shape=tuple(int(d) for d in tensor.getShape()) if known else None,
        dtype="unknown" if dtype is None else str(dtype),
        format=_FORMATS.get(tensor.getDimensionType(), "unknown"),
    )


def inspect_session(path: str | os.PathLike[str]) -> SessionInfo:
    """The session's tensors for a model file (a one-thread session: no MNN thread starts)."""
    path = os.fspath(path)
    _file_key(path)
    info = inspect(path)
    _no_control_flow(path, info)
    with captured_output(echo=False) as lines:
        try:
            interpreter = MNN.Interpreter(path)
            session = interpreter.createSession({"numThread": 1})
        except Exception:
            session = None
    if session is None:
        raise FactoryError(f"MNN could not create a session for {path!r}: {' | '.join(lines)}")
    note_load()
    inputs = interpreter.getSessionInputAll(session)
    outputs = interpreter.getSessionOutputAll(session)
    known = all(d >= 0 for t in inputs.values() for d in t.getShape())
    order = [n for n in info.input_names if n in inputs] + sorted(
        set(inputs) - set(info.input_names)
    )
    outs = [n for n in info.outputs if n in outputs] + sorted(set(outputs) - set(info.outputs))
    return SessionInfo(
        path=path,
        inputs=tuple(_session_tensor(n, inputs[n], True) for n in order),
        outputs=tuple(_session_tensor(n, outputs[n], known) for n in outs),
        notes=tuple(lines),
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
