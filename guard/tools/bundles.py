"""Reading diagnosis bundles back: what `mnn-guard report` and `diagnose --bundle` start from.

A serving process writes bundles (`guard.diagnosis`) and never reads them; the tools do.

>>> bundle = read_bundle("mnn-guard-diagnosis/20261127T101500.000000Z-...")  # doctest: +SKIP
>>> bundle.manifest["rung"]["name"], sorted(bundle.arrays)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard.bundle import KIND, MANIFEST, SCHEMA_VERSION, VERDICT
from guard.diagnosis import find_bundles
from guard.tools.errors import BundleError

__all__ = ["Bundle", "find_bundles", "read_bundle"]

ARRAY_FILES = ("inputs.npz", "golden.npz", "actual.npz")
DIAGNOSIS = "diagnosis.json"  # added by `mnn-guard diagnose --bundle`
MAX_JSON_BYTES = 16 << 20  # a bundle's JSON files larger than this are refused unread

Array = NDArray[Any]


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
    diagnosis = _json(path / DIAGNOSIS) if (path / DIAGNOSIS).is_file() else None
    return Bundle(path, manifest, verdict, arrays, diagnosis)
