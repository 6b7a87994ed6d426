"""`mnn-guard diagnose`: where in the network does a suspect configuration go wrong?

Runs the probe's canary through the suspect configuration (a model file and load options) and
the reference one with every named tensor of the model as an extra output, compares them tensor
by tensor (SNR), and names the first tensors, in execution order, that diverge beyond the
threshold while nothing they read (directly or not) diverged, with their operators, plus the
path from there to the outputs. As Polygraphy does for TensorRT, for MNN.

`run_diagnose` measures (returns a `Diagnosis`); `format_diagnosis` and `diagnosis_json`
render it.

>>> diagnosis = run_diagnose("suspect.mnn", probe, reference_model="clean.mnn")  # doctest: +SKIP
>>> diagnosis.first[0].name, diagnosis.first[0].op_type  # doctest: +SKIP
('Convolution18', 'Convolution')
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard import mnn
from guard.errors import ConfigError
from guard.tools.output import text_table
from probes import Probe
from probes.limits import DEFAULT_LIMITS
from probes.measures import snr_db

__all__ = ["Diagnosis", "TensorScore", "diagnosis_json", "format_diagnosis", "run_diagnose"]

Array = NDArray[Any]
MAX_FIRST = 5  # first divergent tensors reported
CONTROL_FLOW = frozenset({"If", "While"})  # MNN operators that run subgraphs
CONVOLUTIONS = frozenset(
    {"Convolution", "ConvolutionDepthwise", "Deconvolution", "DeconvolutionDepthwise"}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorScore:
    """One named tensor: where it runs, what computes it, and how far the suspect's is off."""

    index: int  # position in execution order
    name: str
    op_type: str
    inputs: tuple[str, ...]
    snr_db: float  # the worst over the canary cases (-inf: shape differs or not finite)
    max_abs: float
    diverged: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightDiff:
    """A constant tensor (a weight) whose values differ between the two model files."""

    name: str
    snr_db: float
    read_by: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Diagnosis:
    """What `mnn-guard diagnose` found: every tensor's SNR, the first divergent ones, the path."""

    model: str
    reference_model: str
    overrides: dict[str, Any]
    reference: dict[str, Any]
    threshold_db: float
    cases: int
    tries: int  # suspect loads run (up to --tries, until one diverged)
    outputs: dict[str, float]  # each model output's SNR
    tensors: tuple[TensorScore, ...]
    first: tuple[TensorScore, ...]
    path: tuple[TensorScore, ...]  # from first[0] to an output
    weights: tuple[WeightDiff, ...]
    seconds: float
    notes: tuple[str, ...] = ()  # what this diagnosis cannot see, and why

    @property
    def diverged(self) -> bool:
        """True when any tensor diverged beyond the threshold."""
        return bool(self.first)


def execution_order(graph: Sequence[mnn.TensorNode]) -> list[mnn.TensorNode]:
    """The graph in an order where every tensor follows its inputs, keeping the file's order."""
    position = {node.name: i for i, node in enumerate(graph)}
    if all(position.get(i, -1) < position[n.name] for n in graph for i in n.inputs):
        return list(graph)
    waiting = {n.name: {i for i in n.inputs if i in position} for n in graph}
    readers: dict[str, list[str]] = {}
    for node in graph:
        for source in waiting[node.name]:
            readers.setdefault(source, []).append(node.name)
    ready = deque(n.name for n in graph if not waiting[n.name])
    order: list[str] = []
    while ready:
        name = ready.popleft()
        order.append(name)
        for reader in readers.get(name, ()):
            waiting[reader].discard(name)
            if not waiting[reader]:
                ready.append(reader)
    by_name = {n.name: n for n in graph}
    return [by_name[n] for n in order]


def _compare(reference: Array, suspect: Array) -> tuple[float, float]:
    """(SNR dB, max abs error) of the suspect's tensor against the reference's."""
    if reference.shape != suspect.shape:
        return -math.inf, math.inf
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(suspect.astype(np.float64) - reference.astype(np.float64))
    if not np.all(np.isfinite(suspect)):
        return -math.inf, math.inf
    snr = snr_db(reference, suspect)
    return (-math.inf if math.isnan(snr) else snr), float(diff.max(initial=0.0))


def _weights(
    model: str, reference_model: str, readers: Mapping[str, list[str]]
) -> list[WeightDiff]:
    """The constants whose values differ between two model files, with the tensors reading them."""
    mine, theirs = mnn.constant_arrays(model), mnn.constant_arrays(reference_model)
    found = []
    for name, value in mine.items():
        other = theirs.get(name)
        if other is None or other.shape != value.shape or not np.array_equal(other, value):
            snr = -math.inf if other is None else _compare(other, value)[0]
            found.append(WeightDiff(name=name, snr_db=snr, read_by=tuple(readers.get(name, ()))))
    return found


