"""`mnn-guard inspect`: what a model file declares, as text or JSON.

The reading is `guard.mnn.inspect` (MNN itself loads the file); this module renders it.
"""

from __future__ import annotations

import json

from guard.mnn import ModelInfo, SessionInfo, TensorInfo
from guard.tools.output import text_table

__all__ = ["format_model_info", "format_session_info", "model_info_json", "session_info_json"]


def _shape(shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return "unknown"
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


_HEADER = ("dtype (declared)", "runs as", "shape (? = open)", "format")


def _row(t: TensorInfo) -> tuple[str, str, str, str, str]:
    """A tensor's table row: the dtype the file declares and the one MNN computes with."""
    return (t.name, t.dtype, t.runs_as, _shape(t.shape), t.format)


def format_model_info(info: ModelInfo) -> str:
    """A title, a table of inputs, the outputs, and what `dynamic=True` does for this model."""
    rows = [_row(t) for t in info.inputs]
    biz = info.biz_code or "-"
    lines = [
        f"{info.path}: MNN {info.mnn_version or '?'} (recorded in the file), bizCode {biz}",
        text_table(("input", *_HEADER), rows),
        f"outputs: {', '.join(info.outputs) or '-'}",
    ]
    lines += [
        f"input {t.name!r}: the file declares {t.dtype}; MNN computes with {t.runs_as}"
        for t in info.inputs
        if t.dtype != t.runs_as
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
    lines = [
        f"{info.path}: as an MNN.Interpreter session sees it (numThread 1)",
        text_table(("input", *_HEADER), [_row(t) for t in info.inputs]),
        text_table(("output", *_HEADER), [_row(t) for t in info.outputs]),
    ]
    if any(t.shape is None or -1 in t.shape for t in info.inputs):
        lines.append("open sizes are set per call (resizeTensor + resizeSession), outputs follow")
    lines += [f"MNN said: {note}" for note in info.notes]
    return "\n".join(lines)


def session_info_json(info: SessionInfo) -> str:
    """The session's tensors as a JSON document."""
    return json.dumps(info.to_json(), indent=2)
