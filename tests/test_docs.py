"""The README and the documentation site: what they promise is what the project holds."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import guard
import probes

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_api_reference_documents_every_public_name() -> None:
    """docs/api.md renders each name of guard.__all__ and probes.__all__, and no other."""
    api = (ROOT / "docs" / "api.md").read_text()
    rendered = re.findall(r"^::: (\w+)\.(\w+)$", api, re.MULTILINE)
    assert sorted(n for p, n in rendered if p == "guard") == sorted(guard.__all__)
    assert sorted(n for p, n in rendered if p == "probes") == sorted(probes.__all__)
    assert len(rendered) == len(set(rendered))


def test_the_readme_is_a_front_page() -> None:
    """At most 250 lines; the two commands first; an install from a clone."""
    lines = README.splitlines()
    assert len(lines) <= 250
    assert lines[2].split()[:2] == ["make", "demo"] and lines[3].split()[:2] == ["make", "test"]
    assert "pip install '.[serve]'" in README


def test_no_page_installs_a_package_the_registry_lacks() -> None:
    """mnn-guard is not on PyPI: no page and no message tells anyone to `pip install mnn-guard`."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    pages += sorted((ROOT / "guard").rglob("*.py"))
    for page in pages:
        assert not re.search(r"pip install\s+['\"]?mnn-guard", page.read_text()), page.name


def test_the_readme_links_only_files_of_the_repository() -> None:
    """Every relative link of the README names a file or folder that exists here."""
    targets = [t for t in LINK.findall(README) if "://" not in t]
    assert targets
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing


def test_every_page_is_in_the_site() -> None:
    """Each docs/*.md is a page of mkdocs.yml's nav (the strict build fails on the others)."""
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert [p for p in pages if f": {p}" not in nav] == []


def test_the_changelog_starts_with_this_version() -> None:
    """CHANGELOG.md's first release heading is guard/version.py's version."""
    changelog = (ROOT / "CHANGELOG.md").read_text()
    first = re.search(r"^## (\S+)", changelog, re.MULTILINE)
    assert first is not None and first.group(1) == guard.__version__
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "guard.version.__version__" }' in pyproject


def test_the_readme_example_runs(tmp_path: Path) -> None:
    """The README's example, as written (on a free port), in a fresh interpreter elsewhere."""
    code = README[README.index("```python\n") + 10 :]
    code = code[: code.index("```")].replace("port=9108", "port=0")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "static True" in done.stdout and "input 'mel'" in done.stdout
    assert (tmp_path / "probes" / "vocoder" / "manifest.json").is_file()
