"""Diagnosis bundles: what a failed canary leaves behind for a person and for MNN's maintainers.

A bundle is a folder: `bundle.json` (session, rung and overrides, attempt history, model
sha256, MNN version and build, platform, CPU flags, thread settings, MNN's log lines),
`verdict.json` (every score against its threshold), `inputs.npz`, `golden.npz`, `actual.npz`
(the canary inputs, golden and actual outputs, no pickle) and `README.txt` (what to attach to
an MNN issue). `mnn-guard report BUNDLE` adds `report.html`, with pictures.

Bundles are written by one background thread per folder and process, from a bounded queue: the
listener only queues a reference to the attempt's owned arrays, so no forward ever waits for a
disk. Bounds: at most `max_bundles` bundles (default 20) and `max_bytes` bytes (default 200
MiB) in the folder, oldest removed first (only folders that are mnn-guard bundles); a bundle
whose arrays alone exceed `max_bytes` is written without them; at most `queue_size` (8) bundles
wait to be written, and a failure beyond that is counted in `dropped`, not queued.

>>> policy = guard.Policy(diagnose="/var/lib/vocoder/diagnosis")  # doctest: +SKIP
>>> session = guard.wrap(factory, probe, policy=policy)  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import platform
import re
import shutil
import threading
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard.errors import BundleError, ConfigError
from guard.ladder import Attempt
from guard.listeners import Listener
from guard.version import __version__
from probes import Probe, Verdict
from probes.judges import OutputScore
from probes.store import file_sha256

__all__ = [
    "MAX_BUNDLES",
    "MAX_BYTES",
    "Bundle",
    "BundleWriter",
    "DiagnosisListener",
    "find_bundles",
    "read_bundle",
    "writer_for",
]

log = logging.getLogger("mnn_guard")

KIND = "mnn-guard-diagnosis"
SCHEMA_VERSION = 1
MANIFEST = "bundle.json"
VERDICT = "verdict.json"
ARRAY_FILES = ("inputs.npz", "golden.npz", "actual.npz")
MAX_BUNDLES = 20
MAX_BYTES = 200 << 20
QUEUE_SIZE = 8
HISTORY = 16  # attempts per session kept for the next bundle
IDLE_SECONDS = 5.0  # a writer thread with nothing to do for this long ends (a new one starts)
MAX_JSON_BYTES = 16 << 20  # a bundle's JSON files larger than this are refused unread
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


def _factory(factory: Any) -> dict[str, Any]:
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


_sha_cache: dict[tuple[str, int, int], str] = {}


def _model(path: Any) -> dict[str, Any]:
    """The model file's path, size and sha256 (cached while the file is unchanged)."""
    if not isinstance(path, str) or not os.path.isfile(path):
        return {"path": path, "sha256": None}
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _sha_cache:
        _sha_cache[key] = file_sha256(path)
    return {"path": key[0], "bytes": stat.st_size, "sha256": _sha_cache[key]}


def _mnn_build() -> dict[str, str]:
    from guard import mnn

    return mnn.build_info()


# ------------------------------------------------------------------ writing one bundle


@dataclass(frozen=True, slots=True, kw_only=True)
class _Job:
    """What one bundle is made of, taken when the attempt finished (arrays by reference)."""

    session: str
    event: str  # init or recheck
    attempt: Attempt
    history: tuple[dict[str, Any], ...]
    probe: Probe
    factory: dict[str, Any]
    when: float
    mnn_log: tuple[str, ...] = ()


