"""Small real ONNX graphs, converted to .mnn with MNN's converter module, for the tests.

Each builder returns an `onnx.ModelProto`; `convert` writes the .mnn file. The converter is
called as a module (`_tools.mnnconvert`), never as the `mnnconvert` console script, which runs
`pip install` and sends usage telemetry. It returns True even when it fails, so `convert`
checks that the file was written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

BIZ_CODE = "mnn-guard-tests"
OPSET = [helper.make_opsetid("", 13)]


def _value(name: str, dtype: int, shape: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _const(name: str, value: NDArray[Any]) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


def control_flow(two: float = 2.0) -> onnx.ModelProto:
    """`y = x * 2 if flag > 0 else x + 2`: an ONNX `If` subgraph and an int64 scalar input
    (`two`: another constant inside both branches)."""
    x = _value("x", TensorProto.FLOAT, [1, 16])
    flag = _value("flag", TensorProto.INT64, [])
    two = _const("two", np.array(two, np.float32))
    then = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["t_out"])],
        "then",
        [],
        [_value("t_out", TensorProto.FLOAT, [1, 16])],
    )
    other = helper.make_graph(
        [helper.make_node("Add", ["x", "two"], ["e_out"])],
        "else",
        [],
        [_value("e_out", TensorProto.FLOAT, [1, 16])],
    )
    nodes = [
        helper.make_node("Greater", ["flag", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
    ]
    initializers = [two, _const("zero", np.array(0, np.int64))]
    graph = helper.make_graph(
        nodes, "control_flow", [x, flag], [_value("y", TensorProto.FLOAT, [1, 16])], initializers
    )
    return helper.make_model(graph, opset_imports=OPSET)


def roles() -> onnx.ModelProto:
    """Inputs with different roles: a signal `x` [1, 4, T], a control vector `scales` [3],
    a recurrent `state` [1, 8] and a float scalar `gain`.

    `y = x * scales[1] * gain + scales[0]`, `new_state = tanh(state * scales[2])`.
    """
    inputs = [
        _value("x", TensorProto.FLOAT, [1, 4, "T"]),
        _value("scales", TensorProto.FLOAT, [3]),
        _value("state", TensorProto.FLOAT, [1, 8]),
        _value("gain", TensorProto.FLOAT, []),
    ]
    nodes = [
        *(helper.make_node("Gather", ["scales", f"i{k}"], [f"s{k}"], axis=0) for k in range(3)),
        helper.make_node("Mul", ["x", "s1"], ["xs"]),
        helper.make_node("Mul", ["xs", "gain"], ["xg"]),
        helper.make_node("Add", ["xg", "s0"], ["y"]),
        helper.make_node("Mul", ["state", "s2"], ["st"]),
        helper.make_node("Tanh", ["st"], ["new_state"]),
    ]
    outputs = [
        _value("y", TensorProto.FLOAT, [1, 4, "T"]),
        _value("new_state", TensorProto.FLOAT, [1, 8]),
    ]
    initializers = [_const(f"i{k}", np.array([k], np.int64)) for k in range(3)]
    graph = helper.make_graph(nodes, "roles", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=OPSET)


def mixed() -> onnx.ModelProto:
    """Several inputs and outputs, an open length and an int input: a signal `x` [1, 4, T],
    channel indices `index` (int64 [2], int32 once converted) and a `bias` [1].

    `picked = x[:, index, :] + bias` [1, 2, T], `energy = mean(x * x, axis 2)` [1, 4, 1].
    """
    inputs = [
        _value("x", TensorProto.FLOAT, [1, 4, "T"]),
        _value("index", TensorProto.INT64, [2]),
        _value("bias", TensorProto.FLOAT, [1]),
    ]
    nodes = [
        helper.make_node("Gather", ["x", "index"], ["gathered"], axis=1),
        helper.make_node("Add", ["gathered", "bias"], ["picked"]),
        helper.make_node("Mul", ["x", "x"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["energy"], axes=[2], keepdims=1),
    ]
    outputs = [
        _value("picked", TensorProto.FLOAT, [1, 2, "T"]),
        _value("energy", TensorProto.FLOAT, [1, 4, 1]),
    ]
    graph = helper.make_graph(nodes, "mixed", inputs, outputs)
    return helper.make_model(graph, opset_imports=OPSET)


def strided(stride: int = 32) -> onnx.ModelProto:
    """`mask = image + upsample(maxpool(image))` over `stride` x `stride` cells: H and W must be
    multiples of `stride`, or MNN's broadcast fails and the module returns no outputs."""
    image = _value("image", TensorProto.FLOAT, [1, 1, "H", "W"])
    mask = _value("mask", TensorProto.FLOAT, [1, 1, "H", "W"])
    nodes = [
        helper.make_node(
            "MaxPool", ["image"], ["pooled"], kernel_shape=[stride, stride], strides=[stride] * 2
        ),
        helper.make_node("Resize", ["pooled", "roi", "scales"], ["up"], mode="nearest"),
        helper.make_node("Add", ["image", "up"], ["mask"]),
    ]
    initializers = [
        _const("roi", np.array([], np.float32)),
        _const("scales", np.array([1, 1, stride, stride], np.float32)),
    ]
    graph = helper.make_graph(nodes, f"stride{stride}", [image], [mask], initializers)
    return helper.make_model(graph, opset_imports=OPSET)


