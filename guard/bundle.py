"""One diagnosis bundle: what goes in it, and writing it into its folder atomically.

A bundle is a folder: `bundle.json` (session, rung and overrides, attempt history, model
sha256, MNN version and build, platform, CPU flags, thread settings, MNN's log lines),
`verdict.json` (every score against its threshold), `inputs.npz`, `golden.npz`, `actual.npz`
(the canary inputs, golden and actual outputs, no pickle) and `README.txt` (what to attach to
an MNN issue). `guard.diagnosis` decides when and where one is written; the tools read them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard.ladder import Attempt
from guard.version import __version__
from probes import Probe, Verdict
from probes.judges import OutputScore
from probes.store import cached_sha256

__all__ = [
    "KIND",
    "MANIFEST",
    "SCHEMA_VERSION",
    "VERDICT",
    "Job",
    "bundle_bytes",
    "describe_factory",
    "history_entry",
    "write_bundle",
]

KIND = "mnn-guard-diagnosis"
SCHEMA_VERSION = 1
MANIFEST = "bundle.json"
VERDICT = "verdict.json"
TEXT_BYTES = 64 << 10  # room for a bundle's JSON files and README (about 15 kB), npz headers
_ENV_THREADS = re.compile(r"^(OMP|OPENBLAS|MKL|MNN|GOTO|BLIS|VECLIB)_")

Array = NDArray[Any]


def _number(value: float | None) -> float | str | None:
    """A JSON-safe number: finite floats as they are, infinities and NaN as strings."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _plain(value: Any) -> Any:
    """A JSON-safe rendering of a load option or setting (objects by their repr)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return repr(value)


def _score_json(score: OutputScore, probe: Probe) -> dict[str, Any]:
    """One output's measurements, each check against its limit, and the thresholds in force."""
    return {
        "passed": score.passed,
        "shape_ok": score.shape_ok,
        "finite": score.finite,
        **{judge: _number(value) for judge, value in score.values.items()},
        "checks": [
            {
                "judge": c.judge,
                "passed": c.passed,
                "value": _number(c.value),
                "limit": _number(c.limit),
                "reason": c.reason,
            }
            for c in score.checks
        ],
        "thresholds": probe.thresholds_for(score.name).to_json(),
    }


def _verdict_json(verdict: Verdict | None, probe: Probe) -> dict[str, Any]:
    if verdict is None:
        return {"passed": False, "reasons": [], "worst_snr_db": None, "outputs": {}}
    return {
        "passed": verdict.passed,
        "reasons": list(verdict.reasons),
        "worst_snr_db": _number(verdict.worst_snr_db),
        "outputs": {name: _score_json(s, probe) for name, s in verdict.scores.items()},
    }


def history_entry(attempt: Attempt, event: str, now: float) -> dict[str, Any]:
    """One attempt as a line of a bundle's history."""
    verdict = attempt.verdict
    return {
        "at": datetime.fromtimestamp(now, UTC).isoformat(),
        "event": event,
        "rung": attempt.rung.name,
        "outcome": attempt.outcome.value,
        "seconds": attempt.seconds,
        "worst_snr_db": _number(verdict.worst_snr_db if verdict is not None else None),
        "summary": attempt.describe(),
    }


# ------------------------------------------------------------------ the environment


def _cpu() -> dict[str, Any]:
    """The CPU model and feature flags (/proc/cpuinfo on Linux), and how many CPUs we may use."""
    info: dict[str, Any] = {"logical_cpus": os.cpu_count(), "processor": platform.processor()}
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return info
    first = text.split("\n\n", 1)[0]
    for line in first.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "vendor_id", "cpu family", "model", "stepping", "microcode"):
            info[key.replace(" ", "_")] = value.strip()
        elif key in ("flags", "Features"):  # x86, ARM
            info["flags"] = value.split()
    return info


def _platform() -> dict[str, Any]:
    libc, libc_version = platform.libc_ver()
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "libc": f"{libc} {libc_version}".strip(),
        "numpy": np.__version__,
        "guard_version": __version__,
        "pid": os.getpid(),
    }


def describe_factory(factory: Any) -> dict[str, Any]:
    """What a factory says about itself: its kind (wrapped ones too), model path, load options."""
    kinds: list[str] = []
    settings: dict[str, Any] = {}
    seen = factory
    for _ in range(4):  # FaultyFactory(MNNFactory) and the like
        if seen is None:
            break
        kinds.append(type(seen).__name__)
        for key in ("path", "inputs", "outputs", "load_kwargs", "config"):
            value = getattr(seen, key, None)
            if value is not None and key not in settings:
                settings[key] = _plain(value)
        seen = getattr(seen, "factory", None)
    settings["kind"] = " wrapping ".join(kinds)
    return settings


