"""`make mutate-pool` and `make mutate-judgement`: mutation testing of one part of the core, on a
copy of the tree.

Every pool test spawns worker processes, so a pool mutant costs seconds where others cost
milliseconds; the judgement's tests (calibration, shadow checks) build many modules. mutmut
reads one configuration (pyproject.toml in its working folder), so this copies the sources and
tests to build/mutate-SET, mutates only that set's modules there (SETS), runs mutmut on the
set's own test files and prints the score. Results stay in build/mutate-SET/mutants between
runs, so the mutants can be run in batches: name them (mutmut accepts globs, e.g.
"guard.pool.worker.x_serve*") and only those run; mutants never run show as "not checked".

    python mutation/subset.py {pool,judgement} [--jobs 2] [--fresh] [MUTANT ...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POOL_SOURCES = [  # every module of guard/pool/ with logic (__init__.py only re-exports)
    "guard/pool/parent.py",
    "guard/pool/dispatch.py",
    "guard/pool/slot.py",
    "guard/pool/job.py",
    "guard/pool/shared.py",
    "guard/pool/wire.py",
    "guard/pool/worker.py",
    "guard/pool/children.py",
]
POOL_FILES = [
    "tests/test_slot.py",
    "tests/test_job.py",
    "tests/test_shared.py",
    "tests/test_pool.py",
    "tests/test_async_pool.py",
    "tests/test_workers.py",
]
JUDGEMENT_SOURCES = [
    "guard/judgement.py",
    "guard/maintenance.py",
    "guard/shadow.py",
    "guard/reference.py",
    "probes/calibration.py",
]
JUDGEMENT_FILES = [
    "tests/test_shadow.py",
    "tests/test_reference.py",
    "tests/test_calibration.py",
    "tests/test_session.py",
    "tests/test_canary.py",
    "tests/test_state_machine.py",
    "tests/test_promotion.py",
    "tests/test_health.py",
    "tests/test_metrics.py",
    "tests/test_probes.py",
]
SETS = {"pool": (POOL_SOURCES, POOL_FILES), "judgement": (JUDGEMENT_SOURCES, JUDGEMENT_FILES)}
"""Each set's modules, and the tests mutmut maps to their functions (a first, unmutated run);
mutation/select_tests.py narrows each mutant's share of them."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("set", choices=sorted(SETS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="forget earlier results")
    parser.add_argument("mutants", nargs="*", help="run only these mutants (globs allowed)")
    args = parser.parse_args()
    sources_of, files_of = SETS[args.set]
    work = ROOT / "build" / f"mutate-{args.set}"
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("guard", "probes", "tests", "mutation"):
        shutil.copytree(ROOT / folder, work / folder, dirs_exist_ok=True, ignore=skip)
    config = (ROOT / "pyproject.toml").read_text()
    # settings at the start of a line (a comment may quote one)
    only = r"^only_mutate = \[[^\]]*\]"
    sources = "only_mutate = [" + ", ".join(f'"{f}"' for f in sources_of) + "]"
    config, count = re.subn(only, sources, config, flags=re.MULTILINE)
    assert count == 1, "pyproject.toml has no [tool.mutmut] only_mutate list"
    files = ", ".join(f'"{f}"' for f in files_of)
    pattern = r"^pytest_add_cli_args_test_selection = \[[^\]]*\]"
    selection = f"pytest_add_cli_args_test_selection = [{files}]"
    config, count = re.subn(pattern, selection, config, flags=re.MULTILINE)
    assert count == 1, "pyproject.toml has no [tool.mutmut] pytest_add_cli_args_test_selection"
    # mutmut stops a mutant after multiplier x (the time of every test it maps to the function
    # + constant): for the pool that sum counts every pool test, most of which select_tests.py
    # leaves out, so a hanging mutant cost 3 x (60 + 5) s; 0.5 x (60 + 30) s is still three
    # times what the selected tests take, and a function reached by one short test gets 15 s
    for key, value in (("timeout_multiplier", "0.5"), ("timeout_constant", "30.0")):
        config, count = re.subn(rf"^{key} = .*$", f"{key} = {value}", config, flags=re.MULTILINE)
        assert count == 1, f"pyproject.toml has no [tool.mutmut] {key}"
    (work / "pyproject.toml").write_text(config)
    env = {**os.environ, "HYPOTHESIS_PROFILE": "mutation"}
    mutmut = Path(sys.executable).parent / "mutmut"
    run = [str(mutmut), "run", "--max-children", str(args.jobs), *args.mutants]
    subprocess.run(run, check=False, cwd=work, env=env)
    score = [sys.executable, str(ROOT / "mutation" / "score.py"), "--mutants"]
    return subprocess.run([*score, str(work / "mutants")], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
