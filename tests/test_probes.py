"""Probes on disk and recording: round trip, and every broken or stale probe raises ProbeError."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from signals import scaled_noise

import guard
import probes
from guard import mnn
from guard.testing import Fault, FaultyFactory
from guard.tools import demo
from probes import probe as probe_module
from probes import signature, store
from probes.calibration import OutputCalibration
from probes.errors import brief
from probes.store import ARRAYS, MANIFEST

pytestmark = pytest.mark.hostile
Array = np.ndarray[Any, Any]
Manifest = dict[str, Any]
SCHEMA1 = Path(__file__).parent / "data" / "probe_schema1"  # a probe recorded with schema 1


def copy_probe(src: Path, dst: Path) -> Path:
    """A private copy of a probe folder to damage."""
    shutil.copytree(src, dst)
    return dst


def rewrite_manifest(folder: Path, change: Callable[[Manifest], None]) -> None:
    """Edit manifest.json in place."""
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def rewrite_arrays(
    folder: Path, arrays: dict[str, Any], *, fix_checksum: bool = True, allow_pickle: bool = False
) -> None:
    """Replace arrays.npz and (optionally) update the manifest's checksum to match."""
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=allow_pickle, **arrays)
    (folder / ARRAYS).write_bytes(buffer.getvalue())
    if fix_checksum:
        digest = hashlib.sha256(buffer.getvalue()).hexdigest()
        rewrite_manifest(folder, lambda m: m["arrays"].__setitem__("sha256", digest))


def loaded_arrays(folder: Path) -> dict[str, Any]:
    """The arrays of a probe folder."""
    with np.load(folder / ARRAYS) as npz:
        return {k: npz[k] for k in npz.files}


def test_round_trip(demo_probe: probes.Probe, tmp_path: Path) -> None:
    """save then load gives the same cases, signature, thresholds (default and per output) and
    metadata."""
    probe = demo_probe.with_thresholds(
        probes.Thresholds(min_snr_db=50.0), wav=probes.Thresholds(min_snr_db=40.0, max_lsd_db=None)
    )
    probe.save(tmp_path / "p")
    back = probes.load(tmp_path / "p")
    assert back.inputs == probe.inputs and back.outputs == probe.outputs
    assert back.thresholds == probe.thresholds and dict(back.per_output) == dict(probe.per_output)
    assert back.meta == probe.meta and back.meta.schema_version == probe_module.SCHEMA_VERSION
    assert len(back.cases) == len(probe.cases) == 2
    for a, b in zip(back.cases, probe.cases, strict=True):
        for side in ("inputs", "outputs"):
            for name in getattr(a, side):
                assert np.array_equal(getattr(a, side)[name], getattr(b, side)[name])
    assert set(p.name for p in (tmp_path / "p").iterdir()) == {MANIFEST, ARRAYS}


def _drop(key: str) -> Callable[[Manifest], None]:
    return lambda m: m.pop(key)


def _set(key: str, value: Any) -> Callable[[Manifest], None]:
    return lambda m: m.__setitem__(key, value)


MANIFEST_DAMAGE: list[tuple[str, Callable[[Manifest], None], str]] = [
    ("wrong schema version", _set("schema_version", 99), "schema version 99 is not supported"),
    ("missing key", _drop("limits"), "missing keys ['limits']"),
    ("extra key", _set("colour", "red"), "unknown keys ['colour']"),
    (
        "not a probe",
        _set("kind", "something-else"),
        "manifest.json is not an mnn-guard probe manifest (kind 'something-else')",
    ),
    (
        "shape contradicts array",
        lambda m: m["cases"][0]["inputs"]["mel"].__setitem__("shape", [1, 80, 7]),
        "'case0/inputs/mel.npy' declares 32128 bytes, but the manifest's float32[1, 80, 7] "
        "takes 2240 bytes",
    ),
    (
        "dtype contradicts array",
        lambda m: m["cases"][0]["outputs"]["wav"].__setitem__("dtype", "float64"),
        "the manifest's float64[1, 1, 25600] takes 204800 bytes",
    ),
    (
        "unknown array key",
        lambda m: m["cases"][0]["inputs"]["mel"].__setitem__("key", "nope"),
        "case 0 inputs 'mel': key must be 'case0/inputs/mel', got 'nope'",
    ),
    (
        "bad threshold",
        lambda m: m["limits"].__setitem__("snr_db", "high"),
        "the limit of judge 'snr_db' must be a finite number, got 'high'",
    ),
    (
        "unknown judge",
        lambda m: m["limits"].__setitem__("top5", 1.0),
        "no judge named 'top5' is registered in this process",
    ),
    (
        "bad dimension",
        lambda m: m["inputs"][0].__setitem__("shape", [1, 80, [9, 2]]),
        "bad range 9..2",
    ),
    (
        "input name mismatch",
        lambda m: m["inputs"][0].__setitem__("name", "spec"),
        "differ from the signature",
    ),
    (
        "bad sha",
        _set("model_sha256", "abc"),
        "model_sha256 must be 64 hex digits or null, got 'abc'",
    ),
    ("no cases", _set("cases", []), "'cases' must be a non-empty list"),
    (
        "checksum changed",
        lambda m: m["arrays"].__setitem__("sha256", "0" * 64),
        "corrupt or was changed",
    ),
    ("empty manifest", lambda m: m.clear(), "not an mnn-guard probe manifest"),
]


@pytest.mark.parametrize(
    ("change", "message"),
    [(c, m) for _, c, m in MANIFEST_DAMAGE],
    ids=[n for n, _, _ in MANIFEST_DAMAGE],
)
def test_damaged_manifest(
    demo_paths: tuple[Path, Path], tmp_path: Path, change: Callable[[Manifest], None], message: str
) -> None:
    """Each kind of manifest damage raises ProbeError that says what and to re-record."""
    folder = copy_probe(demo_paths[1], tmp_path / "p")
    rewrite_manifest(folder, change)
    with pytest.raises(probes.ProbeError) as info:
        probes.load(folder)
    assert message in str(info.value)


def test_missing_folder(tmp_path: Path) -> None:
    """A folder that does not exist is named, with how to record one."""
    said = f"probe folder {str(tmp_path / 'nowhere')!r} does not exist (record one with "
    with pytest.raises(probes.ProbeError, match=re.escape(f"{said}`mnn-guard record`)")):
        probes.load(tmp_path / "nowhere")


@pytest.mark.parametrize("name", [MANIFEST, ARRAYS])
def test_missing_file(demo_paths: tuple[Path, Path], tmp_path: Path, name: str) -> None:
    """A missing manifest or array file is named."""
    folder = copy_probe(demo_paths[1], tmp_path / "p")
    (folder / name).unlink()
    with pytest.raises(probes.ProbeError, match=f"{name} is missing"):
        probes.load(folder)


def test_manifest_not_json(demo_paths: tuple[Path, Path], tmp_path: Path) -> None:
    """A manifest that is not JSON is refused."""
    folder = copy_probe(demo_paths[1], tmp_path / "p")
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(probes.ProbeError, match="not valid JSON"):
        probes.load(folder)


