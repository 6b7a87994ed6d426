"""Test signals with known numbers: a tone, and a golden with noise at an exact SNR."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]


def scaled_noise(golden: Array, snr: float, seed: int = 0) -> Array:
    """`golden` plus white noise at exactly `snr` dB (float64)."""
    g = golden.astype(np.float64)
    n = np.random.default_rng(seed).standard_normal(g.shape)
    return g + n * math.sqrt(float(np.sum(g**2)) / float(np.sum(n**2))) * 10 ** (-snr / 20)


def tone(seconds_samples: int = 4096, hz: float = 440.0, amplitude: float = 1.0) -> Array:
    """A sine of `hz` at 22,050 Hz, shaped (1, 1, n) like the demo vocoder's output."""
    t = np.arange(seconds_samples) / 22050
    return (amplitude * np.sin(2 * np.pi * hz * t)).reshape(1, 1, -1)