def _notes(graph: Sequence[mnn.TensorNode], other_file: bool, unmatched: int) -> list[str]:
    """What the comparison cannot see in this graph: subgraphs, weights held by operators, and
    tensors the reference does not name."""
    notes = []
    if unmatched:
        notes.append(
            f"{unmatched} computed tensor(s) of the model have no namesake in the reference and "
            "are not compared (files saved by different MNN releases may name tensors "
            "differently: rebuild both with one release to compare every tensor)"
        )
    flow = [n for n in graph if n.op_type in CONTROL_FLOW]
    if flow:
        named = ", ".join(f"{n.name} [{n.op_type}]" for n in flow[:MAX_FIRST])
        notes.append(
            f"control flow: the tensors inside the subgraphs of {named} are invisible here (MNN "
            "names only the main graph's tensors): a divergence inside shows at the operator's "
            "output, and the constants inside are not compared"
        )
    constants = {n.name for n in graph if n.op_type == "Const"}
    held = [n.name for n in graph if n.op_type in CONVOLUTIONS and constants.isdisjoint(n.inputs)]
    if other_file and held:
        notes.append(
            f"no weight comparison for {len(held)} convolution(s) ({', '.join(held[:MAX_FIRST])})"
            ": their weights sit inside the operators, as in models converted from ONNX, where "
            "MNN's Python API cannot read them; only constant tensors are compared"
        )
    return notes


def _path(start: str, outputs: Sequence[str], readers: Mapping[str, list[str]]) -> list[str]:
    """The shortest chain of tensors from `start` to one of `outputs` (breadth first)."""
    previous: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        name = queue.popleft()
        if name in outputs:
            chain = [name]
            while (back := previous[chain[-1]]) is not None:
                chain.append(back)
            return chain[::-1]
        for reader in readers.get(name, ()):
            if reader not in previous:
                previous[reader] = name
                queue.append(reader)
    return [start]


def run_diagnose(
    model: str | os.PathLike[str],
    probe: Probe,
    *,
    overrides: Mapping[str, Any] | None = None,
    reference_model: str | os.PathLike[str] | None = None,
    reference: Mapping[str, Any] | None = None,
    threshold_db: float | None = None,
    tries: int = 1,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
) -> Diagnosis:
    """Compare every named tensor of the suspect configuration with the reference configuration.

    The suspect is `model` loaded with `overrides`; the reference is `reference_model` (default
    the same file) loaded with `reference` (default the probe's recorded reference, e.g.
    dynamic=True). `threshold_db` defaults to the probe's SNR limit. With `tries` > 1 the
    suspect is loaded again until one load diverges (a degraded init comes out only sometimes).
    """
    say = progress or (lambda _: None)
    if isinstance(tries, bool) or not isinstance(tries, int) or tries < 1:
        raise ConfigError(f"tries must be a positive int, got {tries!r}")
    began = time.perf_counter()
    suspect_path = os.fspath(model)
    reference_path = os.fspath(reference_model) if reference_model is not None else suspect_path
    suspect_opts = dict(overrides or {})
    reference_opts = dict(probe.meta.reference if reference is None else reference)
    default = probe.thresholds.get("snr_db", DEFAULT_LIMITS["snr_db"])
    limit = default if threshold_db is None else float(threshold_db)
    graph = execution_order(mnn.tensor_graph(suspect_path))
    in_reference = {n.name for n in mnn.tensor_graph(reference_path)}
    names = [n.name for n in graph if n.op_type not in mnn.GRAPH_SOURCES and n.name in in_reference]
    computed = [n for n in graph if n.op_type not in mnn.GRAPH_SOURCES]
    unmatched = len(computed) - len(names)
    missing = sorted(set(probe.output_names) - set(names))
    if missing:
        raise ConfigError(f"the models have no computed tensors named {missing} (probe outputs)")
    cases = [[c.inputs[n] for n in probe.input_names] for c in probe.cases]
    say(f"diagnose: {len(names)} tensors, {len(cases)} case(s), reference {reference_opts}")
    references = [
        mnn.run_tensors(
            reference_path, probe.input_names, x, names, threads=threads, **reference_opts
        )
        for x in cases
    ]
    worst: dict[str, tuple[float, float]] = {}
    tried = 0
    for tried in range(1, tries + 1):
        worst = {n: (math.inf, 0.0) for n in names}
        for x, ref in zip(cases, references, strict=True):
            got = mnn.run_tensors(
                suspect_path, probe.input_names, x, names, threads=threads, **suspect_opts
            )
            for name in names:
                snr, err = _compare(ref[name], got[name])
                worst[name] = (min(worst[name][0], snr), max(worst[name][1], err))
        if any(snr < limit for snr, _ in worst.values()):
            break
        say(f"diagnose: suspect load {tried} of {tries} matches the reference")
    del references
    readers: dict[str, list[str]] = {}
    for node in graph:
        for source in node.inputs:
            readers.setdefault(source, []).append(node.name)
    scores = {
        n.name: TensorScore(
            index=i,
            name=n.name,
            op_type=n.op_type,
            inputs=n.inputs,
            snr_db=worst[n.name][0],
            max_abs=worst[n.name][1],
            diverged=worst[n.name][0] < limit,
        )
        for i, n in enumerate(graph)
        if n.name in worst
    }
    downstream: set[str] = set()  # tensors that read, directly or not, a divergent tensor
    first = []
    for node in graph:  # in execution order, through tensors the reference does not name too
        score = scores.get(node.name)
        if any(i in downstream for i in node.inputs):
            downstream.add(node.name)
        elif score is not None and score.diverged:
            first.append(score)
            downstream.add(node.name)
    chain = _path(first[0].name, probe.output_names, readers) if first else []
    other_file = not os.path.samefile(suspect_path, reference_path)
    return Diagnosis(
        model=suspect_path,
        reference_model=reference_path,
        overrides=suspect_opts,
        reference=reference_opts,
        threshold_db=limit,
        cases=len(cases),
        tries=tried,
        outputs={name: scores[name].snr_db for name in probe.output_names},
        tensors=tuple(scores.values()),
        first=tuple(first[:MAX_FIRST]),
        path=tuple(scores[n] for n in chain if n in scores),
        weights=tuple(_weights(suspect_path, reference_path, readers) if other_file else ()),
        seconds=time.perf_counter() - began,
        notes=tuple(_notes(graph, other_file, unmatched)),
    )


