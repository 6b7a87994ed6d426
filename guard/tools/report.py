"""`mnn-guard report BUNDLE`: a self-contained HTML page a person can look at.

For each failing canary case and output: golden and actual waveforms overlaid (whole, and
zoomed where they differ most), their difference, and the spectrograms of golden, actual and
error; for 2-D and 3-D outputs (a probability map), images of golden, actual and error above an
error histogram; for other shapes the histogram; and the worst elements of any output that is
not a 1-D signal. Then
every score against its threshold, the diagnosis (when `mnn-guard diagnose --bundle` ran), the
environment, and how to hand the bundle to MNN's maintainers. Images are inline PNG data URIs:
the page needs no network and no other file.

Plotting uses matplotlib, an optional dependency (the `diagnose` extra: `pip install
matplotlib`): a serving process writes bundles without it, and the page is rendered where a
person looks at it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guard.tools.bundles import Bundle, find_bundles, read_bundle
from guard.tools.errors import BundleError, MissingExtra
from probes.measures import snr_db

__all__ = ["REPORT", "figure", "figure_png", "render_folder", "render_report"]

Array = NDArray[Any]
REPORT = "report.html"
ZOOM = 400  # samples in the zoomed waveform
WORST = 10  # elements listed for outputs that are not signals
FLOOR_DB = -80.0  # spectrogram floor below the golden's loudest bin
DPI = 72
COLOURS = 128


def _matplotlib() -> Any:
    """matplotlib's Figure class, or MissingExtra saying how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtra(
            "the HTML report needs matplotlib: pip install matplotlib (the diagnose extra)"
        ) from None
    return Figure


def _signal(x: Array) -> Array | None:
    """The array as a 1-D signal when at most one axis is longer than 1 (64 samples or more)."""
    if sum(s > 1 for s in x.shape) != 1 or x.size < 64:
        return None
    return np.asarray(x, np.float64).reshape(-1)


