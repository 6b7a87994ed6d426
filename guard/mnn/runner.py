"""The seam between the guard's core and MNN: what a factory made, as a numpy-level Runner."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast

from numpy.typing import NDArray

from guard.errors import FactoryError
from guard.mnn.module_api import VarModule
from guard.mnn.native import LoadReport, note_load
from guard.mnn.session_api import SessionModule, session_pair

__all__ = ["LoadReport", "Runner", "adapt", "load", "why_no_outputs"]


class Runner(Protocol):
    """A module seen at the numpy level: arrays in model input order in, owned arrays out."""

    def run(self, arrays: Sequence[NDArray[Any]]) -> list[NDArray[Any]]:
        """Run one forward."""
        ...


def load(factory: Callable[..., Any], overrides: Mapping[str, Any]) -> tuple[Any, LoadReport]:
    """What `factory(**overrides)` makes, and what MNN said while it loaded.

    A factory with a `load(**overrides) -> (module, LoadReport)` method (every factory
    mnn-guard ships, `guard.testing.FaultyFactory` included) is asked through it; any other
    factory is called and gets an empty report.
    """
    method = getattr(factory, "load", None)
    if not callable(method):
        return factory(**overrides), LoadReport()
    made = method(**overrides)
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[1], LoadReport)):
        raise FactoryError(
            f"{type(factory).__name__}.load(**overrides) returned a {type(made).__name__}; "
            "expected (module, guard.mnn.LoadReport)"
        )
    return made


def why_no_outputs(runner: Runner, arrays: Sequence[NDArray[Any]]) -> tuple[str, ...]:
    """What MNN prints on one more forward of `runner` on `arrays` (after a forward returned
    too few outputs: MNN says why only on stderr); () for a runner without `diagnose`."""
    diagnose = getattr(runner, "diagnose", None)
    return tuple(diagnose(arrays)) if callable(diagnose) else ()


def adapt(
    module: Any, inputs: Sequence[str] | None = None, outputs: Sequence[str] | None = None
) -> Runner:
    """The numpy-level Runner for what a factory returned (and note that MNN is loaded here).

    An object with `.forward(list_of_vars)` is an MNN-style module; an `(MNN.Interpreter,
    MNN.Session)` pair (or an object with `.interpreter` and `.session`) is a `SessionModule`;
    one that already has `.run(list_of_arrays)` (a fault injector, say) is a Runner as it is.
    `inputs` and `outputs` (the probe's names) bind a session's tensors to the order the
    caller uses; a module loaded by name keeps the order it was loaded with.
    """
    note_load()
    if isinstance(module, SessionModule):  # keeps its names unless the caller gives others
        return module.bind(inputs, outputs)
    if callable(getattr(module, "forward", None)):
        return VarModule(module)
    pair = session_pair(module)
    if pair is not None:
        return SessionModule(*pair, inputs=inputs, outputs=outputs)
    if callable(getattr(module, "run", None)):
        bind = getattr(module, "bind", None)
        if callable(bind) and (inputs is not None or outputs is not None):
            return cast(Runner, bind(inputs, outputs))
        return cast(Runner, module)
    raise FactoryError(
        f"the factory returned a {type(module).__name__} without a forward() method; "
        "expected a module with .forward(list_of_vars) -> list_of_vars, or an "
        "(MNN.Interpreter, MNN.Session) pair"
    )