def classifier(confidence: float = 6.0, seed: int = 0) -> onnx.ModelProto:
    """A small image classifier: `image` [1, 3, 16, 16] -> three 3x3 convolutions (ReLU), global
    average pooling, a linear layer to `logits` [1, 2], and `prob` = softmax(logits).
    `confidence` scales the linear layer: at 6 the canary's softmax is saturated (one class
    above 0.99), so its output barely moves when a weight does."""
    rng = np.random.default_rng(seed)
    image = _value("image", TensorProto.FLOAT, [1, 3, 16, 16])
    nodes, initializers, last, channels = [], [], "image", 3
    for k, out in enumerate((8, 8, 8)):
        w = rng.standard_normal((out, channels, 3, 3)) / np.sqrt(channels * 9)
        initializers += [
            _const(f"w{k}", w.astype(np.float32)),
            _const(f"b{k}", 0.1 * rng.standard_normal(out).astype(np.float32)),
        ]
        nodes += [
            helper.make_node("Conv", [last, f"w{k}", f"b{k}"], [f"conv{k}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"conv{k}"], [f"act{k}"]),
        ]
        last, channels = f"act{k}", out
    fc = rng.standard_normal((channels, 2)) * confidence
    initializers += [
        _const("fc", fc.astype(np.float32)),
        _const("fc_b", np.array([1.0, -1.0], np.float32)),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [last], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "fc"], ["mm"]),
        helper.make_node("Add", ["mm", "fc_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "classifier", [image], [_value("prob", TensorProto.FLOAT, [1, 2])], initializers
    )
    return helper.make_model(graph, opset_imports=OPSET)


def empty_tensors() -> onnx.ModelProto:
    """`y = tanh(concat(x, x[:, 2:2], nothing))` for `x` [1, 4]: a computed tensor `empty` and
    a constant `nothing`, both [1, 0] (MNN's Var.read() raises SystemError on such tensors)."""
    x = _value("x", TensorProto.FLOAT, [1, 4])
    nodes = [
        helper.make_node("Slice", ["x", "start", "end", "axis"], ["empty"]),
        helper.make_node("Concat", ["x", "empty", "nothing"], ["joined"], axis=1),
        helper.make_node("Tanh", ["joined"], ["y"]),
    ]
    initializers = [
        _const("start", np.array([2], np.int64)),
        _const("end", np.array([2], np.int64)),
        _const("axis", np.array([1], np.int64)),
        _const("nothing", np.zeros((1, 0), np.float32)),
    ]
    graph = helper.make_graph(
        nodes, "empty_tensors", [x], [_value("y", TensorProto.FLOAT, [1, 4])], initializers
    )
    return helper.make_model(graph, opset_imports=OPSET)


def tanh_of(name: str) -> onnx.ModelProto:
    """`y = tanh(NAME)` for an input [1, 16] called `name`: models that differ only by the
    input's name (files of one size when the names are of one length)."""
    graph = helper.make_graph(
        [helper.make_node("Tanh", [name], ["y"])],
        "tanh",
        [_value(name, TensorProto.FLOAT, [1, 16])],
        [_value("y", TensorProto.FLOAT, [1, 16])],
    )
    return helper.make_model(graph, opset_imports=OPSET)


def chain(middle: str, gain: float = 2.0) -> onnx.ModelProto:
    """`y = sigmoid(tanh(x * gain))`, x [1, 16], with `tanh`'s tensor called `middle`: models that
    name a tensor differently (as files saved by two MNN releases may)."""
    nodes = [
        helper.make_node("Mul", ["x", "gain"], ["scaled"]),
        helper.make_node("Tanh", ["scaled"], [middle]),
        helper.make_node("Sigmoid", [middle], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [_value("x", TensorProto.FLOAT, [1, 16])],
        [_value("y", TensorProto.FLOAT, [1, 16])],
        [_const("gain", np.array(gain, np.float32))],
    )
    return helper.make_model(graph, opset_imports=OPSET)


def declare_int64(source: Path, path: Path) -> Path:
    """Write `source` to `path` with each int32 input declared int64 (DT_INT64), as MNN's
    converter writes a JSON dump of it back (ONNX conversion declares int64 inputs int32)."""
    import json

    import _tools

    dump = path.with_suffix(".json")
    _tools.mnnconvert(
        ["mnnconvert", "-f", "MNN", "--modelFile", str(source), "--JsonFile", str(dump)]
    )
    net = json.loads(dump.read_text())
    for op in net["oplists"]:
        if op.get("main_type") == "Input" and op["main"].get("dtype") == "DT_INT32":
            op["main"]["dtype"] = "DT_INT64"
    dump.write_text(json.dumps(net))
    args = ["mnnconvert", "-f", "JSON", "--modelFile", str(dump), "--MNNModel", str(path)]
    _tools.mnnconvert([*args, "--bizCode", BIZ_CODE])
    if not path.is_file() or path.stat().st_size == 0:
        raise RuntimeError(f"MNN's converter wrote no {path} from {dump}")
    return path


def conv(seed: int = 0, channels: int = 3) -> onnx.ModelProto:
    """`y = relu(conv3x3(x))` on `x` [1, 2, 8, 8] with weights drawn from `seed`: once
    converted, the weights sit inside MNN's Convolution operator, not in a constant tensor."""
    weights = np.random.default_rng(seed).standard_normal((channels, 2, 3, 3))
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    initializers = [
        _const("w", weights.astype(np.float32)),
        _const("b", np.zeros(channels, np.float32)),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [_value("x", TensorProto.FLOAT, [1, 2, 8, 8])],
        [_value("y", TensorProto.FLOAT, [1, channels, 8, 8])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=OPSET)


def wide(width: int = 2048, layers: int = 4, seed: int = 0) -> onnx.ModelProto:
    """`y = relu(... relu(x @ w1) ... @ wN)` on `x` [1, width]: `layers` float32 weight matrices
    of width x width (64 MiB at the defaults), a model large beside the demo vocoder (0.4 MB),
    for measuring what a worker's memory grows with."""
    rng = np.random.default_rng(seed)
    nodes, initializers, previous = [], [], "x"
    for k in range(layers):
        weights = rng.standard_normal((width, width)) / np.sqrt(width)
        initializers.append(_const(f"w{k}", weights.astype(np.float32)))
        nodes += [
            helper.make_node("MatMul", [previous, f"w{k}"], [f"m{k}"]),
            helper.make_node("Relu", [f"m{k}"], [out := "y" if k == layers - 1 else f"h{k}"]),
        ]
        previous = out
    graph = helper.make_graph(
        nodes,
        "wide",
        [_value("x", TensorProto.FLOAT, [1, width])],
        [_value("y", TensorProto.FLOAT, [1, width])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=OPSET)


def convert(model: onnx.ModelProto, path: Path) -> Path:
    """Check the graph, save it next to `path` as .onnx, convert it to the .mnn at `path`."""
    import _tools

    onnx.checker.check_model(model, full_check=True)
    source = path.with_suffix(".onnx")
    onnx.save(model, source)
    args = ["mnnconvert", "-f", "ONNX", "--modelFile", str(source), "--MNNModel", str(path)]
    _tools.mnnconvert([*args, "--bizCode", BIZ_CODE])
    if not path.is_file() or path.stat().st_size == 0:
        raise RuntimeError(f"MNN's converter wrote no {path} from {source}")
    return path


BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {
    "control_flow": control_flow,
    "roles": roles,
    "mixed": mixed,
    "stride32": strided,
    "stride64": lambda: strided(64),
    "empty_tensors": empty_tensors,
    "classifier": classifier,
}


def build_all(folder: Path) -> dict[str, Path]:
    """Every test model, converted into `folder`, by name."""
    return {name: convert(build(), folder / f"{name}.mnn") for name, build in BUILDERS.items()}
