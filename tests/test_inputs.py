"""Hostile inputs to run(): each raises InputMismatch naming the input, or runs correctly."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
from conftest import examples
from hypothesis import given, settings
from prometheus_client import CollectorRegistry

import guard
import probes
from guard import mnn
from guard.inputs import InputChecker
from guard.tools import demo
from probes import signature

pytestmark = pytest.mark.hostile
Array = np.ndarray[Any, Any]
MEL = demo.demo_mel(20, seed=3)


@pytest.fixture(scope="module")
def session(demo_paths: Any) -> Iterator[guard.GuardedSession]:
    """One healthy session on the demo vocoder for the whole table."""
    probe = probes.load(demo_paths[1], model=demo_paths[0])
    s = guard.wrap(
        demo.demo_factory(),
        probe,
        name="inputs",
        metrics=False,
        policy=guard.Policy(background=False, promote_after=None),
    )
    yield s
    s.close()


class Tagged(np.ndarray[Any, Any]):
    """A harmless ndarray subclass: MNN reads it as its plain array."""


def _readonly(x: Array) -> Array:
    y = x.copy()
    y.flags.writeable = False
    return y


REJECTED: list[tuple[str, Any, str]] = [
    ("missing input", {}, "missing input(s) ['mel']"),
    ("unknown extra input", {"mel": MEL, "pitch": MEL}, "unknown input(s) ['pitch']"),
    ("wrong name", {"mels": MEL}, "missing input(s) ['mel']"),
    ("wrong rank", {"mel": MEL[0]}, "rank 2 (shape [80, 20]), expected rank 3"),
    (
        "wrong channel count",
        {"mel": np.zeros((1, 100, 20), np.float32)},
        "dimension 1 is 100, expected 80",
    ),
    ("wrong batch", {"mel": np.zeros((2, 80, 20), np.float32)}, "dimension 0 is 2, expected 1"),
    (
        "dynamic dim above range",
        {"mel": np.zeros((1, 80, 4001), np.float32)},
        "dimension 2 is 4001, expected the dynamic range 1..4000",
    ),
    ("zero-size", {"mel": np.zeros((1, 80, 0), np.float32)}, "the array is empty"),
    ("int input", {"mel": MEL.astype(np.int64)}, "dtype int64 cannot be cast safely to float32"),
    ("bool input", {"mel": MEL > -3}, "dtype bool cannot be cast safely to float32"),
    ("complex input", {"mel": MEL.astype(np.complex64)}, "dtype complex64 cannot be cast safely"),
    ("NaN", {"mel": np.where(MEL > -3, np.nan, MEL).astype(np.float32)}, "NaN/Inf values"),
    ("Inf", {"mel": np.where(MEL > -3, np.inf, MEL).astype(np.float32)}, "NaN/Inf values"),
    (
        "float64 overflow",
        {"mel": MEL.astype(np.float64) * 1e300},
        "float64 values overflow float32",
    ),
    ("list of wrong length", [MEL, MEL], "got 2 inputs in a list, the model takes 1"),
    ("non-array object", {"mel": MEL.tolist()}, "got list, not a numpy array"),
    ("None value", {"mel": None}, "got NoneType, not a numpy array"),
    ("int value", {"mel": 3}, "input 'mel': got int, not a numpy array"),
    (
        "unknown and missing name",
        {"image": MEL},
        "missing input(s) ['mel'] and unknown input(s) ['image']; the model takes ['mel']",
    ),
    (
        "masked NaN",
        {"mel": np.ma.masked_invalid(np.where(MEL > -3, np.nan, MEL).astype(np.float32))},
        "values are masked (MNN would read the data under the mask)",
    ),
    (
        "masked 1e300, nothing masked",
        {"mel": np.ma.masked_array(MEL.astype(np.float64) * 1e300)},
        "float64 values overflow float32",
    ),
    (
        "masked 1e300, all masked",
        {"mel": np.ma.masked_array(MEL.astype(np.float64) * 1e300, mask=True)},
        f"{MEL.size} of {MEL.size} values are masked",
    ),
    (
        "masked int64 out of int32 range",
        {"mel": np.ma.masked_greater(np.full(MEL.shape, 2**40), 0)},
        "values are masked",
    ),
    ("bare array", MEL, "inputs must be a dict by input name or a list"),
    ("string", "mel", "inputs must be a dict by input name or a list"),
]


@pytest.mark.parametrize(
    ("inputs", "message"), [(i, m) for _, i, m in REJECTED], ids=[n for n, _, _ in REJECTED]
)
def test_rejected_inputs(session: guard.GuardedSession, inputs: Any, message: str) -> None:
    """A hostile input raises InputMismatch whose message says what came and what was expected."""
    with pytest.raises(guard.InputMismatch) as info:
        session.run(inputs)
    assert message in str(info.value)
    assert isinstance(info.value, guard.GuardError) and isinstance(info.value, ValueError)


ACCEPTED: list[tuple[str, Callable[[Array], Any]]] = [
    ("float64 cast", lambda x: {"mel": x.astype(np.float64)}),
    ("float16 cast", lambda x: {"mel": x.astype(np.float16)}),
    ("non-contiguous", lambda x: {"mel": np.asfortranarray(x)}),
    ("strided view", lambda x: {"mel": np.repeat(x, 2, axis=2)[:, :, ::2]}),
    ("read-only", lambda x: {"mel": _readonly(x)}),
    ("tuple in order", lambda x: (x,)),
    ("dynamic dim at minimum", lambda x: {"mel": x[:, :, :1]}),
    ("masked, nothing masked", lambda x: {"mel": np.ma.masked_invalid(x)}),
    ("masked float64, nothing masked", lambda x: {"mel": np.ma.masked_array(x.astype(np.float64))}),
    ("ndarray subclass", lambda x: {"mel": x.view(Tagged)}),
]


@pytest.mark.parametrize("make", [m for _, m in ACCEPTED], ids=[n for n, _ in ACCEPTED])
def test_accepted_inputs_give_the_correct_result(
    session: guard.GuardedSession, make: Callable[[Array], Any]
) -> None:
    """A safely convertible input gives the same output as the plain float32 input."""
    inputs = make(MEL)
    given = inputs["mel"] if isinstance(inputs, dict) else inputs[0]
    expected = session.run({"mel": np.asarray(given).astype(np.float32)})["wav"]
    out = session.run(inputs)["wav"]
    assert out.shape == (1, 1, given.shape[2] * demo.HOP)
    assert np.array_equal(out, expected)


def test_every_hostile_input_is_refused_before_the_module_runs(demo_probe: probes.Probe) -> None:
    """Each rejected case counts as invalid, each accepted one as ok: none reaches the module."""
    registry = CollectorRegistry()
    s = guard.wrap(
        demo.demo_factory(),
        demo_probe,
        name="counted",
        registry=registry,
        policy=guard.Policy(background=False, promote_after=None),
    )
    for _, inputs, _ in REJECTED:
        with pytest.raises(guard.InputMismatch):
            s.run(inputs)
    for _, make in ACCEPTED:
        s.run(make(MEL))
    counts = {
        result: registry.get_sample_value(
            "mnn_guard_runs_total", {"session": "counted", "rung": "static", "result": result}
        )
        for result in ("invalid", "ok", "error")
    }
    s.close()
    print(f"hostile inputs: {len(REJECTED)} rejected, {len(ACCEPTED)} accepted cases")
    assert counts == {"invalid": len(REJECTED), "ok": len(ACCEPTED), "error": 0.0}


def test_mismatch_names_the_input(session: guard.GuardedSession) -> None:
    """InputMismatch carries the offending input's name."""
    with pytest.raises(guard.InputMismatch) as info:
        session.run({"mel": np.zeros((1, 79, 10), np.float32)})
    assert info.value.input == "mel"
    assert "expected float32[1, 80, 1..4000]" in str(info.value)


