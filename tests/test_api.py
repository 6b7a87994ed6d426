"""The public surface: few names, listed once, each importable; no runtime file too long."""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

import guard
import probes

ROOT = Path(guard.__file__).parent.parent
RUNTIME_LIMIT = 600  # lines in any runtime file (guard/ outside guard/tools/, and probes/)


def test_guard_exports_at_most_25_names_each_from_its_module() -> None:
    """guard.__all__ has at most 25 names, no repeats, and each resolves to its module's object."""
    assert len(guard.__all__) <= 25 and len(set(guard.__all__)) == len(guard.__all__)
    stub = ast.parse((ROOT / "guard" / "__init__.pyi").read_text())
    homes = {a.name: n.module for n in stub.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert sorted(homes) == sorted(guard.__all__)
    for name, module in homes.items():
        assert getattr(guard, name) is getattr(importlib.import_module(module), name), name


def test_probes_exports_at_most_12_names() -> None:
    """probes.__all__ has at most 12 names, each an attribute of the package."""
    assert len(probes.__all__) <= 12
    assert all(hasattr(probes, name) for name in probes.__all__)


@pytest.mark.parametrize(
    ("name", "home"),
    [("SessionClosed", "guard.errors"), ("HealthTable", "guard.health")],
)
def test_names_that_moved_still_resolve_with_a_deprecation_warning(name: str, home: str) -> None:
    """A name that left the top level resolves to its new home and says where it is now."""
    with pytest.warns(DeprecationWarning, match=f"{home}.{name}"):
        value = getattr(guard, name)
    assert value is getattr(importlib.import_module(home), name)


def test_an_unknown_name_is_an_attribute_error() -> None:
    """guard.nope raises AttributeError (not ModuleNotFoundError), without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            _ = guard.nope  # type: ignore[attr-defined]


def test_no_runtime_file_is_longer_than_600_lines() -> None:
    """Every file a serving process may import (guard/ outside tools, probes/) is short."""
    runtime = [
        p
        for folder in ("guard", "probes")
        for p in (ROOT / folder).rglob("*.py")
        if "tools" not in p.relative_to(ROOT).parts
    ]
    long = {
        str(p.relative_to(ROOT)): n
        for p in runtime
        if (n := len(p.read_text().splitlines())) > RUNTIME_LIMIT
    }
    assert runtime and not long, long
