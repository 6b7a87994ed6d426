"""Measuring at record time how much clean inits of a model differ, for `probes.Calibration`.

Several inits of each configuration (the factory's own and the reference), in this process
and in fresh spawned ones where the factory pickles, each run twice on every canary case; and
the reference on inputs nudged by one float32 ulp. An init that deviates far more than the
others is a degraded init, the very fault the guard exists for: it is left out and reported.
"""

from __future__ import annotations

import math
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard import mnn
from probes.calibration import MARGIN_DB, Calibration, OutputCalibration, calibrated_limit
from probes.measures import snr_db

__all__ = ["Measured", "calibrate", "cpu_features", "nudged"]

Array = NDArray[Any]
Cases = Sequence[Mapping[str, Array]]
Goldens = Sequence[Sequence[Array]]  # by case, by output
PROCESS_SECONDS = 180.0  # the most the fresh processes may take together
_SIMD_FLAGS = frozenset(
    {
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
        "avx512_bf16",
        "amx_tile",
        "asimd",
        "asimdhp",
        "asimddp",
        "sve",
        "sve2",
        "i8mm",
        "bf16",
    }
)


@dataclass(frozen=True, slots=True)
class Measured:
    """A calibration and what recording should say about how it was made."""

    calibration: Calibration
    notes: tuple[str, ...] = ()
    outliers: tuple[str, ...] = field(default=())  # degraded inits left out, described


def cpu_features() -> str:
    """The machine and the SIMD features that decide MNN's kernels, as one short line."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.split(":", 1)[0].strip() in ("flags", "Features"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    simd = sorted(flags & _SIMD_FLAGS)
    return f"{platform.machine()} {' '.join(simd) or 'no SIMD flags read'}"


def nudged(case: Mapping[str, Array], seed: int) -> dict[str, Array]:
    """The case with every float input moved by one float32 ulp up or down, at random."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, arr in case.items():
        if np.issubdtype(arr.dtype, np.floating):
            signs = rng.choice(np.array([-1.0, 1.0]), size=arr.shape)
            out[name] = np.asarray(arr * (1.0 + signs * 2.0**-23), dtype=arr.dtype)
        else:
            out[name] = arr
    return out


def _run(
    factory: Callable[..., Any],
    overrides: Mapping[str, Any],
    cases: Cases,
    names: Sequence[str],
    out_names: Sequence[str],
    repeats: int,
) -> list[list[list[Array]]]:
    """One fresh init of `overrides`: outputs by repeat, case and output."""
    loaded, _ = mnn.load(factory, overrides)
    runner = mnn.adapt(loaded, names, out_names)
    return [[runner.run([case[n] for n in names]) for case in cases] for _ in range(repeats)]


def _in_process(
    factory: Callable[..., Any],
    configurations: Sequence[Mapping[str, Any]],
    cases: Cases,
    names: Sequence[str],
    out_names: Sequence[str],
) -> list[list[list[list[Array]]]]:
    """What a fresh process computes: one init of each configuration (spawned child's body)."""
    return [_run(factory, c, cases, names, out_names, 2) for c in configurations]


def _worst(
    goldens: Goldens, runs: Sequence[Sequence[Sequence[Array]]], outputs: int
) -> list[float]:
    """Per output, the lowest SNR of any run against the goldens (-inf for a missing output)."""
    worst = [math.inf] * outputs
    for per_case in runs:
        for case, outs in enumerate(per_case):
            for k in range(outputs):
                value = -math.inf
                if k < len(outs) and outs[k].shape == goldens[case][k].shape:
                    value = snr_db(goldens[case][k], outs[k])
                worst[k] = min(worst[k], value if not math.isnan(value) else -math.inf)
    return worst