def test_truncated_arrays(demo_paths: tuple[Path, Path], tmp_path: Path) -> None:
    """Truncated arrays fail the manifest's sha256 before anything is judged against them."""
    folder = copy_probe(demo_paths[1], tmp_path / "p")
    data = (folder / ARRAYS).read_bytes()
    (folder / ARRAYS).write_bytes(data[: len(data) // 2])
    with pytest.raises(probes.ProbeError, match="corrupt or was changed"):
        probes.load(folder)


def test_truncated_arrays_with_matching_checksum(
    demo_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    """Even with a checksum that matches, an unreadable .npz is a ProbeError."""
    folder = copy_probe(demo_paths[1], tmp_path / "p")
    data = (folder / ARRAYS).read_bytes()[:200]
    (folder / ARRAYS).write_bytes(data)
    rewrite_manifest(
        folder, lambda m: m["arrays"].__setitem__("sha256", hashlib.sha256(data).hexdigest())
    )
    with pytest.raises(probes.ProbeError, match="cannot be read"):
        probes.load(folder)


def test_pickled_object_arrays_are_refused(demo_paths: tuple[Path, Path], tmp_path: Path) -> None:
    """Arrays pickled as objects are never unpickled (allow_pickle stays False)."""
    folder = copy_probe(demo_paths[1], tmp_path / "p")
    arrays: dict[str, Any] = loaded_arrays(folder)
    arrays["case0/inputs/mel"] = np.array([{"evil": 1}], dtype=object)
    rewrite_arrays(folder, arrays, allow_pickle=True)
    with pytest.raises(probes.ProbeError, match=r"'case0/inputs/mel\.npy' declares \d+ bytes"):
        probes.load(folder)


def test_object_arrays_are_never_written_pickled(tmp_path: Path) -> None:
    """store.write refuses an object array (numpy would pickle it) and writes no file."""
    with pytest.raises(ValueError, match="allow_pickle=False"):
        store.write(tmp_path / "p", {}, {"x": np.array([{"evil": 1}], dtype=object)})
    assert list((tmp_path / "p").iterdir()) == []


def test_nan_golden_is_refused(demo_paths: tuple[Path, Path], tmp_path: Path) -> None:
    """A golden output with NaN is refused, even with a matching checksum."""
    folder = copy_probe(demo_paths[1], tmp_path / "p")
    arrays = loaded_arrays(folder)
    arrays["case0/outputs/wav"][0, 0, 5] = np.nan
    rewrite_arrays(folder, arrays)
    with pytest.raises(probes.ProbeError, match="golden output 'wav' holds NaN or Inf"):
        probes.load(folder)


def test_extra_array_is_refused(demo_paths: tuple[Path, Path], tmp_path: Path) -> None:
    """An array the manifest does not name is refused."""
    folder = copy_probe(demo_paths[1], tmp_path / "p")
    arrays = loaded_arrays(folder)
    arrays["smuggled"] = np.zeros(3)
    rewrite_arrays(folder, arrays)
    with pytest.raises(probes.ProbeError, match="does not name"):
        probes.load(folder)


def test_stale_probe_for_another_model(demo_paths: tuple[Path, Path], tmp_path: Path) -> None:
    """A probe recorded for other model bytes is refused by load(model=) and by guard.wrap."""
    other = tmp_path / "other.mnn"
    demo.build_vocoder(other, seed=5)
    with pytest.raises(probes.ProbeError, match="stale probe"):
        probes.load(demo_paths[1], model=other)
    probe = probes.load(demo_paths[1])
    with pytest.raises(probes.ProbeError, match="re-record the probe"):
        guard.wrap(guard.mnn_factory(other, ["mel"], ["wav"]), probe, name="stale", metrics=False)


def test_model_file_missing_when_checking(demo_paths: tuple[Path, Path], tmp_path: Path) -> None:
    """Checking a probe against a model path that does not exist names the path."""
    missing = tmp_path / "gone.mnn"
    with pytest.raises(probes.ProbeError, match=r"gone\.mnn.*no such file"):
        probes.load(demo_paths[1], model=missing)


def test_signature_mismatch_with_model(demo_paths: tuple[Path, Path]) -> None:
    """A probe whose input names differ from the factory's is refused (a factory built by hand:
    guard.mnn_factory itself refuses names the model lacks)."""
    probe = probes.load(demo_paths[1])
    factory = dataclasses.replace(
        guard.mnn_factory(demo_paths[0], ["mel"], ["wav"]), inputs=("spectrogram",)
    )
    with pytest.raises(
        probes.ProbeError, match=r"inputs \['mel'\] do not match the model's \['spectrogram'\]"
    ):
        guard.wrap(factory, probe, name="sig", metrics=False)


def test_other_mnn_version_warns_or_refuses(demo_paths: tuple[Path, Path], tmp_path: Path) -> None:
    """A probe from another MNN version warns by default and is refused with strict_version;
    without mnn_version, or with the recorded one, it loads quietly."""
    folder = copy_probe(demo_paths[1], tmp_path / "p")
    rewrite_manifest(folder, _set("mnn_version", "2.9.0"))
    with pytest.warns(probes.ProbeVersionWarning, match=r"recorded with MNN 2\.9\.0"):
        probes.load(folder, mnn_version="3.6.1")
    with pytest.raises(probes.ProbeError, match=r"recorded with MNN 2\.9\.0"):
        probes.load(folder, mnn_version="3.6.1", strict_version=True)
    with warnings.catch_warnings():  # the installed MNN is asked only for strict_version alone
        warnings.simplefilter("error")
        probes.load(folder)
        probes.load(folder, mnn_version="2.9.0", strict_version=True)


# ---------------------------------------------------------------- recording


def test_record_refuses_nan_goldens(demo_factory: guard.mnn.MNNFactory) -> None:
    """A reference that produces NaN is refused."""
    faulty = FaultyFactory(demo_factory, fault=Fault.NAN, rate=1.0, affects="all")
    with pytest.raises(probes.ProbeError, match="refusing to record non-finite goldens"):
        probes.record(faulty, {"mel": demo.demo_mel(10)})


def test_record_refuses_a_nondeterministic_reference(demo_factory: guard.mnn.MNNFactory) -> None:
    """A reference whose fresh inits disagree is refused."""
    faulty = FaultyFactory(demo_factory, fault=Fault.NOISE, rate=1.0, affects="all", seed=None)
    with pytest.raises(probes.ProbeError, match="does not agree with itself"):
        probes.record(faulty, {"mel": demo.demo_mel(10)})


def test_record_refuses_a_stale_reference(demo_factory: guard.mnn.MNNFactory) -> None:
    """A reference that returns the previous call's output disagrees with itself and is refused
    (the derived case, rolled along the declared dynamic axis, tells the calls apart)."""
    faulty = FaultyFactory(demo_factory, fault=Fault.STALE, rate=1.0, affects="all")
    with pytest.raises(probes.ProbeError, match="does not agree with itself"):
        probes.record(faulty, {"mel": demo.demo_mel(10)}, dynamic={"mel": {2: (1, 64)}})


@pytest.mark.parametrize(
    ("inputs", "kwargs", "message"),
    [
        ({"mel": np.full((1, 80, 10), np.nan, np.float32)}, {}, "800 NaN/Inf values"),
        ({"spec": demo.demo_mel(10)}, {}, "the model takes ['mel']"),
        ({"mel": demo.demo_mel(10).astype(np.complex64)}, {}, "dtype complex64 is not supported"),
        ({"mel": np.full((1, 80, 10), 2**40, np.int64)}, {}, "outside the int32 range"),
        ({"mel": np.zeros((1, 80, 0), np.float32)}, {}, "the array is empty"),
        ({"mel": demo.demo_mel(10)}, {"runs": 1}, "runs must be at least 2"),
        (
            {"mel": demo.demo_mel(10)},
            {"dynamic": {"mel": {2: (20, 30)}}},
            "outside the declared range",
        ),
        (
            {"mel": demo.demo_mel(10)},
            {"dynamic": {"pitch": {0: (1, 2)}}},
            "unknown inputs ['pitch']",
        ),
        ([], {}, "non-empty list"),
    ],
    ids=[
        "nan input",
        "wrong name",
        "dtype",
        "int64 too large",
        "empty array",
        "runs",
        "range",
        "unknown dynamic",
        "empty",
    ],
)
def test_record_rejects_bad_arguments(
    demo_factory: guard.mnn.MNNFactory, inputs: Any, kwargs: dict[str, Any], message: str
) -> None:
    """Bad canaries or options are refused before anything is recorded."""
    with pytest.raises(probes.ProbeError) as info:
        probes.record(demo_factory, inputs, **kwargs)
    assert message in str(info.value)


def test_record_derives_a_second_case(demo_factory: guard.mnn.MNNFactory, tmp_path: Path) -> None:
    """A single canary gets a rolled second case with its own golden, and metadata is filled in."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe = probes.record(
            demo_factory, {"mel": demo.demo_mel(12)}, dynamic={"mel": {2: (1, 64)}}
        )
    assert len(probe.cases) == 2
    assert not np.array_equal(probe.cases[0].outputs["wav"], probe.cases[1].outputs["wav"])
    assert probe.meta.model_sha256 == store.file_sha256(demo_factory.path)
    assert probe.meta.reference == {"dynamic": True} and probe.meta.runs == 3
    assert probe.inputs[0].shape == (1, 80, (1, 64))
    assert probe.outputs[0].shape == (1, 1, 12 * demo.HOP)


def test_a_probes_folder_in_the_working_directory_does_not_shadow_the_package(
    demo_probe: probes.Probe, tmp_path: Path
) -> None:
    """docs/architecture.md's `probe.save("probes/vocoder")`, then Python started in that
    directory: `import probes` is still this package (the make install links files, not an
    import hook)."""
    demo_probe.save(tmp_path / "probes" / "vocoder")
    script = "import guard, probes; p = probes.load('probes/vocoder'); print(len(p.cases))"
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(len(demo_probe.cases))


# ---------------------------------------------------------------- hostile manifests


def raw_manifest(change: Callable[[Manifest], None], raw: str = "") -> Callable[[Path], None]:
    """Edit the manifest, then put `raw` JSON text where the edit left the string "@RAW@"."""

    def apply(folder: Path) -> None:
        manifest = json.loads((folder / MANIFEST).read_text())
        change(manifest)
        text = json.dumps(manifest)
        assert raw == "" or '"@RAW@"' in text
        (folder / MANIFEST).write_text(text.replace('"@RAW@"', raw))

    return apply


def _threshold(value: Any) -> Callable[[Manifest], None]:
    return lambda m: m["limits"].__setitem__("snr_db", value)


def _runs(value: Any) -> Callable[[Manifest], None]:
    return lambda m: m["recorded"].__setitem__("runs", value)


def _input_dim(value: Any) -> Callable[[Manifest], None]:
    return lambda m: m["inputs"][0]["shape"].__setitem__(2, value)


def _mel_ref(key: str, value: Any) -> Callable[[Manifest], None]:
    return lambda m: m["cases"][0]["inputs"]["mel"].__setitem__(key, value)


def _huge_wav(m: Manifest) -> None:
    for case in m["cases"]:
        case["outputs"]["wav"]["shape"] = [1, 1, 300_000_000]


HOSTILE_MANIFESTS: list[tuple[str, Callable[[Path], None], str]] = [
    (
        "schema_version true",
        raw_manifest(_set("schema_version", True)),
        "schema version True is not supported (this mnn-guard reads the integers 1, 2)",
    ),
    (
        "boolean threshold",
        raw_manifest(_threshold(True)),
        "the limit of judge 'snr_db' must be a finite number, got True",
    ),
    (
        "threshold 1e400 written as an integer",
        raw_manifest(_threshold("@RAW@"), "1" + "0" * 400),
        "holds an integer of 401 digits (at most 18)",
    ),
    (
        "threshold 1e400 as a float",
        raw_manifest(_threshold("@RAW@"), "1e400"),
        "holds '1e400', which is not a finite float",
    ),
    (
        "NaN threshold",
        raw_manifest(_threshold("@RAW@"), "NaN"),
        "holds NaN, which is not a finite number",
    ),
    (
        "5000-digit integer",
        raw_manifest(_runs("@RAW@"), "9" * 5000),
        "holds an integer of 5000 digits",
    ),
    ("runs 10**100", raw_manifest(_runs(10**100)), "holds an integer of 101 digits"),
    (
        "runs 10**12",
        raw_manifest(_runs(10**12)),
        "'recorded.runs' must be an integer in 0..10000, got 1000000000000",
    ),
    ("runs true", raw_manifest(_runs(True)), "'recorded.runs' must be an integer in 0..10000"),
    ("dynamic range to 10**30", raw_manifest(_input_dim([1, 10**30])), "31 digits"),
    (
        "dynamic range to 2**40",
        raw_manifest(_input_dim([1, 2**40])),
        "bad range 1..1099511627776 (expected ints in 0..2147483647",
    ),
    ("boolean dimension", raw_manifest(_input_dim(True)), "bad dimension True"),
    (
        "deeply nested",
        raw_manifest(
            lambda m: m["recorded"].__setitem__("notes", "@RAW@"), "[" * 100_000 + "]" * 100_000
        ),
        "manifest.json is nested too deeply",
    ),
    (
        "dtype (-1,)f4",
        raw_manifest(lambda m: m["inputs"][0].__setitem__("dtype", "(-1,)f4")),
        "input 'mel': dtype must be one of",
    ),
    (
        "dtype (99999999999,)f4",
        raw_manifest(_mel_ref("dtype", "(99999999999,)f4")),
        "case 0 inputs 'mel': dtype must be one of",
    ),
    ("object dtype", raw_manifest(_mel_ref("dtype", "object")), "dtype must be one of"),
    (
        "repeated key",
        lambda f: (f / MANIFEST).write_text(
            (f / MANIFEST).read_text().replace('"kind": ', '"kind": "x", "kind": ', 1)
        ),
        "repeats the key(s) ['kind'] in one object",
    ),
    (
        "nested reference value",
        raw_manifest(lambda m: m["recorded"]["reference"].__setitem__("dynamic", {"a": [1]})),
        "'recorded.reference.dynamic' must be null, a bool, a number or a string of at most "
        "1000 characters, got {'a': [1]}",
    ),
    (
        "note not a string",
        raw_manifest(lambda m: m["recorded"].__setitem__("notes", [1])),
        "each of 'recorded.notes' must be a string of at most 1000 characters, got 1",
    ),
    (
        "5000-character version",
        raw_manifest(_set("mnn_version", "9" * 5000)),
        "mnn_version must be a string of at most 1000 characters or null",
    ),
    (
        "uppercase model hash",
        raw_manifest(lambda m: m.__setitem__("model_sha256", m["model_sha256"].upper())),
        "model_sha256 must be 64 hex digits or null",
    ),
    (
        "boolean per-output threshold",
        raw_manifest(
            _set(
                "per_output",
                {"wav": {"snr_db": 40.0, "cosine": False}},
            )
        ),
        "the limit of judge 'cosine' must be a finite number, got False",
    ),
    (
        "1.2 GB declared",
        raw_manifest(_huge_wav),
        "the manifest declares 2400064000 bytes of arrays, more than the limit of 1073741824",
    ),
    (
        "not UTF-8",
        lambda f: (f / MANIFEST).write_bytes(b'{"kind": "\xff"}'),
        "manifest.json is not valid JSON",
    ),
    (
        "larger than 4 MiB",
        lambda f: (f / MANIFEST).write_bytes(b" " * (4 << 20) + b"{}"),
        "manifest.json is 4194306 bytes, more than the limit of 4194304",
    ),
    (
        "a FIFO (never opened)",
        lambda f: ((f / MANIFEST).unlink(), os.mkfifo(f / MANIFEST)),
        "manifest.json is not a regular file",
    ),
    (
        "a symlink to an unreadable file",
        lambda f: ((f / MANIFEST).unlink(), (f / MANIFEST).symlink_to("/proc/self/mem")),
        "manifest.json cannot be read (OSError: [Errno 5] Input/output error)",
    ),
    (
        "a symlink loop",
        lambda f: ((f / MANIFEST).unlink(), (f / MANIFEST).symlink_to(f / MANIFEST)),
        "manifest.json cannot be read (OSError: [Errno 40] Too many levels of symbolic links",
    ),
]


# ---------------------------------------------------------------- hostile arrays.npz

Member = tuple[str, bytes, int]  # name, bytes, zipfile compression method


def npy(arr: Any, *, version: tuple[int, int] | None = None) -> bytes:
    """The .npy bytes of an array."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asanyarray(arr), version=version, allow_pickle=False)
    return buffer.getvalue()


def members_of(folder: Path) -> list[Member]:
    """The members of a probe's arrays.npz, in order."""
    with zipfile.ZipFile(folder / ARRAYS) as zf:
        return [(i.filename, zf.read(i), zipfile.ZIP_STORED) for i in zf.infolist()]


def write_members(folder: Path, members: list[Member]) -> None:
    """Write arrays.npz from raw members and update the manifest's checksum (as an attacker)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicate names are wanted here
        with zipfile.ZipFile(buffer, "w") as zf:
            for name, data, method in members:
                zf.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    write_npz_bytes(folder, buffer.getvalue())


def write_npz_bytes(folder: Path, data: bytes) -> None:
    """Replace arrays.npz with `data` and make the manifest's sha256 match it."""
    (folder / ARRAYS).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    rewrite_manifest(folder, lambda m: m["arrays"].__setitem__("sha256", digest))


def edit_member(
    name: str, change: Callable[[bytes], bytes], method: int = zipfile.ZIP_STORED
) -> Callable[[Path], None]:
    """A damage that rewrites one member's bytes (and its compression method)."""

    def apply(folder: Path) -> None:
        members = members_of(folder)
        write_members(
            folder,
            [(n, change(d) if n == name else d, method if n == name else m) for n, d, m in members],
        )

    return apply


def patch_entries(flags: int = 0, method: int | None = None) -> Callable[[Path], None]:
    """Set flag bits and/or the method number in every local and central zip header."""

    def apply(folder: Path) -> None:
        data = bytearray((folder / ARRAYS).read_bytes())
        with zipfile.ZipFile(folder / ARRAYS) as zf:
            infos, start = zf.infolist(), zf.start_dir  # type: ignore[attr-defined]
        heads = [(i.header_offset, 6) for i in infos]  # local header: flags at +6, method at +8
        pos = start
        for _ in infos:  # central entry: flags at +8, method at +10
            heads.append((pos, 8))
            n, m, k = struct.unpack("<HHH", data[pos + 28 : pos + 34])
            pos += 46 + n + m + k
        for offset, at in heads:
            old_flags, old_method = struct.unpack("<HH", data[offset + at : offset + at + 4])
            new = (old_flags | flags, old_method if method is None else method)
            data[offset + at : offset + at + 4] = struct.pack("<HH", *new)
        write_npz_bytes(folder, bytes(data))

    return apply


def deflate_all(folder: Path) -> None:
    """Store every member deflated (as np.savez_compressed does)."""
    write_members(folder, [(n, d, zipfile.ZIP_DEFLATED) for n, d, _ in members_of(folder)])


def corrupt_deflate(folder: Path) -> None:
    """Deflated members, with garbage in the middle of the first member's compressed stream."""
    deflate_all(folder)
    data = bytearray((folder / ARRAYS).read_bytes())
    with zipfile.ZipFile(folder / ARRAYS) as zf:
        first = zf.infolist()[0]
    start = first.header_offset + 30 + len(first.filename)
    data[start + 20 : start + 60] = b"\xff" * 40
    write_npz_bytes(folder, bytes(data))


MEL = "case0/inputs/mel.npy"
MEL_DATA = np.zeros((1, 80, 100), np.float32)


def npy_with_header(
    header: dict[str, Any], data: bytes, version: tuple[int, int] = (1, 0)
) -> bytes:
    """A .npy member whose header says `header` (unchecked), followed by `data`."""
    text = repr(header).encode("latin1")
    length = "<H" if version == (1, 0) else "<I"
    text += b" " * (63 - (8 + struct.calcsize(length) + len(text)) % 64) + b"\n"
    return b"\x93NUMPY" + bytes(version) + struct.pack(length, len(text)) + text + data


def _header(**changes: Any) -> dict[str, Any]:
    return {"descr": "<f4", "fortran_order": False, "shape": (1, 80, 100), **changes}


def truncate_after_first_member(folder: Path) -> None:
    """Cut arrays.npz right after its first member (no central directory left)."""
    with zipfile.ZipFile(folder / ARRAYS) as zf:
        second = zf.infolist()[1].header_offset
    write_npz_bytes(folder, (folder / ARRAYS).read_bytes()[:second])


HOSTILE_ARRAYS: list[tuple[str, Callable[[Path], None], str]] = [
    (
        "LZMA member",
        edit_member(MEL, bytes, zipfile.ZIP_LZMA),
        "uses compression method 14; only stored (0) and deflated (8) members are read",
    ),
    ("bzip2 member", edit_member(MEL, bytes, zipfile.ZIP_BZIP2), "uses compression method 12"),
    ("compression method 93", patch_entries(method=93), "uses compression method 93"),
    ("encryption flag", patch_entries(flags=0x1), "is encrypted; probes are never encrypted"),
    (
        "member without NPY magic",
        edit_member(MEL, lambda d: b"\x00" * len(d)),
        f"member {MEL!r}: its .npy header cannot be read (ValueError: the member does not start "
        f"with the .npy magic (got {bytes(6)!r}))",
    ),
    (
        "npy header declaring 29 TiB",
        edit_member(MEL, lambda d: npy_with_header(_header(shape=(1, 80, 10**11)), d[128:])),
        f"member {MEL!r} holds float32[1, 80, 100000000000] but the manifest says "
        "float32[1, 80, 100]",
    ),
    (
        "npy header with a subarray dtype",
        edit_member(MEL, lambda d: npy_with_header(_header(descr="(99999999999,)f4"), d[128:])),
        f"member {MEL!r}: its .npy header cannot be read (ValueError",
    ),
    (
        "big-endian member",
        edit_member(MEL, lambda d: npy(MEL_DATA.astype(">f4"))),
        "holds >f4[1, 80, 100] but the manifest says float32[1, 80, 100]",
    ),
    (
        "npy format 3.0",
        edit_member(MEL, lambda d: npy_with_header(_header(), d[128:], (3, 0))),
        ".npy format version (3, 0) is not read",
    ),
    (
        "member not named .npy",
        lambda f: write_members(
            f, [(n.removesuffix(".npy") if n == MEL else n, d, m) for n, d, m in members_of(f)]
        ),
        "holds arrays the manifest does not name: ['case0/inputs/mel']",
    ),
    (
        "member twice",
        lambda f: write_members(f, members_of(f) + members_of(f)[:1]),
        f"holds members more than once: [{MEL!r}]",
    ),
    (
        "member missing",
        lambda f: write_members(f, members_of(f)[1:]),
        "array 'case0/inputs/mel' is not in arrays.npz",
    ),
    (
        "data longer than declared",
        edit_member(MEL, lambda d: d + b"\x00" * 64),
        f"member {MEL!r}: its data cannot be read (ValueError: the data is longer than 32000",
    ),
    (
        "data shorter than the header says",
        edit_member(MEL, lambda d: d[:-4]),
        f"member {MEL!r}: its data cannot be read (EOFError: the data ends after 31996 of 32000",
    ),
    (
        "member far shorter than the manifest says",
        edit_member(MEL, lambda d: d[:1000]),
        f"member {MEL!r} declares 1000 bytes, but the manifest's float32[1, 80, 100] takes "
        "32000 bytes plus a header of at most 4096",
    ),
    (
        "corrupt deflate stream",
        corrupt_deflate,
        f"member {MEL!r}: its .npy header cannot be read (error: Error -3 while decompressing",
    ),
    ("truncated after one member", truncate_after_first_member, "cannot be read (BadZipFile"),
    ("empty file", lambda f: write_npz_bytes(f, b""), "cannot be read (BadZipFile"),
    (
        "a directory",
        lambda f: ((f / ARRAYS).unlink(), (f / ARRAYS).mkdir()),
        "arrays.npz is not a regular file",
    ),
    (
        "a symlink to an unreadable file",
        lambda f: ((f / ARRAYS).unlink(), (f / ARRAYS).symlink_to("/proc/self/mem")),
        "arrays.npz cannot be read (OSError: [Errno 5] Input/output error)",
    ),
    (
        "a symlink to /dev/zero",
        lambda f: ((f / ARRAYS).unlink(), (f / ARRAYS).symlink_to("/dev/zero")),
        "arrays.npz is not a regular file",
    ),
]


HOSTILE_FILES = [(f"manifest, {n}", d, m) for n, d, m in HOSTILE_MANIFESTS] + [
    (f"arrays, {n}", d, m) for n, d, m in HOSTILE_ARRAYS
]


@pytest.mark.parametrize(
    ("damage", "message"),
    [(d, m) for _, d, m in HOSTILE_FILES],
    ids=[n for n, _, _ in HOSTILE_FILES],
)
def test_hostile_probe_files(
    demo_paths: tuple[Path, Path], tmp_path: Path, damage: Callable[[Path], None], message: str
) -> None:
    """A hostile manifest, or a hostile arrays.npz whose sha256 the manifest matches, raises a
    ProbeError naming the probe folder and the problem (with the bound it broke)."""
    folder = copy_probe(demo_paths[1], tmp_path / "p")
    damage(folder)
    with pytest.raises(probes.ProbeError) as info:
        probes.load(folder)
    assert message in str(info.value)
    assert str(info.value).startswith(f"probe {str(folder)!r}: ")


@pytest.mark.parametrize(
    "change",
    [
        deflate_all,
        edit_member(
            MEL,
            lambda d: npy(
                np.asfortranarray(np.frombuffer(d[128:], np.float32).reshape(1, 80, 100))
            ),
        ),
        edit_member(
            MEL,
            lambda d: npy(np.frombuffer(d[128:], np.float32).reshape(1, 80, 100), version=(2, 0)),
        ),
    ],
    ids=["deflated members", "Fortran order", "npy format 2.0"],
)
def test_other_valid_encodings_load_the_same_probe(
    demo_paths: tuple[Path, Path],
    demo_probe: probes.Probe,
    tmp_path: Path,
    change: Callable[[Path], None],
) -> None:
    """Deflated members, Fortran order and .npy 2.0 are read, and give the same probe."""
    folder = copy_probe(demo_paths[1], tmp_path / "p")
    change(folder)
    assert probes.load(folder) == demo_probe


# ---------------------------------------------------------------- zip bombs

BOMB_BYTES = 256 << 20  # zeros: deflated to about 250 kB


def _write_bomb(zf: zipfile.ZipFile, name: str, shape: tuple[int, ...]) -> None:
    """A deflated .npy member: a header declaring float32 `shape`, then BOMB_BYTES of zeros."""
    header = npy_with_header(_header(shape=shape), b"")
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with zf.open(info, "w", force_zip64=True) as out:
        out.write(header)
        block = bytes(1 << 20)
        for _ in range(BOMB_BYTES >> 20):
            out.write(block)


def extra_bomb(folder: Path) -> None:
    """An extra member the manifest does not name."""
    with zipfile.ZipFile(folder / ARRAYS, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        _write_bomb(zf, "bomb.npy", (BOMB_BYTES // 4,))
    write_npz_bytes(folder, (folder / ARRAYS).read_bytes())


def named_bomb(folder: Path, shape: tuple[int, ...] = (BOMB_BYTES // 4,)) -> None:
    """The manifest's own member, replaced by a bomb."""
    keep = [m for m in members_of(folder) if m[0] != MEL]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        _write_bomb(zf, MEL, shape)
        for name, data, _ in keep:
            zf.writestr(name, data)
    write_npz_bytes(folder, buffer.getvalue())


def lying_bomb(folder: Path) -> None:
    """A member whose zip directory and header declare the manifest's size, while its stream
    inflates to far more."""
    named_bomb(folder, (1, 80, 100))
    data = bytearray((folder / ARRAYS).read_bytes())
    with zipfile.ZipFile(folder / ARRAYS) as zf:
        pos = zf.start_dir  # type: ignore[attr-defined]
    name = MEL.encode()
    while data[pos + 46 : pos + 46 + len(name)] != name:  # central entries until the bomb's
        n, m, k = struct.unpack("<HHH", data[pos + 28 : pos + 34])
        pos += 46 + n + m + k
    assert struct.unpack("<I", data[pos + 24 : pos + 28]) == (BOMB_BYTES + 128,)
    data[pos + 24 : pos + 28] = struct.pack("<I", 32128)  # uncompressed size, as the manifest's
    write_npz_bytes(folder, bytes(data))


RSS_SCRIPT = """
import resource, sys
import probes
probes.load(sys.argv[1])  # an honest probe first: later growth is the bomb's alone
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    probes.load(sys.argv[2])
    print("loaded")
except probes.ProbeError as exc:
    print(exc)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.parametrize(
    ("bomb", "message"),
    [
        (extra_bomb, "holds arrays the manifest does not name: ['bomb']"),
        (named_bomb, f"member {MEL!r} declares {BOMB_BYTES + 128} bytes"),
        (lying_bomb, f"member {MEL!r}: its data cannot be read (BadZipFile: Bad CRC-32"),
    ],
    ids=["extra member", "member named in the manifest", "sizes lie"],
)
def test_zip_bomb_is_refused_before_it_is_inflated(
    demo_paths: tuple[Path, Path], tmp_path: Path, bomb: Callable[[Path], None], message: str
) -> None:
    """A 256 MB member of zeros (250 kB deflated) is refused with peak RSS up by < 32 MB."""
    folder = copy_probe(demo_paths[1], tmp_path / "p")
    bomb(folder)
    assert (folder / ARRAYS).stat().st_size < 2 << 20
    done = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(demo_paths[1]), str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    said, grown_mb = done.stdout.splitlines()
    assert message in said
    assert int(grown_mb) < 32, f"peak RSS grew by {grown_mb} MB"


# ---------------------------------------------------------------- MNN version


def test_strict_version_compares_with_the_installed_mnn(
    demo_paths: tuple[Path, Path], demo_probe: probes.Probe, tmp_path: Path
) -> None:
    """strict_version=True alone refuses a probe from another MNN; the right one loads."""
    installed = mnn.mnn_version()
    folder = copy_probe(demo_paths[1], tmp_path / "p")
    rewrite_manifest(folder, _set("mnn_version", "9.9.9"))
    running = rf"recorded with MNN 9\.9\.9, running MNN {re.escape(installed)}"
    with pytest.raises(probes.ProbeError, match=running):
        probes.load(folder, strict_version=True)
    here = copy_probe(demo_paths[1], tmp_path / "q")
    rewrite_manifest(here, _set("mnn_version", installed))
    assert probes.load(here, strict_version=True).cases == demo_probe.cases


def test_strict_version_without_an_installed_mnn_asks_for_mnn_version(
    demo_paths: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """strict_version=True alone, where no MNN distribution is installed, is refused and says
    to pass mnn_version=."""
    monkeypatch.setattr(store, "installed_mnn_version", lambda: None)
    with pytest.raises(probes.ProbeError) as info:
        probes.load(demo_paths[1], strict_version=True)
    assert str(info.value) == (
        "strict_version=True, but no installed MNN was found to compare the probe's MNN 3.6.1 "
        "with; pass mnn_version="
    )


def test_installed_version_is_read_without_importing_mnn() -> None:
    """The version strict_version compares with is MNN.version(), read without importing MNN."""
    assert store.installed_mnn_version() == mnn.mnn_version()
    script = "import sys, probes.store as s; print(s.installed_mnn_version(), 'MNN' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == [mnn.mnn_version(), "False"]


def test_save_and_load_give_an_equal_probe(demo_probe: probes.Probe, tmp_path: Path) -> None:
    """Probes compare by content: saved and loaded equals the original, a changed one does not."""
    demo_probe.save(tmp_path / "p")
    back = probes.load(tmp_path / "p")
    assert back == demo_probe
    changed = dict(back.cases[0].outputs)
    changed["wav"] = changed["wav"].copy()
    changed["wav"][0, 0, 7] += 1
    other = dataclasses.replace(
        back, cases=(probes.Case(inputs=back.cases[0].inputs, outputs=changed), *back.cases[1:])
    )
    assert other != demo_probe
    assert back.with_thresholds(probes.Thresholds(min_snr_db=40)) != demo_probe


def test_cases_compare_nan_equal_to_nan_in_the_same_place() -> None:
    """A case holding NaN equals its copy, and differs from one with the NaN elsewhere."""
    x = np.array([1.0, np.nan, 3.0], np.float32)
    y = {"y": np.ones(2, np.float32)}
    case = probes.Case(inputs={"x": x}, outputs=y)
    assert case == probes.Case(inputs={"x": x.copy()}, outputs=dict(y))
    assert case != probes.Case(inputs={"x": x[::-1].copy()}, outputs=dict(y))


def test_probes_modules_import_each_other_without_a_cycle() -> None:
    """No probes module imports one that imports it back, lazily or under TYPE_CHECKING."""
    package = Path(probes.__file__).resolve().parent
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("probes")
            ):
                found.update(
                    f"probes.{a.name}" if node.module == "probes" else node.module
                    for a in node.names
                )
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("probes."))
        graph[f"probes.{path.stem}"] = {m for m in found if m.removeprefix("probes.") != ""}
    modules = {m for m in graph if m != "probes.__init__"}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, set()) & modules:
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    assert graph["probes.probe"] >= {"probes.store"}
    assert [m for m in sorted(modules) if reaches(m, m, set())] == []


# ---------------------------------------------------------------- exact refusals and bounds


def npy_raw(version: int, length: int, text: bytes, data: bytes) -> bytes:
    """A .npy member with any header length field, header text and data (all unchecked)."""
    field = struct.pack("<H" if version == 1 else "<I", length)
    return b"\x93NUMPY" + bytes((version, 0)) + field + text + data


def header_text(header: dict[str, Any], length: int) -> bytes:
    """`header` as .npy header text padded with spaces to exactly `length` bytes."""
    text = repr(header).encode("latin1")
    return text + b" " * (length - len(text) - 1) + b"\n"


def set_central(name: str, offset: int, fmt: str, value: int) -> Callable[[Path], None]:
    """A damage that overwrites one field of `name`'s central directory entry."""

    def apply(folder: Path) -> None:
        data = bytearray((folder / ARRAYS).read_bytes())
        with zipfile.ZipFile(folder / ARRAYS) as zf:
            pos = zf.start_dir  # type: ignore[attr-defined]
        while data[pos + 46 : pos + 46 + len(name)] != name.encode():
            n, m, k = struct.unpack("<HHH", data[pos + 28 : pos + 34])
            pos += 46 + n + m + k
        struct.pack_into(fmt, data, pos + offset, value)
        write_npz_bytes(folder, bytes(data))

    return apply


def header_refusal(header: dict[str, Any]) -> tuple[Callable[[Path], None], str]:
    """A MEL member whose .npy header is `header`, and the exact refusal it gets."""
    reason = f"the .npy header is not one of a numeric array: {probes.errors.brief(header)}"
    return (
        edit_member(MEL, lambda d: npy_with_header(header, d[128:])),
        f"arrays.npz member {MEL!r}: its .npy header cannot be read (ValueError: {reason})",
    )


MEL_HEAD = (
    f"arrays.npz member {MEL!r}: its .npy header cannot be read (ValueError: the .npy header is"
)
EXTRA_KEY = {**_header(), "extra": 1}
SHAPE_RULE = "shape must be a list of at most 32 integers in 0..2147483647"
DECLARES = f"arrays.npz member {MEL!r} declares 32128 bytes, but the manifest's"


def _case(index: int, key: str, value: Any) -> Callable[[Manifest], None]:
    return lambda m: m["cases"][index].__setitem__(key, value)


def _recorded(key: str, value: Any) -> Callable[[Manifest], None]:
    return lambda m: m["recorded"].__setitem__(key, value)


EXACT_REFUSALS: list[tuple[str, Callable[[Path], None], str]] = [
    (
        "extra member with a .npy name",
        lambda f: write_members(
            f, [*members_of(f), ("extra.npy", npy(np.zeros(2, np.float32)), zipfile.ZIP_STORED)]
        ),
        "arrays.npz holds arrays the manifest does not name: ['extra']",
    ),
    (
        "member of the data's size alone",
        edit_member(MEL, lambda d: d[128:]),
        f"arrays.npz member {MEL!r} declares 32000 bytes, but the manifest's float32[1, 80, 100] "
        "takes 32000 bytes plus a header of at most 4096",
    ),
    (
        "member one byte over data and largest header",
        edit_member(MEL, lambda d: npy_raw(2, 4097, header_text(_header(), 4097), d[128:])),
        f"arrays.npz member {MEL!r} declares 36109 bytes, but the manifest's float32[1, 80, 100] "
        "takes 32000 bytes plus a header of at most 4096",
    ),
    (
        "stored member whose sizes differ",
        set_central(MEL, 20, "<I", 32127),  # compressed size
        f"arrays.npz member {MEL!r} is stored, but its stored and declared sizes differ",
    ),
    (
        "npy 1.0 header of 4097 bytes",
        edit_member(MEL, lambda d: npy_raw(1, 4097, header_text(_header(), 4097), d[128:])),
        f"{MEL_HEAD} 4097 bytes, more than 4096)",
    ),
    (
        "npy 1.0 header length above 32767",
        edit_member(MEL, lambda d: npy_raw(1, 0x9000, d[10:128], d[128:])),
        f"{MEL_HEAD} 36864 bytes, more than 4096)",
    ),
    (
        "npy 2.0 header length above 2**31",
        edit_member(MEL, lambda d: npy_raw(2, 0xFFFFFFF0, d[12:128], d[128:])),
        f"{MEL_HEAD} 4294967280 bytes, more than 4096)",
    ),
    (
        "npy header that is not a literal",
        edit_member(MEL, lambda d: npy_raw(1, 118, b"{'descr': '<f4', ".ljust(118), d[128:])),
        f"{MEL_HEAD} not a Python literal ('{{' was never closed (<unknown>, line 1)))",
    ),
    (
        "npy header with a key too many",
        edit_member(MEL, lambda d: npy_with_header(EXTRA_KEY, d[128:])),
        f"{MEL_HEAD} not a descr/fortran_order/shape dict: {probes.errors.brief(EXTRA_KEY)})",
    ),
    ("npy descr as a list", *header_refusal(_header(descr=[("", "<f4")]))),
    ("npy shape as a list", *header_refusal(_header(shape=[1, 80, 100]))),
    ("npy fortran_order 0", *header_refusal(_header(fortran_order=0))),
    ("npy dimension 1.0", *header_refusal(_header(shape=(1.0, 80, 100)))),
    ("npy dimension -1", *header_refusal(_header(shape=(1, 80, -1)))),
    (
        "npy dimension 0",
        edit_member(MEL, lambda d: npy_with_header(_header(shape=(0, 80, 100)), d[128:])),
        f"arrays.npz member {MEL!r} holds float32[0, 80, 100] but the manifest says "
        "float32[1, 80, 100]",
    ),
    # the manifest's own refusals
    (
        "case with a key too many",
        raw_manifest(_case(0, "extra", {})),
        "case 0 must have exactly 'inputs' and 'outputs'",
    ),
    (
        "case outputs as a list",
        raw_manifest(_case(1, "outputs", [])),
        "case 1 outputs must be an object",
    ),
    (
        "array reference with a key too many",
        raw_manifest(_mel_ref("extra", 1)),
        "case 0 inputs 'mel' needs exactly key, dtype, shape",
    ),
    (
        "array dimension -1",
        raw_manifest(_mel_ref("shape", [1, 80, -1])),
        f"case 0 inputs 'mel': {SHAPE_RULE}, got [1, 80, -1]",
    ),
    (
        "array shape of rank 33",
        raw_manifest(_mel_ref("shape", [1] * 33)),
        f"case 0 inputs 'mel': {SHAPE_RULE}, got {brief([1] * 33)}",
    ),
    # shapes at the bounds pass on to the size checks
    (
        "array shape of rank 32",
        raw_manifest(_mel_ref("shape", [1] * 32)),
        f"{DECLARES} float32{[1] * 32} takes 4 bytes plus a header of at most 4096",
    ),
    (
        "array dimension 0",
        raw_manifest(_mel_ref("shape", [1, 80, 0])),
        f"{DECLARES} float32[1, 80, 0] takes 0 bytes plus a header of at most 4096",
    ),
    (
        "array dimension 2**31 - 1",
        raw_manifest(_mel_ref("shape", [1, 80, 2**31 - 1])),
        f"the manifest declares {4 * 80 * (2**31 - 1) + 32000 + 2 * 102400} bytes of arrays, "
        "more than the limit of 1073741824 (probes.store.MAX_ARRAY_BYTES)",
    ),
    (
        "recorded with a key too many",
        raw_manifest(_recorded("extra", 1)),
        "'recorded' needs exactly the keys ['created', 'notes', 'reference', 'runs']",
    ),
    (
        "recorded reference as a list",
        raw_manifest(_recorded("reference", [])),
        "'recorded.reference' must be an object and 'recorded.notes' a list",
    ),
    (
        "recorded date as a number",
        raw_manifest(_recorded("created", 5)),
        "'recorded.created' must be a string of at most 1000 characters, got 5",
    ),
    (
        "per_output as a list",
        raw_manifest(_set("per_output", [])),
        "'per_output' must be an object",
    ),
    (
        "limits as a list",
        raw_manifest(_set("limits", [45.0])),
        "'limits' must be an object of judge name -> limit, got [45.0]",
    ),
    (
        "per-output limits as a list",
        raw_manifest(_set("per_output", {"wav": [45.0]})),
        "'per_output.wav' must be an object of judge name -> limit, got [45.0]",
    ),
]


@pytest.mark.parametrize(
    ("damage", "message"),
    [(d, m) for _, d, m in EXACT_REFUSALS],
    ids=[n for n, _, _ in EXACT_REFUSALS],
)
def test_refusals_say_exactly_what_is_wrong(
    demo_paths: tuple[Path, Path], tmp_path: Path, damage: Callable[[Path], None], message: str
) -> None:
    """Each damaged arrays.npz (sha256 matching) or manifest is a ProbeError whose message is
    exactly the folder, the reason and the fix."""
    folder = copy_probe(demo_paths[1], tmp_path / "p")
    damage(folder)
    with pytest.raises(probes.ProbeError) as info:
        probes.load(folder)
    fix = "re-record it with `mnn-guard record`"
    assert str(info.value) == f"probe {str(folder)!r}: {message}; {fix}"


def test_a_header_of_exactly_the_largest_size_loads(
    demo_paths: tuple[Path, Path], demo_probe: probes.Probe, tmp_path: Path
) -> None:
    """A .npy 2.0 header of exactly 4096 bytes (12 + 4096 before the data) is read."""
    folder = copy_probe(demo_paths[1], tmp_path / "p")
    edit_member(MEL, lambda d: npy_raw(2, 4096, header_text(_header(), 4096), d[128:]))(folder)
    with zipfile.ZipFile(folder / ARRAYS) as zf:
        assert zf.getinfo(MEL).file_size == 32000 + 12 + 4096
    assert probes.load(folder) == demo_probe


def test_arrays_file_may_be_as_large_as_its_bound_and_no_larger(
    demo_paths: tuple[Path, Path], demo_probe: probes.Probe, tmp_path: Path
) -> None:
    """arrays.npz may take the declared bytes, per array 2 x its key + 5120, and 1 MiB."""
    folder = copy_probe(demo_paths[1], tmp_path / "p")
    original = (folder / ARRAYS).read_bytes()
    keys = [n.removesuffix(".npy") for n, _, _ in members_of(folder)]
    declared = 2 * 80 * 100 * 4 + 2 * 25600 * 4
    bound = declared + sum(2 * len(k) + 1024 + 4096 for k in keys) + (1 << 20)
    # zip readers skip bytes before the first member (as in self-extracting archives)
    write_npz_bytes(folder, bytes(bound - len(original)) + original)
    assert probes.load(folder) == demo_probe
    write_npz_bytes(folder, bytes(bound + 1 - len(original)) + original)
    with pytest.raises(probes.ProbeError) as info:
        probes.load(folder)
    assert (
        f"arrays.npz is {bound + 1} bytes, more than the {bound} bytes that the manifest's "
        "arrays, their headers and 1 MiB of slack can take; re-record"
    ) in str(info.value)


def test_a_reference_value_may_be_1000_characters_and_no_more(
    demo_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    """A recorded reference value of 1000 characters loads; one of 1001 is refused."""
    folder = copy_probe(demo_paths[1], tmp_path / "p")
    rewrite_manifest(folder, lambda m: m["recorded"]["reference"].__setitem__("device", "x" * 1000))
    assert probes.load(folder).meta.reference == {"dynamic": True, "device": "x" * 1000}
    rewrite_manifest(folder, lambda m: m["recorded"]["reference"].__setitem__("device", "x" * 1001))
    with pytest.raises(probes.ProbeError) as info:
        probes.load(folder)
    assert (
        "'recorded.reference.device' must be null, a bool, a number or a string of at most 1000 "
        f"characters, got {brief('x' * 1001)}; re-record"
    ) in str(info.value)


def test_a_changed_arrays_file_names_both_checksums(
    demo_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    """A sha256 mismatch quotes the first 12 hex digits of the file's and the manifest's."""
    folder = copy_probe(demo_paths[1], tmp_path / "p")
    actual = hashlib.sha256((folder / ARRAYS).read_bytes()).hexdigest()
    rewrite_manifest(
        folder, lambda m: m["arrays"].__setitem__("sha256", "0123456789ab" * 5 + "cdef")
    )
    with pytest.raises(probes.ProbeError) as info:
        probes.load(folder)
    assert (
        f"arrays.npz is corrupt or was changed: sha256 {actual[:12]}... differs from the "
        "manifest's 0123456789ab...; re-record"
    ) in str(info.value)


def test_arrays_of_exactly_the_declared_limit_are_read_on(
    demo_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    """A manifest declaring exactly MAX_ARRAY_BYTES passes that bound and meets the next check."""
    wav = (store.MAX_ARRAY_BYTES - 2 * 32000) // 8
    assert 2 * 32000 + 2 * 4 * wav == store.MAX_ARRAY_BYTES
    folder = copy_probe(demo_paths[1], tmp_path / "p")

    def huge(m: Manifest) -> None:
        for case in m["cases"]:
            case["outputs"]["wav"]["shape"] = [1, 1, wav]

    rewrite_manifest(folder, huge)
    with pytest.raises(probes.ProbeError) as info:
        probes.load(folder)
    assert (
        f"member 'case0/outputs/wav.npy' declares 102528 bytes, but the manifest's "
        f"float32[1, 1, {wav}] takes {4 * wav} bytes"
    ) in str(info.value)


def one_input_probe(n: int, name: str = "x") -> probes.Probe:
    """A one-case probe: float32 input `name` of n values, golden output y of two."""
    x = np.arange(n, dtype=np.float32)
    return probes.Probe(
        cases=(probes.Case(inputs={name: x}, outputs={"y": np.ones(2, np.float32)}),),
        inputs=(signature.InputSpec(name=name, dtype="float32", shape=(n,)),),
        outputs=(signature.OutputSpec(name="y", dtype="float32", shape=(2,)),),
    )


def test_an_array_larger_than_one_read_step_loads_and_is_refused_when_longer(
    tmp_path: Path,
) -> None:
    """A 1.6 MB array (two 1 MiB read steps) loads equal; two bytes more are refused."""
    probe = one_input_probe(400_000)
    probe.save(tmp_path / "p")
    assert probes.load(tmp_path / "p") == probe
    edit_member("case0/inputs/x.npy", lambda d: d + b"\x00\x00")(tmp_path / "p")
    with pytest.raises(probes.ProbeError) as info:
        probes.load(tmp_path / "p")
    assert (
        "member 'case0/inputs/x.npy': its data cannot be read "
        "(ValueError: the data is longer than 1600000 bytes)"
    ) in str(info.value)


def test_a_header_cut_short_says_how_many_bytes_it_has(tmp_path: Path) -> None:
    """A member that ends inside its .npy header is refused with the bytes it had and wanted."""
    probe = one_input_probe(2)
    probe.save(tmp_path / "p")
    edit_member("case0/inputs/x.npy", lambda d: npy_raw(1, 100, b" " * 20, b""))(tmp_path / "p")
    with pytest.raises(probes.ProbeError) as info:
        probes.load(tmp_path / "p")
    assert (
        "member 'case0/inputs/x.npy': its .npy header cannot be read "
        "(EOFError: the member ends after 20 of 100 header bytes)"
    ) in str(info.value)


def test_a_long_reason_from_zipfile_is_cut_at_200_characters(tmp_path: Path) -> None:
    """zipfile's own words on a damaged member are quoted, cut to their first 200 characters."""
    name = "x" * 100
    member = f"case0/inputs/{name}.npy"
    one_input_probe(2, name).save(tmp_path / "p")
    data = bytearray((tmp_path / "p" / ARRAYS).read_bytes())
    with zipfile.ZipFile(tmp_path / "p" / ARRAYS) as zf:
        start = zf.getinfo(member).header_offset + 30
    data[start + len(member) - 5] = ord("y")  # the local header's name differs from the directory's
    write_npz_bytes(tmp_path / "p", bytes(data))
    with pytest.raises(probes.ProbeError) as info:
        probes.load(tmp_path / "p")
    local = member.replace("x.npy", "y.npy").encode()
    said = f"File name in directory {member!r} and header {local!r} differ."
    assert len(said) > 200
    assert f"its .npy header cannot be read (BadZipFile: {said[:200]})" in str(info.value)


def test_stale_model_messages_name_both_hashes_and_the_fix(
    demo_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    """check_model names the recorded and the actual sha256 (12 digits), or the missing file."""
    probe = probes.load(demo_paths[1])
    other = tmp_path / "other.mnn"
    other.write_bytes(b"not the demo model")
    actual = hashlib.sha256(b"not the demo model").hexdigest()
    recorded = probe.meta.model_sha256
    assert recorded is not None
    with pytest.raises(probes.ProbeError) as info:
        store.check_model(probe, other)
    assert str(info.value) == (
        f"stale probe: it was recorded for a model with sha256 {recorded[:12]}..., but "
        f"{str(other)!r} has sha256 {actual[:12]}...; re-record the probe for this model"
    )
    with pytest.raises(probes.ProbeError) as info:
        store.check_model(probe, tmp_path / "gone.mnn")
    assert str(info.value) == (
        f"cannot check the probe against model {str(tmp_path / 'gone.mnn')!r}: no such file; "
        "pass the path of the .mnn file the session loads"
    )


def test_another_mnn_version_warns_and_logs_by_default(
    demo_probe: probes.Probe, caplog: pytest.LogCaptureFixture
) -> None:
    """check_mnn_version warns and logs the same words unless strict; None on either side is
    no mismatch."""
    said = (
        f"probe recorded with MNN {demo_probe.meta.mnn_version}, running MNN 9.9.9; "
        "re-record the probe if the canary fails"
    )
    with (
        caplog.at_level("WARNING", logger="mnn_guard.probes"),
        pytest.warns(probes.ProbeVersionWarning) as record,
    ):
        store.check_mnn_version(demo_probe, "9.9.9")
    assert [str(w.message) for w in record] == [said]
    assert [r.getMessage() for r in caplog.records] == [said]
    unrecorded = dataclasses.replace(
        demo_probe, meta=dataclasses.replace(demo_probe.meta, mnn_version=None)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store.check_mnn_version(demo_probe, None, strict=True)
        store.check_mnn_version(unrecorded, "9.9.9", strict=True)
        store.check_mnn_version(demo_probe, demo_probe.meta.mnn_version, strict=True)


# mutmut runs every function of a mutated module through a trampoline, a frame more per call
UNDER_MUTMUT = Path(store.__file__).resolve().parent.parent.name == "mutants"


@pytest.mark.skipif(UNDER_MUTMUT, reason="mutmut's trampolines add frames (equivalent.md)")
def test_the_version_warning_points_at_the_caller_of_load(
    demo_paths: tuple[Path, Path],
) -> None:
    """The ProbeVersionWarning of probes.load names the line that called load."""
    with pytest.warns(probes.ProbeVersionWarning) as record:
        probes.load(demo_paths[1], mnn_version="9.9.9")
    assert [w.filename for w in record] == [__file__]


# ------------------------------------------------------------------ limits set later


def calibrated_probe() -> probes.Probe:
    """A probe of outputs a, b and c, all calibrated; `a` has its own limits (no SNR)."""
    names = ("a", "b", "c")
    measured = OutputCalibration(spread_db=90.0, floor_db=80.0, limit_db=60.0)
    return probes.Probe(
        cases=(
            probes.Case(
                inputs={"x": np.zeros(2, np.float32)}, outputs={n: np.ones(2) for n in names}
            ),
        ),
        inputs=(signature.InputSpec(name="x", dtype="float32", shape=(2,)),),
        outputs=tuple(signature.OutputSpec(name=n, dtype="float64", shape=(2,)) for n in names),
        thresholds={"snr_db": 45.0, "cosine": 0.99},
        per_output={"a": {"cosine": 0.5}},
        calibration=probes.Calibration(outputs={n: measured for n in names}, inits=3),
    )


SNR_40 = {"snr_db": 40.0}
COSINE = {"cosine": 0.9}


@pytest.mark.parametrize(
    ("default", "per_output", "calibrated"),
    [
        (SNR_40, {}, ["a"]),  # the new default reaches b and c, not a (its own limits)
        (COSINE, {}, ["a", "b", "c"]),  # a default without an SNR limit
        ({}, {}, ["a", "b", "c"]),  # an empty default: no SNR limit either
        (None, {"b": SNR_40}, ["a", "c"]),
        (None, {"b": COSINE}, ["a", "b", "c"]),
        (None, {"a": SNR_40}, ["b", "c"]),
        (SNR_40, {"b": COSINE}, ["a", "b"]),  # the default reaches c only
        (SNR_40, {"b": SNR_40, "a": SNR_40}, []),
    ],
    ids=["default", "default-no-snr", "empty-default", "b", "b-no-snr", "a", "both", "all"],
)
def test_with_thresholds_drops_calibration_where_it_sets_an_snr_limit(
    default: dict[str, float] | None, per_output: dict[str, Any], calibrated: list[str]
) -> None:
    """An output keeps its calibration unless the call gives it new limits with an SNR limit."""
    probe = calibrated_probe().with_thresholds(default, **per_output)
    kept = probe.calibration
    assert sorted(kept.outputs if kept is not None else []) == calibrated
    if kept is not None:
        assert kept.inits == 3 and dict(probe.limits_for(calibrated[0])).get("snr_db") == 60.0


def test_with_thresholds_sets_the_default_given_and_keeps_it_otherwise() -> None:
    """A default given replaces the probe's, even an empty one; without one, it stays."""
    probe = calibrated_probe()
    assert probe.with_thresholds(SNR_40).thresholds == SNR_40
    assert probe.with_thresholds({}).thresholds == {}
    assert probe.with_thresholds(b=COSINE).thresholds == {"snr_db": 45.0, "cosine": 0.99}


def test_with_thresholds_adds_to_the_per_output_limits() -> None:
    """Per-output limits given replace those outputs' limits and leave the others' as they were."""
    probe = calibrated_probe().with_thresholds(SNR_40, b=COSINE)
    assert probe.per_output == {"a": {"cosine": 0.5}, "b": COSINE}
    assert [dict(probe.thresholds_for(n)) for n in "abc"] == [{"cosine": 0.5}, COSINE, SNR_40]


# ------------------------------------------------------------------ judging


def test_judge_raises_the_snr_limit_by_the_retry_margin_only_when_asked(
    demo_probe: probes.Probe,
) -> None:
    """An output at 50.5 dB passes a 50 dB limit with no margin (the default) and fails it with a
    2 dB one, whose reason gives the raised limit."""
    probe = demo_probe.with_thresholds({"snr_db": 50.0})
    golden = probe.cases[0].outputs["wav"]
    noisy = {"wav": scaled_noise(golden, 50.5).astype(golden.dtype)}
    assert probe.judge(noisy, tier="loose").passed
    assert probe.judge(noisy, tier="loose", retry_margin_db=0.0).passed
    raised = probe.judge(noisy, tier="loose", retry_margin_db=2.0)
    assert not raised.passed and raised.reasons[0].endswith("is below the limit 52 dB")


def test_a_retry_margin_leaves_an_output_without_an_snr_limit_alone() -> None:
    """An output judged without an SNR limit is judged alike with a retry margin."""
    probe = calibrated_probe()
    assert "snr_db" not in probe.limits_for("a", "loose")
    outputs = {n: np.ones(2) for n in "abc"}
    assert probe.judge(outputs, tier="loose", retry_margin_db=3.0).passed


def test_judge_against_other_goldens(demo_probe: probes.Probe) -> None:
    """`goldens=` judges against those instead of the probe's own."""
    other = {"wav": np.roll(demo_probe.cases[0].outputs["wav"], 100)}
    assert not demo_probe.judge(other).passed
    assert demo_probe.judge(other, goldens=other).passed


def test_an_unknown_tier_is_refused_by_name(demo_probe: probes.Probe) -> None:
    """A tier other than "tight" or "loose" raises ProbeError quoting it."""
    assert demo_probe.calibration is not None
    message = "tier must be 'tight' or 'loose', got 'medium'"
    with pytest.raises(probes.ProbeError, match=re.escape(message)):
        demo_probe.limits_for("wav", "medium")


# ------------------------------------------------------------------ what a probe refuses to hold


def small_probe(golden: Any) -> probes.Probe:
    """A one-case probe whose golden output is `golden`."""
    return probes.Probe(
        cases=(probes.Case(inputs={"x": np.zeros(2, np.float32)}, outputs={"y": golden}),),
        inputs=(signature.InputSpec(name="x", dtype="float32", shape=(2,)),),
        outputs=(signature.OutputSpec(name="y", dtype="float32", shape=(2,)),),
    )


@pytest.mark.parametrize(
    "golden",
    [np.array(["a", "b"]), np.array([1 + 1j, 2]), np.array([True, False]), np.array([1.0, np.inf])],
    ids=["strings", "complex", "bools", "inf"],
)
def test_a_golden_that_is_not_finite_real_numbers_is_a_probe_error(golden: Array) -> None:
    """Goldens of strings, complex numbers, bools or non-finite values raise ProbeError."""
    with pytest.raises(probes.ProbeError, match="golden output 'y'"):
        small_probe(golden)


def test_a_probe_refuses_what_it_cannot_judge_with_exact_reasons() -> None:
    """Probe(...) refuses each malformed probe with a message naming what is wrong."""
    spec = signature.InputSpec(name="x", dtype="float32", shape=(2,))
    out = signature.OutputSpec(name="y", dtype="float64", shape=(2,))
    x, y = np.zeros(2, np.float32), np.ones(2)
    sentinel = signature.OutputSpec(name="s", dtype="float64", shape=(2,), sentinel=True)
    z = signature.OutputSpec(name="z", dtype="float64", shape=(2,))
    yzs = {"y": y, "s": y, "z": y}
    measured = OutputCalibration(spread_db=90.0, floor_db=80.0, limit_db=60.0)

    def make(**kw: Any) -> Any:
        args: dict[str, Any] = {
            "cases": (probes.Case(inputs={"x": x}, outputs={"y": y}),),
            "inputs": (spec,),
            "outputs": (out,),
            **kw,
        }
        return probes.Probe(**args)

    cases: list[tuple[dict[str, Any], str]] = [
        ({"cases": ()}, "a probe needs at least one canary case"),
        ({"per_output": {"z": probes.Thresholds()}},
         "per-output thresholds for unknown outputs ['z']; outputs are ['y']"),
        ({"cases": (probes.Case(inputs={"w": x}, outputs={"y": y}),)},
         "case 0: inputs ['w'] differ from the signature ['x']"),
        ({"cases": (probes.Case(inputs={"x": x}, outputs={"z": y}),)},
         "case 0: outputs ['z'] differ from ['y']"),
        ({"cases": (probes.Case(inputs={"x": np.zeros(3, np.float32)}, outputs={"y": y}),)},
         "case 0: input 'x' is float32[3], which the signature float32[2] does not accept"),
        ({"cases": (probes.Case(inputs={"x": x.astype(np.float64)}, outputs={"y": y}),)},
         "case 0: input 'x' is float64[2], which the signature float32[2] does not accept"),
        ({"cases": (probes.Case(inputs={"x": x}, outputs={"y": [1.0, 2.0]}),)},
         "case 0: golden output 'y' is a list of None, not an array of one of"),
        ({"per_output": 5}, "per_output must map output names to limits, got 5"),
        ({"outputs": (dataclasses.replace(out, sentinel=True),)},  # no output served
         "outputs ['y']: the served outputs come first, then the sentinels, and at least one "
         "output is served"),
        ({"outputs": (out, sentinel, z), "cases": (probes.Case(inputs={"x": x}, outputs=yzs),)},
         "outputs ['y', 's', 'z']: the served outputs come first, then the sentinels, and at "
         "least one output is served"),
        ({"calibration": probes.Calibration(outputs={"z": measured}, inits=3)},
         "calibration of unknown outputs ['z']; outputs are ['y']"),
    ]  # fmt: skip
    assert make().output_names == ["y"]
    for kw, message in cases:
        with pytest.raises(probes.ProbeError) as info:
            make(**kw)
        assert str(info.value).startswith(message), str(info.value)


def test_a_probe_keeps_its_own_copy_of_the_limits_it_was_given() -> None:
    """Changing the dicts a probe was built from afterwards changes none of its limits."""
    default: dict[str, Any] = {"snr_db": 30}
    per: dict[str, Any] = {"y": {"snr_db": 40}}
    probe = probes.Probe(
        cases=(probes.Case(inputs={"x": np.zeros(2, np.float32)}, outputs={"y": np.ones(2)}),),
        inputs=(signature.InputSpec(name="x", dtype="float32", shape=(2,)),),
        outputs=(signature.OutputSpec(name="y", dtype="float64", shape=(2,)),),
        thresholds=default,
        per_output=per,
    )
    default["snr_db"] = 90
    per["y"]["snr_db"] = 90
    per["z"] = {"snr_db": 90}
    assert isinstance(probe.thresholds, probes.Limits) and probe.thresholds == {"snr_db": 30.0}
    assert probe.per_output == {"y": {"snr_db": 40.0}}
    assert isinstance(probe.per_output["y"], probes.Limits)


def test_a_models_hash_is_read_once_while_the_file_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cached_sha256 reads a file once while it is unchanged, and holds at most _HASHED_MAX
    files' hashes."""
    store.forget_hashes()
    reads: list[str] = []
    real = store.file_sha256

    def reading(path: Any) -> str:
        reads.append(str(path))
        return real(path)

    monkeypatch.setattr(store, "file_sha256", reading)
    model = tmp_path / "m.mnn"
    model.write_bytes(b"abc")
    digest = hashlib.sha256(b"abc").hexdigest()
    assert store.cached_sha256(model) == digest == store.cached_sha256(model)
    assert reads == [str(model)]
    for i in range(store._HASHED_MAX + 1):
        other = tmp_path / f"{i}.mnn"
        other.write_bytes(str(i).encode())
        store.cached_sha256(other)
        assert len(store._HASHED) <= store._HASHED_MAX
    store.forget_hashes()


# ------------------------------------------------------------------ probe files, exactly


def saved(probe: probes.Probe, folder: Any) -> dict[str, Any]:
    """Save `probe` into `folder` and return its manifest as JSON."""
    import json

    probe.save(folder)
    manifest: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
    return manifest


def dataclasses_replace_cases(probe: probes.Probe, how: Callable[[Array], Array]) -> probes.Probe:
    """`probe` with every case array passed through `how`."""
    import dataclasses

    cases = tuple(
        probes.Case(
            inputs={k: how(v) for k, v in c.inputs.items()},
            outputs={k: how(v) for k, v in c.outputs.items()},
        )
        for c in probe.cases
    )
    return dataclasses.replace(probe, cases=cases)


def write_manifest(folder: Any, text: str) -> None:
    """Replace a saved probe's manifest.json with `text`."""
    (folder / "manifest.json").write_text(text)


def test_saved_files_are_canonical(demo_probe: probes.Probe, tmp_path: Any) -> None:
    """manifest.json is indented, key-sorted JSON; arrays.npz does not depend on array layout."""
    import json

    manifest = saved(demo_probe, tmp_path / "c")
    text = (tmp_path / "c" / "manifest.json").read_text()
    assert text == json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    fortran = dataclasses_replace_cases(demo_probe, np.asfortranarray)
    saved(fortran, tmp_path / "f")
    assert (tmp_path / "f" / "arrays.npz").read_bytes() == (
        tmp_path / "c" / "arrays.npz"
    ).read_bytes()


def test_manifest_must_name_arrays_npz(demo_paths: tuple[Any, Any], tmp_path: Any) -> None:
    """A manifest naming another arrays file is refused, even with a matching checksum."""
    import json
    import shutil

    folder = shutil.copytree(demo_paths[1], tmp_path / "p")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["arrays"]["file"] = "other.npz"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(probes.ProbeError, match="'arrays' must be"):
        probes.load(folder)


def test_manifest_limits_are_inclusive_and_messages_exact(
    demo_probe: probes.Probe, tmp_path: Any
) -> None:
    """A manifest of exactly the size limit is read; each malformed one has its own message."""
    import json

    from probes import store

    folder = tmp_path / "p"
    manifest = saved(demo_probe, folder)
    body = json.dumps({"kind": "other", "pad": ""})
    pad = "x" * (store.MAX_MANIFEST_BYTES - len(body))
    write_manifest(folder, json.dumps({"kind": "other", "pad": pad}))
    assert (folder / "manifest.json").stat().st_size == store.MAX_MANIFEST_BYTES
    with pytest.raises(probes.ProbeError, match="is not an mnn-guard probe manifest"):
        probes.load(folder)
    cases: list[tuple[Any, str]] = [
        ({**manifest, "recorded": {**manifest["recorded"], "runs": 10**17}},
         "'recorded.runs' must be an integer in 0..10000, got 100000000000000000"),
        ("[" * 100_000, "manifest.json is nested too deeply to be a probe manifest"),
        ([], "manifest.json must hold a JSON object, got list"),
        ({**manifest, "arrays": "x"}, "'arrays' must be {'file': 'arrays.npz', 'sha256': 64 hex "
         "digits}, got 'x'"),
        ({**manifest, "arrays": {**manifest["arrays"], "extra": 1}}, "'arrays' must be"),
    ]  # fmt: skip
    for value, message in cases:
        write_manifest(folder, value if isinstance(value, str) else json.dumps(value))
        with pytest.raises(probes.ProbeError) as info:
            probes.load(folder)
        assert message in str(info.value), str(info.value)
    assert not store.is_sha256("X" * 64) and store.is_sha256("ab" * 32)


def test_manifest_fields_at_their_limits(demo_probe: probes.Probe, tmp_path: Any) -> None:
    """runs 0 and 10,000 and a 1,000-character note load; one more is refused, with its reason."""
    import dataclasses

    for runs, note, ok in ((0, "n" * 1000, True), (10_000, "", True), (10_001, "", False)):
        meta = dataclasses.replace(demo_probe.meta, runs=runs, notes=(note,))
        folder = tmp_path / f"r{runs}"
        dataclasses.replace(demo_probe, meta=meta).save(folder)
        if ok:
            assert probes.load(folder).meta.runs == runs
        else:
            with pytest.raises(probes.ProbeError, match=r"'recorded.runs' must be an integer in"):
                probes.load(folder)
    long = dataclasses.replace(demo_probe.meta, notes=("n" * 1001,))
    dataclasses.replace(demo_probe, meta=long).save(tmp_path / "long")
    with pytest.raises(probes.ProbeError) as info:
        probes.load(tmp_path / "long")
    assert "each of 'recorded.notes' must be a string of at most 1000 characters, got" in str(
        info.value
    )
    assert " or null" not in str(info.value)


# ------------------------------------------------------------------ what a manifest records


def test_a_schema_1_probe_keeps_its_own_thresholds_and_per_output_ones(tmp_path: Path) -> None:
    """A schema-1 probe's 'thresholds' and per-output ones load as the judges' limits."""
    folder = copy_probe(SCHEMA1, tmp_path / "old")
    loose = {"min_snr_db": 30.0, "min_cosine": None, "max_lsd_db": 2.0, "max_abs": 0.5}
    tight = {"min_snr_db": 50.0, "min_cosine": 0.999, "max_lsd_db": None, "max_abs": None}
    rewrite_manifest(folder, lambda m: m.update(thresholds=loose, per_output={"wav": tight}))
    old = probes.load(folder)
    assert old.meta.schema_version == 1 and old.calibration is None
    assert dict(old.thresholds) == {"snr_db": 30.0, "lsd_db": 2.0, "max_abs": 0.5}
    assert {k: dict(v) for k, v in old.per_output.items()} == {
        "wav": {"snr_db": 50.0, "cosine": 0.999}
    }


def test_a_probe_loads_the_calibration_its_manifest_records(
    demo_paths: tuple[Path, Path],
) -> None:
    """A recorded calibration loads with its probe and sets the output's SNR limit."""
    recorded = json.loads((demo_paths[1] / MANIFEST).read_text())["calibration"]
    probe = probes.load(demo_paths[1], model=demo_paths[0])  # here, not a shared fixture's
    assert probe.calibration is not None
    assert probe.calibration.to_json() == recorded
    assert probe.limits_for("wav")["snr_db"] == recorded["outputs"]["wav"]["limit_db"]
