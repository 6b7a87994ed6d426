"""Every model the tools build with MNN.expr: the demo vocoder and the benchmark's references.

Building a model is MNN's job, so this is the one tools module that uses `guard.mnn.F`; each
builder runs under `graph_building()`, which keeps placeholders as inputs on every release.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard.mnn import F
from guard.mnn.expressions import graph_building

__all__ = [
    "HOP",
    "RELAY_INPUTS",
    "RELAY_OUTPUTS",
    "SMALL_INPUTS",
    "SMALL_OUTPUTS",
    "VOCODER_INPUT",
    "VOCODER_OUTPUT",
    "build_relay",
    "build_small",
    "build_tiny",
    "build_vocoder",
    "relay_inputs",
    "small_inputs",
]

VOCODER_INPUT, VOCODER_OUTPUT = "mel", "wav"
UPSAMPLE = (8, 8, 4)
HOP = int(np.prod(UPSAMPLE))
CHANNELS = (64, 32, 16, 8)

Array = NDArray[Any]
Transform = Callable[[Array], Array]


class _Builder:
    """Draws fixed-seed weights in a fixed order and emits MNN.expr layers."""

    def __init__(self, seed: int, transform: Transform | None) -> None:
        self.rng = np.random.default_rng(seed)
        self.transform = transform

    def weight(self, shape: tuple[int, ...], fan_in: int, gain: float = 1.0) -> Any:
        w = (self.rng.standard_normal(shape) * gain / np.sqrt(fan_in)).astype(np.float32)
        if self.transform is not None:
            w = np.asarray(self.transform(w), dtype=np.float32)
        return F.const(w, list(shape), F.NCHW)

    def bias(self, n: int) -> Any:
        b = (0.01 * self.rng.standard_normal(n)).astype(np.float32)
        return F.const(b, [n], F.NCHW)

    def conv(self, x: Any, cin: int, cout: int, k: int, dil: int = 1, gain: float = 1.0) -> Any:
        """Conv1d as a 1xK conv2d with 'same' padding (CAFFE mode honours explicit padding)."""
        w = self.weight((cout, cin, 1, k), cin * k, gain)
        return F.conv2d(
            x,
            w,
            self.bias(cout),
            stride=[1, 1],
            padding=[dil * (k - 1) // 2, 0],
            dilate=[dil, 1],
            padding_mode=F.CAFFE,
        )

    def up(self, x: Any, cin: int, cout: int, stride: int) -> Any:
        """Transposed conv1d with kernel 2*stride that multiplies the length by exactly `stride`."""
        k = 2 * stride
        w = self.weight((cin, cout, 1, k), cin * 2)
        return F.conv2d_transpose(
            x,
            w,
            self.bias(cout),
            stride=[stride, 1],
            padding=[stride // 2, 0],
            padding_mode=F.CAFFE,
        )

    def resblock(self, x: Any, ch: int) -> Any:
        for dil in (1, 3, 5):
            h = self.conv(F.relu(x, 0.1), ch, ch, 3, dil, gain=0.5)
            x = x + self.conv(F.relu(h, 0.1), ch, ch, 3, 1, gain=0.5)
        return x


@graph_building()
def build_vocoder(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    weight_transform: Transform | None = None,
    frames: int = 100,
) -> None:
    """Write the demo vocoder (`mel` [1, 80, T] -> `wav` [1, 1, T*256]) as a real .mnn file.

    `weight_transform` is applied to every weight array (fp16 rounding, noise, ...) to build
    benign or faulty variants with the same seed.
    """
    b = _Builder(seed, weight_transform)
    mel = F.placeholder([1, 80, frames], F.NCHW)
    mel.name = VOCODER_INPUT
    x = F.convert(F.reshape(mel, [1, 80, 1, -1]), F.NC4HW4)
    x = b.conv(x, 80, CHANNELS[0], 7)
    for i, stride in enumerate(UPSAMPLE):
        x = b.up(F.relu(x, 0.1), CHANNELS[i], CHANNELS[i + 1], stride)
        x = b.resblock(x, CHANNELS[i + 1])
    x = b.conv(F.relu(x, 0.1), CHANNELS[-1], 1, 7, gain=0.4)
    wav = F.reshape(F.convert(F.tanh(x), F.NCHW), [1, 1, -1])
    wav.name = VOCODER_OUTPUT
    F.save([wav], os.fspath(path))


@graph_building()
def build_tiny(path: str | os.PathLike[str]) -> None:
    """A tiny real model where per-call overhead dominates: y = tanh(x * w + b), x [1, 16]."""
    rng = np.random.default_rng(0)
    x = F.placeholder([1, 16], F.NCHW)
    x.name = "x"
    w = F.const(rng.standard_normal(16).astype(np.float32), [16], F.NCHW)
    b = F.const(rng.standard_normal(16).astype(np.float32), [16], F.NCHW)
    y = F.tanh(x * w + b)
    y.name = "y"
    F.save([y], os.fspath(path))


SMALL_INPUTS = ("audio", "state", "sr")
SMALL_OUTPUTS = ("prob", "state_out")
SMALL_WINDOW, SMALL_HIDDEN = 2048, 448


@graph_building()
def build_small(path: str | os.PathLike[str]) -> None:
    """A small streaming voice-activity-like model of about 0.2 ms a call, three mixed inputs:
    `audio` float32 [1, 2048], a recurrent `state` float32 [1, 448] and `sr`, an int32 scalar;
    outputs `prob` [1, 1] and `state_out` [1, 448]."""
    rng = np.random.default_rng(0)

    def weight(rows: int, cols: int) -> Any:
        w = (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)
        return F.const(w, [rows, cols], F.NCHW)

    audio = F.placeholder([1, SMALL_WINDOW], F.NCHW)
    audio.name = "audio"
    state = F.placeholder([1, SMALL_HIDDEN], F.NCHW)
    state.name = "state"
    sr = F.placeholder([], F.NCHW, F.int)
    sr.name = "sr"
    h = F.relu(F.matmul(audio, weight(SMALL_WINDOW, SMALL_HIDDEN)))
    state_out = F.tanh(F.matmul(F.concat([h, state], 1), weight(2 * SMALL_HIDDEN, SMALL_HIDDEN)))
    scale = F.cast(sr, F.float) * F.const(np.array(1 / 16000, np.float32), [], F.NCHW)
    prob = F.sigmoid(F.matmul(state_out, weight(SMALL_HIDDEN, 1)) * scale)
    prob.name = "prob"
    state_out.name = "state_out"
    F.save([prob, state_out], os.fspath(path))


def small_inputs(seed: int = 1) -> dict[str, Array]:
    """One call's inputs for the small model."""
    rng = np.random.default_rng(seed)
    return {
        "audio": rng.standard_normal((1, SMALL_WINDOW)).astype(np.float32),
        "state": np.tanh(rng.standard_normal((1, SMALL_HIDDEN))).astype(np.float32),
        "sr": np.array(16000, np.int32),
    }


