"""Saving and loading probes: a folder with `manifest.json` and a checksummed `arrays.npz`."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from probes.errors import ProbeError
from probes.judges import Thresholds
from probes.probe import SCHEMA_VERSION, Case, Probe, ProbeMeta
from probes.signature import InputSpec, OutputSpec

__all__ = ["ARRAYS", "MANIFEST", "ProbeVersionWarning", "file_sha256", "load", "save"]

MANIFEST = "manifest.json"
ARRAYS = "arrays.npz"
KIND = "mnn-guard-probe"
_KEYS = {
    "kind",
    "schema_version",
    "model_sha256",
    "mnn_version",
    "recorded",
    "inputs",
    "outputs",
    "thresholds",
    "per_output",
    "cases",
    "arrays",
}
_RECORDED_KEYS = {"reference", "runs", "created", "notes"}
log = logging.getLogger("mnn_guard.probes")


class ProbeVersionWarning(UserWarning):
    """The probe was recorded with another MNN version; its goldens may no longer apply."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _key(case: int, side: str, name: str) -> str:
    return f"case{case}/{side}/{name}"


def save(probe: Probe, directory: str | os.PathLike[str]) -> None:
    """Write the probe to `directory`: arrays first, then the manifest that checksums them."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, NDArray[Any]] = {}
    cases = []
    for i, case in enumerate(probe.cases):
        entry: dict[str, dict[str, Any]] = {"inputs": {}, "outputs": {}}
        for side, values in (("inputs", case.inputs), ("outputs", case.outputs)):
            for name, arr in values.items():
                key = _key(i, side, name)
                arrays[key] = np.ascontiguousarray(arr)
                entry[side][name] = {"key": key, "dtype": str(arr.dtype), "shape": list(arr.shape)}
        cases.append(entry)
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    data = buffer.getvalue()
    meta = probe.meta
    manifest = {
        "kind": KIND,
        "schema_version": SCHEMA_VERSION,
        "model_sha256": meta.model_sha256,
        "mnn_version": meta.mnn_version,
        "recorded": {
            "reference": dict(meta.reference),
            "runs": meta.runs,
            "created": meta.created,
            "notes": list(meta.notes),
        },
        "inputs": [s.to_json() for s in probe.inputs],
        "outputs": [s.to_json() for s in probe.outputs],
        "thresholds": probe.thresholds.to_json(),
        "per_output": {k: v.to_json() for k, v in probe.per_output.items()},
        "cases": cases,
        "arrays": {"file": ARRAYS, "sha256": hashlib.sha256(data).hexdigest()},
    }
    (folder / ARRAYS).write_bytes(data)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _fail(folder: Path, what: str) -> ProbeError:
    return ProbeError(f"probe {str(folder)!r}: {what}; re-record it with `mnn-guard record`")


def _read_manifest(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise ProbeError(
            f"probe folder {str(folder)!r} does not exist (record one with `mnn-guard record`)"
        )
    path = folder / MANIFEST
    if not path.is_file():
        raise _fail(folder, f"{MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(folder, f"{MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise _fail(folder, f"{MANIFEST} must hold a JSON object")
    if manifest.get("kind") != KIND:
        raise _fail(
            folder, f"{MANIFEST} is not an mnn-guard probe manifest (kind {manifest.get('kind')!r})"
        )
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise _fail(
            folder,
            f"schema version {version!r} is not supported (this mnn-guard reads {SCHEMA_VERSION})",
        )
    missing, extra = sorted(_KEYS - set(manifest)), sorted(set(manifest) - _KEYS)
    if missing or extra:
        raise _fail(folder, f"{MANIFEST} has missing keys {missing} and unknown keys {extra}")
    return manifest


def _read_arrays(folder: Path, manifest: Mapping[str, Any]) -> dict[str, NDArray[Any]]:
    info = manifest["arrays"]
    if not isinstance(info, dict) or set(info) != {"file", "sha256"} or info["file"] != ARRAYS:
        raise _fail(folder, f"'arrays' must be {{'file': {ARRAYS!r}, 'sha256': ...}}, got {info!r}")
    path = folder / ARRAYS
    if not path.is_file():
        raise _fail(folder, f"{ARRAYS} is missing")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != info["sha256"]:
        raise _fail(
            folder,
            f"{ARRAYS} is corrupt or was changed: sha256 {actual[:12]}... differs from the "
            f"manifest's {str(info['sha256'])[:12]}...",
        )
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise _fail(folder, f"{ARRAYS} cannot be read ({type(exc).__name__}: {exc})") from None


def _case(folder: Path, i: int, raw: Any, arrays: Mapping[str, NDArray[Any]]) -> Case:
    if not isinstance(raw, dict) or set(raw) != {"inputs", "outputs"}:
        raise _fail(folder, f"case {i} must have exactly 'inputs' and 'outputs'")
    sides: dict[str, dict[str, NDArray[Any]]] = {}
    for side in ("inputs", "outputs"):
        entries = raw[side]
        if not isinstance(entries, dict):
            raise _fail(folder, f"case {i} {side} must be an object")
        sides[side] = {}
        for name, ref in entries.items():
            if not isinstance(ref, dict) or set(ref) != {"key", "dtype", "shape"}:
                raise _fail(folder, f"case {i} {side} {name!r} needs exactly key, dtype, shape")
            arr = arrays.get(ref["key"]) if isinstance(ref["key"], str) else None
            if arr is None:
                raise _fail(
                    folder, f"case {i} {side} {name!r}: array {ref['key']!r} is not in {ARRAYS}"
                )
            if str(arr.dtype) != ref["dtype"] or list(arr.shape) != ref["shape"]:
                raise _fail(
                    folder,
                    f"case {i} {side} {name!r}: the array is {arr.dtype}{list(arr.shape)} but the "
                    f"manifest says {ref['dtype']}{ref['shape']}",
                )
            if not np.issubdtype(arr.dtype, np.number):
                raise _fail(folder, f"case {i} {side} {name!r}: dtype {arr.dtype} is not numeric")
            sides[side][name] = arr
    return Case(inputs=sides["inputs"], outputs=sides["outputs"])


def _meta(folder: Path, manifest: Mapping[str, Any]) -> ProbeMeta:
    rec = manifest["recorded"]
    if not isinstance(rec, dict) or set(rec) != _RECORDED_KEYS:
        raise _fail(folder, f"'recorded' needs exactly the keys {sorted(_RECORDED_KEYS)}")
    sha, mnn = manifest["model_sha256"], manifest["mnn_version"]
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
        raise _fail(folder, f"model_sha256 must be 64 hex digits or null, got {sha!r}")
    if mnn is not None and not isinstance(mnn, str):
        raise _fail(folder, f"mnn_version must be a string or null, got {mnn!r}")
    if not isinstance(rec["reference"], dict) or not isinstance(rec["notes"], list):
        raise _fail(folder, "'recorded.reference' must be an object and 'recorded.notes' a list")
    return ProbeMeta(
        model_sha256=sha,
        mnn_version=mnn,
        reference=rec["reference"],
        runs=int(rec["runs"]) if isinstance(rec["runs"], int) else 0,
        created=str(rec["created"]),
        notes=tuple(str(n) for n in rec["notes"]),
    )


def load(
    directory: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    mnn_version: str | None = None,
    strict_version: bool = False,
) -> Probe:
    """Load and validate a probe; raise ProbeError saying what is wrong.

    With `model`, refuse a probe recorded for other model bytes (sha256 differs). A probe
    recorded with another MNN version warns (ProbeVersionWarning), or is refused when
    `strict_version` is set.
    """
    folder = Path(directory)
    manifest = _read_manifest(folder)
    arrays = _read_arrays(folder, manifest)
    try:
        inputs = tuple(InputSpec.from_json(r) for r in _list(folder, manifest, "inputs"))
        outputs = tuple(OutputSpec.from_json(r) for r in _list(folder, manifest, "outputs"))
        thresholds = Thresholds.from_json(manifest["thresholds"])
        per = manifest["per_output"]
        if not isinstance(per, dict):
            raise _fail(folder, "'per_output' must be an object")
        per_output = {str(k): Thresholds.from_json(v) for k, v in per.items()}
        cases = tuple(
            _case(folder, i, raw, arrays) for i, raw in enumerate(_list(folder, manifest, "cases"))
        )
        used = {
            ref["key"]
            for raw in manifest["cases"]
            for side in raw.values()
            for ref in side.values()
        }
        if set(arrays) != used:
            raise _fail(
                folder,
                f"{ARRAYS} holds arrays the manifest does not name: {sorted(set(arrays) - used)}",
            )
        probe = Probe(
            cases=cases,
            inputs=inputs,
            outputs=outputs,
            thresholds=thresholds,
            per_output=per_output,
            meta=_meta(folder, manifest),
        )
    except ProbeError as exc:
        if str(exc).startswith(f"probe {str(folder)!r}"):
            raise
        raise _fail(folder, str(exc)) from None
    check_model(probe, model)
    check_mnn_version(probe, mnn_version, strict=strict_version)
    return probe


def _list(folder: Path, manifest: Mapping[str, Any], key: str) -> list[Any]:
    value = manifest[key]
    if not isinstance(value, list) or not value:
        raise _fail(folder, f"'{key}' must be a non-empty list")
    return value


def check_model(probe: Probe, model: str | os.PathLike[str] | None) -> None:
    """Refuse a probe recorded for a different model file (by sha256)."""
    if model is None or probe.meta.model_sha256 is None:
        return
    if not os.path.isfile(model):
        raise ProbeError(
            f"cannot check the probe against model {os.fspath(model)!r}: no such file; "
            "pass the path of the .mnn file the session loads"
        )
    actual = file_sha256(model)
    if actual != probe.meta.model_sha256:
        recorded = probe.meta.model_sha256[:12]
        raise ProbeError(
            f"stale probe: it was recorded for a model with sha256 {recorded}..., but "
            f"{os.fspath(model)!r} has sha256 {actual[:12]}...; re-record the probe for this model"
        )


def check_mnn_version(probe: Probe, version: str | None, *, strict: bool = False) -> None:
    """Warn (or refuse, when strict) if the probe was recorded with another MNN version."""
    if version is None or probe.meta.mnn_version is None or version == probe.meta.mnn_version:
        return
    message = (
        f"probe recorded with MNN {probe.meta.mnn_version}, running MNN {version}; "
        "re-record the probe if the canary fails"
    )
    if strict:
        raise ProbeError(message)
    log.warning(message)
    warnings.warn(message, ProbeVersionWarning, stacklevel=3)
