"""Diagnosis bundles: what a failed canary leaves behind, where, how much, and off the hot path."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
from conftest import FakeClock
from prometheus_client import CollectorRegistry
from small_disk import ROTATE, run_on_small_disk

import guard
import probes
from guard import mnn
from guard.canary import init_and_check
from guard.diagnosis import DiagnosisListener, find_bundles, writer_for
from guard.ladder import Attempt, Outcome, Rung
from guard.testing import Fault, FaultyFactory
from guard.tools import demo
from guard.tools.bundles import read_bundle
from probes import measures


def quiet_policy(**kw: object) -> guard.Policy:
    """No background thread: the test sees only what it triggers."""
    return guard.Policy(background=False, promote_after=None, **kw)  # type: ignore[arg-type]


def failed_attempt(factory: guard.mnn.MNNFactory, probe: probes.Probe) -> Attempt:
    """A real failed init + canary: the demo vocoder with noise at 20 dB on every output."""
    faulty = FaultyFactory(factory, fault=Fault.NOISE, schedule=[True], snr_db=20.0)
    canary = init_and_check(faulty, {}, probe, runs=2)[1]
    assert not canary.verdict.passed
    return Attempt(guard.STATIC, 0, Outcome.FAIL, canary.verdict, None, 0.05, canary.failed_outputs)


def test_failed_canary_leaves_a_complete_bundle(
    tmp_path: Path,
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
) -> None:
    """A degraded first init leaves one bundle with arrays, scores, history and environment."""
    folder = tmp_path / "diagnosis"
    faulty = FaultyFactory(demo_factory, fault=Fault.NOISE, schedule=[True], snr_db=20.0)
    policy = quiet_policy(diagnose=folder)
    session = guard.wrap(faulty, demo_probe, name="voc", policy=policy, registry=registry)
    assert session.status.healthy and session.status.attempts == 2
    assert writer_for(folder).flush(30)
    (path,) = find_bundles(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diagnosis"]
    assert sorted(p.name for p in folder.iterdir()) == [path.name]  # no temporary left
    bundle = read_bundle(path)
    m = bundle.manifest
    assert (m["session"], m["event"], m["outcome"]) == ("voc", "init", "fail")
    assert m["rung"] == {"name": "static", "index": 0, "overrides": {}}
    assert m["model"]["sha256"] == demo.DEMO_SHA256
    assert m["mnn"]["version"] == mnn.mnn_version() and "wheel_tags" in m["mnn"]
    assert "avx2" in m["cpu"]["flags"] or "sse2" in m["cpu"]["flags"]
    assert m["threads"]["factory_threads"] == 1
    assert m["platform"]["python"] and m["factory"]["kind"] == "FaultyFactory wrapping MNNFactory"
    assert [h["outcome"] for h in m["history"]] == ["fail"]
    verdict = bundle.verdict
    assert verdict["passed"] is False and verdict["outputs"]["wav"]["snr_db"] < 25
    assert {c["judge"] for c in verdict["outputs"]["wav"]["checks"]} >= {"snr_db", "cosine"}
    assert verdict["outputs"]["wav"]["thresholds"]["snr_db"] == 45.0
    assert set(verdict["cases"]) == {"0", "1"}
    inputs, golden, actual = (bundle.arrays[f] for f in ("inputs.npz", "golden.npz", "actual.npz"))
    assert np.array_equal(inputs["case0/mel"], demo_probe.cases[0].inputs["mel"])
    assert np.array_equal(golden["case1/wav"], demo_probe.cases[1].outputs["wav"])
    assert actual["case1/wav"].shape == golden["case1/wav"].shape
    assert 15 < measures.snr_db(golden["case1/wav"], actual["case1/wav"]) < 25
    readme = (path / "README.txt").read_text()
    assert "github.com/alibaba/MNN/issues" in readme and "attach this folder" in readme


def test_a_healthy_session_writes_nothing(
    tmp_path: Path,
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
) -> None:
    """No failed canary, no bundle, and not even the folder is created."""
    policy = quiet_policy(diagnose=tmp_path / "d")
    guard.wrap(demo_factory, demo_probe, policy=policy, registry=registry).close()
    assert writer_for(tmp_path / "d").flush(30)
    assert not (tmp_path / "d").exists()


def test_a_failed_recheck_leaves_a_bundle(
    tmp_path: Path,
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
) -> None:
    """A module that turns bad after its canary is caught by a re-check, which leaves a bundle."""
    faulty = FaultyFactory(
        demo_factory, fault=Fault.ZEROS, schedule=[True], degrade_after=4, snr_db=20.0
    )
    policy = quiet_policy(diagnose=tmp_path / "d")
    with guard.wrap(faulty, demo_probe, policy=policy, registry=registry) as session:
        session.maintain(force_recheck=True)
        assert writer_for(tmp_path / "d").flush(30)
    (path,) = find_bundles(tmp_path / "d")
    bundle = read_bundle(path)
    assert (bundle.manifest["event"], bundle.manifest["outcome"]) == ("recheck", "fail")
    assert not bundle.arrays["actual.npz"]["case0/wav"].any()  # the zeros it returned
    assert [h["outcome"] for h in bundle.manifest["history"]] == ["pass", "fail"]


def test_bounds_remove_the_oldest_bundles_only(
    tmp_path: Path, demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe
) -> None:
    """At most max_bundles stay, the newest; a folder of the user's own in there is kept."""
    folder = tmp_path / "d"
    (folder / "mine").mkdir(parents=True)
    (folder / "mine" / "notes.txt").write_text("keep me")
    listener = DiagnosisListener(folder, demo_probe, factory=demo_factory, max_bundles=3)
    attempt = failed_attempt(demo_factory, demo_probe)
    for _ in range(5):
        assert listener.record("s", attempt)
        assert listener.flush(30)  # one at a time: the queue never drops one here
    kept = find_bundles(folder)
    assert kept == list(listener.writer.written)[-3:]
    assert (folder / "mine" / "notes.txt").read_text() == "keep me"
    assert [h["outcome"] for h in read_bundle(kept[-1]).manifest["history"]] == ["fail"] * 5


