"""The only package that knows MNN: loading through either API, the numpy-level Runners, what
MNN prints, fork bookkeeping, and the one vocabulary of rung overrides.

One concept per module: `native` (MNN itself: its import, output, forks, threads), `model`
(what a model file holds), `expressions` (building graphs with MNN.expr on every release),
`declared` (input dtypes as the file declares them), `options` (the overrides' vocabulary),
`module_api` and `session_api` (factories and Runners of each API), `runner` (the seam to
the guard's core: `load`, `adapt`), `graph` (for a diagnosis).

>>> from guard import mnn
>>> mnn.inspect("vocoder.mnn").input_names  # doctest: +SKIP
['mel']
"""

from guard.mnn.expressions import graph_building, placeholders_fold
from guard.mnn.graph import GRAPH_SOURCES, TensorNode, constant_arrays, run_tensors, tensor_graph
from guard.mnn.model import (
    NO_INPUTS_NOTE,
    SUPPORTED_DTYPES,
    DynamicIgnoredWarning,
    ModelInfo,
    TensorInfo,
    check_names,
    inspect,
    mnn_dtype,
)
from guard.mnn.module_api import MNNFactory, VarModule, mnn_factory, to_numpy, to_var
from guard.mnn.native import (
    MAX_THREADS,
    STATIC_LOAD_NOTE,
    F,
    Loader,
    LoadReport,
    build_info,
    captured_output,
    check_not_forked,
    loaded_pid,
    mnn_version,
    note_load,
    notes_of,
    runtime_manager,
)
from guard.mnn.options import (
    APIS,
    SESSION_BACKENDS,
    SESSION_KEYS,
    check_load_options,
    session_config,
    split_api,
)
from guard.mnn.runner import Runner, adapt, load, why_no_outputs
from guard.mnn.session_api import (
    MNNSessionFactory,
    SessionFactory,
    SessionInfo,
    SessionModule,
    inspect_session,
    mnn_session_factory,
    session_factory,
    session_pair,
)

__all__ = [
    "APIS",
    "GRAPH_SOURCES",
    "MAX_THREADS",
    "NO_INPUTS_NOTE",
    "SESSION_BACKENDS",
    "SESSION_KEYS",
    "STATIC_LOAD_NOTE",
    "SUPPORTED_DTYPES",
    "DynamicIgnoredWarning",
    "F",
    "LoadReport",
    "Loader",
    "MNNFactory",
    "MNNSessionFactory",
    "ModelInfo",
    "Runner",
    "SessionFactory",
    "SessionInfo",
    "SessionModule",
    "TensorInfo",
    "TensorNode",
    "VarModule",
    "adapt",
    "build_info",
    "captured_output",
    "check_load_options",
    "check_names",
    "check_not_forked",
    "constant_arrays",
    "graph_building",
    "inspect",
    "inspect_session",
    "load",
    "loaded_pid",
    "mnn_dtype",
    "mnn_factory",
    "mnn_session_factory",
    "mnn_version",
    "note_load",
    "notes_of",
    "placeholders_fold",
    "run_tensors",
    "runtime_manager",
    "session_config",
    "session_factory",
    "session_pair",
    "split_api",
    "tensor_graph",
    "to_numpy",
    "to_var",
    "why_no_outputs",
]
