"""Choosing canaries: a derived second case that catches stale outputs, and degenerate ones.

A module that hands back the previous call's output passes a canary of one case: a second case
with other outputs catches it. Models with a dynamic axis get case 0 rolled along it; models
of fixed shape get their inputs rolled along their last axis, else reversed, else (float
inputs) nudged with seeded noise: the first transform whose outputs differ is kept.

A canary whose outputs are constant, silent or saturated, or whose lengths are near zero,
judges little of the model: recording warns (`probes.CanaryWarning`) and notes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from probes.errors import ProbeError

__all__ = ["Derive", "degenerate", "derive_axes", "derived_cases"]

Array = NDArray[Any]
Derive = bool | Mapping[str, int | None]
"""Which inputs a derived canary moves: True (those with a declared dynamic axis, along it;
with none declared, every input of two or more values), False (no derived canary), or
{name: axis} (None: the input's last dynamic axis, else its last axis)."""
SATURATED = 0.99  # a softmax row this confident, or this share of a bounded output at its bounds
_LENGTH_WORDS = ("len", "count", "num", "size")  # an integer input so named is a length


def derive_axes(
    derive: Derive, case: Mapping[str, Array], dynamic: Mapping[str, Mapping[int, Any]]
) -> dict[str, int]:
    """Input name -> the (non-negative) axis a derived canary moves it along."""
    if derive is True:
        declared = {n: None for n, axes in dynamic.items() if axes}
        movable = {n: None for n, a in case.items() if a.size > 1}
        chosen: Mapping[str, int | None] = declared or movable
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
        declared_axes = [a % arr.ndim for a in dynamic.get(name, {})]
        longest = max((a for a in range(arr.ndim) if arr.shape[a] > 1), default=arr.ndim - 1)
        axis = given if given is not None else max(declared_axes, default=longest)
        if isinstance(axis, bool) or not isinstance(axis, int) or not -arr.ndim <= axis < arr.ndim:
            raise ProbeError(
                f"derive: axis {axis!r} of input {name!r} is out of range for rank {arr.ndim}"
            )
        axes[name] = axis % arr.ndim
    return axes


def _noise(arr: Array, seed: int) -> Array:
    """Seeded Gaussian noise of a tenth of the input's spread (floats only)."""
    if not np.issubdtype(arr.dtype, np.floating):
        return arr
    scale = float(np.std(arr)) or 1.0
    rng = np.random.default_rng(seed)
    return (arr + rng.normal(0.0, 0.1 * scale, arr.shape)).astype(arr.dtype)


def derived_cases(
    case: Mapping[str, Array], axes: Mapping[str, int]
) -> Iterator[tuple[dict[str, Array], str]]:
    """Candidate second canaries, best first, each with a note saying how it was made."""
    fixed = [n for n in case if n not in axes]
    held = f"; {', '.join(fixed)} held fixed" if fixed else ""
    shift = {n: case[n].shape[a] // 2 for n, a in axes.items()}
    transforms: list[tuple[str, Callable[[str, Array], Array]]] = [
        (
            ", ".join(f"{n} by {shift[n]} along axis {a}" for n, a in axes.items()),
            lambda n, a: np.roll(a, shift[n], axis=axes[n]),
        ),
        (
            ", ".join(f"{n} reversed along axis {a}" for n, a in axes.items()),
            lambda n, a: np.flip(a, axis=axes[n]).copy(),
        ),
        (
            ", ".join(f"{n} with seeded noise of 10% of its spread" for n in axes),
            lambda n, a: _noise(a, 1),
        ),
    ]
    for how, transform in transforms:
        moved = {n: transform(n, a) if n in axes else a for n, a in case.items()}
        if not all(np.array_equal(moved[n], case[n]) for n in case):
            yield moved, f"case 1 is case 0 with {how}{held}"


def _saturated(name: str, out: Array) -> str | None:
    """Why an output looks saturated (a confident softmax, a bounded output at its bounds)."""
    if not np.issubdtype(out.dtype, np.floating) or out.size < 2:
        return None
    values = out.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    rows = values.reshape(-1, values.shape[-1]) if values.ndim else values.reshape(1, -1)
    if low >= 0.0 and rows.shape[-1] > 1 and np.allclose(rows.sum(axis=-1), 1.0, atol=1e-3):
        if float(rows.max(axis=-1).min()) >= SATURATED:
            return (
                f"output {name!r} is a confident probability ({float(rows.max()):.4f}): a "
                "softmax this sure hides weight faults; use sentinels (the logits before it)"
            )
        return None
    for bound_low, bound_high in ((-1.0, 1.0), (0.0, 1.0)):
        if low >= bound_low - 1e-6 and high <= bound_high + 1e-6:
            margin = 1e-3 * (bound_high - bound_low)
            at_bounds = (values <= bound_low + margin) | (values >= bound_high - margin)
            if float(np.mean(at_bounds)) >= SATURATED:
                return (
                    f"output {name!r} sits at its bounds [{bound_low:g}, {bound_high:g}] for "
                    f"{100 * float(np.mean(at_bounds)):.0f}% of its values: saturated outputs "
                    "hide weight faults; use sentinels (the tensor before the squashing)"
                )
    return None


def degenerate(
    inputs: Sequence[Mapping[str, Array]], outputs: Sequence[Mapping[str, Array]]
) -> list[str]:
    """Why the canary judges little of the model: constant, silent or saturated outputs, or
    lengths near zero (one sentence each; empty when it looks sound)."""
    found: list[str] = []
    for name, arr in inputs[0].items():
        counts = any(word in name.lower() for word in _LENGTH_WORDS)
        if counts and np.issubdtype(arr.dtype, np.integer) and 0 < arr.size <= 4 and arr.max() <= 1:
            found.append(
                f"input {name!r} is {arr.tolist()}: a length or count near zero gives a "
                "degenerate canary; record with realistic values"
            )
    for case, outs in enumerate(outputs):
        for name, out in outs.items():
            if out.size == 0:
                found.append(f"output {name!r} of case {case} is empty")
            elif out.size > 1 and np.ptp(out) == 0:
                value = out.reshape(-1)[0].item()
                word = "silent" if value == 0 else f"constant ({value!r})"
                found.append(
                    f"output {name!r} of case {case} is {word}: it cannot show a fault "
                    "that keeps it so; record with a canary that makes it vary"
                )
            elif (why := _saturated(name, out)) is not None and case == 0:
                found.append(why)
    return list(dict.fromkeys(found))
