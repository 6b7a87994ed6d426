"""A model's weight tensors, and copies of the model with one of them perturbed (`assess`).

MNN's training extraction (`nn.load_module(inputs, outputs, for_training=True)`) turns every
weight into a parameter, those of models built with MNN.expr (constant tensors) and those of
models converted from ONNX (whose weights sit inside the convolution operators) alike. A
copy with one parameter replaced is saved as a new .mnn file through the same graph, so a
guarded factory loads it as it would load the original.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard.errors import ConfigError
from guard.mnn.model import inspect
from guard.mnn.module_api import to_numpy
from guard.mnn.native import F, captured_output, check_not_forked, nn, note_load

__all__ = ["WeightTensor", "Weights"]

Array = NDArray[Any]


@dataclass(frozen=True, slots=True)
class WeightTensor:
    """One weight tensor: its index among the model's parameters, a name, its shape."""

    index: int
    name: str  # the operator that reads it, and which of its weights ("conv3:weight")
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        """How many values it holds."""
        return int(np.prod(self.shape, dtype=np.int64))


class Weights:
    """The weight tensors of a model file, and perturbed copies of it.

    >>> weights = Weights("vocoder.mnn")  # doctest: +SKIP
    >>> weights.save_perturbed("faulty.mnn", weights.tensors[3], relative=0.01)  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        check_not_forked()
        self.path = os.fspath(path)
        info = inspect(self.path)
        self._inputs, self._outputs = info.input_names, list(info.outputs)
        with captured_output(echo=False):
            variables = F.load_as_dict(self.path)
            missing = [n for n in (*self._inputs, *self._outputs) if n not in variables]
            if missing:
                raise ConfigError(f"model {self.path!r} has no tensors named {missing}")
            self._shapes = {n: list(variables[n].shape) for n in self._inputs}
            self._formats = {n: variables[n].data_format for n in self._inputs}
            self._dtypes = {n: variables[n].dtype for n in self._inputs}
            self._module = nn.load_module(
                [variables[n] for n in self._inputs], [variables[n] for n in self._outputs], True
            )
        note_load()
        self._values = [to_numpy(p) for p in self._module.parameters]
        names = self._names()
        self.tensors = tuple(
            WeightTensor(k, names.get(k, f"parameter{k}"), tuple(v.shape))
            for k, v in enumerate(self._values)
        )

    def _names(self) -> dict[int, str]:
        """Parameter index -> the operator reading it, found by walking the extracted graph."""
        outputs = self._forward()
        found: dict[int, str] = {}
        stack, seen = list(outputs), set()
        while stack:
            var = stack.pop()
            key = (var.name, var.op_type, tuple(var.shape) if var.op_type == "Input" else ())
            if key in seen and var.name:
                continue
            seen.add(key)
            for source in var.inputs:
                if source.op_type in ("Trainable", "Const"):
                    value = to_numpy(source)
                    for k, known in enumerate(self._values):
                        if (
                            k not in found
                            and known.shape == value.shape
                            and np.array_equal(known, value)
                        ):
                            kind = "weight" if value.ndim > 1 else "bias"
                            found[k] = f"{var.name or var.op_type}:{kind}"
                            break
                else:
                    stack.append(source)
        return found

    def _forward(self) -> list[Any]:
        placeholders = []
        for name in self._inputs:
            var = F.placeholder(self._shapes[name], self._formats[name], self._dtypes[name])
            var.name = name
            placeholders.append(var)
        outputs = self._module.forward(placeholders)
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        for var, name in zip(outputs, self._outputs, strict=True):
            var.name = name
        return outputs

    def save(self, path: str | os.PathLike[str], values: Sequence[Array] | None = None) -> None:
        """Write the model with these parameter values (the originals when None) to `path`."""
        chosen = self._values if values is None else list(values)
        if len(chosen) != len(self._values):
            raise ConfigError(f"expected {len(self._values)} parameter arrays, got {len(chosen)}")
        with captured_output(echo=False):
            self._module.load_parameters(
                [F.const(np.ascontiguousarray(v, np.float32), list(v.shape)) for v in chosen]
            )
            try:
                F.save(self._forward(), os.fspath(path))
            finally:
                self._module.load_parameters([F.const(v, list(v.shape)) for v in self._values])

    def save_perturbed(
        self,
        path: str | os.PathLike[str],
        tensor: WeightTensor,
        *,
        relative: float = 0.01,
        scale: float | None = None,
        seed: int = 0,
    ) -> None:
        """Write the model with one tensor perturbed: Gaussian noise of `relative` times the
        tensor's standard deviation (its largest magnitude for a single value), or, with
        `scale`, the tensor multiplied by it."""
        values = list(self._values)
        original = values[tensor.index]
        if scale is not None:
            changed = original * np.float32(scale)
        else:
            spread = (
                float(np.std(original)) if original.size > 1 else float(np.max(np.abs(original)))
            )
            rng = np.random.default_rng(seed)
            noise = rng.standard_normal(original.shape) * (relative * (spread or 1.0))
            changed = original + noise.astype(np.float32)
        values[tensor.index] = changed.astype(np.float32)
        self.save(path, values)
