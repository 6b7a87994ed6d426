"""Byte-level fuzzing of real probe folders: probes.load loads the same probe or raises ProbeError.

The arrays are protected by the manifest's sha256, so a damaged arrays.npz (even with the
checksum updated, as an attacker would) must load as the original probe or be refused. The
manifest has no checksum of its own: a damaged manifest that still parses may say something
else (another threshold digit, another note), so the probe it loads must say exactly what the
damaged manifest says (saving it again gives the same JSON) and keep the original arrays.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
from conftest import examples
from hypothesis import HealthCheck, given, settings

import probes
from probes import probe as probe_module
from probes import signature
from probes.store import ARRAYS, MANIFEST

pytestmark = pytest.mark.hostile


@dataclass(frozen=True, repr=False)
class Original:
    """A real probe folder's bytes, the probe it loads as, and where its zip structure lies."""

    probe: probes.Probe
    manifest: bytes
    arrays: bytes
    structure: tuple[tuple[int, int], ...]  # byte ranges of zip headers and .npy headers

    def __repr__(self) -> str:
        return f"Original({len(self.manifest)} + {len(self.arrays)} bytes)"


def tiny_probe() -> probes.Probe:
    """A small probe of two cases (float32 and int32 inputs, per-output limits) whose arrays.npz
    is mostly zip and .npy structure rather than data."""
    rng = np.random.default_rng(7)
    cases = tuple(
        probes.Case(
            inputs={
                "x": rng.standard_normal((1, 4, n)).astype(np.float32),
                "ids": rng.integers(0, 9, (n,)).astype(np.int32),
            },
            outputs={"y": rng.standard_normal((1, 1, 2 * n)).astype(np.float32)},
        )
        for n in (3, 5)
    )
    return probes.Probe(
        cases=cases,
        inputs=(
            signature.InputSpec(name="x", dtype="float32", shape=(1, 4, (1, 8))),
            signature.InputSpec(name="ids", dtype="int32", shape=((1, 8),)),
        ),
        outputs=(signature.OutputSpec(name="y", dtype="float32", shape=(1, 1, 6)),),
        per_output={"y": probes.Thresholds(min_snr_db=30.0, max_lsd_db=None, max_abs=0.5)},
        meta=probe_module.ProbeMeta(
            model_sha256="ab" * 32,
            mnn_version="3.6.1",
            reference={"dynamic": True, "precision": "high"},
            runs=3,
            created="2026-01-01T00:00:00+00:00",
            notes=("fuzzing",),
        ),
    )


def structure_of(arrays: bytes) -> tuple[tuple[int, int], ...]:
    """Byte ranges holding zip local headers with the .npy header after them, and the zip
    directory with its end records."""
    with zipfile.ZipFile(io.BytesIO(arrays)) as zf:
        ranges = [
            (i.header_offset, i.header_offset + 30 + len(i.filename) + 20 + 128)
            for i in zf.infolist()
        ]
        ranges.append((zf.start_dir, len(arrays)))  # type: ignore[attr-defined]
    return tuple(ranges)


