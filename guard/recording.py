"""Recording a probe from a trusted reference configuration that agrees with itself."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard import mnn
from guard.errors import ConfigError, InputMismatch
from guard.inputs import check_input
from probes.errors import ProbeError
from probes.limits import DEFAULT_LIMITS
from probes.measures import snr_db
from probes.probe import Case, Probe, ProbeMeta
from probes.signature import Dim, InputSpec, OutputSpec
from probes.store import file_sha256

__all__ = ["Derive", "as_input_array", "record"]

Array = NDArray[Any]
Derive = bool | Mapping[str, int | None]
"""Which inputs a derived canary rolls: True (those with a declared dynamic axis, along it),
False (no derived canary), or {name: axis} (None: the input's last dynamic axis, else its last)."""


def as_input_array(name: str, value: Any) -> Array:
    """A canary input as `run()` will take it: the plain array, in the dtype MNN takes for it
    (float64 -> float32, int64 -> int32, values checked to fit), finite, non-empty."""
    arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    try:
        spec = InputSpec(name=name, dtype=mnn.mnn_dtype(arr.dtype), shape=tuple(arr.shape))
        checked = check_input(spec, arr)
    except (ConfigError, InputMismatch) as exc:
        raise ProbeError(f"canary input {name!r}: {exc}") from exc
    return checked if checked.flags.c_contiguous else np.ascontiguousarray(checked)  # 0-d stays


def _signature(
    names: Sequence[str], first: Mapping[str, Array], dynamic: Mapping[str, Mapping[int, Any]]
) -> tuple[InputSpec, ...]:
    unknown = sorted(set(dynamic) - set(names))
    if unknown:
        raise ProbeError(
            f"dynamic dimensions given for unknown inputs {unknown}; inputs are {list(names)}"
        )
    specs = []
    for name in names:
        arr = first[name]
        dims: list[Dim] = list(arr.shape)
        for axis, bounds in dynamic.get(name, {}).items():
            if not -arr.ndim <= axis < arr.ndim:
                raise ProbeError(f"input {name!r}: axis {axis} is out of range for rank {arr.ndim}")
            lo, hi = (int(b) for b in bounds)
            if not 0 <= lo <= arr.shape[axis] <= hi:
                raise ProbeError(
                    f"input {name!r}: the canary's size {arr.shape[axis]} on axis {axis} is "
                    f"outside the declared range {lo}..{hi}"
                )
            dims[axis] = (lo, hi)
        specs.append(InputSpec(name=name, dtype=str(arr.dtype), shape=tuple(dims)))
    return tuple(specs)


def _derive_axes(
    derive: Derive, case: Mapping[str, Array], dynamic: Mapping[str, Mapping[int, Any]]
) -> dict[str, int]:
    """Input name -> the (non-negative) axis a derived canary rolls it along."""
    if derive is True:
        chosen: Mapping[str, int | None] = {n: None for n, axes in dynamic.items() if axes}
    elif derive is False:
        return {}
    elif isinstance(derive, Mapping):
        chosen = derive
    else:
        raise ProbeError(
            f"derive must be True, False or a dict of input name -> axis, got {derive!r}"
        )
    unknown = sorted(set(chosen) - set(case))
    if unknown:
        raise ProbeError(f"derive names unknown inputs {unknown}; inputs are {list(case)}")
    axes: dict[str, int] = {}
    for name, given in chosen.items():
        arr = case[name]
        if arr.ndim == 0:
            raise ProbeError(f"derive: input {name!r} is a scalar (0-d); it has no axis to roll")
        declared = [a % arr.ndim for a in dynamic.get(name, {})]
        axis = given if given is not None else max(declared, default=arr.ndim - 1)
        if isinstance(axis, bool) or not isinstance(axis, int) or not -arr.ndim <= axis < arr.ndim:
            raise ProbeError(
                f"derive: axis {axis!r} of input {name!r} is out of range for rank {arr.ndim}"
            )
        axes[name] = axis % arr.ndim
    return axes


def _derived_case(
    case: Mapping[str, Array], axes: Mapping[str, int]
) -> tuple[dict[str, Array], str] | None:
    """A second canary: the chosen inputs rolled by half along their axis, the others as they
    are; None when that changes nothing. With a note saying what was rolled."""
    rolled = {
        n: np.roll(a, a.shape[axes[n]] // 2, axis=axes[n]) if n in axes else a
        for n, a in case.items()
    }
    if all(np.array_equal(rolled[n], case[n]) for n in case):
        return None
    moved = ", ".join(f"{n} by {case[n].shape[a] // 2} along axis {a}" for n, a in axes.items())
    fixed = [n for n in case if n not in axes]
    held = f"; {', '.join(fixed)} held fixed" if fixed else ""
    return rolled, f"case 1 is case 0 with {moved}{held}"


def _run_reference(
    factory: Callable[..., Any],
    reference: Mapping[str, Any],
    cases: Sequence[Mapping[str, Array]],
    names: Sequence[str],
    runs: int,
    agreement_db: float,
    outputs: Sequence[str] | None = None,
) -> tuple[list[list[Array]], bool, tuple[str, ...]]:
    """Outputs of every case, whether MNN loaded the reference statically despite
    dynamic=True, and the output names a session reports (a module reports none); refuses
    NaN/Inf and any disagreement across inits and repeat runs."""
    first: list[list[Array]] | None = None
    static = False
    reported: tuple[str, ...] = ()
    for init in range(runs):
        try:
            loaded, report = mnn.load(factory, reference)
            static = static or report.turned_static
            module = mnn.adapt(loaded, names, outputs)
            reported = tuple(getattr(module, "output_names", ()))
            results = [[module.run([case[n] for n in names]) for case in cases] for _ in range(2)]
        except ProbeError:
            raise
        except Exception as exc:
            raise ProbeError(
                f"the reference configuration {dict(reference)} failed: {exc!r}"
            ) from exc
        del module, loaded
        how = " (which MNN loaded statically: the model has control flow)" if static else ""
        for rep, per_case in enumerate(results):
            for c, outs in enumerate(per_case):
                if not outs:
                    raise ProbeError(
                        f"the reference returned no outputs for case {c}{how}; MNN returns none "
                        "when the inputs' shapes or dtypes do not suit the model"
                    )
                for k, out in enumerate(outs):
                    if not np.issubdtype(out.dtype, np.number) or not np.all(np.isfinite(out)):
                        raise ProbeError(
                            f"the reference gave NaN/Inf in output {k} of case {c}; refusing to "
                            "record non-finite goldens"
                        )
                if first is None:
                    continue
                for k, (ref, out) in enumerate(zip(first[c], outs, strict=False)):
                    agree = ref.shape == out.shape and snr_db(ref, out) >= agreement_db
                    if len(first[c]) != len(outs) or not agree:
                        raise ProbeError(
                            f"the reference {dict(reference)}{how} does not agree with itself: "
                            f"init {init + 1}, run {rep + 1}, case {c}, output {k} differs from "
                            f"the first run (needs >= {agreement_db} dB SNR); pick a "
                            "deterministic reference configuration"
                        )
            if first is None:
                first = per_case
    assert first is not None
    return first, static, reported


def record(
    factory: Callable[..., Any],
    inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    reference: Mapping[str, Any] | None = None,
    *,
    runs: int = 3,
    thresholds: Mapping[str, float] | None = None,
    per_output: Mapping[str, Mapping[str, float]] | None = None,
    dynamic: Mapping[str, Mapping[int, tuple[int, int]]] | None = None,
    output_names: Sequence[str] | None = None,
    model: str | os.PathLike[str] | None = None,
    derive: Derive = True,
    agreement_db: float = 90.0,
) -> Probe:
    """Record a probe by running the canary on `factory(**reference)` in `runs` fresh inits.

    `inputs` is one dict of canary inputs by name, or a list of such dicts. A single canary
    gets a derived second one, so that a module that returns a previous call's output is
    caught: by default the inputs with a declared dynamic axis are rolled by half along it and
    the others (control inputs, recurrent state) held fixed; `derive={"mel": 2}` chooses the
    inputs and axes, `derive=False` records none. `dynamic={"mel": {2: (1, 4000)}}` declares
    axis 2 of `mel` dynamic within 1..4000; other dimensions are fixed to the canary's.

    >>> probe = record(factory, {"mel": mel}, reference={"dynamic": True})  # doctest: +SKIP
    """
    reference = {"dynamic": True} if reference is None else dict(reference)
    if runs < 2:
        raise ProbeError(
            f"runs must be at least 2 to check that the reference agrees with itself, got {runs}"
        )
    raw_cases = [inputs] if isinstance(inputs, Mapping) else list(inputs)
    if not raw_cases or not all(isinstance(c, Mapping) for c in raw_cases):
        raise ProbeError(
            "inputs must be a dict of arrays by input name, or a non-empty list of such dicts"
        )
    names = list(getattr(factory, "inputs", None) or raw_cases[0])
    cases: list[dict[str, Array]] = []
    for i, raw in enumerate(raw_cases):
        if sorted(raw) != sorted(names):
            raise ProbeError(f"canary {i} has inputs {sorted(raw)}, the model takes {names}")
        cases.append({n: as_input_array(n, raw[n]) for n in names})
    signature = _signature(names, cases[0], dynamic or {})
    axes = _derive_axes(derive, cases[0], dynamic or {})
    derived_note: str | None = None
    if len(cases) == 1 and axes:
        extra = _derived_case(cases[0], axes)
        if extra is not None:
            cases.append(extra[0])
            derived_note = extra[1]
    for i, case in enumerate(cases):
        for spec in signature:
            if not spec.accepts(case[spec.name].shape) or str(case[spec.name].dtype) != spec.dtype:
                raise ProbeError(
                    f"canary {i}: input {spec.name!r} does not fit the signature of canary 0"
                )
    declared = list(output_names or getattr(factory, "outputs", None) or [])
    goldens, static, reported = _run_reference(
        factory, reference, cases, names, runs, agreement_db, declared or None
    )
    out_names = declared or list(reported)
    if not out_names:
        out_names = [f"output{k}" for k in range(len(goldens[0]))]
    if any(len(g) != len(out_names) for g in goldens):
        raise ProbeError(f"the reference returned {len(goldens[0])} outputs, expected {out_names}")
    if (
        derived_note is not None
        and len(goldens) > 1
        and all(np.array_equal(a, b) for a, b in zip(goldens[0], goldens[1], strict=True))
    ):
        cases.pop()
        goldens.pop()
        derived_note = None
    notes = [derived_note] if derived_note else []
    if len(cases) == 1:
        why = (
            "derive=False"
            if derive is False
            else "no input has a declared dynamic axis to roll (derive= chooses inputs)"
            if not axes
            else "the derived case changed no output and was dropped"
        )
        notes.append(
            f"one canary case ({why}): a module that returns a previous call's output is not caught"
        )
    if static:
        notes.append(
            f"the reference {reference} was a static load: MNN ignores dynamic=True for this "
            "model (it has control flow)"
        )
    model_path = model if model is not None else getattr(factory, "path", None)

    return Probe(
        cases=tuple(
            Case(inputs=c, outputs=dict(zip(out_names, g, strict=True)))
            for c, g in zip(cases, goldens, strict=True)
        ),
        inputs=signature,
        outputs=tuple(
            OutputSpec(name=n, dtype=str(a.dtype), shape=tuple(a.shape))
            for n, a in zip(out_names, goldens[0], strict=True)
        ),
        thresholds=DEFAULT_LIMITS if thresholds is None else thresholds,
        per_output=dict(per_output or {}),
        meta=ProbeMeta(
            model_sha256=file_sha256(model_path) if model_path is not None else None,
            mnn_version=mnn.mnn_version(),
            reference=reference,
            runs=runs,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            notes=tuple(notes),
        ),
    )