def test_the_default_bound_keeps_the_newest_20_bundles(
    tmp_path: Path, demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe
) -> None:
    """A session wrapped with Policy(diagnose=folder) and nothing else: 22 failed inits (one in
    wrap, 21 retries) write 22 bundles and leave exactly the newest 20."""
    folder = tmp_path / "d"
    clock = FakeClock()
    faulty = FaultyFactory(demo_factory, fault=Fault.NOISE, rate=1.0, affects="all", snr_db=20.0)
    policy = guard.Policy(
        background=False, diagnose=folder, ladder=(guard.STATIC,), reinit_attempts=0,
        promote_after=1.0,
    )  # fmt: skip
    session = guard.wrap(
        faulty, demo_probe, name="voc", policy=policy, metrics=False, raise_exhausted=False,
        clock=clock,
    )  # fmt: skip
    writer = writer_for(folder)  # the default bounds': the session's own writer
    assert writer.flush(30)
    for _ in range(21):
        clock.advance(1.0)
        assert session.maintain() == ["retry"]
        assert writer.flush(30)  # one at a time: the queue never drops one here
    session.close()
    kept = find_bundles(folder)
    assert (faulty.inits, writer.total, writer.dropped) == (22, 22, 0)
    assert len(kept) == 20 and kept == list(writer.written)[-20:]


def test_a_full_disk_makes_room_by_removing_the_oldest_bundles(tmp_path: Path) -> None:
    """On a 5 MB tmpfs (about 9 bundles), 14 failures are all written; the newest stay, and
    the full disk is said once, with no traceback."""
    report, logged = run_on_small_disk("rotate", 5, tmp_path / "disk")
    assert report["total"] == ROTATE and report["failed"] == 0
    kept = report["kept"]
    assert 5 <= len(kept) < ROTATE
    assert kept == report["written"][-len(kept) :]
    assert report["leftovers"] == []  # no temporary folder left by a failed attempt
    assert "Traceback" not in logged
    assert sum("the oldest bundles are removed to make room" in line
               for line in logged.splitlines()) == 1  # fmt: skip


def test_a_disk_full_of_other_files_drops_bundles_and_says_so_once(tmp_path: Path) -> None:
    """With no bundle of ours to remove, failures are dropped, counted and said in one line;
    once there is room, bundles are written again and that is said too."""
    report, logged = run_on_small_disk("full", 5, tmp_path / "disk")
    assert report["failed_while_full"] == 3 and report["failed"] == 3
    assert report["total"] == 1 and len(report["kept"]) == 1
    assert report["leftovers"] == []
    ours = [line for line in logged.splitlines() if line.startswith("LOG diagnosis:")]
    assert "Traceback" not in logged
    assert len(ours) == 2, logged
    assert "cannot write bundles" in ours[0] and "the disk is full" in ours[0]
    assert "written to" in ours[1] and "again" in ours[1]


