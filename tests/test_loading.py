"""`guard.mnn.load`: every factory mnn-guard ships answers `load(**overrides)` with the module
and what MNN said while loading it; `__call__` returns the module alone; a user's own factory
(a plain callable) gets an empty report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_real_models import cf_factory
from test_session_api import make_demo_session as make_session

import guard
from guard import mnn
from guard.testing import DegradedModule, Fault, FaultyFactory
from guard.tools import demo


@pytest.fixture()
def control_flow(converted: dict[str, Path]) -> mnn.MNNFactory:
    """A factory of a model MNN always loads statically (it says so when asked for dynamic)."""
    return cf_factory(converted)


def test_a_module_factory_reports_a_static_load(control_flow: mnn.MNNFactory) -> None:
    """MNNFactory.load says when MNN turned dynamic=True back into a static load, with MNN's
    words; a static load asked for is no such turn."""
    module, report = control_flow.load(dynamic=True)
    assert callable(module.forward) and report.turned_static
    assert any(mnn.STATIC_LOAD_NOTE in note for note in report.notes)
    assert not control_flow.load()[1].turned_static


def test_calling_a_factory_returns_the_module_alone(control_flow: mnn.MNNFactory) -> None:
    """`factory(**overrides)` is the module, as any user's factory returns it."""
    assert callable(control_flow(dynamic=True).forward)
    assert isinstance(guard.mnn_session_factory(demo.DEMO_MODEL)(), mnn.SessionModule)
    factory = guard.session_factory(make_session, path=demo.DEMO_MODEL)
    assert isinstance(factory(), mnn.SessionModule)


def test_session_factories_load_with_a_report(control_flow: mnn.MNNFactory) -> None:
    """MNNSessionFactory and SessionFactory answer load() with a module and a report; their
    Module API rung reports as MNNFactory does."""
    for factory in (
        guard.mnn_session_factory(demo.DEMO_MODEL, {"numThread": 1}),
        guard.session_factory(make_session, path=demo.DEMO_MODEL),
    ):
        runner, report = factory.load()
        assert isinstance(runner, mnn.SessionModule) and isinstance(report, mnn.LoadReport)
        module, report = factory.load(dynamic=True)
        assert callable(module.forward) and not report.turned_static


def test_a_faulty_factory_passes_its_inner_report_through(control_flow: mnn.MNNFactory) -> None:
    """FaultyFactory's load returns the wrapped factory's report, for a degraded init and a
    clean one alike."""
    faulty = FaultyFactory(control_flow, fault=Fault.ZEROS, schedule=[True, False], affects="all")
    degraded, report = faulty.load(dynamic=True)
    assert isinstance(degraded, DegradedModule) and report.turned_static
    clean, report = mnn.load(faulty, {"dynamic": True})
    assert not isinstance(clean, DegradedModule) and report.turned_static


def test_a_plain_callable_gets_an_empty_report(control_flow: mnn.MNNFactory) -> None:
    """A user's factory without load() is called; MNN's words are not guessed for it."""

    def mine(**overrides: Any) -> Any:
        return control_flow(**overrides)

    module, report = mnn.load(mine, {"dynamic": True})
    assert callable(module.forward) and report == mnn.LoadReport()


@pytest.mark.hostile
def test_a_load_method_that_returns_something_else_is_a_factory_error() -> None:
    """A factory whose load() does not return (module, LoadReport) is refused by name."""

    class Odd:
        def __call__(self, **overrides: Any) -> Any:
            return None

        def load(self, **overrides: Any) -> Any:
            return "module"

    returned = r"Odd.load\(\*\*overrides\) returned a str"
    with pytest.raises(guard.errors.FactoryError, match=returned):
        mnn.load(Odd(), {})
