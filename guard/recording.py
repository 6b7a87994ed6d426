"""Recording a probe from a trusted reference configuration that agrees with itself."""

from __future__ import annotations

import datetime as dt
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard import mnn
from guard.calibrating import calibrate
from guard.canaries import Derive, degenerate, derive_axes, derived_cases
from guard.errors import ConfigError, InputMismatch
from guard.inputs import check_input
from guard.sentinels import auto_sentinels
from probes.calibration import MARGIN_DB, Calibration
from probes.errors import CanaryWarning, ProbeError
from probes.limits import DEFAULT_LIMITS, Limits
from probes.measures import snr_db
from probes.probe import Case, Probe, ProbeMeta
from probes.signature import Dim, InputSpec, OutputSpec, check_dim, format_shape
from probes.store import file_sha256

__all__ = ["Derive", "as_input_array", "record"]

Array = NDArray[Any]


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
            if not isinstance(bounds, (tuple, list)) or len(bounds) not in (2, 3):
                raise ProbeError(
                    f"input {name!r}: axis {axis} needs (min, max) or (min, max, step), "
                    f"got {bounds!r}"
                )
            step = bounds[2] if len(bounds) == 3 else 1
            dim = check_dim(bounds[0], bounds[1], step, f"input {name!r} axis {axis}")
            assert isinstance(dim, tuple)
            if InputSpec(name=name, dtype="float32", shape=(dim,)).misfit((arr.shape[axis],)):
                raise ProbeError(
                    f"input {name!r}: the canary's size {arr.shape[axis]} on axis {axis} is "
                    f"outside the declared range {format_shape([dim])[1:-1]}"
                )
            dims[axis] = dim
        specs.append(InputSpec(name=name, dtype=str(arr.dtype), shape=tuple(dims)))
    return tuple(specs)


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


def _choose_derived(
    factory: Callable[..., Any],
    reference: Mapping[str, Any],
    case: dict[str, Array],
    axes: Mapping[str, int],
    names: Sequence[str],
    outputs: Sequence[str] | None,
) -> tuple[dict[str, Array] | None, str]:
    """The first derived canary whose reference outputs differ from case 0's, and a note."""
    if not axes:
        return None, "no input to move (derive= chooses inputs)"
    candidates = list(derived_cases(case, axes))
    if not candidates:
        return None, "moving the chosen inputs changes none of them"
    try:
        loaded, _ = mnn.load(factory, reference)
        runner = mnn.adapt(loaded, names, outputs)
        first = runner.run([case[n] for n in names])
        for moved, note in candidates:
            outs = runner.run([moved[n] for n in names])
            if len(outs) != len(first) or not all(
                a.shape == b.shape and np.array_equal(a, b)
                for a, b in zip(first, outs, strict=True)
            ):
                return moved, note
    except Exception as exc:
        raise ProbeError(f"the reference configuration {dict(reference)} failed: {exc!r}") from exc
    return None, "every derived case gave case 0's outputs and was dropped"


def _canary_cases(
    factory: Callable[..., Any], inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]]
) -> tuple[list[str], list[dict[str, Array]]]:
    """The model's input names and the canary cases as checked arrays."""
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
    return names, cases


def _with_derived(
    factory: Callable[..., Any],
    reference: Mapping[str, Any],
    cases: list[dict[str, Array]],
    derive: Derive,
    dynamic: Mapping[str, Mapping[int, Any]],
    names: Sequence[str],
    declared: Sequence[str],
) -> list[str]:
    """Append a derived second canary to a single one (in place); the notes to record."""
    if len(cases) > 1:
        return []
    note = "derive=False"
    if derive is not False:
        axes = derive_axes(derive, cases[0], dynamic)
        extra, note = _choose_derived(factory, reference, cases[0], axes, names, declared or None)
        if extra is not None:
            cases.append(extra)
            return [note]
    return [
        f"one canary case ({note}): a module that returns a previous call's output is not caught"
    ]


