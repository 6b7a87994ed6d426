"""MNN's Session API (`MNN.Interpreter`, `createSession`): factories and a numpy Runner.

Per call a session takes `copyFrom` into its input tensors, `runSession`, `copyToHostTensor`
out of its output tensors. It owns its tensors and reuses them on every run (inputs and
outputs alike), so every array handed out is copied out of a host tensor into memory numpy
owns. `runSession` releases the GIL (a Module's forward does not); calls are still serialised.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard.errors import ConfigError, FactoryError, ForwardFailed, InputMismatch
from guard.mnn.declared import declared_dtypes
from guard.mnn.model import ModelInfo, TensorInfo, check_names, file_key, inspect, repeated
from guard.mnn.module_api import MNNFactory
from guard.mnn.native import (
    MNN,
    Loader,
    LoadReport,
    captured_output,
    check_not_forked,
    note_load,
)
from guard.mnn.options import (
    canonical,
    loaded_outputs,
    merge,
    refuse_fallback,
    session_config,
    session_kwargs,
    split_api,
)

__all__ = [
    "MNNSessionFactory",
    "SessionFactory",
    "SessionInfo",
    "SessionModule",
    "inspect_session",
    "mnn_session_factory",
    "session_factory",
    "session_pair",
]

_WHAT = "session option"
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


def _host_format(tensor: Any) -> Any:
    """The layout of a host tensor for `tensor`: its own, with NC4HW4 read as NCHW."""
    kind = tensor.getDimensionType()
    return _CAFFE if kind == MNN.Tensor_DimensionType_Caffe_C4 else kind


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
    if unknown or missing or repeated(names):
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
        return self.serve(arrays, len(self._outputs))

    def serve(self, arrays: Sequence[NDArray[Any]], count: int) -> list[NDArray[Any]]:
        """As `run`, copying out only the first `count` outputs (a probe's sentinels stay in
        the session)."""
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
            return [self._copy_out(i, t) for i, t in enumerate(self._outputs[:count])]

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


def _no_control_flow(path: str, info: ModelInfo) -> None:
    """Refuse a model the Session API cannot run (control-flow subgraphs need a Module)."""
    if info.control_flow:
        raise ConfigError(
            f"model {path!r} has control flow (ONNX If/Loop): MNN's Session API cannot run it "
            '("please use MNN::Express::Module"); use guard.mnn_factory'
        )


def _load_failed(what: str, lines: list[str]) -> FactoryError:
    """The error for a session MNN would not create, with what it printed as notes."""
    said = f"; MNN says: {' | '.join(lines)}" if lines else ""
    error = FactoryError(f"MNN could not create a session for {what}{said}")
    for line in lines:
        error.add_note(f"MNN while loading: {line}")
    return error


@dataclass(frozen=True, slots=True)
class MNNSessionFactory(Loader):
    """A picklable Session-API factory: `factory(**overrides)` creates an interpreter and a
    session with the config updated by `overrides`; `api="module"` (or `dynamic=True`, the
    fallback rung) loads the same file through the Module API instead."""

    path: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    config: dict[str, Any] = field(default_factory=dict)

    def load(self, **overrides: Any) -> tuple[Any, LoadReport]:
        """A fresh SessionModule (or module) and what MNN printed while creating it."""
        check_not_forked()
        given, wanted = loaded_outputs(overrides, self.outputs)
        api, rest = split_api(given)
        own = canonical(self.config, _WHAT)
        if api == "module":  # the config's thread count, unless the rung sets its own
            threads = {"threads": own["threads"]} if "threads" in own else {}
            module = MNNFactory(self.path, self.inputs, wanted)
            return module.load(**merge(threads, canonical(rest, "MNN load option")))
        if not os.path.isfile(self.path):
            raise FactoryError(f"model file {self.path!r} does not exist")
        info = check_names(self.path, self.inputs, wanted)
        _no_control_flow(self.path, info)
        config = session_config(merge(own, canonical(rest, _WHAT)))
        inputs = self.inputs or tuple(info.input_names)
        outputs = wanted or info.outputs
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
        if session is None:
            raise _load_failed(f"{self.path!r} with config {config}", lines)
        refuse_fallback(lines, config.get("backend"), self.path)
        return SessionModule(interpreter, session, inputs, outputs), LoadReport.of(lines)


def mnn_session_factory(
    path: str | os.PathLike[str],
    config: Mapping[str, Any] | None = None,
    inputs: Sequence[str] = (),
    outputs: Sequence[str] = (),
) -> MNNSessionFactory:
    """Build a picklable factory for the Session API (`MNN.Interpreter` + `createSession`).

    `config` takes the rung overrides' vocabulary (`threads`, `precision`, `memory`, `power`,
    `backend`) or `createSession`'s own keys (`numThread` really sets the thread count,
    `saveTensors`), checked; modes take names such as "low". A rung's overrides update it.
    `dynamic=True` (or `api="module"`) loads the same file through the Module API (with the
    config's thread count), so the default ladder's dynamic rung is a real fallback. Names
    are checked against the model (empty: the model's own); other tensors may be outputs.

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
class SessionFactory(Loader):
    """Your factory returning `(interpreter, session)`, as a guard factory of SessionModules.

    Your factory gets the overrides' vocabulary in `createSession`'s spelling (`threads` as
    `numThread`, modes as MNN's numbers), and any key of its own as given. With `path`,
    `dynamic=True` (or `api="module"`) loads that file through the Module API: the ladder
    keeps its fallback. Picklable when your factory is (a module-level function).
    """

    make: Callable[..., Any]
    path: str | None = None
    inputs: tuple[str, ...] | None = None
    outputs: tuple[str, ...] | None = None

    def load(self, **overrides: Any) -> tuple[Any, LoadReport]:
        """The adapted result of your factory (or a module) and what MNN printed meanwhile."""
        check_not_forked()
        given, wanted = loaded_outputs(overrides, self.outputs or ())
        api, rest = split_api(given)
        if api == "module":
            if self.path is None:
                raise ConfigError(
                    f"overrides {dict(overrides)} ask for the Module API; give "
                    "guard.session_factory(..., path=MODEL) so it can load the file"
                )
            return MNNFactory(self.path, self.inputs or (), wanted).load(**rest)
        kwargs = session_kwargs(rest)
        with captured_output() as lines:
            made = self.make(**kwargs)
        note_load()
        pair = session_pair(made)
        if pair is None:
            raise FactoryError(
                f"the session factory returned a {type(made).__name__}; expected an "
                "(MNN.Interpreter, MNN.Session) pair or an object with .interpreter and .session"
            )
        refuse_fallback(lines, kwargs.get("backend"), self.path or "your session factory")
        module = SessionModule(*pair, inputs=self.inputs, outputs=wanted or self.outputs)
        return module, LoadReport.of(lines)


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


def _session_tensor(name: str, tensor: Any, known: bool, declared: str | None) -> TensorInfo:
    dtype = _numpy_dtype(tensor.getDataType())
    runs_as = "unknown" if dtype is None else str(dtype)
    return TensorInfo(
        name=name,
        shape=tuple(int(d) for d in tensor.getShape()) if known else None,
        dtype=declared or runs_as,
        runs_as=runs_as,
        format=_FORMATS.get(tensor.getDimensionType(), "unknown"),
    )


def inspect_session(path: str | os.PathLike[str]) -> SessionInfo:
    """The session's tensors for a model file (a one-thread session: no MNN thread starts)."""
    path = os.fspath(path)
    file_key(path)
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
    declared = declared_dtypes(path)
    return SessionInfo(
        path=path,
        inputs=tuple(_session_tensor(n, inputs[n], True, declared.get(n)) for n in order),
        outputs=tuple(_session_tensor(n, outputs[n], known, None) for n in outs),
        notes=tuple(lines),
    )