def _bundle_name(job: _Job, seq: int) -> str:
    stamp = datetime.fromtimestamp(job.when, UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    words = f"{job.session}-{job.attempt.rung.name}-{job.attempt.outcome.value}"
    return f"{stamp}-{os.getpid()}-{seq:04d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', words)[:80]}"


def _arrays(job: _Job) -> dict[str, dict[str, Array]]:
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


def _case_verdicts(job: _Job) -> dict[str, Any]:
    """Each failing case judged on its own (the attempt's verdict merges every run)."""
    cases: dict[str, Any] = {}
    for i, outputs in sorted(job.attempt.outputs.items()):
        verdict = job.probe.judge(dict(outputs), case=i)
        cases[str(i)] = _verdict_json(verdict, job.probe)
    return cases


def _manifest(job: _Job, arrays: Mapping[str, Any], omitted: str | None) -> dict[str, Any]:
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
                 `mnn-guard report THIS_FOLDER` (needs pip install 'mnn-guard[diagnose]')
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


def write_bundle(folder: Path, job: _Job, *, seq: int, max_bytes: int) -> Path:
    """Write one bundle atomically (a hidden temporary folder renamed into place)."""
    name = _bundle_name(job, seq)
    folder.mkdir(exist_ok=True)  # its parent was checked when the listener was made
    tmp = folder / f".tmp-{name}"
    tmp.mkdir()
    try:
        arrays = _arrays(job)
        size = sum(a.nbytes for content in arrays.values() for a in content.values())
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


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def find_bundles(folder: str | os.PathLike[str]) -> list[Path]:
    """The mnn-guard bundles directly in `folder`, oldest first (names start with a UTC time)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.name.startswith(".") or not child.is_dir():
            continue
        try:
            manifest = json.loads((child / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and manifest.get("kind") == KIND:
            found.append(child)
    return sorted(found, key=lambda p: p.name)


def prune(folder: Path, *, max_bundles: int, max_bytes: int, keep: Path) -> list[Path]:
    """Remove the oldest bundles until at most `max_bundles` and `max_bytes` remain."""
    bundles = find_bundles(folder)
    sizes = {b: _size(b) for b in bundles}
    total = sum(sizes.values())
    removed: list[Path] = []
    for bundle in bundles:
        if len(bundles) - len(removed) <= max_bundles and total <= max_bytes:
            break
        if bundle == keep:
            continue
        shutil.rmtree(bundle, ignore_errors=True)  # another process may be removing it too
        total -= sizes[bundle]
        removed.append(bundle)
    return removed


# ------------------------------------------------------------------ the background writer


class BundleWriter:
    """Writes bundles into one folder from a bounded queue, on one background thread."""

    def __init__(self, folder: Path, *, max_bundles: int, max_bytes: int, queue_size: int) -> None:
        self.folder = folder
        self.max_bundles = max_bundles
        self.max_bytes = max_bytes
        self.queue_size = queue_size
        self.written: collections.deque[Path] = collections.deque(maxlen=100)
        self.total = 0  # bundles written so far
        self.dropped = 0  # failures not written: the queue was full
        self.failed = 0  # bundles whose writing raised (logged)
        self._jobs: collections.deque[_Job] = collections.deque()
        self._busy = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._seq = 0

    def submit(self, job: _Job) -> bool:
        """Queue a bundle (never blocks); False when the queue is full and it was dropped."""
        with self._cond:
            if self._pid != os.getpid():  # a forked child has no writer thread: start afresh
                self._pid, self._thread, self._busy = os.getpid(), None, False
                self._jobs.clear()
            if len(self._jobs) >= self.queue_size:
                self.dropped += 1
                log.warning(
                    "diagnosis: %d bundle(s) already wait to be written to %s; dropped one",
                    len(self._jobs),
                    self.folder,
                )
                return False
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="mnn-guard-diagnosis", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
            return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._jobs:
                    self._cond.wait(IDLE_SECONDS)
                if not self._jobs:
                    self._thread = None
                    return
                job = self._jobs.popleft()
                self._busy = True
                self._seq += 1
                seq = self._seq
            try:
                path = write_bundle(self.folder, job, seq=seq, max_bytes=self.max_bytes)
                prune(
                    self.folder, max_bundles=self.max_bundles, max_bytes=self.max_bytes, keep=path
                )
                log.warning("session %s: diagnosis bundle written to %s", job.session, path)
                with self._cond:
                    self.written.append(path)
                    self.total += 1
            except Exception:
                self.failed += 1
                log.exception("diagnosis: a bundle could not be written to %s", self.folder)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Wait until every queued bundle is written; False if `timeout` s passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def since(self, total: int) -> list[Path]:
        """The bundles written after the first `total` that still exist (the last 100 at most)."""
        with self._cond:
            new = self.total - total
            paths = list(self.written)[-new:] if new > 0 else []
        return [p for p in paths if p.is_dir()]  # the bounds may have removed the oldest


_writers_lock = threading.Lock()
_writers: dict[tuple[str, int, int, int], BundleWriter] = {}


def _folder(folder: str | os.PathLike[str]) -> Path:
    """The bundle folder, checked now and created at the first bundle (its parent must exist)."""
    path = Path(folder).absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"diagnosis folder {str(path)!r} is a file; expected a folder")
    where = path if path.exists() else path.parent
    if not where.is_dir():
        raise ConfigError(
            f"diagnosis folder {str(path)!r}: its parent folder does not exist; create it first"
        )
    if not os.access(where, os.W_OK | os.X_OK):
        raise ConfigError(f"diagnosis folder {str(path)!r}: {str(where)!r} is not writable")
    return path


def writer_for(
    folder: str | os.PathLike[str],
    *,
    max_bundles: int = MAX_BUNDLES,
    max_bytes: int = MAX_BYTES,
    queue_size: int = QUEUE_SIZE,
) -> BundleWriter:
    """The process's writer for `folder` and these bounds (one thread per folder, not session)."""
    bounds = {"max_bundles": max_bundles, "max_bytes": max_bytes, "queue_size": queue_size}
    for what, value in bounds.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{what} must be a positive int, got {value!r}")
    path = _folder(folder)
    key = (str(path), max_bundles, max_bytes, queue_size)
    with _writers_lock:
        if key not in _writers:
            _writers[key] = BundleWriter(
                path, max_bundles=max_bundles, max_bytes=max_bytes, queue_size=queue_size
            )
        return _writers[key]


# ------------------------------------------------------------------ the listener


class DiagnosisListener(Listener):
    """Leaves a bundle in `folder` for every failed canary (init or re-check), off the request path.

    `guard.wrap` adds one when `Policy.diagnose` names a folder; build one yourself for other
    bounds. `flush()` waits for the queued bundles (for tools and tests).
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        probe: Probe,
        *,
        factory: Any = None,
        max_bundles: int = MAX_BUNDLES,
        max_bytes: int = MAX_BYTES,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.writer = writer_for(
            folder, max_bundles=max_bundles, max_bytes=max_bytes, queue_size=queue_size
        )
        self.probe = probe
        self._factory = _factory(factory)
        self._lock = threading.Lock()
        self._history: dict[str, collections.deque[dict[str, Any]]] = {}

    @property
    def folder(self) -> Path:
        """Where the bundles go."""
        return self.writer.folder

    def _remember(self, session: str, attempt: Attempt, event: str, now: float) -> tuple[Any, ...]:
        """Add the attempt to the session's history (the last HISTORY); the history so far."""
        verdict = attempt.verdict
        entry = {
            "at": datetime.fromtimestamp(now, UTC).isoformat(),
            "event": event,
            "rung": attempt.rung.name,
            "outcome": attempt.outcome.value,
            "seconds": attempt.seconds,
            "worst_snr_db": _number(verdict.worst_snr_db if verdict is not None else None),
            "summary": attempt.describe(),
        }
        with self._lock:
            history = self._history.setdefault(session, collections.deque(maxlen=HISTORY))
            history.append(entry)
            return tuple(history)

    def record(
        self, session: str, attempt: Attempt, *, event: str = "init", mnn_log: Sequence[str] = ()
    ) -> bool:
        """Note the attempt in the session's history and queue a bundle for it (any outcome)."""
        now = time.time()
        job = _Job(
            session=session,
            event=event,
            attempt=attempt,
            history=self._remember(session, attempt, event, now),
            probe=self.probe,
            factory=self._factory,
            when=now,
            mnn_log=tuple(mnn_log),
        )
        return self.writer.submit(job)

    def _note(self, session: str, attempt: Attempt, event: str) -> None:
        """A failure gets a bundle; a pass goes into the history the next bundle shows."""
        if attempt.passed:
            self._remember(session, attempt, event, time.time())
        else:
            self.record(session, attempt, event=event)

    def on_attempt(self, session: str, attempt: Attempt) -> None:
        self._note(session, attempt, "init")

    def on_check(self, session: str, attempt: Attempt) -> None:
        self._note(session, attempt, "recheck")

    def on_close(self, session: str) -> None:
        with self._lock:
            self._history.pop(session, None)

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Wait until every queued bundle is written; False if `timeout` s passed first."""
        return self.writer.flush(timeout)


# ------------------------------------------------------------------ reading a bundle


@dataclass(frozen=True, slots=True)
class Bundle:
    """A bundle read back: its manifest, verdict, arrays by file and key, and any diagnosis."""

    path: Path
    manifest: dict[str, Any]
    verdict: dict[str, Any]
    arrays: dict[str, dict[str, Array]] = field(default_factory=dict)
    diagnosis: dict[str, Any] | None = None


def _json(path: Path) -> Any:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise BundleError(f"{str(path)!r} is larger than {MAX_JSON_BYTES} bytes")
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{str(path)!r} cannot be read as JSON: {exc}") from None


def read_bundle(folder: str | os.PathLike[str]) -> Bundle:
    """Read a bundle folder (arrays without pickle); BundleError says what is wrong."""
    path = Path(folder)
    if not (path / MANIFEST).is_file():
        raise BundleError(f"{str(path)!r} is not a diagnosis bundle (no {MANIFEST})")
    manifest = _json(path / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise BundleError(f"{str(path / MANIFEST)!r} is not an mnn-guard diagnosis manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"bundle schema {manifest.get('schema_version')!r} is not supported")
    verdict = _json(path / VERDICT)
    if not isinstance(verdict, dict):
        raise BundleError(f"{str(path / VERDICT)!r} is not a JSON object")
    arrays: dict[str, dict[str, Array]] = {}
    for file in ARRAY_FILES:
        if not (path / file).is_file():
            continue
        try:
            with np.load(path / file, allow_pickle=False) as npz:
                arrays[file] = {key: npz[key] for key in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise BundleError(f"{str(path / file)!r} cannot be read: {exc}") from None
    diagnosis = _json(path / "diagnosis.json") if (path / "diagnosis.json").is_file() else None
    return Bundle(path, manifest, verdict, arrays, diagnosis)
