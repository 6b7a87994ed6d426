"""Write diagnosis bundles onto a small real disk: a tmpfs in a private mount namespace.

`run_on_small_disk(scenario, megabytes)` runs this file in a child process that mounts a tmpfs
of that size (`unshare --mount --map-root-user`: root, or an unprivileged user namespace, may;
the mount goes away with the child) and plays `scenario` there with a default
DiagnosisListener and a real failed canary of the demo vocoder. The child prints one JSON line
on stdout; what the guard logged is on stderr.

- "rotate": 14 bundles, one at a time, onto a disk that holds about 9.
- "full": the disk filled by another file, 3 bundles, the file removed, 1 more bundle.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROTATE = 14
CHUNK = 1 << 16


def run_on_small_disk(scenario: str, megabytes: int, mount: Path) -> tuple[dict[str, Any], str]:
    """Play `scenario` on a tmpfs of `megabytes` MB at `mount`: its report, and its log."""
    if shutil.which("unshare") is None:
        raise RuntimeError("the small-disk tests need util-linux's `unshare`")
    mount.mkdir(parents=True, exist_ok=True)
    script = 'mount -t tmpfs -o size="$1"m tmpfs "$2" && shift 2 && exec "$@"'
    done = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", script, "sh", str(megabytes),
         str(mount), sys.executable, __file__, scenario, str(mount)],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"small-disk child failed ({done.returncode}): {done.stderr}")
    report: dict[str, Any] = json.loads(lines[-1])
    return report, done.stderr


def _failed_attempt() -> Any:
    """A real failed init + canary: the demo vocoder with noise at 20 dB on every output."""
    import guard
    import probes
    from guard.canary import init_and_check
    from guard.ladder import Attempt, Outcome
    from guard.testing import Fault, FaultyFactory
    from guard.tools import demo

    _, probe_dir = demo.ensure_demo()
    probe = probes.load(probe_dir)
    faulty = FaultyFactory(demo.demo_factory(), fault=Fault.NOISE, schedule=[True], snr_db=20.0)
    canary = init_and_check(faulty, {}, probe, runs=2)[1]
    return probe, Attempt(
        guard.STATIC, 0, Outcome.FAIL, canary.verdict, None, 0.05, canary.failed_outputs
    )


def _fill(path: Path) -> None:
    """Write `path` until the disk is full."""
    with path.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * CHUNK)
        except OSError:
            pass


def _play(scenario: str, mount: Path) -> dict[str, Any]:
    from guard.diagnosis import DiagnosisListener, find_bundles

    probe, attempt = _failed_attempt()
    listener = DiagnosisListener(mount / "d", probe)
    writer = listener.writer
    if scenario == "full":
        (mount / "d").mkdir()
        _fill(mount / "other.bin")
    for _ in range(ROTATE if scenario == "rotate" else 3):
        listener.record("s", attempt)
        listener.flush(60)
    failed_while_full = writer.failed
    if scenario == "full":
        (mount / "other.bin").unlink()
        listener.record("s", attempt)
        listener.flush(60)
    return {
        "total": writer.total,
        "failed": writer.failed,
        "failed_while_full": failed_while_full,
        "written": [p.name for p in writer.written],
        "kept": [p.name for p in find_bundles(mount / "d")],
        "leftovers": sorted(p.name for p in (mount / "d").iterdir() if p.name.startswith(".")),
    }


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="LOG %(message)s")
    print(json.dumps(_play(sys.argv[1], Path(sys.argv[2]))))