def test_nonfinite_inputs_allowed_when_policy_says_so(demo_paths: Any) -> None:
    """With check_finite_inputs=False a NaN input reaches the model as it is; by default, not."""
    probe = probes.load(demo_paths[1])
    x = MEL.copy()
    x[0, 0, 0] = np.nan
    policies = [
        guard.Policy(background=False, promote_after=None, check_finite_inputs=check)
        for check in (False, True)
    ]
    allowed, default = (
        guard.wrap(demo.demo_factory(), probe, name=f"nan-{k}", metrics=False, policy=p)
        for k, p in enumerate(policies)
    )
    out = allowed.run({"mel": x})["wav"]
    raw = mnn.adapt(demo.demo_factory()()).run([x])[0]
    clean = allowed.run({"mel": MEL})["wav"]
    with pytest.raises(guard.InputMismatch, match="1 NaN/Inf values"):
        default.run({"mel": x})
    allowed.close()
    default.close()
    assert out.shape == (1, 1, 20 * demo.HOP)
    assert np.array_equal(out, raw)
    assert not np.array_equal(out, clean)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_huge_finite_values_are_not_mistaken_for_inf() -> None:
    """The fast finiteness check sums; a sum that overflows falls back to checking each value."""
    checker = InputChecker(
        [signature.InputSpec(name="x", dtype="float32", shape=(1, (1, 8)))], check_finite=True
    )
    huge = np.full((1, 4), 3e38, np.float32)
    (out,) = checker({"x": huge})
    assert out is huge
    with pytest.raises(guard.InputMismatch, match="1 NaN/Inf values"):
        checker({"x": np.array([[3e38, np.inf, 1.0, 2.0]], np.float32)})