def _sentinels(
    factory: Callable[..., Any], chosen: str | Sequence[str] | None, outputs: Sequence[str]
) -> list[str]:
    """The sentinel tensors to record: none, the ones named, or those `auto` finds."""
    if chosen is None or (not isinstance(chosen, str) and not chosen):
        return []
    path = getattr(factory, "path", None)
    if getattr(factory, "outputs", None) is None or not outputs:
        raise ProbeError(
            "sentinels need a factory that names its outputs and can load more "
            "(guard.mnn_factory or guard.mnn_session_factory)"
        )
    if chosen == "auto":
        if not isinstance(path, (str, os.PathLike)):
            raise ProbeError("sentinels='auto' needs a factory with a model path to read")
        return auto_sentinels(path, outputs)
    if isinstance(chosen, str):
        raise ProbeError(f"sentinels must be 'auto' or a list of tensor names, got {chosen!r}")
    names = list(dict.fromkeys(chosen))
    clash = sorted(set(names) & set(outputs))
    if clash or not all(isinstance(n, str) and n for n in names):
        raise ProbeError(f"sentinels must be tensor names other than the outputs, got {names}")
    return names


def _explicit(
    out_names: Sequence[str],
    thresholds: Mapping[str, float] | None,
    per_output: Mapping[str, Mapping[str, float]],
) -> frozenset[str]:
    """The outputs whose limits the user set (they are not calibrated: the user's limits win)."""
    return frozenset(n for n in out_names if thresholds is not None or n in per_output)


def _loosened(
    calibration: Calibration, loose: Mapping[str, float], per_output: dict[str, Mapping[str, float]]
) -> list[str]:
    """Lower the loose SNR limit of every output whose clean inits differ more than it allows
    (a guard that fails clean inits is worse than none); what was lowered, in words."""
    said = []
    for name, found in calibration.outputs.items():
        limit = loose.get("snr_db")
        if limit is not None and found.limit_db < limit:
            per_output[name] = Limits({**loose, "snr_db": found.limit_db})
            said.append(
                f"clean inits of output {name!r} differ by up to {found.spread_db:.1f} dB "
                f"(rounding moves it {found.floor_db:.1f} dB): its loose SNR limit is lowered "
                f"from {limit:g} to {found.limit_db:.1f} dB"
            )
    return said


