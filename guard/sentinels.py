"""Sentinels: intermediate tensors a probe judges on the serving module, never handed out.

A saturated output (a confident softmax, a squashed tanh) hides faults: its values barely move
when a weight does. The tensor before the squashing op (the logits before a softmax) moves
with every weight; judging it too, on the very module that serves, sees those faults. The
sentinels are loaded after the served outputs (the `outputs` override of mnn-guard's
factories), judged by every canary, and left in MNN on the request path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from guard import mnn
from guard.errors import ConfigError
from probes import Probe

__all__ = ["PASS_THROUGH", "SQUASHING", "auto_sentinels", "check_factory", "loading"]

SQUASHING = frozenset({"Softmax", "LogSoftmax", "Sigmoid", "TANH", "TanH", "Tanh", "ArgMax"})
"""Ops whose output saturates: the tensor they read is the sentinel `auto` picks."""
PASS_THROUGH = frozenset(
    {"Reshape", "ConvertTensor", "Cast", "Squeeze", "Unsqueeze", "Transpose", "Flatten"}
)
"""Ops that move or relabel values without changing them: `auto` looks through them."""


def auto_sentinels(path: str | os.PathLike[str], outputs: Sequence[str]) -> list[str]:
    """For each output made by a squashing op (through pass-through ops), the tensor it reads."""
    nodes = {n.name: n for n in mnn.tensor_graph(path)}
    found: list[str] = []
    for output in outputs:
        node = nodes.get(output)
        while node is not None and node.op_type in PASS_THROUGH and node.inputs:
            node = nodes.get(node.inputs[0])
        if node is None or node.op_type not in SQUASHING or not node.inputs:
            continue
        source = node.inputs[0]
        if source in nodes and source not in outputs and source not in found:
            found.append(source)
    return found


def check_factory(factory: Callable[..., Any], probe: Probe) -> None:
    """Refuse a factory that cannot load the probe's sentinels as extra outputs."""
    if probe.sentinel_names and getattr(factory, "outputs", None) is None:
        raise ConfigError(
            f"the probe judges sentinels {probe.sentinel_names}, which the factory must load "
            f"as extra outputs; a {type(factory).__name__} cannot: use guard.mnn_factory or "
            "guard.mnn_session_factory (or record the probe without sentinels)"
        )


def loading(probe: Probe, overrides: Mapping[str, Any]) -> Mapping[str, Any]:
    """A rung's overrides, with the probe's sentinels loaded after its served outputs."""
    if not probe.sentinel_names:
        return overrides
    return {**overrides, "outputs": tuple(probe.output_names)}
