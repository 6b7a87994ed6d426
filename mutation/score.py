"""The mutation score of the last `mutmut run`, per core module, less the listed equivalents.

Reads mutmut's results in mutants/ and the entries of mutation/equivalent.md. Each entry names
a mutant and quotes the line its mutation produces; an entry whose mutant no longer exists, or
whose quoted line is no longer that mutant's (the code moved and mutmut renumbered), is reported
as stale and not subtracted. Only entries above the "## Known holes" heading are subtracted:
known holes count as survivors. Timeouts and crashes count as killed. A survivor that is in
neither list is unexplained. Exits 1 below the target, with stale entries, or with unexplained
survivors.

    python mutation/score.py [--target 90] [--list survived]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / "mutation" / "equivalent.md"
MUTANTS = ROOT / "mutants"  # `make mutate-pool` passes its own (--mutants)

KILLED = {1: "killed", 3: "killed", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout"}
KILLED |= {255: "timeout", -11: "segfault", -9: "segfault", 37: "type check"}
OTHER = {0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", None: "not checked"}

# - `guard.session.xǁGuardedSessionǁ_to__mutmut_5` `+ line of the mutant`: why
# (a line that holds backticks is quoted as markdown does: `` a line with `code` in it ``)
ENTRY = re.compile(r"^- `(?P<name>[^`]+)` (?:`` (?P<long>.+?) ``|`(?P<line>[^`]+)`)", re.MULTILINE)


def status(code: int | None) -> str:
    """mutmut's verdict for an exit code; timeouts and crashes (signals) count as killed."""
    if code is None:
        return "not checked"
    if code < 0 and code not in KILLED:
        return "segfault"  # the test process died of a signal the mutant caused
    return KILLED.get(code, OTHER.get(code, "suspicious"))


def results(mutants: Path) -> dict[str, dict[str, str]]:
    """Module -> mutant name -> verdict, from the .meta file of each file mutmut mutates now."""
    import tomllib

    config = tomllib.loads((mutants.parent / "pyproject.toml").read_text())
    mutated = set(config["tool"]["mutmut"]["only_mutate"])
    found: dict[str, dict[str, str]] = defaultdict(dict)
    for meta in sorted(mutants.rglob("*.py.meta")):
        source = meta.relative_to(mutants).with_suffix("")
        if source.as_posix() not in mutated:
            continue  # left from a run with other settings
        module = ".".join(source.with_suffix("").parts)
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            found[module][name] = status(code)
    return found


def module_of(name: str) -> str:
    """The module a mutant's name starts with: probes.judges.x_snr_db__mutmut_1 -> probes.judges."""
    return re.split(r"\.x[_\u01c1]", name, maxsplit=1)[0]


def mutant_lines(name: str) -> list[str]:
    """The lines a mutant adds (the `+` side of `mutmut show`), without the diff header."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    diff = get_diff_for_mutant(name)
    added = [x for x in diff.splitlines() if x.startswith("+") and not x.startswith("++")]
    return [x[1:].strip() for x in added]


def listed(known: set[str], text: str) -> tuple[set[str], list[str]]:
    """(mutants of `text`'s entries still matching their quoted line, stale entries)."""
    good: set[str] = set()
    stale: list[str] = []
    modules = {module_of(n) for n in known}
    for m in ENTRY.finditer(text):
        name, line = m["name"], (m["line"] or m["long"]).strip()
        if module_of(name) not in modules:
            continue  # a module this run did not mutate (`make mutate-pool` mutates one)
        if name not in known:
            stale.append(f"{name}: no such mutant")
        elif line not in mutant_lines(name):
            stale.append(f"{name}: its mutation is no longer `{line}`")
        else:
            good.add(name)
    return good, stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=90.0, help="minimum score, percent")
    parser.add_argument("--list", default="survived,no tests,suspicious,not checked")
    parser.add_argument("--mutants", type=Path, default=MUTANTS, help="mutmut's mutants/ folder")
    args = parser.parse_args()
    import os

    mutants = args.mutants.resolve()  # before the chdir: a relative path names the caller's
    os.chdir(mutants.parent)  # mutmut reads its config from pyproject.toml here
    found = results(mutants)
    names = {n for verdicts in found.values() for n in verdicts}
    above, _, below = EQUIVALENT.read_text().partition("\n## Known holes")
    equivalent, stale = listed(names, above)
    holes, stale_holes = listed(names, below)
    stale += stale_holes
    rows = []
    totals: Counter[str] = Counter()
    for module, verdicts in sorted(found.items()):
        counts = Counter(
            "equivalent" if n in equivalent and v != "killed" else v for n, v in verdicts.items()
        )
        killed = sum(counts[v] for v in set(KILLED.values()))
        judged = sum(counts.values()) - counts["equivalent"] - counts["skipped"]
        rows.append((module, killed, judged, counts))
        totals.update(counts)
    width = max(len(r[0]) for r in rows)
    print(f"{'module':{width}}  score   killed  survived  equivalent  other")
    for module, killed, judged, counts in rows:
        other = judged - killed - counts["survived"]
        score = 100.0 * killed / judged if judged else 100.0
        print(
            f"{module:{width}}  {score:5.1f}%  {killed:6}  {counts['survived']:8}  "
            f"{counts['equivalent']:10}  {other:5}"
        )
    killed = sum(totals[v] for v in set(KILLED.values()))
    judged = sum(totals.values()) - totals["equivalent"] - totals["skipped"]
    score = 100.0 * killed / judged if judged else 100.0
    print(f"{'core':{width}}  {score:5.1f}%  {killed:6}  {totals['survived']:8}  "
          f"{totals['equivalent']:10}  {judged - killed - totals['survived']:5}")  # fmt: skip
    print(f"verdicts: {dict(sorted(totals.items()))}")
    shown = set(args.list.split(","))
    unexplained = []
    for _, verdicts in sorted(found.items()):
        for name, verdict in sorted(verdicts.items()):
            if verdict in shown and name not in equivalent:
                print(f"  {verdict}: {name}" + (" (known hole)" if name in holes else ""))
            if verdict == "survived" and name not in equivalent | holes:
                unexplained.append(name)
    for name in sorted(holes):
        if status_of(found, name) not in ("survived", "not checked"):
            stale.append(f"{name}: listed as a known hole, now {status_of(found, name)}")
    for entry in stale:
        print(f"stale equivalent.md entry: {entry}")
    print(f"survivors neither equivalent nor known holes: {len(unexplained)}")
    return 0 if score >= args.target and not stale and not unexplained else 1


def status_of(found: dict[str, dict[str, str]], name: str) -> str:
    """A mutant's verdict in this run."""
    return found[module_of(name)][name]


if __name__ == "__main__":
    sys.exit(main())