def record(
    factory: Callable[..., Any],
    inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    reference: Mapping[str, Any] | None = None,
    *,
    runs: int = 3,
    thresholds: Mapping[str, float] | None = None,
    per_output: Mapping[str, Mapping[str, float]] | None = None,
    dynamic: Mapping[str, Mapping[int, tuple[int, ...]]] | None = None,
    output_names: Sequence[str] | None = None,
    model: str | os.PathLike[str] | None = None,
    derive: Derive = True,
    agreement_db: float = 90.0,
    calibrate_inits: int = 3,
    processes: int = 2,
    configurations: Sequence[Mapping[str, Any]] = ({},),
    margin_db: float = MARGIN_DB,
    sentinels: str | Sequence[str] | None = None,
) -> Probe:
    """Record a probe: goldens from `factory(**reference)` in `runs` fresh inits that agree,
    then a calibration of how much clean inits differ.

    `inputs` is one dict of canary inputs by name, or a list of such dicts. A single canary
    gets a derived second one, so that a module that returns a previous call's output is
    caught (see `guard.canaries`); `derive={"mel": 2}` chooses the inputs and axes,
    `derive=False` records none. `dynamic={"mel": {2: (1, 4000)}}` declares axis 2 of `mel`
    dynamic within 1..4000 (`(32, 1024, 32)`: in steps of 32); other dimensions are fixed.

    Calibration runs `calibrate_inits` inits of each of `configurations` (the factory's own by
    default) and of the reference, in this process and in `processes` fresh ones (when the
    factory pickles), and the reference on inputs nudged by one ulp; each output's SNR limit
    is then what they give less `margin_db` (`probes.Calibration`). Outputs whose limits you
    set (`thresholds`, `per_output`) keep yours. `calibrate_inits=0` records no calibration
    (the probe then judges by its set or default limits only).

    `sentinels` ("auto", or tensor names) adds intermediate tensors to what every canary
    judges, on the very module that serves, without handing them out: "auto" picks the tensor
    each squashing op (softmax, sigmoid, tanh) reads before an output (`guard.sentinels`). A
    saturated output hides weight faults; the tensor before it does not.

    >>> probe = record(factory, {"mel": mel}, reference={"dynamic": True})  # doctest: +SKIP
    """
    reference = {"dynamic": True} if reference is None else dict(reference)
    if runs < 2:
        raise ProbeError(
            f"runs must be at least 2 to check that the reference agrees with itself, got {runs}"
        )
    if (
        isinstance(calibrate_inits, bool)
        or not isinstance(calibrate_inits, int)
        or calibrate_inits < 0
    ):
        raise ProbeError(f"calibrate_inits must be an int >= 0, got {calibrate_inits!r}")
    names, cases = _canary_cases(factory, inputs)
    signature = _signature(names, cases[0], dynamic or {})
    declared = list(output_names or getattr(factory, "outputs", None) or [])
    watched = _sentinels(factory, sentinels, declared)
    load = {"outputs": tuple(declared + watched)} if watched else {}  # sentinels after outputs
    loading = {**reference, **load}
    notes = _with_derived(factory, loading, cases, derive, dynamic or {}, names, declared)
    if watched:
        notes.append(f"sentinels {watched} are judged with the outputs, never served")
    for i, case in enumerate(cases):
        for spec in signature:
            if not spec.accepts(case[spec.name].shape) or str(case[spec.name].dtype) != spec.dtype:
                raise ProbeError(
                    f"canary {i}: input {spec.name!r} does not fit the signature of canary 0"
                )
    goldens, static, reported = _run_reference(
        factory, loading, cases, names, runs, agreement_db, (declared + watched) or None
    )
    out_names = (declared + watched) or list(reported)
    if not out_names:
        out_names = [f"output{k}" for k in range(len(goldens[0]))]
    if any(len(g) != len(out_names) for g in goldens):
        raise ProbeError(f"the reference returned {len(goldens[0])} outputs, expected {out_names}")
    named = [dict(zip(out_names, g, strict=True)) for g in goldens]
    for warning in degenerate(cases, named):
        notes.append(f"degenerate canary: {warning}")
        warnings.warn(CanaryWarning(warning), stacklevel=2)
    if static:
        notes.append(
            f"the reference {reference} was a static load: MNN ignores dynamic=True for this "
            "model (it has control flow)"
        )
    loose = Limits.of(DEFAULT_LIMITS if thresholds is None else thresholds)
    limits_by_output: dict[str, Mapping[str, float]] = dict(per_output or {})
    calibration = None
    if calibrate_inits:
        measured = calibrate(
            factory,
            loading,
            cases,
            goldens,
            names,
            out_names,
            configurations=[{**c, **load} for c in configurations],
            inits=calibrate_inits,
            processes=processes,
            margin_db=margin_db,
            skip=_explicit(out_names, thresholds, limits_by_output),
        )
        notes.extend(measured.notes)
        for outlier in measured.outliers:
            text = (
                f"calibration left out a degraded init ({outlier}): the others agree far "
                "better, so this one is the fault the guard exists for"
            )
            notes.append(text)
            warnings.warn(CanaryWarning(text), stacklevel=2)
        for text in _loosened(measured.calibration, loose, limits_by_output):
            notes.append(text)
            warnings.warn(CanaryWarning(text), stacklevel=2)
        if measured.calibration.outputs:
            calibration = measured.calibration
            notes.append(calibration.describe())
    model_path = model if model is not None else getattr(factory, "path", None)

    return Probe(
        cases=tuple(Case(inputs=c, outputs=n) for c, n in zip(cases, named, strict=True)),
        inputs=signature,
        outputs=tuple(
            OutputSpec(name=n, dtype=str(a.dtype), shape=tuple(a.shape), sentinel=n in watched)
            for n, a in zip(out_names, goldens[0], strict=True)
        ),
        thresholds=loose,
        per_output=limits_by_output,
        calibration=calibration,
        meta=ProbeMeta(
            model_sha256=file_sha256(model_path) if model_path is not None else None,
            mnn_version=mnn.mnn_version(),
            reference=reference,
            runs=runs,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            notes=tuple(notes),
        ),
    )
