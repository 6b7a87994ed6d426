"""MNN's Module API (`nn.load_module_from_file`, Vars): a picklable factory and a numpy Runner."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard.errors import ConfigError, FactoryError
from guard.mnn.model import check_names, numpy_dtype, var_dtype
from guard.mnn.native import (
    F,
    Loader,
    LoadReport,
    captured_output,
    check_not_forked,
    nn,
    note_load,
)
from guard.mnn.options import (
    canonical,
    check_module,
    loaded_outputs,
    merge,
    module_kwargs,
    refuse_fallback,
)

__all__ = ["MNNFactory", "VarModule", "mnn_factory", "to_numpy", "to_var"]

_WHAT = "MNN load option"


@dataclass(frozen=True, slots=True)
class MNNFactory(Loader):
    """A picklable factory: `factory(**overrides)` loads the model with updated load options
    (e.g. dynamic=True)."""

    path: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    load_kwargs: dict[str, Any] = field(default_factory=dict)

    def load(self, **overrides: Any) -> tuple[Any, LoadReport]:
        """A fresh module and what MNN printed while loading it (echoed to stderr too).

        The names are checked against the model first (MNN crashes on unknown ones); a
        backend MNN does not have (it would quietly run on the CPU) is a ConfigError.
        """
        check_not_forked()
        rest, outputs = loaded_outputs(overrides, self.outputs)
        if not os.path.isfile(self.path):
            raise FactoryError(f"model file {self.path!r} does not exist")
        check_names(self.path, self.inputs, outputs)
        options = merge(canonical(self.load_kwargs, _WHAT), canonical(rest, _WHAT))
        kwargs = module_kwargs(options)
        with captured_output() as lines:
            try:
                module = nn.load_module_from_file(
                    self.path, list(self.inputs), list(outputs), **kwargs
                )
            except SystemError:  # MNN's answer to a file or name it cannot load
                module = None
        note_load()
        if module is None:
            said = f"; MNN says: {' | '.join(lines)}" if lines else ""
            error = FactoryError(
                f"MNN could not load {self.path!r} with inputs {list(self.inputs)} and outputs "
                f"{list(outputs)} (corrupt or not an .mnn file?){said}"
            )
            for line in lines:
                error.add_note(f"MNN while loading: {line}")
            raise error
        refuse_fallback(lines, options.get("backend"), self.path)
        return module, LoadReport.of(lines, dynamic=bool(options.get("dynamic")))


def mnn_factory(
    path: str | os.PathLike[str],
    inputs: Sequence[str],
    outputs: Sequence[str],
    **load_kwargs: Any,
) -> MNNFactory:
    """Build a picklable factory for `MNN.nn.load_module_from_file`.

    The options are the rung overrides' vocabulary (`guard.mnn.options`): `threads=n` really
    sets MNN's thread count (through a runtime manager); `dynamic`, `precision`, `memory`,
    `power`, `backend`, `shape_mutable`, `rearrange` (and MNN's own spellings, such as
    `precision_mode`) go to `load_module_from_file`. The names are checked against the model
    now (ConfigError naming its real ones) and again at each load.

    >>> factory = mnn_factory("vocoder.mnn", ["mel"], ["wav"], threads=1)
    >>> module = factory(dynamic=True)  # doctest: +SKIP
    """
    if isinstance(inputs, str) or isinstance(outputs, str):
        raise ConfigError("inputs and outputs are lists of names, not a single string")
    check_module(canonical(load_kwargs, _WHAT))  # fail early on typos
    path = os.fspath(path)
    if os.path.isfile(path):  # a file that is not there yet is checked when it is loaded
        check_names(path, inputs, outputs)
    return MNNFactory(path, tuple(inputs), tuple(outputs), dict(load_kwargs))


def to_var(array: NDArray[Any]) -> Any:
    """An MNN Var holding a copy of a C-contiguous array of a supported dtype (NCHW)."""
    dtype = var_dtype(array.dtype)
    data = array if array.flags.c_contiguous else np.ascontiguousarray(array)  # keeps 0-d 0-d
    return F.const(data, list(array.shape), F.NCHW, dtype)


def _shape(var: Any) -> tuple[int, ...] | None:
    """A Var's shape; None when MNN cannot say."""
    try:
        return tuple(int(d) for d in var.shape)
    except Exception:  # MNN raises when a Var has no shape information
        return None


def to_numpy(var: Any) -> NDArray[Any]:
    """An owned numpy copy of a Var (Var.read() is a view MNN overwrites on the next forward).

    A tensor with a zero dimension comes out as an empty array of its shape (MNN's read()
    raises SystemError on it).
    """
    if var.data_format == F.NC4HW4:
        var = F.convert(var, F.NCHW)
    shape = _shape(var)
    if shape is not None and 0 in shape:
        return np.zeros(shape, numpy_dtype(var))
    return np.array(var.read(), copy=True)


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

    def serve(self, arrays: Sequence[NDArray[Any]], count: int) -> list[NDArray[Any]]:
        """Forward and copy out only the first `count` outputs (a probe's sentinels, loaded
        after the served outputs, are left in MNN); all of them when fewer came back."""
        check_not_forked()
        result = self.module.forward([to_var(a) for a in arrays])
        if result is None:
            return []
        if not isinstance(result, (list, tuple)):
            result = [result]
        return [to_numpy(v) for v in (result[:count] if len(result) > count else result)]

    def diagnose(self, arrays: Sequence[NDArray[Any]]) -> tuple[str, ...]:
        """Run one forward again and return what MNN prints (why it returned no outputs)."""
        with captured_output() as lines, contextlib.suppress(Exception):
            self.run(arrays)
        return tuple(lines)