# ---------------------------------------------------------------- the report


def _db(value: float) -> str:
    return f"{value:.1f}" if math.isfinite(value) else str(value)


def _number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def diagnosis_dict(diagnosis: Diagnosis) -> dict[str, Any]:
    """Plain JSON-ready data (infinities as strings)."""
    data = asdict(diagnosis)
    for key in ("tensors", "first", "path", "weights"):
        for item in data[key]:
            for field in ("snr_db", "max_abs"):
                if field in item:
                    item[field] = _number(item[field])
            for field in ("inputs", "read_by"):
                if field in item:
                    item[field] = list(item[field])
    data["outputs"] = {k: _number(v) for k, v in diagnosis.outputs.items()}
    data["overrides"] = {k: repr(v) if not isinstance(v, bool | int | str) else v
                         for k, v in diagnosis.overrides.items()}  # fmt: skip
    data["reference"] = {k: repr(v) if not isinstance(v, bool | int | str) else v
                         for k, v in diagnosis.reference.items()}  # fmt: skip
    data["diverged"] = diagnosis.diverged
    data["kind"] = "mnn-guard-diagnose"
    return data


def diagnosis_json(diagnosis: Diagnosis) -> str:
    """The diagnosis as a JSON document."""
    return json.dumps(diagnosis_dict(diagnosis), indent=2, allow_nan=False)


def format_diagnosis(diagnosis: Diagnosis) -> str:
    """A title, the outputs' SNR, the first divergent tensors, the path, and what differs."""
    d = diagnosis
    same = d.model == d.reference_model
    title = (
        f"mnn-guard diagnose: suspect {d.model} (overrides {d.overrides or 'none'}) vs reference "
        f"{'the same file' if same else d.reference_model} ({d.reference or 'no options'}); "
        f"{d.cases} case(s), {len(d.tensors)} tensors, threshold {d.threshold_db:g} dB, "
        f"{d.tries} suspect load(s), {d.seconds:.1f} s"
    )
    lines = [title]
    outputs = ", ".join(f"{k} {_db(v)} dB" for k, v in d.outputs.items())
    lines.append(f"outputs: {outputs}")
    if not d.first:
        lines.append(f"no tensor diverges beyond {d.threshold_db:g} dB: the configurations agree")
        return "\n".join([*lines, *(f"note: {n}" for n in d.notes)])
    by_name = {t.name: t for t in d.tensors}
    weights = {w.name: w for w in d.weights}

    def source(name: str) -> str:
        if name in weights:
            return f"{name} (weights differ: {_db(weights[name].snr_db)} dB)"
        if name in by_name:
            return f"{name} ({_db(by_name[name].snr_db)} dB)"
        return name

    rows = [
        (str(t.index), t.name, t.op_type, _db(t.snr_db), ", ".join(source(i) for i in t.inputs))
        for t in d.first
    ]
    lines += ["", "first divergent tensors (nothing they read diverged), in execution order:"]
    lines += ["  " + r for r in text_table(("#", "tensor", "operator", "SNR dB", "inputs"), rows)
              .splitlines()]  # fmt: skip
    lines += ["", "path to the outputs:"]
    lines.append("  " + " -> ".join(f"{t.name} [{t.op_type}] {_db(t.snr_db)} dB" for t in d.path))
    diverged = sum(t.diverged for t in d.tensors)
    lines.append("")
    lines.append(f"{diverged} of {len(d.tensors)} tensors diverge beyond {d.threshold_db:g} dB")
    if d.weights:
        shown = ", ".join(
            f"{w.name} ({_db(w.snr_db)} dB, read by {', '.join(w.read_by) or 'nothing'})"
            for w in d.weights[:MAX_FIRST]
        )
        lines.append(f"weights that differ between the files: {shown}")
    return "\n".join([*lines, *(f"note: {n}" for n in d.notes)])
