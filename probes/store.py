"""Probe folders on disk: `manifest.json` and a checksummed `arrays.npz`, read within bounds.

Reading is bounded and total. The manifest is parsed strictly (no NaN, no huge integers, no
repeated keys); `arrays.npz` is checked against the sizes, dtypes and shapes the manifest
declares, in the zip directory and then in every .npy header, before any array data is
decompressed; every failure is a ProbeError saying what is wrong. This module knows the file
format, not the Probe class (probes/probe.py maps one onto the other).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import logging
import math
import os
import stat
import struct
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
from numpy.typing import NDArray

from probes.errors import ProbeError, brief
from probes.signature import NUMERIC_DTYPES

__all__ = [
    "ARRAYS",
    "MANIFEST",
    "MAX_ARRAY_BYTES",
    "MAX_MANIFEST_BYTES",
    "ProbeVersionWarning",
    "check_mnn_version",
    "check_model",
    "file_sha256",
    "installed_mnn_version",
    "read_arrays",
    "read_manifest",
    "write",
]

MANIFEST = "manifest.json"
ARRAYS = "arrays.npz"
MAX_MANIFEST_BYTES = 4 << 20
"""A manifest larger than this is refused unread (a probe's is a few kB)."""
MAX_ARRAY_BYTES = 1 << 30
"""The most array data a manifest may declare in total (canaries and goldens, not datasets)."""
MAX_JSON_DIGITS = 18
"""Integers in a manifest have at most this many digits (every field's range fits in them)."""
_MAX_NPY_HEADER = 4096  # numpy writes 128 bytes for these arrays; np.load allows 10,000
_ENTRY_OVERHEAD = 1024  # zip local header, central directory entry, data descriptor, zip64
_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,  # also UnicodeDecodeError
    RuntimeError,  # zipfile on encryption or an unknown method (both refused before by flag)
    struct.error,
    zlib.error,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
)
"""What zipfile and _npy_header raise on damaged bytes; each becomes a ProbeError."""

Array = NDArray[Any]
ArrayRefs = Mapping[str, tuple[np.dtype[Any], tuple[int, ...]]]
"""Array key -> (dtype, shape) as the manifest declares it."""
log = logging.getLogger("mnn_guard.probes")


class ProbeVersionWarning(UserWarning):
    """The probe was recorded with another MNN version; its goldens may no longer apply."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


_HASHED: dict[tuple[int, int, int, int, int], str] = {}
_HASHED_MAX = 64


def forget_hashes() -> None:
    """Empty `cached_sha256`'s cache (as in a fresh process)."""
    _HASHED.clear()


def cached_sha256(path: str | os.PathLike[str]) -> str:
    """`file_sha256`, read once while the file is unchanged (the same device, inode, size,
    mtime and ctime: a file replaced by `cp -p` or `rsync -a` keeps its mtime, not its inode
    or ctime). Every guarded start checks the model's hash; a 100 MB model takes 60 ms to
    read."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    found = _HASHED.get(key)
    if found is None:
        found = file_sha256(path)
        if len(_HASHED) >= _HASHED_MAX:
            _HASHED.clear()
        _HASHED[key] = found
    return found


def installed_mnn_version() -> str | None:
    """The installed PyMNN version (as MNN.version() says), read without importing MNN."""
    import importlib.metadata  # ~15 ms, only for strict_version

    try:
        return importlib.metadata.version("MNN")
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------- writing


def write(
    directory: str | os.PathLike[str], manifest: dict[str, Any], arrays: Mapping[str, Array]
) -> None:
    """Write `arrays.npz`, then `manifest.json` with its sha256 under "arrays"."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    # C order without np.ascontiguousarray, which makes 0-d arrays 1-d
    np.savez(buffer, allow_pickle=False, **{k: np.asarray(a, order="C") for k, a in arrays.items()})
    data = buffer.getvalue()
    manifest = {**manifest, "arrays": {"file": ARRAYS, "sha256": hashlib.sha256(data).hexdigest()}}
    (folder / ARRAYS).write_bytes(data)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- reading


