"""The bundled demo vocoder: its model file, its probe, a factory and deterministic inputs.

`python -m guard.tools.demo` rebuilds both files (the model with `guard.tools.models`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from guard.errors import GuardError
from guard.mnn import MNNFactory, mnn_factory
from guard.tools.models import HOP, VOCODER_INPUT, VOCODER_OUTPUT, build_vocoder

if TYPE_CHECKING:
    from probes import Probe

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

DEMO_INPUT, DEMO_OUTPUT = VOCODER_INPUT, VOCODER_OUTPUT
DATA_DIR = Path(__file__).parent.parent / "data"  # guard/data: package data of the runtime
DEMO_MODEL = DATA_DIR / "demo_vocoder.mnn"
DEMO_PROBE = DATA_DIR / "demo_vocoder.probe"
DEMO_SHA256 = "7e81c6bf2a0b66c13a8228eae7147ca3e36a6726489829c96e4f3c37c3e001de"

Array = NDArray[Any]


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


def record_demo_probe() -> Probe:
    """Record the demo probe from the dynamic reference, with T dynamic in 1..4000."""
    from guard.recording import record

    return record(
        demo_factory(),
        {DEMO_INPUT: demo_mel()},
        reference={"dynamic": True},
        dynamic={DEMO_INPUT: {2: (1, 4000)}},
    )


def ensure_demo(rebuild: bool = False) -> tuple[Path, Path]:
    """(model, probe dir) of the demo vocoder, rebuilt and re-verified when missing or changed."""
    from probes.store import file_sha256

    fresh = not rebuild and DEMO_MODEL.is_file() and file_sha256(DEMO_MODEL) == DEMO_SHA256
    if fresh and (DEMO_PROBE / "manifest.json").is_file():
        return DEMO_MODEL, DEMO_PROBE
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    build_vocoder(DEMO_MODEL)
    sha = file_sha256(DEMO_MODEL)
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
