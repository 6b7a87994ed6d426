"""Hostile inputs to run(): each raises InputMismatch naming the input, or runs correctly; the
input checker's rules one at a time (casts, ranges, overflow, shapes, order, finiteness)."""

from __future__ import annotations

import math
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


# ------------------------------------------------------------------ one rule at a time


INT32 = [signature.InputSpec(name="ids", dtype="int32", shape=((1, 8),))]


@pytest.mark.parametrize(
    "values",
    [
        np.array([0, 2**31 - 1, -(2**31)], np.int64),
        np.array([1, 2], np.uint8),
        np.array([True, False]),
        np.array([7], np.int16),
    ],
    ids=["int64 at the limits", "uint8", "bool", "int16"],
)
def test_integers_within_range_are_cast(values: Array) -> None:
    """Integers (and bools) that fit the input's int32 are cast without changing a value."""
    (out,) = guard.inputs.prepare_inputs(INT32, {"ids": values})
    assert out.dtype == np.int32 and np.array_equal(out, values.astype(np.int64))
    (fast,) = guard.inputs.InputChecker(INT32)({"ids": values})
    assert fast.dtype == np.int32 and np.array_equal(fast, out)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.array([1, 2**40], np.int64), "int64 values outside the int32 range"),
        (np.array([2**31], np.int64), "int64 values outside the int32 range"),
        (np.array([-(2**31) - 1], np.int64), "int64 values outside the int32 range"),
        (np.array([2**63], np.uint64), "uint64 values outside the int32 range"),
        (np.array([1.0]), "dtype float64 cannot be cast safely to int32"),
    ],
    ids=["2**40", "2**31", "-2**31-1", "uint64", "float"],
)
def test_integers_outside_the_range_are_refused(values: Array, message: str) -> None:
    """An integer the input's int32 cannot hold is refused, never wrapped around."""
    with pytest.raises(guard.InputMismatch, match=message) as info:
        guard.inputs.InputChecker(INT32)({"ids": values})
    assert info.value.input == "ids"
    assert "-2147483648..2147483647" in str(info.value) or "float64" in str(info.value)


def test_float_inputs_that_overflow_the_target_are_refused() -> None:
    """float32 70,000 does not fit float16 (it would become inf); 60,000 does."""
    spec = [signature.InputSpec(name="x", dtype="float16", shape=(2,))]
    with pytest.raises(guard.InputMismatch, match="float32 values overflow float16"):
        guard.inputs.InputChecker(spec)({"x": np.array([1.0, 7e4], np.float32)})
    (out,) = guard.inputs.InputChecker(spec)({"x": np.array([1.0, 6e4], np.float32)})
    assert out.dtype == np.float16 and out.tolist() == [1.0, 6e4]
    nan = np.array([np.nan, 1.0], np.float32)  # non-finite in, non-finite out: not an overflow
    with pytest.raises(guard.InputMismatch, match="1 NaN/Inf values"):
        guard.inputs.InputChecker(spec)({"x": nan})
    (kept,) = guard.inputs.InputChecker(spec, check_finite=False)({"x": nan})
    assert kept.dtype == np.float16 and math.isnan(kept[0])