def _threads(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The thread settings that shape MNN's work: the factory's, the environment's, Python's."""
    load = settings.get("load_kwargs")
    config = settings.get("config")  # a Session-API factory's createSession config
    threads = load.get("threads") if isinstance(load, Mapping) else None
    if threads is None and isinstance(config, Mapping):
        threads = config.get("numThread")
    return {
        "factory_threads": threads,
        "environment": {k: v for k, v in sorted(os.environ.items()) if _ENV_THREADS.match(k)},
        "python_threads": threading.active_count(),
    }


def _model(path: Any) -> dict[str, Any]:
    """The model file's path, size and sha256 (cached while the file is unchanged)."""
    if not isinstance(path, str) or not os.path.isfile(path):
        return {"path": path, "sha256": None}
    return {
        "path": os.path.abspath(path),
        "bytes": os.path.getsize(path),
        "sha256": cached_sha256(path),
    }


def _mnn_build() -> dict[str, str]:
    from guard import mnn

    return mnn.build_info()


# ------------------------------------------------------------------ writing one bundle


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """What one bundle is made of, taken when the attempt finished (arrays by reference)."""

    session: str
    event: str  # init, recheck or shadow (a sampled live call that diverged)
    attempt: Attempt
    history: tuple[dict[str, Any], ...]
    probe: Probe
    factory: dict[str, Any]
    when: float
    mnn_log: tuple[str, ...] = ()


def _bundle_name(job: Job, seq: int) -> str:
    stamp = datetime.fromtimestamp(job.when, UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    words = f"{job.session}-{job.event}-{job.attempt.rung.name}-{job.attempt.outcome.value}"
    return f"{stamp}-{os.getpid()}-{seq:04d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', words)[:80]}"


def _arrays(job: Job) -> dict[str, dict[str, Array]]:
    """The arrays of a bundle by file: every canary input, and the failing cases' outputs."""
    probe = job.probe
    inputs = {
        f"case{i}/{name}": array
        for i, case in enumerate(probe.cases)
        for name, array in case.inputs.items()
    }
    golden: dict[str, Array] = {}
    actual: dict[str, Array] = {}
    for i, outputs in sorted(job.attempt.outputs.items()):
        for name in probe.output_names:
            golden[f"case{i}/{name}"] = probe.cases[i].outputs[name]
            if name in outputs:
                actual[f"case{i}/{name}"] = np.asarray(outputs[name])
    return {"inputs.npz": inputs, "golden.npz": golden, "actual.npz": actual}


def _case_verdicts(job: Job) -> dict[str, Any]:
    """Each failing case judged on its own (the attempt's verdict merges every run)."""
    cases: dict[str, Any] = {}
    for i, outputs in sorted(job.attempt.outputs.items()):
        verdict = job.probe.judge(dict(outputs), case=i)
        cases[str(i)] = _verdict_json(verdict, job.probe)
    return cases


def _manifest(job: Job, arrays: Mapping[str, Any], omitted: str | None) -> dict[str, Any]:
    attempt, probe = job.attempt, job.probe
    error = attempt.error
    log_lines = list(job.mnn_log)
    cause = error
    while cause is not None and len(log_lines) < 200:  # what MNN said may be in the error chain
        log_lines.extend(f"{type(cause).__name__}: {line}" for line in str(cause).splitlines())
        cause = cause.__cause__
    return {
        "kind": KIND,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.fromtimestamp(job.when, UTC).isoformat(),
        "session": job.session,
        "event": job.event,
        "outcome": attempt.outcome.value,
        "seconds": attempt.seconds,
        "summary": attempt.describe(),
        "error": None if error is None else f"{type(error).__name__}: {error}",
        "rung": {
            "name": attempt.rung.name,
            "index": attempt.rung_index,
            "overrides": _plain(dict(attempt.rung.overrides)),
        },
        "history": list(job.history),
        "factory": job.factory,
        "model": _model(job.factory.get("path")),
        "probe": {
            "model_sha256": probe.meta.model_sha256,
            "mnn_version": probe.meta.mnn_version,
            "reference": _plain(dict(probe.meta.reference)),
            "created": probe.meta.created,
            "inputs": [s.to_json() for s in probe.inputs],
            "outputs": [s.to_json() for s in probe.outputs],
            "cases": len(probe.cases),
            "failing_cases": sorted(attempt.outputs),
        },
        "mnn": _mnn_build(),
        "platform": _platform(),
        "cpu": _cpu(),
        "threads": _threads(job.factory),
        "mnn_log": log_lines[:200],
        "arrays": {file: sorted(content) for file, content in arrays.items()},
        "arrays_omitted": omitted,
    }


def _readme(manifest: Mapping[str, Any], verdict: Mapping[str, Any]) -> str:
    """README.txt: what the bundle is and how to hand it to MNN's maintainers."""
    model = manifest["model"]
    rung = manifest["rung"]
    mnn = manifest["mnn"]
    reasons = "; ".join(verdict.get("reasons", [])) or manifest["summary"]
    return f"""mnn-guard diagnosis bundle
==========================

Session {manifest["session"]!r}, {manifest["event"]} canary on rung {rung["name"]!r}
(overrides {json.dumps(rung["overrides"])}): {manifest["outcome"].upper()} at {manifest["created"]}.
{reasons}

Model {model.get("path")} (sha256 {model.get("sha256")}); MNN {mnn.get("version")}
({mnn.get("wheel_tags", "build unknown")}); {manifest["platform"]["platform"]}.

What is here
  bundle.json    the attempt, its history, rung and overrides, model sha256, MNN version and
                 build, platform, CPU flags, thread settings, MNN's log lines
  verdict.json   every score of every output against its threshold, per failing case too
  inputs.npz     the canary inputs, keys case<i>/<input>
  golden.npz     the golden outputs of the failing cases, keys case<i>/<output>
  actual.npz     what the module returned for them (np.load(path, allow_pickle=False))
  report.html    pictures (waveforms, spectrograms, the difference): written by
                 `mnn-guard report THIS_FOLDER` (needs matplotlib: pip install matplotlib)
  diagnosis.json where in the network the outputs first diverge, when `mnn-guard diagnose
                 ... --bundle THIS_FOLDER` was run

How to hand it to MNN's maintainers (https://github.com/alibaba/MNN/issues)
  1. Look at report.html (`mnn-guard report THIS_FOLDER`): is the actual audio really worse?
  2. Find where it goes wrong: `mnn-guard diagnose MODEL --probe PROBE_DIR --override KEY=VALUE
     --tries 20 --bundle THIS_FOLDER` runs the canary with every named tensor as an output and
     names the first tensors that diverge, with their operators and SNR.
  3. Say how often it happens: `mnn-guard doctor MODEL --probe PROBE_DIR` gives the rate of
     degraded starts with a confidence interval.
  4. Open an issue titled like "Degraded outputs after load_module_from_file on <CPU>, MNN
     {mnn.get("version")}". Paste the MNN version and build, the CPU model and flags, the
     thread settings and the first divergent tensor from bundle.json / diagnosis.json, and
     attach this folder as a .zip (every file above) and, if you may share it, the model file
     (or a model that shows the same, rebuilt small). The .npz files open with numpy alone.

Nothing in this folder was sent anywhere. It holds your canary inputs and outputs: make sure
you may share them before you attach them.
"""


def _bytes(arrays: Mapping[str, Mapping[str, Array]]) -> int:
    return sum(a.nbytes for content in arrays.values() for a in content.values())


def bundle_bytes(job: Job, *, max_bytes: int) -> int:
    """About the room the bundle takes on disk: its arrays (unless left out) and its text."""
    size = _bytes(_arrays(job))
    return (size if size <= max_bytes else 0) + TEXT_BYTES


def write_bundle(folder: Path, job: Job, *, seq: int, max_bytes: int) -> Path:
    """Write one bundle atomically (a hidden temporary folder renamed into place)."""
    name = _bundle_name(job, seq)
    folder.mkdir(exist_ok=True)  # its parent was checked when the listener was made
    tmp = folder / f".tmp-{name}"
    tmp.mkdir()
    try:
        arrays = _arrays(job)
        size = _bytes(arrays)
        omitted = None
        if size > max_bytes:
            omitted = f"{size} bytes of arrays exceed the folder's bound of {max_bytes} bytes"
            arrays = {}
        for file, content in arrays.items():
            np.savez(tmp / file, allow_pickle=False, **content)
        verdict = _verdict_json(job.attempt.verdict, job.probe)
        verdict["cases"] = _case_verdicts(job)
        manifest = _manifest(job, arrays, omitted)
        (tmp / VERDICT).write_text(json.dumps(verdict, indent=2, allow_nan=False))
        (tmp / "README.txt").write_text(_readme(manifest, verdict))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False))
        final = folder / name
        tmp.rename(final)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
