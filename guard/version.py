"""The mnn-guard version, in one place (pyproject.toml reads it; CHANGELOG.md describes it)."""

__version__ = "0.2.0"
