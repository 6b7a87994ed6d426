"""A model file's tensor graph for a diagnosis: every named tensor, the weights, and a forward
with any of them as extra outputs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from numpy.typing import NDArray

from guard.errors import ConfigError, FactoryError
from guard.mnn.module_api import VarModule, to_numpy
from guard.mnn.native import F, check_not_forked, nn, note_load, stdout_to_stderr
from guard.mnn.options import check_load_options

__all__ = ["GRAPH_SOURCES", "TensorNode", "constant_arrays", "run_tensors", "tensor_graph"]

GRAPH_SOURCES = frozenset({"Input", "Const"})  # op types that compute nothing


@dataclass(frozen=True, slots=True)
class TensorNode:
    """One named tensor of a model file: its operator type and the tensors it reads."""

    name: str
    op_type: str
    inputs: tuple[str, ...]


def _variables(path: str | os.PathLike[str]) -> list[Any]:
    """Every named tensor of a model file as an MNN Var, in the file's (execution) order."""
    check_not_forked()
    with stdout_to_stderr():
        variables = F.load_as_list(os.fspath(path))
    note_load()
    return list(variables)


def tensor_graph(path: str | os.PathLike[str]) -> list[TensorNode]:
    """Every named tensor of a model file, in the file's (execution) order."""
    return [
        TensorNode(str(v.name), str(v.op_type), tuple(str(i.name) for i in v.inputs))
        for v in _variables(path)
    ]


def constant_arrays(path: str | os.PathLike[str]) -> dict[str, NDArray[Any]]:
    """The values of a model file's constant tensors (its weights), by name (an empty one as
    an empty array of its shape)."""
    return {str(v.name): to_numpy(v) for v in _variables(path) if v.op_type == "Const"}


def run_tensors(
    path: str | os.PathLike[str],
    inputs: Sequence[str],
    arrays: Sequence[NDArray[Any]],
    names: Sequence[str],
    **load_kwargs: Any,
) -> dict[str, NDArray[Any]]:
    """Load the model with `names` (any named tensors) as its outputs, forward once, copy out
    (a tensor with a zero dimension as an empty array of its shape)."""
    check_not_forked()
    known = {node.name for node in tensor_graph(path)}
    unknown = sorted(set(inputs) - known) + sorted(set(names) - known)
    if unknown:  # an unknown name crashes the dynamic load (docs/architecture.md)
        raise ConfigError(f"model {os.fspath(path)!r} has no tensor(s) named {unknown}")
    kwargs = check_load_options(load_kwargs)
    module = nn.load_module_from_file(os.fspath(path), list(inputs), list(names), **kwargs)
    note_load()
    if module is None:
        raise FactoryError(f"MNN could not load {os.fspath(path)!r} with outputs {list(names)}")
    result = VarModule(module).run(arrays)
    if len(result) != len(names):
        raise FactoryError(f"MNN returned {len(result)} of the {len(names)} tensors asked for")
    return dict(zip(names, result, strict=True))