def test_refusing_an_overflowing_input_warns_nothing() -> None:
    """A float64 input beyond float32 is refused quietly: no RuntimeWarning from the cast."""
    import warnings

    checker = guard.inputs.InputChecker(
        [signature.InputSpec(name="x", dtype="float32", shape=(2,))]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(guard.InputMismatch, match="float64 values overflow float32"):
            checker({"x": np.array([1.0, 1e300])})


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_float16_inputs_are_checked_value_by_value_when_their_sum_overflows() -> None:
    """float16 inputs: finite values whose sum overflows pass; an inf or NaN is refused."""
    spec = signature.InputSpec(name="h", dtype="float16", shape=(2, 3))
    checker = guard.inputs.InputChecker([spec])
    loud = np.array([[6e4, 6e4, -1.0], [1.0, 2.0, 3.0]], np.float16)
    (out,) = checker({"h": loud})
    assert out is loud
    for bad in (
        np.array([[np.inf, 1, 2], [1, 2, 3]], np.float16),
        np.array([[1, 2, 3], [1, np.nan, 2]], np.float16),
    ):
        with pytest.raises(guard.InputMismatch, match="input 'h': 1 NaN/Inf values"):
            checker({"h": bad})


def test_many_shapes_do_not_wear_out_the_shape_check() -> None:
    """After more distinct valid shapes than the checker remembers, a wrong one is refused."""
    checker = guard.inputs.InputChecker(
        [signature.InputSpec(name="x", dtype="float32", shape=(1, (1, 200)))]
    )
    for n in range(1, 101):
        (out,) = checker({"x": np.zeros((1, n), np.float32)})
        assert out.shape == (1, n)
    for bad in (np.zeros((1, 201), np.float32), np.zeros((2, 5), np.float32)):
        with pytest.raises(guard.InputMismatch, match="dimension"):
            checker({"x": bad})
    with pytest.raises(guard.InputMismatch, match="the array is empty"):
        checker({"x": np.zeros((1, 0), np.float32)})


def test_two_inputs_are_checked_and_ordered_by_the_signature() -> None:
    """Inputs come back in signature order whatever the dict's order; each one is checked."""
    specs = [
        signature.InputSpec(name="a", dtype="float32", shape=(2,)),
        signature.InputSpec(name="b", dtype="int32", shape=(3,)),
    ]
    checker = guard.inputs.InputChecker(specs)
    a, b = np.ones(2, np.float32), np.arange(3, dtype=np.int32)
    out = checker({"b": b, "a": a})
    assert [o.dtype for o in out] == [np.float32, np.int32] and out[0] is a and out[1] is b
    assert checker([a, b])[1] is b
    with pytest.raises(guard.InputMismatch, match="input 'b'"):
        checker({"a": a, "b": np.arange(4, dtype=np.int32)})
    with pytest.raises(guard.InputMismatch, match=r"missing input\(s\) \['b'\]"):
        checker({"a": a, "c": b})
    inf = np.array([1.0, np.inf], np.float32)
    with pytest.raises(guard.InputMismatch, match="input 'a': 1 NaN/Inf values"):
        checker({"a": inf, "b": b})
    assert guard.inputs.InputChecker(specs, check_finite=False)({"a": inf, "b": b})[0] is inf


def test_input_errors_name_the_input_and_only_what_is_wrong() -> None:
    """Input errors name the offending input (its `input` attribute) and only what is wrong."""
    specs = [signature.InputSpec(name="mel", dtype="float32", shape=(1, 4))]
    x = np.zeros((1, 4), np.float32)
    cases: list[tuple[Any, str, str | None]] = [
        (
            {"mel": x, "pitch": x},
            "unknown input(s) ['pitch']; the model takes ['mel']",
            "pitch",
        ),
        ({}, "missing input(s) ['mel']; the model takes ['mel']", "mel"),
        (x, "inputs must be a dict by input name or a list in input order ['mel'], got ndarray",
         None),
        ("mel", "inputs must be a dict by input name or a list in input order ['mel'], got str",
         None),
    ]  # fmt: skip
    for inputs, message, name in cases:
        with pytest.raises(guard.InputMismatch) as info:
            guard.inputs.InputChecker(specs)(inputs)
        assert (str(info.value), info.value.input) == (message, name)
    with pytest.raises(guard.InputMismatch, match="4 NaN/Inf values"):
        guard.inputs.prepare_inputs(specs, {"mel": np.full((1, 4), np.nan, np.float32)})


def test_prepare_inputs_can_let_non_finite_values_through() -> None:
    """prepare_inputs(check_finite=False) hands a NaN on, as the policy's opt-out does."""
    specs = [signature.InputSpec(name="x", dtype="float32", shape=(2,))]
    nan = np.array([np.nan, 1.0], np.float32)
    (out,) = guard.inputs.prepare_inputs(specs, {"x": nan}, check_finite=False)
    assert out is nan


def test_check_input_checks_and_casts_one_input_as_run_does() -> None:
    """check_input (used by probes.record) casts a fitting array, refuses NaN unless told not
    to, and names the input it refuses."""
    ids = signature.InputSpec(name="ids", dtype="int32", shape=(2,))
    cast = guard.inputs.check_input(ids, np.array([1, 2], np.int64))
    assert cast.dtype == np.int32 and cast.tolist() == [1, 2]
    spec = signature.InputSpec(name="x", dtype="float32", shape=(2,))
    nan = np.array([np.nan, 1.0], np.float32)
    with pytest.raises(guard.InputMismatch, match=r"^input 'x'"):
        guard.inputs.check_input(spec, nan)
    assert guard.inputs.check_input(spec, nan, check_finite=False) is nan
