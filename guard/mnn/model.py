"""What a model file holds: its inputs (as declared and as MNN runs them), outputs and tensors."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from guard.errors import ConfigError, FactoryError
from guard.mnn.declared import declared_dtypes
from guard.mnn.native import STATIC_LOAD_NOTE, F, captured_output, nn, runtime_manager

__all__ = [
    "NO_INPUTS_NOTE",
    "SUPPORTED_DTYPES",
    "DynamicIgnoredWarning",
    "ModelInfo",
    "TensorInfo",
    "check_names",
    "file_key",
    "inspect",
    "mnn_dtype",
    "numpy_dtype",
    "repeated",
    "tensor_names",
    "var_dtype",
]

VAR_DTYPES: dict[np.dtype[Any], Any] = {  # what a Var can be built from, and MNN's dtype for it
    np.dtype(np.float32): F.float,
    np.dtype(np.int32): F.int,
    np.dtype(np.uint8): F.uint8,
    np.dtype(np.int8): F.int8,
}
SUPPORTED_DTYPES = tuple(str(d) for d in VAR_DTYPES)
_WIDER = {np.dtype(np.float64): np.dtype(np.float32), np.dtype(np.int64): np.dtype(np.int32)}
_DTYPE_NAMES = {  # MNN.expr's dtype names, as numpy's
    "float": "float32",
    "double": "float64",
    "int": "int32",
    "int64": "int64",
    "int8": "int8",
    "uint8": "uint8",
}
_FORMAT_NAMES = {"NCHW", "NHWC", "NC4HW4"}
NO_INPUTS_NOTE = (
    "the file declares no inputs: its outputs are constants. MNN.expr on PyMNN 3.0 and 3.1 "
    "evaluates eagerly by default, and a graph saved so holds its outputs' values, not its "
    "placeholders; save it again inside guard.mnn.graph_building() (MNN.expr.lazy_eval(True))"
)
_MAX_CACHED = 64


class DynamicIgnoredWarning(UserWarning):
    """MNN loads this model statically even with dynamic=True: a dynamic rung is no fallback."""


def mnn_dtype(dtype: np.dtype[Any]) -> str:
    """The dtype MNN takes for arrays of `dtype`: itself, or float32 for float64, int32 for int64.

    Raises ConfigError for any other dtype (MNN would misread it).
    """
    found = dtype if dtype in VAR_DTYPES else _WIDER.get(dtype)
    if found is None:
        raise ConfigError(
            f"dtype {dtype} is not supported by MNN's Python API; use one of {SUPPORTED_DTYPES}"
        )
    return str(found)


def var_dtype(dtype: np.dtype[Any]) -> Any:
    """MNN's dtype for a Var holding arrays of `dtype`; ConfigError for one MNN cannot take."""
    found = VAR_DTYPES.get(dtype)
    if found is None:
        raise ConfigError(f"dtype {dtype} cannot be given to MNN; use one of {SUPPORTED_DTYPES}")
    return found


def _enum_name(value: Any) -> str:
    """`dtype.float` -> "float"."""
    return str(value).rsplit(".", 1)[-1]


def numpy_dtype(var: Any) -> np.dtype[Any]:
    """The numpy dtype of an MNN Var's values (float32 for a dtype PyMNN does not name)."""
    return np.dtype(_DTYPE_NAMES.get(_enum_name(var.dtype), "float32"))


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorInfo:
    """One model tensor: the dtype the file declares and the one MNN computes with (int64
    inputs run as int32), and its shape (-1 where a size is left open)."""

    name: str
    shape: tuple[int, ...] | None  # None when the file declares no shape
    dtype: str  # as the file declares it
    runs_as: str  # as MNN computes with it (what to feed it)
    format: str

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        shape = None if self.shape is None else list(self.shape)
        return {
            "name": self.name,
            "shape": shape,
            "dtype": self.dtype,
            "runs_as": self.runs_as,
            "format": self.format,
        }


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


FileKey = tuple[str, int, int, int, int, int]
_infos: dict[FileKey, ModelInfo] = {}
_tensors: dict[FileKey, frozenset[str]] = {}
_info_lock = threading.Lock()


