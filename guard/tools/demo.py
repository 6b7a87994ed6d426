"""The bundled demo vocoder: a small HiFiGAN-like generator built with MNN.expr, and its probe."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard.errors import GuardError
from guard.mnn import F, MNNFactory, mnn_factory

__all__ = [
    "DEMO_INPUT",
    "DEMO_MODEL",
    "DEMO_OUTPUT",
    "DEMO_PROBE",
    "DEMO_SHA256",
    "HOP",
    "build_vocoder",
    "demo_factory",
    "demo_mel",
    "ensure_demo",
    "record_demo_probe",
]

DEMO_INPUT, DEMO_OUTPUT = "mel", "wav"
UPSAMPLE = (8, 8, 4)
HOP = int(np.prod(UPSAMPLE))
CHANNELS = (64, 32, 16, 8)
DATA_DIR = Path(__file__).parent.parent / "data"
DEMO_MODEL = DATA_DIR / "demo_vocoder.mnn"
DEMO_PROBE = DATA_DIR / "demo_vocoder.probe"
DEMO_SHA256 = "7e81c6bf2a0b66c13a8228eae7147ca3e36a6726489829c96e4f3c37c3e001de"

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
    mel.name = DEMO_INPUT
    x = F.convert(F.reshape(mel, [1, 80, 1, -1]), F.NC4HW4)
    x = b.conv(x, 80, CHANNELS[0], 7)
    for i, stride in enumerate(UPSAMPLE):
        x = b.up(F.relu(x, 0.1), CHANNELS[i], CHANNELS[i + 1], stride)
        x = b.resblock(x, CHANNELS[i + 1])
    x = b.conv(F.relu(x, 0.1), CHANNELS[-1], 1, 7, gain=0.4)
    wav = F.reshape(F.convert(F.tanh(x), F.NCHW), [1, 1, -1])
    wav.name = DEMO_OUTPUT
    F.save([wav], os.fspath(path))


def demo_mel(frames: int = 100, seed: int = 1) -> Array:
    """A smooth, deterministic mel-like input of shape [1, 80, frames]."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames)[None, :]
    f = np.arange(80)[:, None]
    base = -4.0 + 3.0 * np.exp(-(((f - 20 - 10 * np.sin(t / 9.0)) / 12.0) ** 2))
    mel: Array = (base + 0.3 * rng.standard_normal((80, frames)))[None].astype(np.float32)
    return mel


def demo_factory(threads: int = 1) -> MNNFactory:
    """A picklable factory for the bundled demo vocoder."""
    return mnn_factory(DEMO_MODEL, [DEMO_INPUT], [DEMO_OUTPUT], threads=threads)


def record_demo_probe() -> Any:
    """Record the demo probe from the dynamic reference, with T dynamic in 1..4000."""
    import probes

    return probes.record(
        demo_factory(),
        {DEMO_INPUT: demo_mel()},
        reference={"dynamic": True},
        dynamic={DEMO_INPUT: {2: (1, 4000)}},
    )


def ensure_demo(rebuild: bool = False) -> tuple[Path, Path]:
    """(model, probe dir) of the demo vocoder, rebuilt and re-verified when missing or changed."""
    import probes

    fresh = not rebuild and DEMO_MODEL.is_file() and probes.file_sha256(DEMO_MODEL) == DEMO_SHA256
    if fresh and (DEMO_PROBE / "manifest.json").is_file():
        return DEMO_MODEL, DEMO_PROBE
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    build_vocoder(DEMO_MODEL)
    sha = probes.file_sha256(DEMO_MODEL)
    if sha != DEMO_SHA256:
        raise GuardError(
            f"the rebuilt demo vocoder has sha256 {sha}, expected {DEMO_SHA256}: this MNN or "
            "numpy builds different bytes; the demo probe would not match"
        )
    record_demo_probe().save(DEMO_PROBE)
    return DEMO_MODEL, DEMO_PROBE


if __name__ == "__main__":
    model, probe = ensure_demo(rebuild=True)
    print(f"built {model} (sha256 {DEMO_SHA256}) and recorded {probe}")