class Liar(np.ndarray[Any, Any]):
    """A hostile subclass whose reductions and ufuncs claim every value is fine."""

    def __array_ufunc__(self, ufunc: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        return np.True_ if method == "reduce" else np.ones(self.shape, bool)

    def min(self, *args: Any, **kwargs: Any) -> Any:
        return 0

    def max(self, *args: Any, **kwargs: Any) -> Any:
        return 0


@pytest.mark.parametrize(
    ("dtype", "raw", "message"),
    [
        ("float32", np.array([[1, 2, 3, np.nan]], np.float32), "1 NaN/Inf values"),
        ("float32", np.array([[1, 2, 3, 1e300]]), "float64 values overflow float32"),
        ("int32", np.array([[1, 2, 3, 2**40]]), "int64 values outside the int32 range"),
    ],
    ids=["nan", "overflow", "int range"],
)
def test_a_lying_subclass_is_checked_as_the_plain_array(
    dtype: str, raw: Array, message: str
) -> None:
    """Reductions overridden by a subclass are not trusted: checks run on its plain array."""
    checker = InputChecker([signature.InputSpec(name="x", dtype=dtype, shape=(1, 4))])
    with pytest.raises(guard.InputMismatch, match=message):
        checker({"x": raw.view(Liar)})


finite_or_not = st.sampled_from([0.0, -1.5, 2.0, 1e300, -1e300, np.nan, np.inf])


@settings(max_examples=examples(300), deadline=None)
@given(
    values=hnp.arrays(np.float64, (1, 6), elements=finite_or_not),
    mask=hnp.arrays(np.bool_, (1, 6)),
    kind=st.sampled_from(["masked", "tagged", "liar"]),
)
def test_checks_run_on_the_exact_array_handed_on(values: Array, mask: Array, kind: str) -> None:
    """A subclass is accepted or refused exactly as its plain array is; what is handed on is a
    plain ndarray equal to that array cast; a masked array with a masked cell is refused."""
    checker = InputChecker([signature.InputSpec(name="x", dtype="float32", shape=(1, 6))])
    wrapped = (
        np.ma.masked_array(values, mask=mask)
        if kind == "masked"
        else values.view(Tagged if kind == "tagged" else Liar)
    )
    if kind == "masked" and mask.any():
        with pytest.raises(guard.InputMismatch, match=f"{int(mask.sum())} of 6 values are masked"):
            checker({"x": wrapped})
        return
    try:
        expected: Any = checker({"x": values.copy()})[0]
    except guard.InputMismatch as exc:
        expected = str(exc)
    try:
        got: Any = checker({"x": wrapped})[0]
    except guard.InputMismatch as exc:
        got = str(exc)
    if isinstance(expected, str):
        assert got == expected
    else:
        assert type(got) is np.ndarray and got.dtype == np.float32
        assert np.array_equal(got, expected)