def file_key(path: str) -> FileKey:
    """What identifies a model file's bytes without reading them: its real path, inode, size,
    mtime and ctime. `cp -p`, `rsync -a` and `tar x` restore the mtime of a file they replace,
    but not its inode or ctime. FactoryError if it is not a readable file."""
    try:
        st = os.stat(path)
    except OSError:
        raise FactoryError(f"model file {path!r} does not exist") from None
    if not os.path.isfile(path):
        raise FactoryError(f"model {path!r} is not a file")
    real = os.path.realpath(path)
    return real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _cache_get(cache: dict[FileKey, Any], key: FileKey) -> Any:
    with _info_lock:
        return cache.get(key)


def _cache_put(cache: dict[FileKey, Any], key: FileKey, value: Any) -> None:
    with _info_lock:
        if len(cache) >= _MAX_CACHED:
            cache.clear()
        cache[key] = value


def _tensor_info(name: str, var: Any, declared: str | None) -> TensorInfo:
    shape: tuple[int, ...] | None
    try:
        shape = tuple(int(d) for d in var.shape)
    except Exception:  # MNN raises when a Var has no shape information
        shape = None
    dtype = _enum_name(var.dtype)
    runs_as = _DTYPE_NAMES.get(dtype, dtype)
    fmt = _enum_name(var.data_format)
    return TensorInfo(
        name=name,
        shape=shape,
        dtype=declared or runs_as,
        runs_as=runs_as,
        format=fmt if fmt in _FORMAT_NAMES else "unknown",
    )


def _inspect_load(
    path: str, names: tuple[list[str], list[str]], dynamic: bool
) -> tuple[Any, list[str]]:
    """Load for inspection (one-thread runtime manager: no MNN thread pool, fork-safe)."""
    with captured_output(echo=False) as lines:
        try:
            module = nn.load_module_from_file(
                path, *names, dynamic=dynamic, runtime_manager=runtime_manager(1)
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
    """What the model file declares, read by MNN itself (cached until the file is replaced).

    Loads the model with its own names (statically, then with dynamic=True to see whether MNN
    turns that back to a static load, as it does for models with control flow) on a
    one-thread runtime manager, which starts no MNN threads: a later fork stays safe.

    >>> guard.mnn.inspect("vocoder.mnn").input_names  # doctest: +SKIP
    ['mel']
    """
    path = os.fspath(path)
    key = file_key(path)
    found: ModelInfo | None = _cache_get(_infos, key)
    if found is not None:
        return found
    module, notes = _inspect_load(path, ([], []), dynamic=False)
    raw = module.get_info()
    names = [str(n) for n in raw.get("inputNames", [])]
    outputs = tuple(str(n) for n in raw.get("outputNames", []))
    variables = list(raw.get("inputs", []))
    declared = declared_dtypes(path)
    inputs = tuple(
        _tensor_info(n, variables[i], declared.get(n))
        if i < len(variables)
        else TensorInfo(name=n, shape=None, dtype="unknown", runs_as="unknown", format="unknown")
        for i, n in enumerate(names)
    )
    if not names:
        notes = [*notes, NO_INPUTS_NOTE]
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
    _cache_put(_infos, key, info)
    return info


def tensor_names(path: str) -> frozenset[str]:
    """Every tensor name in the model (any of them can be asked for as an extra output)."""
    key = file_key(path)
    found: frozenset[str] | None = _cache_get(_tensors, key)
    if found is not None:
        return found
    with captured_output(echo=False):  # MNN complains about tensors it cannot size: noise here
        try:
            names = frozenset(str(n) for n in F.load_as_dict(path))
        except Exception:
            names = frozenset()
    _cache_put(_tensors, key, names)
    return names


def repeated(names: Sequence[str]) -> list[str]:
    """The names that occur more than once."""
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
        if repeated(inputs):
            problems.append(f"input(s) {repeated(inputs)} given twice")
    if outputs:
        unknown = [n for n in outputs if n not in info.outputs]
        if unknown:
            tensors = tensor_names(path)
            unknown = [n for n in unknown if n not in tensors]
        if unknown:
            problems.append(f"no output or tensor named {unknown}")
        if repeated(outputs):
            problems.append(f"output(s) {repeated(outputs)} given twice")
    if problems:
        why = "" if info.inputs else f" ({NO_INPUTS_NOTE})"
        raise ConfigError(
            f"model {path!r}: {'; '.join(problems)}. Its inputs are {info.input_names}{why} and "
            f"its outputs {list(info.outputs)} (see `mnn-guard inspect {path}`)"
        )
    return info
