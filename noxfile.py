"""The compatibility matrix: mnn-guard on every supported PyMNN release (docs/compatibility.md).

Each session installs the project (not editable: as a user's `pip install .` does) with one
PyMNN release into a fresh virtual environment made by uv, runs the core suite and the
real-model tests, then measures the MNN facts and runs the demo (compat/facts.py).

    make compat          # every release, then docs/compatibility.md is written again
    make compat-edges    # CI: the oldest release's session, and the newest release's facts
                         # and demo (`make test` runs the whole suite on it): nox -t edges
    .venv/bin/nox -s "compat(3.4.1)"
"""

from __future__ import annotations

import json
from pathlib import Path

import nox

RELEASES = ("3.0.0", "3.1.0", "3.2.0", "3.4.0", "3.4.1", "3.5.0", "3.6.0", "3.6.1")
"""Every PyMNN release for CPython 3.11 within the supported range (`MNN>=3.0,<3.7`)."""
EDGES = (RELEASES[0], RELEASES[-1])

TESTS = (  # the core suite and the real-model tests: what differs between releases is here
    "tests/test_session.py",
    "tests/test_state_machine.py",
    "tests/test_judges.py",
    "tests/test_probes.py",
    "tests/test_inputs.py",
    "tests/test_loading.py",
    "tests/test_overrides.py",
    "tests/test_model_files.py",
    "tests/test_real_models.py",
    "tests/test_session_api.py",
    "tests/test_demo.py",
    "tests/test_fork.py",
    "tests/test_diagnose.py",
    "tests/test_cli.py",
    "tests/test_upgrade_check.py",
)

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["compat"]
nox.options.error_on_missing_interpreters = True


def _install(session: nox.Session, mnn: str) -> None:
    session.install(".[test,diagnose]", f"MNN=={mnn}")


def _facts(session: nox.Session, results: str, report: str | None = None) -> None:
    tests = ("--tests", report) if report else ()
    session.run("python", "compat/facts.py", *tests, "--json", results)


@nox.session(python="3.11")
@nox.parametrize(
    "mnn", [nox.param(r, id=r, tags=["edges"] if r == EDGES[0] else []) for r in RELEASES]
)
def compat(session: nox.Session, mnn: str) -> None:
    """The tests, the MNN facts and the demo on one PyMNN release."""
    _install(session, mnn)
    report = f"build/compat/{mnn}.xml"
    # failed tests (exit 1) still get the facts measured and recorded, then fail the session
    session.run(
        "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", f"--junitxml={report}",
        *TESTS, *session.posargs, success_codes=[0, 1],
    )  # fmt: skip
    # `make compat` copies the results to compat/results/ (docs/compatibility.md shows them);
    # CI's edges leave the committed results alone
    results = f"build/compat/results/{mnn}.json"
    _facts(session, results, report)
    counts = json.loads(Path(results).read_text())["tests"]
    if counts["failures"] or counts["errors"]:
        session.error(f"tests failed on MNN {mnn}: {counts} ({results})")


@nox.session(python="3.11")
@nox.parametrize(
    "mnn", [nox.param(r, id=r, tags=["edges"] if r == EDGES[1] else []) for r in RELEASES]
)
def facts(session: nox.Session, mnn: str) -> None:
    """The MNN facts and the demo alone on one release: CI's newest release, whose tests
    `make test` runs in .venv (the range resolves to the newest release)."""
    _install(session, mnn)
    _facts(session, f"build/compat/facts-{mnn}.json")