@pytest.fixture(scope="module")
def originals(
    demo_paths: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Original]:
    """The shipped demo probe and a tiny one, each saved by probe.save and loaded back."""
    found: dict[str, Original] = {}
    for name, probe in (("demo", probes.load(demo_paths[1])), ("tiny", tiny_probe())):
        folder = tmp_path_factory.mktemp(f"original-{name}")
        probe.save(folder)
        arrays = (folder / ARRAYS).read_bytes()
        loaded = probes.load(folder)
        assert loaded == probe
        found[name] = Original(
            loaded, (folder / MANIFEST).read_bytes(), arrays, structure_of(arrays)
        )
    return found


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One folder that every example overwrites."""
    yield tmp_path_factory.mktemp("fuzz")


def mutate(data: st.DataObject, raw: bytes, structure: tuple[tuple[int, int], ...] = ()) -> bytes:
    """1-4 byte edits (flip a bit, set a byte, insert, delete, truncate), half of them inside
    `structure` when it is given."""
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]), label="op")
        if structure and data.draw(st.booleans(), label="in structure"):
            lo, hi = data.draw(st.sampled_from(structure), label="range")
            pos = data.draw(st.integers(lo, max(lo, min(hi, len(buf)) - 1)), label="pos")
        else:
            pos = data.draw(st.integers(0, max(len(buf) - 1, 0)), label="pos")
        pos = min(pos, len(buf))
        if op == "flip" and pos < len(buf):
            buf[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif op == "set" and pos < len(buf):
            buf[pos] = data.draw(st.integers(0, 255), label="byte")
        elif op == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8), label="inserted")
        elif op == "delete":
            del buf[pos : pos + data.draw(st.integers(1, 8), label="deleted")]
        elif op == "truncate":
            del buf[pos:]
    return bytes(buf)


def load(folder: Path, manifest: bytes, arrays: bytes) -> probes.Probe | probes.ProbeError:
    """Write the two files and load them: a probe, or the ProbeError (anything else escapes)."""
    (folder / MANIFEST).write_bytes(manifest)
    (folder / ARRAYS).write_bytes(arrays)
    try:
        return probes.load(folder)
    except probes.ProbeError as exc:
        return exc


def with_sha(manifest: bytes, arrays: bytes) -> bytes:
    """The manifest with its checksum updated to `arrays`, as an attacker would."""
    value = json.loads(manifest)
    value["arrays"]["sha256"] = hashlib.sha256(arrays).hexdigest()
    return json.dumps(value).encode()


FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@settings(FUZZ, max_examples=examples(2000))
@given(which=st.sampled_from(["demo", "tiny"]), fix_checksum=st.booleans(), data=st.data())
def test_damaged_arrays_load_the_original_or_raise_probe_error(
    originals: dict[str, Original],
    workspace: Path,
    which: str,
    fix_checksum: bool,
    data: st.DataObject,
) -> None:
    """A damaged arrays.npz, checksum updated or not, loads as the original probe or is refused."""
    original = originals[which]
    arrays = mutate(data, original.arrays, original.structure)
    manifest = with_sha(original.manifest, arrays) if fix_checksum else original.manifest
    result = load(workspace, manifest, arrays)
    if isinstance(result, probes.Probe):
        assert result == original.probe
    elif not fix_checksum:
        assert arrays != original.arrays and "corrupt or was changed" in str(result)


def manifest_of(probe: probes.Probe, folder: Path) -> Any:
    """The JSON a probe saves as its manifest, without the arrays' checksum."""
    probe.save(folder)
    value = json.loads((folder / MANIFEST).read_text())
    del value["arrays"]["sha256"]
    return value


@settings(FUZZ, max_examples=examples(2000))
@given(which=st.sampled_from(["demo", "tiny"]), data=st.data())
def test_damaged_manifest_loads_what_it_says_or_raises_probe_error(
    originals: dict[str, Original], workspace: Path, which: str, data: st.DataObject
) -> None:
    """A damaged manifest is refused, or loads a probe that says exactly what it says, with the
    original arrays (the original probe itself when the JSON is unchanged)."""
    original = originals[which]
    manifest = mutate(data, original.manifest)
    result = load(workspace, manifest, original.arrays)
    try:
        said = json.loads(manifest)
    except ValueError:  # not JSON, or an integer too long to read
        assert isinstance(result, probes.ProbeError)
        return
    if isinstance(result, probes.ProbeError):
        return
    assert [c for c in result.cases] == list(original.probe.cases)
    assert isinstance(said, dict)
    del said["arrays"]["sha256"]
    assert manifest_of(result, workspace / "again") == said
    if said == manifest_of(original.probe, workspace / "original"):
        assert result == original.probe
