"""Probes on disk and recording: round trip, and every broken or stale probe raises ProbeError."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import guard
import probes
from guard.testing import Fault, FaultyFactory
from guard.tools import demo
from probes.store import ARRAYS, MANIFEST

pytestmark = pytest.mark.hostile
Manifest = dict[str, Any]


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
        import hashlib

        digest = hashlib.sha256(buffer.getvalue()).hexdigest()
        rewrite_manifest(folder, lambda m: m["arrays"].__setitem__("sha256", digest))


def loaded_arrays(folder: Path) -> dict[str, Any]:
    """The arrays of a probe folder."""
    with np.load(folder / ARRAYS) as npz:
        return {k: npz[k] for k in npz.files}


def test_round_trip(demo_probe: probes.Probe, tmp_path: Path) -> None:
    """save then load gives the same cases, signature, thresholds and metadata."""
    probe = demo_probe.with_thresholds(wav=probes.Thresholds(min_snr_db=40.0, max_lsd_db=None))
    probe.save(tmp_path / "p")
    back = probes.load(tmp_path / "p")
    assert back.inputs == probe.inputs and back.outputs == probe.outputs
    assert back.thresholds == probe.thresholds and dict(back.per_output) == dict(probe.per_output)
    assert back.meta == probe.meta
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
    ("missing key", _drop("thresholds"), "missing keys ['thresholds']"),
    ("extra key", _set("colour", "red"), "unknown keys ['colour']"),
    ("not a probe", _set("kind", "something-else"), "not an mnn-guard probe manifest"),
    (
        "shape contradicts array",
        lambda m: m["cases"][0]["inputs"]["mel"].__setitem__("shape", [1, 80, 7]),
        "the array is float32[1, 80, 100] but the manifest says float32[1, 80, 7]",
    ),
    (
        "dtype contradicts array",
        lambda m: m["cases"][0]["outputs"]["wav"].__setitem__("dtype", "float64"),
        "manifest says float64",
    ),
    (
        "unknown array key",
        lambda m: m["cases"][0]["inputs"]["mel"].__setitem__("key", "nope"),
        "array 'nope' is not in",
    ),
    (
        "bad threshold",
        lambda m: m["thresholds"].__setitem__("min_snr_db", "high"),
        "must be a finite number",
    ),
    (
        "threshold key missing",
        lambda m: m["thresholds"].pop("min_cosine"),
        "thresholds need exactly",
    ),
    (
        "bad dimension",
        lambda m: m["inputs"][0].__setitem__("shape", [1, 80, [9, 2]]),
        "bad dimension",
    ),
    (
        "input name mismatch",
        lambda m: m["inputs"][0].__setitem__("name", "spec"),
        "differ from the signature",
    ),
    ("bad sha", lambda m: m.__setitem__("model_sha256", "abc"), "64 hex digits"),
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
    """A folder that does not exist says so."""
    with pytest.raises(probes.ProbeError, match="does not exist"):
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
    import hashlib

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
    with pytest.raises(probes.ProbeError, match="cannot be read"):
        probes.load(folder)


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
    """A probe whose input names differ from the factory's is refused."""
    probe = probes.load(demo_paths[1])
    factory = guard.mnn_factory(demo_paths[0], ["spectrogram"], ["wav"])
    with pytest.raises(
        probes.ProbeError, match=r"inputs \['mel'\] do not match the model's \['spectrogram'\]"
    ):
        guard.wrap(factory, probe, name="sig", metrics=False)


def test_other_mnn_version_warns_or_refuses(demo_paths: tuple[Path, Path], tmp_path: Path) -> None:
    """A probe from another MNN version warns by default and is refused with strict_version."""
    folder = copy_probe(demo_paths[1], tmp_path / "p")
    rewrite_manifest(folder, _set("mnn_version", "2.9.0"))
    with pytest.warns(probes.ProbeVersionWarning, match=r"recorded with MNN 2\.9\.0"):
        probes.load(folder, mnn_version="3.6.1")
    with pytest.raises(probes.ProbeError, match=r"recorded with MNN 2\.9\.0"):
        probes.load(folder, mnn_version="3.6.1", strict_version=True)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(which=st.sampled_from([MANIFEST, ARRAYS]), data=st.data())
def test_random_corruption_only_raises_probe_error(
    demo_paths: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
    which: str,
    data: st.DataObject,
) -> None:
    """Random byte corruption of a saved probe never escapes as anything but ProbeError."""
    folder = copy_probe(demo_paths[1], tmp_path_factory.mktemp("fuzz") / "p")
    raw = bytearray((folder / which).read_bytes())
    n = data.draw(st.integers(1, 8))
    for _ in range(n):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    (folder / which).write_bytes(bytes(raw))
    with contextlib.suppress(probes.ProbeError):
        probes.load(folder)


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
    """A reference that returns the previous call's output disagrees with itself and is refused."""
    faulty = FaultyFactory(demo_factory, fault=Fault.STALE, rate=1.0, affects="all")
    with pytest.raises(probes.ProbeError, match="does not agree with itself"):
        probes.record(faulty, {"mel": demo.demo_mel(10)})


@pytest.mark.parametrize(
    ("inputs", "kwargs", "message"),
    [
        ({"mel": np.full((1, 80, 10), np.nan, np.float32)}, {}, "canary inputs must be finite"),
        ({"spec": demo.demo_mel(10)}, {}, "the model takes ['mel']"),
        ({"mel": demo.demo_mel(10).astype(np.complex64)}, {}, "dtype complex64 is not supported"),
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
    ids=["nan input", "wrong name", "dtype", "runs", "range", "unknown dynamic", "empty"],
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
    assert probe.meta.model_sha256 == probes.file_sha256(demo_factory.path)
    assert probe.meta.reference == {"dynamic": True} and probe.meta.runs == 3
    assert probe.inputs[0].shape == (1, 80, (1, 64))
    assert probe.outputs[0].shape == (1, 1, 12 * demo.HOP)


def test_a_probes_folder_in_the_working_directory_does_not_shadow_the_package(
    demo_probe: probes.Probe, tmp_path: Path
) -> None:
    """DESIGN.md's `probe.save("probes/vocoder")`, then Python started in that directory:
    `import probes` is still this package (the make install links files, not an import hook)."""
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