RELAY_INPUTS = ("left", "right")
RELAY_OUTPUTS = ("out",)
RELAY_CHANNELS, RELAY_STEPS, RELAY_OUT, RELAY_LAYERS = 32, 400, 160, 6


def build_relay(path: str | os.PathLike[str]) -> None:
    """A model of about 2 ms a forward that moves pool-sized arrays: `left` and `right`, each
    float32 [1, 32, 400] (50 KB; 100 KB in all), in; `out` float32 [1, 160, 400] (250 KB) out,
    through six residual convolutions over both (a stand-in for a vocoder's request)."""
    b = _Builder(0, None)
    halves = []
    for name in RELAY_INPUTS:
        x = F.placeholder([1, RELAY_CHANNELS, RELAY_STEPS], F.NCHW)
        x.name = name
        halves.append(x)
    both = F.concat(halves, 1)
    x = F.convert(F.reshape(both, [1, 2 * RELAY_CHANNELS, 1, RELAY_STEPS]), F.NC4HW4)
    for _ in range(RELAY_LAYERS):
        x = x + b.conv(F.relu(x, 0.1), 2 * RELAY_CHANNELS, 2 * RELAY_CHANNELS, 9, gain=0.5)
    x = b.conv(F.relu(x, 0.1), 2 * RELAY_CHANNELS, RELAY_OUT, 1)
    out = F.reshape(F.convert(F.tanh(x), F.NCHW), [1, RELAY_OUT, RELAY_STEPS])
    out.name = RELAY_OUTPUTS[0]
    F.save([out], os.fspath(path))


def relay_inputs(seed: int = 1) -> dict[str, Array]:
    """One call's inputs for the relay model."""
    rng = np.random.default_rng(seed)
    shape = (1, RELAY_CHANNELS, RELAY_STEPS)
    return {name: rng.standard_normal(shape).astype(np.float32) for name in RELAY_INPUTS}