def _spectrogram(x: Array, n: int) -> Array:
    """Power spectrogram in dB (frequency x frame), Hann-windowed frames of `n`, hop n/4."""
    frames = np.lib.stride_tricks.sliding_window_view(x, n)[:: max(1, n // 4)]
    z = np.fft.rfft(frames * np.hanning(n + 1)[:-1], axis=-1)
    power: Array = (z.real**2 + z.imag**2).T
    return power


def _envelope(y: Array, points: int = 1200) -> tuple[Array, Array]:
    """(x, y) of a line drawing the same pixels as `y` with about 2 * `points` vertices.

    Each of `points` runs of samples is drawn as its minimum and maximum, so a figure 800
    pixels wide looks the same and renders several times faster.
    """
    if y.size <= 2 * points:
        return np.arange(y.size, dtype=np.float64), y
    run = -(-y.size // points)
    blocks = np.pad(y, (0, run * points - y.size), mode="edge").reshape(points, run)
    xs = np.repeat(np.minimum(np.arange(points) * run + run / 2, y.size - 1), 2)
    ys = np.stack([blocks.min(axis=1), blocks.max(axis=1)], axis=1).reshape(-1)
    return xs.astype(np.float64), ys


def _db(power: Array, peak: float) -> Array:
    with np.errstate(divide="ignore"):
        db: Array = 10.0 * np.log10(np.maximum(power, 1e-30) / peak)
    return np.clip(db, FLOOR_DB, None)


def _png(fig: Any) -> bytes:
    """The figure as a PNG of 128 colours (a third of the bytes; Pillow comes with matplotlib)."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    buffer.seek(0)
    small = io.BytesIO()
    Image.open(buffer).convert("RGB").quantize(colors=COLOURS).save(small, "PNG", optimize=True)
    return small.getvalue()


def _plane(x: Array) -> Array | None:
    """The array as an image (H x W) or a stack of them (C x H x W), size-1 axes dropped."""
    squeezed = np.squeeze(x)
    return squeezed if squeezed.ndim in (2, 3) and min(squeezed.shape) > 1 else None


def figure(golden: Array, actual: Array, title: str) -> Any:
    """The matplotlib Figure for one output of one case: waveforms, difference and spectrograms
    of a 1-D signal; images of golden, actual and error and an error histogram of a 2-D or 3-D
    output; the histogram alone for other shapes."""
    make = _matplotlib()
    bad = int(actual.size - np.count_nonzero(np.isfinite(actual)))
    shown = np.nan_to_num(np.asarray(actual, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    note = f" ({bad} NaN/Inf values drawn as 0)" if bad else ""
    g, a = _signal(golden), _signal(shown)
    if g is not None and a is not None and g.size == a.size:
        fig = make(figsize=(11, 9.5))  # a fixed layout: a constrained one draws all twice
        grid = fig.add_gridspec(
            4, 3, height_ratios=(1, 1, 0.8, 1.3), hspace=0.45, wspace=0.18,
            left=0.06, right=0.9, top=0.96, bottom=0.06,
        )  # fmt: skip
        _waveforms(fig, grid, g, a, f"{title}: waveform, golden and actual{note}")
        _spectrograms(fig, grid, g, a)
        return fig
    planes = _plane(np.asarray(golden, np.float64)), _plane(shown)
    if golden.shape != actual.shape:
        fig = make(figsize=(10, 3.5), layout="constrained")
        ax = fig.add_subplot()
        ax.hist(shown.reshape(-1), bins=80, color="C1", log=True)
        ax.set_title(f"{title}: actual {list(actual.shape)} is not golden's {list(golden.shape)}")
        return fig
    if planes[0] is None or planes[1] is None:
        fig = make(figsize=(10, 3.5), layout="constrained")
        _histogram(fig.add_subplot(), shown - golden, f"{title}: error histogram{note}")
        return fig
    fig = make(figsize=(11, 7.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=(1.3, 1))
    _images(top, planes[0], planes[1], f"{title}{note}")
    _histogram(bottom.add_subplot(), shown - golden, "error histogram")
    return fig


def figure_png(golden: Array, actual: Array, title: str) -> bytes:
    """`figure` as a PNG."""
    return _png(figure(golden, actual, title))


def _histogram(ax: Any, error: Array, title: str) -> None:
    ax.hist(error.reshape(-1), bins=80, color="C3", log=True)
    ax.set_title(f"{title} (actual - golden)")
    ax.set_xlabel("error")
    ax.set_ylabel("elements")


def _images(fig: Any, g: Array, a: Array, title: str) -> None:
    """Golden, actual (on one colour scale) and their error, of the worst channel of a stack."""
    channel = ""
    if g.ndim == 3:
        worst = int(np.argmax(np.abs(a - g).reshape(len(g), -1).max(axis=1)))
        channel = f", channel {worst} of {len(g)} (the largest error)"
        g, a = g[worst], a[worst]
    low, high = float(min(g.min(), a.min())), float(max(g.max(), a.max()))
    error = a - g
    limit = float(np.abs(error).max()) or 1.0
    shown = (
        ("golden", g, "viridis", low, high),
        ("actual", a, "viridis", low, high),
        ("error (actual - golden)", error, "RdBu_r", -limit, limit),
    )
    for ax, (name, image, cmap, vmin, vmax) in zip(fig.subplots(1, 3), shown, strict=True):
        drawn = ax.imshow(image, aspect="auto", interpolation="nearest", cmap=cmap)
        drawn.set_clim(vmin, vmax)
        fig.colorbar(drawn, ax=ax)
        ax.set_title(name)
    fig.suptitle(f"{title}: golden, actual and error{channel}")


def _waveforms(fig: Any, grid: Any, g: Array, a: Array, title: str) -> None:
    """Rows 0-2: both waveforms overlaid, a zoom where they differ most, the difference."""
    diff = a - g
    centre = int(np.argmax(np.abs(diff)))
    lo = max(0, min(centre - ZOOM // 2, g.size - ZOOM))
    hi = min(g.size, lo + ZOOM)
    whole = fig.add_subplot(grid[0, :])
    whole.plot(*_envelope(g), color="C0", lw=0.6, label="golden")
    whole.plot(*_envelope(a), color="C1", lw=0.6, alpha=0.75, label="actual")
    whole.axvspan(lo, hi, color="0.85", zorder=0)
    whole.set_title(title)
    whole.legend(loc="upper right")
    whole.set_xlim(0, g.size)
    t = np.arange(lo, hi)
    zoom = fig.add_subplot(grid[1, :])
    zoom.plot(t, g[lo:hi], color="C0", lw=1.0, label="golden")
    zoom.plot(t, a[lo:hi], color="C1", lw=1.0, alpha=0.8, label="actual")
    zoom.set_title(f"zoom: samples {lo}..{hi} around the largest difference")
    zoom.set_xlim(lo, hi)
    err = fig.add_subplot(grid[2, :])
    err.plot(*_envelope(diff), color="C3", lw=0.6)
    limit = float(np.max(np.abs(diff))) or 1.0
    err.set_ylim(-1.05 * limit, 1.05 * limit)  # scaled to the difference: its shape shows
    peak = float(np.max(np.abs(g)))
    err.set_title(
        f"difference (actual - golden), at most {limit:.3g} (the golden's peak: {peak:.3g}): "
        f"SNR {snr_db(g, a):.1f} dB"
    )
    err.set_xlim(0, g.size)
    err.set_xlabel("sample")


def _spectrograms(fig: Any, grid: Any, g: Array, a: Array) -> None:
    """Row 3: spectrograms of golden, actual and error, in dB below the golden's loudest bin."""
    n = min(512, 1 << int(math.log2(g.size)))
    spectra = [_spectrogram(g, n), _spectrogram(a, n), _spectrogram(a - g, n)]
    peak = float(spectra[0].max()) or 1.0
    image = None
    for col, (name, power) in enumerate(zip(("golden", "actual", "error"), spectra, strict=True)):
        ax = fig.add_subplot(grid[3, col])
        image = ax.imshow(
            _db(power, peak), origin="lower", aspect="auto", cmap="magma", vmin=FLOOR_DB, vmax=0
        )
        ax.set_title(f"spectrogram: {name}")
        ax.set_xlabel("frame")
        if col == 0:
            ax.set_ylabel("frequency bin")
    bar = fig.add_axes((0.915, 0.06, 0.012, 0.22))
    fig.colorbar(image, cax=bar, label="dB below the golden's peak")


# ------------------------------------------------------------------ the page

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:2px 8px;
text-align:left;vertical-align:top} .fail{color:#b00;font-weight:bold} .pass{color:#070}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;white-space:pre-wrap} img{max-width:100%}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], raw: bool = False) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if raw else _e(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _g(value: Any, digits: int = 6) -> str:
    """A number with `digits` significant digits (JSON's "inf" strings and None as they are)."""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "-" if value is None else str(value)


def _word(passed: Any) -> str:
    return '<span class="pass">pass</span>' if passed else '<span class="fail">FAIL</span>'


def _scores(outputs: Mapping[str, Any]) -> str:
    rows = []
    for name, score in outputs.items():
        for check in score.get("checks", []):
            rows.append(
                (
                    _e(name),
                    _e(check["judge"]),
                    _e(_g(check["value"])),
                    _e(_g(check["limit"])),
                    _word(check["passed"]),
                    _e(check["reason"]),
                )
            )
    if not rows:
        return "<p>No scores (the module returned no outputs).</p>"
    return _table(("output", "judge", "value", "limit", "result", "why"), rows, raw=True)


def _worst(golden: Array, actual: Array) -> str:
    """The elements that differ most, for outputs that are not 1-D signals."""
    if golden.shape != actual.shape:
        return f"<p>shape {list(actual.shape)} differs from the golden {list(golden.shape)}</p>"
    with np.errstate(invalid="ignore"):
        diff = np.abs(actual.astype(np.float64) - golden.astype(np.float64)).reshape(-1)
    order = np.argsort(np.nan_to_num(diff, nan=np.inf))[::-1][:WORST]
    rows = [
        (
            [int(k) for k in np.unravel_index(int(i), golden.shape)],
            golden.reshape(-1)[i],
            actual.reshape(-1)[i],
            diff[i],
        )
        for i in order
    ]
    return _table(("index", "golden", "actual", "|difference|"), rows)


def _cases(bundle: Bundle) -> str:
    golden = bundle.arrays.get("golden.npz", {})
    actual = bundle.arrays.get("actual.npz", {})
    cases = bundle.verdict.get("cases", {})
    if bundle.manifest.get("arrays_omitted"):
        return f"<p>Arrays omitted: {_e(bundle.manifest['arrays_omitted'])}.</p>"
    if not golden:
        return "<p>No outputs were kept (the init or canary raised before judging).</p>"
    parts = []
    for key in sorted(golden):
        case, _, output = key.partition("/")
        index = case.removeprefix("case")
        parts.append(f"<h3>case {_e(index)}, output {_e(repr(output))}</h3>")
        verdict = cases.get(index, {})
        if verdict:
            parts.append(_scores({output: verdict.get("outputs", {}).get(output, {})}))
        if key not in actual:
            parts.append("<p class='fail'>The module returned no such output.</p>")
            continue
        png = figure_png(golden[key], actual[key], f"case {index} {output!r}")
        data = base64.b64encode(png).decode()
        alt = f"golden vs actual, case {index}, output {output}"
        parts.append(f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">')
        if _signal(golden[key]) is None:
            parts.append(_worst(golden[key], actual[key]))
    return "\n".join(parts)


def _diagnosis(found: Mapping[str, Any] | None) -> str:
    if found is None:
        return (
            "<p>Not run. <code>mnn-guard diagnose MODEL --probe DIR --override KEY=VALUE "
            "--tries 20 --bundle THIS_FOLDER</code> names the first tensors that diverge.</p>"
        )
    head = (
        f"<p>Suspect {_e(found['model'])} with {_e(found['overrides'])} against "
        f"{_e(found['reference_model'])} with {_e(found['reference'])}, threshold "
        f"{_e(found['threshold_db'])} dB, {_e(found['tries'])} suspect load(s).</p>"
    )
    head += "".join(f"<p>Note: {_e(note)}</p>" for note in found.get("notes", []))
    if not found["first"]:
        return head + "<p class='pass'>No tensor diverges: the configurations agree.</p>"
    rows = [(t["index"], t["name"], t["op_type"], _g(t["snr_db"], 3), ", ".join(t["inputs"]))
            for t in found["first"]]  # fmt: skip
    path = " &rarr; ".join(f"{_e(t['name'])} ({_e(_g(t['snr_db'], 3))} dB)" for t in found["path"])
    return (
        head
        + "<p>First divergent tensors, in execution order:</p>"
        + _table(("#", "tensor", "operator", "SNR dB", "inputs"), rows)
        + f"<p>Path to the outputs: {path}</p>"
    )


def _environment(manifest: Mapping[str, Any]) -> str:
    rung = manifest["rung"]
    cpu = dict(manifest.get("cpu", {}))
    flags = " ".join(cpu.pop("flags", []))
    rows: list[tuple[str, Any]] = [
        ("session", manifest["session"]),
        ("event", f"{manifest['event']} canary: {manifest['outcome']}"),
        ("rung", f"{rung['name']} (#{rung['index']}), overrides {json.dumps(rung['overrides'])}"),
        ("error", manifest.get("error") or "-"),
        ("model", json.dumps(manifest.get("model"))),
        ("factory", json.dumps(manifest.get("factory"))),
        ("MNN", json.dumps(manifest.get("mnn"))),
        ("platform", json.dumps(manifest.get("platform"))),
        ("CPU", json.dumps(cpu)),
        ("threads", json.dumps(manifest.get("threads"))),
    ]
    history = [
        (h.get("at", ""), h.get("event", ""), h.get("rung", ""), h.get("outcome", ""),
         h.get("summary", ""))
        for h in manifest.get("history", [])
    ]  # fmt: skip
    log = "\n".join(manifest.get("mnn_log", [])) or "(none captured)"
    return (
        _table(("what", "value"), rows)
        + f"<details><summary>CPU flags</summary><pre>{_e(flags)}</pre></details>"
        + "<h3>attempt history</h3>"
        + _table(("at", "event", "rung", "outcome", "summary"), history)
        + f"<h3>MNN's log lines</h3><pre>{_e(log)}</pre>"
    )


def render_report(
    bundle: str | os.PathLike[str], out: str | os.PathLike[str] | None = None
) -> Path:
    """Write the bundle's HTML page (default BUNDLE/report.html) and return its path."""
    _matplotlib()
    found = read_bundle(bundle)
    manifest, verdict = found.manifest, found.verdict
    readme = (
        (found.path / "README.txt").read_text() if (found.path / "README.txt").is_file() else ""
    )
    title = (
        f"mnn-guard diagnosis: session {manifest['session']!r}, rung "
        f"{manifest['rung']['name']!r}, {manifest['outcome']}"
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{_e(title)}</h1>
<p>{_e(manifest["created"])} &middot; {_e(manifest["summary"])}</p>
<h2>Scores against their thresholds (worst over every canary run)</h2>
{_scores(verdict.get("outputs", {}))}
<h2>Golden and actual outputs of the failing cases</h2>
{_cases(found)}
<h2>Where it goes wrong</h2>
{_diagnosis(found.diagnosis)}
<h2>Environment</h2>
{_environment(manifest)}
<h2>How to hand this to MNN's maintainers</h2>
<pre>{_e(readme)}</pre>
</body></html>
"""
    target = Path(out) if out is not None else found.path / REPORT
    target.write_text(page)
    return target


def render_folder(folder: str | os.PathLike[str]) -> list[Path]:
    """Write the page of every bundle in `folder` (or of `folder` itself if it is a bundle)."""
    root = Path(folder)
    if (root / "bundle.json").is_file():
        return [render_report(root)]
    bundles = find_bundles(root)
    if not bundles:
        raise BundleError(f"{str(root)!r} holds no diagnosis bundle")
    return [render_report(b) for b in bundles]