def test_byte_bound_removes_old_bundles_and_omits_oversized_arrays(
    tmp_path: Path, demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe
) -> None:
    """Under max_bytes the oldest go first; arrays larger than the bound are left out."""
    attempt = failed_attempt(demo_factory, demo_probe)
    one = DiagnosisListener(tmp_path / "a", demo_probe, max_bundles=100, max_bytes=700_000)
    for _ in range(3):
        one.record("s", attempt)
        assert one.flush(30)
    assert len(find_bundles(tmp_path / "a")) == 1  # a bundle is about 480 kB
    tiny = DiagnosisListener(tmp_path / "b", demo_probe, max_bytes=10_000)
    tiny.record("s", attempt)
    assert tiny.flush(30)
    (path,) = find_bundles(tmp_path / "b")
    bundle = read_bundle(path)
    assert bundle.arrays == {} and "exceed" in bundle.manifest["arrays_omitted"]


def test_the_queue_is_bounded_and_never_blocks(
    tmp_path: Path, demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe
) -> None:
    """Failures beyond the queue are dropped and counted, never waited for."""
    listener = DiagnosisListener(tmp_path / "d", demo_probe, queue_size=1, max_bundles=100)
    attempt = failed_attempt(demo_factory, demo_probe)
    start = time.perf_counter()
    accepted = sum(listener.record("s", attempt) for _ in range(50))
    queued_in = time.perf_counter() - start
    assert listener.flush(60)
    writer = listener.writer
    assert writer.dropped == 50 - accepted >= 1
    assert len(find_bundles(tmp_path / "d")) == writer.total == accepted
    assert queued_in < writer.total * 5.0  # bounded; the real check is that 50 calls returned


@pytest.mark.hostile
@pytest.mark.parametrize("bad", [123, ""])
def test_policy_refuses_a_folder_that_is_not_a_path(bad: object) -> None:
    """Policy(diagnose=...) takes a path or None."""
    with pytest.raises(guard.ConfigError, match="diagnose must be a folder path"):
        guard.Policy(diagnose=bad)  # type: ignore[arg-type]


@pytest.mark.hostile
def test_wrap_refuses_a_folder_it_cannot_make(
    tmp_path: Path,
    demo_factory: guard.mnn.MNNFactory,
    demo_probe: probes.Probe,
    registry: CollectorRegistry,
) -> None:
    """A folder whose parent is missing, or a file, is a ConfigError at wrap time."""
    (tmp_path / "file").write_text("x")
    for folder, why in ((tmp_path / "no" / "d", "parent folder does not exist"),
                        (tmp_path / "file", "is a file")):  # fmt: skip
        with pytest.raises(guard.ConfigError, match=why):
            guard.wrap(
                demo_factory, demo_probe, policy=quiet_policy(diagnose=folder), registry=registry
            )
    assert not (tmp_path / "no").exists()


@pytest.mark.hostile
def test_reading_something_else_is_a_bundle_error(tmp_path: Path) -> None:
    """A folder without a manifest, or with someone else's, is a BundleError (a GuardError)."""
    with pytest.raises(guard.GuardError, match="not a diagnosis bundle"):
        read_bundle(tmp_path)
    (tmp_path / "bundle.json").write_text(json.dumps({"kind": "other"}))
    with pytest.raises(guard.GuardError, match="not an mnn-guard diagnosis manifest"):
        read_bundle(tmp_path)


def test_a_rung_with_objects_in_its_overrides_still_writes(
    tmp_path: Path, demo_factory: guard.mnn.MNNFactory, demo_probe: probes.Probe
) -> None:
    """Overrides MNN objects (a runtime manager) are written by their repr, in valid JSON."""
    attempt = failed_attempt(demo_factory, demo_probe)
    manager = mnn.runtime_manager(1)
    rung = Rung("custom", MappingProxyType({"runtime_manager": manager, "dynamic": False}))
    odd = Attempt(rung, 2, Outcome.FAIL, attempt.verdict, None, 0.1, attempt.outputs)
    listener = DiagnosisListener(tmp_path / "d", demo_probe)
    listener.record("s", odd)
    assert listener.flush(30)
    (path,) = find_bundles(tmp_path / "d")
    overrides = read_bundle(path).manifest["rung"]["overrides"]
    assert overrides["dynamic"] is False and "RuntimeManager" in overrides["runtime_manager"]
