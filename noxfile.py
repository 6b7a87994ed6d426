"""The compatibility matrix: mnn-guard on every supported PyMNN release (docs/compatibility.md).

Each session installs the project (not editable: as a user's `pip install .` does) with one
PyMNN release into a fresh virtual environment made by uv, runs the core suite and the
real-model tests, then measures the MNN facts and runs the demo (compat/facts.py).

    make compat          # every release, then docs/compatibility.md is written again
    make compat-edges    # the oldest and the newest release (what CI runs): nox -t edges
    .venv/bin/nox -s "compat(3.4.1)"
"""

from __future__ import annotations

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
nox.options.error_on_missing_interpreters = True


@nox.session(python="3.11")
@nox.parametrize(
    "mnn", [nox.param(r, id=r, tags=["edges"] if r in EDGES else []) for r in RELEASES]
)
def compat(session: nox.Session, mnn: str) -> None:
    """The tests, the MNN facts and the demo on one PyMNN release."""
    session.install(".[test]", f"MNN=={mnn}")
    report = f"build/compat/{mnn}.xml"
    session.run(
        "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", f"--junitxml={report}",
        *TESTS, *session.posargs,
    )  # fmt: skip
    session.run(
        "python", "compat/facts.py", "--tests", report, "--json", f"compat/results/{mnn}.json"
    )