def _open_regular(path: Path, limit: int) -> io.BufferedReader:
    """Open a regular file of at most `limit` bytes (never a FIFO, device or folder)."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ProbeError(f"{path.name} is not a regular file")
        if info.st_size > limit:
            raise ProbeError(
                f"{path.name} is {info.st_size} bytes, more than the {limit} bytes that the "
                "manifest's arrays, their headers and 1 MiB of slack can take"
                if path.name == ARRAYS
                else f"{path.name} is {info.st_size} bytes, more than the limit of {limit}"
            )
        return open(path, "rb")  # the caller closes it
    except FileNotFoundError:
        raise ProbeError(f"{path.name} is missing") from None
    except OSError as exc:
        raise ProbeError(f"{path.name} cannot be read ({type(exc).__name__}: {exc})") from None


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_DIGITS:
        raise ProbeError(
            f"{MANIFEST} holds an integer of {len(text)} digits (at most {MAX_JSON_DIGITS})"
        )
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProbeError(f"{MANIFEST} holds {brief(text)}, which is not a finite float")
    return value


def _json_constant(text: str) -> Any:
    raise ProbeError(f"{MANIFEST} holds {text}, which is not a finite number")


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        twice = sorted(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise ProbeError(f"{MANIFEST} repeats the key(s) {brief(twice)} in one object")
    return obj


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest as a JSON object: bounded size, UTF-8, finite numbers, no repeated keys."""
    with _open_regular(folder / MANIFEST, MAX_MANIFEST_BYTES) as fh:
        try:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            raise ProbeError(f"{MANIFEST} cannot be read ({type(exc).__name__}: {exc})") from None
    if len(data) > MAX_MANIFEST_BYTES:  # it grew since it was measured
        raise ProbeError(f"{MANIFEST} is more than the limit of {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(
            data.decode("utf-8"),
            parse_int=_json_int,
            parse_float=_json_float,
            parse_constant=_json_constant,
            object_pairs_hook=_json_object,
        )
    except RecursionError:
        raise ProbeError(f"{MANIFEST} is nested too deeply to be a probe manifest") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProbeError(f"{MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ProbeError(f"{MANIFEST} must hold a JSON object, got {type(manifest).__name__}")
    return manifest


def _sha256_of(raw: Any) -> str:
    """The arrays entry of a manifest: {"file": "arrays.npz", "sha256": 64 hex digits}."""
    sha = raw.get("sha256") if isinstance(raw, dict) else None
    if (
        not isinstance(raw, dict)
        or set(raw) != {"file", "sha256"}
        or raw["file"] != ARRAYS
        or not is_sha256(sha)
    ):
        raise ProbeError(
            f"'arrays' must be {{'file': {ARRAYS!r}, 'sha256': 64 hex digits}}, got {brief(raw)}"
        )
    return str(sha)


def is_sha256(value: Any) -> bool:
    """True for 64 lowercase hex digits."""
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


def _exactly(member: IO[bytes], n: int) -> bytes:
    data = member.read(n)
    if len(data) != n:
        raise EOFError(f"the member ends after {len(data)} of {n} header bytes")
    return data


def _npy_header(member: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """(shape, fortran_order, dtype) from a .npy header, parsed here rather than by numpy so
    that untrusted bytes meet a short, known set of exceptions."""
    magic = _exactly(member, 8)
    if magic[:6] != b"\x93NUMPY":
        raise ValueError(f"the member does not start with the .npy magic (got {magic[:6]!r})")
    if magic[6:] not in (b"\x01\x00", b"\x02\x00"):
        raise ValueError(f".npy format version {tuple(magic[6:])} is not read (1.0 and 2.0 are)")
    (length,) = struct.unpack("<H" if magic[6] == 1 else "<I", _exactly(member, magic[6] * 2))
    if length > _MAX_NPY_HEADER:
        raise ValueError(f"the .npy header is {length} bytes, more than {_MAX_NPY_HEADER}")
    try:
        header = ast.literal_eval(_exactly(member, length).decode("latin1"))
    except (SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise ValueError(f"the .npy header is not a Python literal ({exc})") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise ValueError(
            f"the .npy header is not a descr/fortran_order/shape dict: {brief(header)}"
        )
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    dtype = _DESCRS.get(descr) if isinstance(descr, str) else None
    if (
        dtype is None
        or not isinstance(fortran, bool)
        or not isinstance(shape, tuple)
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise ValueError(f"the .npy header is not one of a numeric array: {brief(header)}")
    return shape, fortran, dtype


_DESCRS = {
    dtype.str: dtype
    for name in NUMERIC_DTYPES
    for dtype in (np.dtype(name).newbyteorder("<"), np.dtype(name).newbyteorder(">"))
}
"""The .npy descrs of numeric dtypes in either byte order (a wrong order is named, then refused)."""


def _check_directory(infos: list[zipfile.ZipInfo], refs: ArrayRefs) -> dict[str, int]:
    """Member name -> data bytes, after every check the zip directory alone allows."""
    names = [info.filename for info in infos]
    twice = sorted(n for n, count in Counter(names).items() if count > 1)
    if twice:
        raise ProbeError(f"{ARRAYS} holds members more than once: {twice}")
    wanted = {f"{key}.npy": key for key in refs}
    unknown = sorted(n.removesuffix(".npy") for n in set(names) - set(wanted))
    if unknown:
        raise ProbeError(f"{ARRAYS} holds arrays the manifest does not name: {unknown}")
    missing = sorted(key for member, key in wanted.items() if member not in names)
    if missing:
        raise ProbeError(f"array {missing[0]!r} is not in {ARRAYS}")
    sizes: dict[str, int] = {}
    for info in infos:
        dtype, shape = refs[wanted[info.filename]]
        nbytes = math.prod(shape) * dtype.itemsize
        where = f"{ARRAYS} member {info.filename!r}"
        if info.flag_bits & 0x1:
            raise ProbeError(f"{where} is encrypted; probes are never encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ProbeError(
                f"{where} uses compression method {info.compress_type}; only stored (0) and "
                "deflated (8) members are read"
            )
        if not nbytes < info.file_size <= nbytes + _MAX_NPY_HEADER + 12:
            raise ProbeError(
                f"{where} declares {info.file_size} bytes, but the manifest's "
                f"{dtype}{list(shape)} takes {nbytes} bytes plus a header of at most "
                f"{_MAX_NPY_HEADER}"
            )
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise ProbeError(f"{where} is stored, but its stored and declared sizes differ")
        sizes[info.filename] = nbytes
    return sizes


def read_arrays(folder: Path, entry: Any, refs: ArrayRefs) -> dict[str, Array]:
    """The arrays the manifest declares (`refs`), each checked before it is decompressed.

    In order: the declared total against MAX_ARRAY_BYTES, the file's size against a bound
    derived from `refs`, the sha256 the manifest's `entry` records, the zip directory (names,
    compression, encryption, sizes), every .npy header (dtype, shape, size), then the data.
    """
    sha256 = _sha256_of(entry)
    declared = sum(math.prod(shape) * dtype.itemsize for dtype, shape in refs.values())
    if declared > MAX_ARRAY_BYTES:
        raise ProbeError(
            f"the manifest declares {declared} bytes of arrays, more than the limit of "
            f"{MAX_ARRAY_BYTES} (probes.store.MAX_ARRAY_BYTES)"
        )
    # headers and zip records, plus slack so that a small mismatch gets the precise message
    bound = declared + sum(2 * len(k) + _ENTRY_OVERHEAD + _MAX_NPY_HEADER for k in refs) + (1 << 20)
    with _open_regular(folder / ARRAYS, bound) as fh:
        try:
            actual = hashlib.file_digest(fh, "sha256").hexdigest()
        except OSError as exc:
            raise ProbeError(f"{ARRAYS} cannot be read ({type(exc).__name__}: {exc})") from None
        if actual != sha256:
            raise ProbeError(
                f"{ARRAYS} is corrupt or was changed: sha256 {actual[:12]}... differs from the "
                f"manifest's {sha256[:12]}..."
            )
        what = f"{ARRAYS} cannot be read"
        try:
            with zipfile.ZipFile(fh) as zf:
                sizes = _check_directory(zf.infolist(), refs)
                layout: dict[str, bool] = {}
                for name in sizes:
                    what = f"{ARRAYS} member {name!r}: its .npy header cannot be read"
                    with zf.open(name) as member:
                        shape, fortran, dtype = _npy_header(member)
                    want_dtype, want_shape = refs[name.removesuffix(".npy")]
                    if dtype != want_dtype or tuple(shape) != want_shape:
                        raise ProbeError(
                            f"{ARRAYS} member {name!r} holds {dtype}{list(shape)} but the "
                            f"manifest says {want_dtype}{list(want_shape)}"
                        )
                    layout[name] = bool(fortran)
                arrays: dict[str, Array] = {}
                for name, nbytes in sizes.items():
                    what = f"{ARRAYS} member {name!r}: its data cannot be read"
                    dtype, shape = refs[name.removesuffix(".npy")]
                    arrays[name.removesuffix(".npy")] = _read(
                        zf, name, nbytes, layout[name], dtype, shape
                    )
                return arrays
        except ProbeError:
            raise
        except _READ_ERRORS as exc:
            raise ProbeError(f"{what} ({type(exc).__name__}: {str(exc)[:200]})") from None


def _read(
    zf: zipfile.ZipFile,
    name: str,
    nbytes: int,
    fortran: bool,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
) -> Array:
    """The member's data after its header: exactly `nbytes`, CRC-checked, read in 1 MiB steps."""
    buffer = bytearray(nbytes)
    view = memoryview(buffer)
    with zf.open(name) as member:
        _npy_header(member)
        done = 0
        while done < nbytes:
            chunk = member.read(min(1 << 20, nbytes - done))
            if not chunk:
                raise EOFError(f"the data ends after {done} of {nbytes} bytes")
            view[done : done + len(chunk)] = chunk
            done += len(chunk)
        if member.read(1):  # at the end, zipfile checks the CRC
            raise ValueError(f"the data is longer than {nbytes} bytes")
    return np.frombuffer(buffer, dtype).reshape(shape, order="F" if fortran else "C")


# ---------------------------------------------------------------- staleness


class _Meta(Protocol):
    @property
    def model_sha256(self) -> str | None: ...

    @property
    def mnn_version(self) -> str | None: ...


class _Recorded(Protocol):
    """What the staleness checks read from a probes.Probe."""

    @property
    def meta(self) -> _Meta: ...


def check_model(probe: _Recorded, model: str | os.PathLike[str] | None) -> None:
    """Refuse a probe recorded for a different model file (by sha256)."""
    if model is None or probe.meta.model_sha256 is None:
        return
    if not os.path.isfile(model):
        raise ProbeError(
            f"cannot check the probe against model {os.fspath(model)!r}: no such file; "
            "pass the path of the .mnn file the session loads"
        )
    actual = cached_sha256(model)
    if actual != probe.meta.model_sha256:
        recorded = probe.meta.model_sha256[:12]
        raise ProbeError(
            f"stale probe: it was recorded for a model with sha256 {recorded}..., but "
            f"{os.fspath(model)!r} has sha256 {actual[:12]}...; re-record the probe for this model"
        )


def check_mnn_version(probe: _Recorded, version: str | None, *, strict: bool = False) -> None:
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