def _fresh_processes(
    factory: Callable[..., Any],
    configurations: Sequence[Mapping[str, Any]],
    cases: Cases,
    names: Sequence[str],
    out_names: Sequence[str],
    processes: int,
) -> tuple[list[list[list[list[list[Array]]]]], str | None]:
    """Each fresh process's outputs, or why none could be measured.

    The children are new interpreters (`python -m guard.calibrating`), not multiprocessing's:
    a spawned multiprocessing child would run the recording script's module code again.
    """
    if processes <= 0:
        return [], None
    args = (factory, [dict(c) for c in configurations], [dict(c) for c in cases], list(names))
    try:
        job = pickle.dumps((*args, list(out_names)), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        return (
            [],
            f"the factory cannot be pickled ({type(exc).__name__}): no fresh process measured",
        )
    with tempfile.TemporaryDirectory(prefix="mnn-guard-calibration-") as folder:
        request = Path(folder, "job.pickle")
        request.write_bytes(job)
        replies = [Path(folder, f"reply{k}.pickle") for k in range(processes)]
        children = [
            subprocess.Popen(
                [sys.executable, "-m", "guard.calibrating", str(request), str(reply)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for reply in replies
        ]
        deadline = time.monotonic() + PROCESS_SECONDS
        failures = []
        for child in children:
            try:
                _, err = child.communicate(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
                failures.append(f"a fresh process took more than {PROCESS_SECONDS:g} s")
                continue
            if child.returncode != 0:
                last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
                failures.append(f"a fresh process exited with {child.returncode}: {last[0]}")
        if failures:
            return [], f"{failures[0]}; no fresh process measured"
        return [pickle.loads(reply.read_bytes()) for reply in replies], None


def calibrate(
    factory: Callable[..., Any],
    reference: Mapping[str, Any],
    cases: Cases,
    goldens: Goldens,
    names: Sequence[str],
    out_names: Sequence[str],
    *,
    configurations: Sequence[Mapping[str, Any]] = ({},),
    inits: int = 3,
    processes: int = 2,
    margin_db: float = MARGIN_DB,
    skip: frozenset[str] = frozenset(),
) -> Measured:
    """Measure clean inits of each configuration and the reference, and the ulp floor; the
    calibrated limit of every output not in `skip` (outputs whose SNR limit the user set)."""
    configs = [dict(c) for c in configurations]
    if dict(reference) not in configs:
        configs.append(dict(reference))
    per_init: list[tuple[str, list[float]]] = []
    for config in configs:
        for k in range(inits):
            runs = _run(factory, config, cases, names, out_names, 2)
            per_init.append(
                (f"init {k + 1} of {_text(config)}", _worst(goldens, runs, len(out_names)))
            )
    children, why = _fresh_processes(factory, configs, cases, names, out_names, processes)
    for p, child in enumerate(children):
        for config, runs in zip(configs, child, strict=True):
            per_init.append(
                (f"fresh process {p + 1}, {_text(config)}", _worst(goldens, runs, len(out_names)))
            )
    kept, outliers = _without_outliers(per_init, margin_db)
    loaded, _ = mnn.load(factory, reference)
    runner = mnn.adapt(loaded, names, out_names)
    floor_runs = [
        [runner.run([nudged(case, seed)[n] for n in names]) for seed, case in enumerate(cases)]
    ]
    floor = _worst(goldens, floor_runs, len(out_names))
    outputs = {}
    for k, name in enumerate(out_names):
        if name in skip:
            continue
        spread = min((worst[k] for _, worst in kept), default=math.inf)
        dtype = goldens[0][k].dtype
        outputs[name] = OutputCalibration(
            spread_db=spread,
            floor_db=floor[k],
            limit_db=calibrated_limit(spread, floor[k], dtype, margin_db),
        )
    notes = [why] if why else []
    calibration = Calibration(
        outputs=outputs,
        margin_db=margin_db,
        inits=inits * len(configs),
        processes=len(children),
        configurations=tuple(_text(c) for c in configs),
        provenance=_provenance(factory),
    )
    return Measured(calibration, tuple(notes), tuple(outliers))


def _without_outliers(
    per_init: list[tuple[str, list[float]]], margin_db: float
) -> tuple[list[tuple[str, list[float]]], list[str]]:
    """Leave out inits whose worst SNR lies more than the margin below the median init's."""
    if len(per_init) < 3:
        return per_init, []
    typical = statistics.median(min(worst) for _, worst in per_init)
    kept, outliers = [], []
    for label, worst in per_init:
        if min(worst) < typical - margin_db:
            outliers.append(f"{label}: {min(worst):.1f} dB against the goldens")
        else:
            kept.append((label, worst))
    return kept, outliers


def _text(config: Mapping[str, Any]) -> str:
    shown = {k: v for k, v in config.items() if k != "outputs"}  # sentinels: not a config
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "the factory's own configuration"


def _provenance(factory: Callable[..., Any]) -> dict[str, str]:
    threads = getattr(factory, "load_kwargs", {}).get("threads")
    if threads is None:
        threads = getattr(factory, "config", {}).get("numThread")
    return {
        "mnn": mnn.mnn_version(),
        "cpu": cpu_features(),
        "threads": "unknown" if threads is None else str(threads),
        "python": platform.python_version(),
    }


def _child(request: str, reply: str) -> None:
    """A fresh process's body: read the job, measure one init of each configuration, reply."""
    factory, configurations, cases, names, out_names = pickle.loads(Path(request).read_bytes())
    outputs = _in_process(factory, configurations, cases, names, out_names)
    Path(reply).write_bytes(pickle.dumps(outputs, protocol=pickle.HIGHEST_PROTOCOL))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
