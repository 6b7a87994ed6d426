"""`mnn-guard inspect`: what a model file declares, as text or JSON.

The reading is `guard.mnn.inspect` (MNN itself loads the file); this module renders it.
"""

from __future__ import annotations

import json

from guard.mnn import ModelInfo, SessionInfo
from guard.tools.output import text_table

__all__ = ["format_model_info", "format_session_info", "model_info_json", "session_info_json"]


def _shape(shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return "unknown"
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


def format_model_info(info: ModelInfo) -> str:
    """A title, a table of inputs, the outputs, and what `dynamic=True` does for this model."""
    rows = [(t.name, t.dtype, _shape(t.shape), t.format) for t in info.inputs]
    biz = info.biz_code or "-"
    lines = [
        f"{info.path}: MNN {info.mnn_version or '?'} (recorded in the file), bizCode {biz}",
        text_table(("input", "dtype", "shape (? = open)", "format"), rows),
        f"outputs: {', '.join(info.outputs) or '-'}",
    ]
    if info.control_flow:
        lines.append(
            "control flow: yes. MNN loads this model statically even with dynamic=True "
            "(it prints: turn back to static load), so a dynamic rung is no fallback"
        )
    else:
        lines.append("control flow: no (dynamic=True is honoured)")
    lines += [f"MNN said: {note}" for note in info.notes]
    return "\n".join(lines)


def model_info_json(info: ModelInfo) -> str:
    """The model's description as a JSON document."""
    return json.dumps(info.to_json(), indent=2)


def format_session_info(info: SessionInfo) -> str:
    """The session's input and output tensors as tables (`inspect --api session`)."""
    header = ("dtype", "shape (? = open)", "format")
    inputs = [(t.name, t.dtype, _shape(t.shape), t.format) for t in info.inputs]
    outputs = [(t.name, t.dtype, _shape(t.shape), t.format) for t in info.outputs]
    lines = [
        f"{info.path}: as an MNN.Interpreter session sees it (numThread 1)",
        text_table(("input", *header), inputs),
        text_table(("output", *header), outputs),
    ]
    if any(t.shape is None or -1 in t.shape for t in info.inputs):
        lines.append("open sizes are set per call (resizeTensor + resizeSession), outputs follow")
    lines += [f"MNN said: {note}" for note in info.notes]
    return "\n".join(lines)


def session_info_json(info: SessionInfo) -> str:
    """The session's tensors as a JSON document."""
    return json.dumps(info.to_json(), indent=2)
