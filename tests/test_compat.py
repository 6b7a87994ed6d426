"""The compatibility matrix's tooling: nox's edges, the committed results and their page."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RELEASES: tuple[str, ...] = _module(ROOT / "noxfile.py").RELEASES  # once: nox registers sessions


def test_ci_edges_are_the_oldest_release_tested_and_the_newest_measured() -> None:
    """`nox -t edges` selects the oldest release's compat session and the newest's facts."""
    nox = Path(sys.executable).with_name("nox")
    done = subprocess.run(
        [str(nox), "-l", "-t", "edges"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    selected = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("* ")]
    assert selected == [f"compat({RELEASES[0]})", f"facts({RELEASES[-1]})"]


def test_the_compatibility_page_shows_the_committed_results_of_every_release() -> None:
    """docs/compatibility.md is compat/report.py's page of compat/results/, one per release."""
    report = _module(ROOT / "compat" / "report.py")
    files = sorted((ROOT / "compat" / "results").glob("*.json"))
    results = sorted((json.loads(p.read_text()) for p in files), key=report._release)
    assert [r["mnn"] for r in results] == list(RELEASES)
    page = (ROOT / "docs" / "compatibility.md").read_text()
    assert page == report.render(results)
