"""``python -m lightning_lnsgd report RUN_DIR [RUN_DIR ...] --out FILE``: the phase figure of one or more runs.

Reads the TensorBoard event files under each run directory (recursively) and draws, runs overlaid:

1. ``train/loss`` (solid) and ``test/loss`` (dashed), log scale;
2. ``dynamics/norm_sq_mean``, the mean squared neuron norm (1/m)Σ‖wᵢ‖²;
3. ``dynamics/alignment_mean`` (solid) and ``dynamics/cosine_mean`` (dashed);
4. ``dynamics/lazy_distance`` √m·minᵢ‖wᵢ − wᵢ(0)‖ with the escape threshold 1 (log scale).

``phase/escape_step`` is drawn as a vertical dotted line in every panel, in the run's colour. With ``--layer NAME``
the ``dynamics/NAME/*`` tags of a :class:`~lightning_lnsgd.callbacks.DynamicsMonitor` layer are used instead.

A stacked run (:class:`~lightning_lnsgd.TwoLayerLinear` with ``replicas``) is drawn one line per replica. Its
replicas are read from their own TensorBoard runs, the folders ``r{k}`` or ``r{k}-<settings>`` (``r03-sigma4-seed3``)
inside the run's version folder, each with the tags of a single run and its settings as ``replica/<name>``; runs
written before that layout, with ``<tag>/r{k}`` and ``replica/<name>/r{k}`` tags in the run itself, are read too.
``--escape-vs sigma|lr|init_scale`` draws each replica's ``phase/escape_step`` against its ``replica/<name>``.

``--phase-diagram X Y`` (e.g. ``sigma lr``) draws Theorem 2's phase diagram of a grid run from its ``replicas.csv``
(:class:`~lightning_lnsgd.twolayer.replica_table.ReplicaTable`): the escape step over the X × Y grid, the mean over
the other settings (the seeds) of the replicas that escaped, cells where none escaped marked ×, cells where some did
not marked with a dot; the fitted power law T₁ = c·X^a·Y^b (:func:`power_law_fit`) as contours; and it prints a and b
with their 95 % intervals (Theorem 2: T₁ ∝ 1/(σ²η²), a = b = −2).

``--out`` is written exactly when its extension is a format matplotlib writes (:func:`image_formats`); without an
extension ``.png`` is appended, and an existing directory (or a path ending in ``/``) gets ``phases.png``
(``escape_vs_<PARAM>.png`` with ``--escape-vs``) inside it. The path written is printed and returned.
An event file cut short (a run killed while writing) is read up to the cut, with a :class:`ReportWarning` naming it.
Importing this module has no side effects; matplotlib is loaded (Agg backend) only when drawing.
"""

from __future__ import annotations

import argparse
import os
import re
import struct
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .stats import t_quantile

__all__ = [
    "PANELS", "REPLICA_RUN", "ReportError", "ReportWarning", "event_dirs", "check_event_file", "escape_figure",
    "escape_points", "expand_replicas", "image_formats", "layers_in", "load_run", "load_scalars", "main",
    "output_path", "phase_diagram_figure", "phase_figure", "PowerLawFit", "power_law_fit", "split_stacked",
    "find_replica_table",
]

#: (panel title, [(tag suffix or full tag, line style)], log y, horizontal reference line)
#: Curves with fewer points than this are drawn with markers (a one-point curve is otherwise invisible).
SHORT_CURVE = 10

PANELS: list[tuple[str, list[tuple[str, str]], bool, float | None]] = [
    ("loss  (train —, test - -)", [("train/loss", "-"), ("test/loss", "--")], True, None),
    ("mean ‖wᵢ‖²", [("dynamics/norm_sq_mean", "-")], False, None),
    ("alignment mean |⟨wᵢ,θ⋆⟩| —, cosine - -", [("dynamics/alignment_mean", "-"), ("dynamics/cosine_mean", "--")], False, None),
    ("√m · minᵢ ‖wᵢ − wᵢ(0)‖", [("dynamics/lazy_distance", "-")], True, 1.0),
]
ESCAPE_TAG = "phase/escape_step"
#: The folder name of a replica's own run inside a stacked run's version folder; group 1 is the replica index.
REPLICA_RUN = re.compile(r"^r(\d+)(?:-.*)?$")
#: A per-replica tag of a stacked run written before the replicas had their own runs: ``<tag>/r{k}``.
_REPLICA_TAG = re.compile(r"^(.+)/r(\d+)$")

Scalars = dict[str, list[tuple[int, float]]]


class ReportError(ValueError):
    """The run directories cannot be reported (no event files, no known tags), or ``--out`` names no image format."""


class ReportWarning(UserWarning):
    """An event file could not be read to its end: the figure shows what precedes the damage."""


def check_event_file(path: str | os.PathLike) -> str | None:
    """Why the event file ``path`` cannot be read to its end, or ``None`` when every record in it is complete.

    An event file is a sequence of TFRecords: an 8-byte little-endian length, a 4-byte CRC, the payload and its
    4-byte CRC. TensorBoard's reader stops at the first incomplete record without a word; this walks the framing to
    find whether such a record (a run killed while writing, a partial copy) is there.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            pos, records = 0, 0
            # Only the record headers are read: the payloads are skipped by their declared length.
            while size - pos >= 12:
                f.seek(pos)
                (length,) = struct.unpack("<Q", f.read(8))
                if length > size - pos - 16:
                    break
                pos += 16 + length
                records += 1
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if pos == size:
        return None
    return f"is truncated or corrupt: {size - pos} of its {size} bytes, after {records} complete records, cannot be read"


def event_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """The directories under ``run_dir`` (itself included) that hold TensorBoard event files, sorted."""
    root = Path(run_dir)
    if not root.exists():
        raise ReportError(f"report: run directory {str(root)!r} does not exist.")
    return sorted({p.parent for p in root.rglob("events.out.tfevents.*") if p.is_file()})


def load_scalars(run_dir: str | os.PathLike) -> Scalars:
    """Every scalar tag of the run under ``run_dir``: ``{tag: [(step, value), ...]}`` sorted by step; for a stacked
    run, those of the run itself (the means over replicas), without its replicas' own runs (see :func:`load_run`).

    Event files of several sub-directories (e.g. ``version_0``, ``version_1`` of a resumed run) are merged; where two
    events share a tag and a step, the later one (by wall time) wins.
    """
    return load_run(run_dir)[0]


def load_run(run_dir: str | os.PathLike) -> tuple[Scalars, dict[int, Scalars]]:
    """The scalars of the run under ``run_dir`` (as :func:`load_scalars`) and those of each of its replicas,
    ``{k: scalars}`` by replica index (empty for a run without replicas).

    A replica's own run is an event directory named as :data:`REPLICA_RUN` whose parent, inside ``run_dir``, holds
    event files (the version folder); the runs of replica k in several version folders are merged. A run without such
    folders but with ``<tag>/r{k}`` tags (the earlier layout) is split by :func:`split_stacked`.
    """
    root = Path(run_dir)
    dirs = event_dirs(root)
    if not dirs:
        raise ReportError(f"report: no TensorBoard event files (events.out.tfevents.*) under {str(run_dir)!r}.")
    held = set(dirs)
    own: list[Path] = []
    replicas: dict[int, list[Path]] = {}
    for d in dirs:
        match = REPLICA_RUN.match(d.name)
        if match and d != root and d.parent in held:
            replicas.setdefault(int(match.group(1)), []).append(d)
        else:
            own.append(d)
    scalars = _merge(own)
    if not replicas:
        return scalars, split_stacked(scalars)
    return scalars, {k: _merge(replicas[k]) for k in sorted(replicas)}


def _merge(dirs: Sequence[Path]) -> Scalars:
    """The scalars of the event files in ``dirs``, merged (the later event wins at a shared tag and step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    merged: dict[str, dict[int, tuple[float, float]]] = {}
    for d in dirs:
        for event_file in sorted(p for p in d.glob("events.out.tfevents.*") if p.is_file()):
            problem = check_event_file(event_file)
            if problem is not None:
                warnings.warn(
                    f"report: event file {str(event_file)!r} {problem}; its events before that point are drawn.",
                    ReportWarning,
                    stacklevel=3,
                )
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            series = merged.setdefault(tag, {})
            for e in acc.Scalars(tag):
                if e.step not in series or series[e.step][0] <= e.wall_time:
                    series[e.step] = (e.wall_time, float(e.value))
    return {tag: sorted((step, v) for step, (_, v) in series.items()) for tag, series in merged.items()}


def split_stacked(scalars: Scalars) -> dict[int, Scalars]:
    """The replicas of a stacked run written with ``<tag>/r{k}`` tags in the run itself (``dynamics/norm_sq_mean/r3``,
    ``phase/escape_step/r3``, ``replica/sigma/r3``): ``{k: {tag: series}}``; empty when there are none."""
    replicas: dict[int, Scalars] = {}
    for tag, series in scalars.items():
        match = _REPLICA_TAG.match(tag)
        if match:
            replicas.setdefault(int(match.group(2)), {})[match.group(1)] = series
    return dict(sorted(replicas.items()))


def layers_in(scalars: dict[str, list[tuple[int, float]]]) -> list[str]:
    """The :class:`~lightning_lnsgd.callbacks.DynamicsMonitor` layers with a phase-figure tag
    (``dynamics/<layer>/<name>``) in ``scalars``, sorted."""
    names = {tag.split("/", 1)[1] for _, lines, _, _ in PANELS for tag, _ in lines if tag.startswith("dynamics/")}
    return sorted({
        t[len("dynamics/") : -len(name) - 1]
        for t in scalars
        for name in names
        if t.startswith("dynamics/") and t.endswith("/" + name) and len(t) > len("dynamics/") + len(name) + 1
    })


def _tag(tag: str, layer: str | None) -> str:
    if layer is None or not tag.startswith("dynamics/"):
        return tag
    return f"dynamics/{layer}/{tag[len('dynamics/'):]}"


def phase_figure(
    runs: Sequence[dict[str, list[tuple[int, float]]]], labels: Sequence[str], layer: str | None = None
) -> Any:
    """The four-panel phase figure (see module docstring) of ``runs`` (outputs of :func:`load_scalars`)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    known = {_tag(t, layer) for _, lines, _, _ in PANELS for t, _ in lines}
    for label, scalars in zip(labels, runs):
        if layer is not None and not any(t.startswith(f"dynamics/{layer}/") for t in scalars):
            found = ", ".join(layers_in(scalars)) or "none"
            raise ReportError(f"report: --layer {layer!r} matches no dynamics/{layer}/* tag of run {label!r}; "
                              f"layers in its logs: {found}.")
        if not known & set(scalars):
            found = ", ".join(sorted(scalars)[:15]) or "none"
            raise ReportError(
                f"report: run {label!r} has none of the tags {sorted(known)}; its scalar tags: {found}."
                + ("" if layer else " For a DynamicsMonitor layer, pass --layer NAME.")
            )
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=110, sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, lines, logy, hline) in zip(axes.flat, PANELS):
        for i, (label, scalars) in enumerate(zip(labels, runs)):
            color = colors[i % len(colors)]
            for j, (tag, style) in enumerate(lines):
                series = scalars.get(_tag(tag, layer))
                if not series:
                    continue
                steps, values = zip(*series)
                if logy:  # zeros and negatives cannot be drawn on a log axis
                    keep = [k for k, v in enumerate(values) if v > 0]
                    steps, values = [steps[k] for k in keep], [values[k] for k in keep]
                # A line through one point draws nothing: a curve of few points is drawn with its points marked.
                marker = "o" if len(steps) < SHORT_CURVE else None
                ax.plot(steps, values, style, color=color, label=label if j == 0 else None, lw=1.3, marker=marker,
                        markersize=4)
            for tag, escape in scalars.items():  # logged once, value = the step; stacked runs: one per replica
                if escape and (tag == ESCAPE_TAG or tag.startswith(ESCAPE_TAG + "/r")):
                    ax.axvline(escape[0][1], color=color, ls=":", lw=1.2)
        if hline is not None:
            ax.axhline(hline, color="k", lw=0.8, ls="-.")
        if logy:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    from matplotlib.ticker import FuncFormatter

    steps_fmt = FuncFormatter(lambda v, _: f"{v / 1000:g}k" if abs(v) >= 1000 else f"{v:g}")
    for ax in axes[-1]:
        ax.set_xlabel("SGD steps")
        ax.xaxis.set_major_formatter(steps_fmt)
    for ax in axes.flat:  # the legend goes in the first panel that has a line of every run
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
            break
    if any(t == ESCAPE_TAG or t.startswith(ESCAPE_TAG + "/") for r in runs for t in r):
        fig.text(0.01, 0.005, "dotted vertical lines: phase/escape_step (every neuron left the lazy ball)", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return fig


def expand_replicas(
    scalars: Scalars, label: str, replicas: dict[int, Scalars] | None = None
) -> list[tuple[str, Scalars]]:
    """One pseudo-run per replica of a stacked run (``replicas`` as :func:`load_run` gives them; by default split from
    the ``…/r{k}`` tags of ``scalars``), labelled ``"<label> r{k}"`` with the ``replica/<name>`` settings that differ
    between replicas. A run without replicas, or whose replicas hold no tag of the phase figure (more replicas than
    ``log_replicas``: only their escape steps), is returned as it is."""
    if replicas is None:
        replicas = split_stacked(scalars)
    drawn = {t for _, lines, _, _ in PANELS for t, _ in lines}
    if not any(drawn & set(run) for run in replicas.values()):
        return [(label, scalars)]

    def setting(run: Scalars, name: str) -> float | None:
        series = run.get(f"replica/{name}")
        return series[0][1] if series else None

    names = sorted({t.split("/", 1)[1] for run in replicas.values() for t in run if t.startswith("replica/")})
    varying = [n for n in names if len({setting(run, n) for run in replicas.values()}) > 1]
    out = []
    for k, run in replicas.items():
        given = ", ".join(f"{n}={setting(run, n):g}" for n in varying if setting(run, n) is not None)
        out.append((f"{label} r{k}" + (f" ({given})" if given else ""), run))
    return out


def escape_points(replicas: dict[int, Scalars], param: str) -> list[tuple[float, float]]:
    """``(value of replica/<param>, escape step)`` for every replica (of :func:`load_run`) that escaped, sorted."""
    points = []
    for run in replicas.values():
        value, escape = run.get(f"replica/{param}"), run.get(ESCAPE_TAG)
        if value and escape:
            points.append((value[0][1], escape[0][1]))
    return sorted(points)


def escape_figure(runs: Sequence[dict[int, Scalars]], labels: Sequence[str], param: str) -> Any:
    """Escape step of every replica of stacked ``runs`` (their replicas, as :func:`load_run` gives them) against its
    ``param`` (log–log), with Theorem 2's slope −2.

    Theorem 2 bounds the escape time by T₁ ∝ 1/(σ²η²): against σ or η the slope on a log–log plot
    is −2. The reference line goes through the geometric mean of all points.
    """
    import math

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    symbol = {"sigma": "σ", "lr": "η"}.get(param, param)
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    all_points = []
    for label, replicas in zip(labels, runs):
        points = escape_points(replicas, param)
        if not points:
            raise ReportError(
                f"report: run {label!r} has no replica with both {ESCAPE_TAG} and replica/{param} "
                f"({len(replicas)} replicas found); --escape-vs needs a stacked run (TwoLayerLinear with `replicas`) "
                "whose replicas escaped."
            )
        xs, ys = zip(*points)
        ax.loglog(xs, ys, "o", alpha=0.7, label=label)
        all_points += points
    gx = math.exp(sum(math.log(x) for x, _ in all_points) / len(all_points))
    gy = math.exp(sum(math.log(y) for _, y in all_points) / len(all_points))
    lo, hi = min(x for x, _ in all_points), max(x for x, _ in all_points)
    grid = [lo * (hi / lo) ** (i / 50) for i in range(51)] if hi > lo else [lo]
    ax.loglog(grid, [gy * (x / gx) ** -2 for x in grid], "k--", lw=1, label=f"Theorem 2: ∝ {symbol}⁻²")
    ax.set_xlabel(symbol)
    ax.set_ylabel("escape step (every neuron left the lazy ball)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


class PowerLawFit(NamedTuple):
    """T = c · x^a · y^b fitted by least squares on log T (:func:`power_law_fit`)."""

    a: float
    b: float
    #: 95 % t-intervals of ``a`` and ``b``.
    a_interval: tuple[float, float]
    b_interval: tuple[float, float]
    c: float
    #: Points fitted.
    n: int

    def __call__(self, x: Any, y: Any) -> Any:
        """The fitted T at ``x``, ``y`` (floats or numpy arrays)."""
        return self.c * x**self.a * y**self.b


def power_law_fit(x: Sequence[float], y: Sequence[float], t: Sequence[float]) -> PowerLawFit:
    """Least squares of log T = log c + a log x + b log y over positive points, with 95 % t-intervals of a and b
    (n − 3 degrees of freedom; needs n ≥ 4 and x, y each with two values or more).

    >>> fit = power_law_fit([1, 2, 4, 1, 2, 4], [1, 1, 1, 2, 2, 2], [5 * x**-2 * y**-3 for x, y in
    ...                     zip([1, 2, 4, 1, 2, 4], [1, 1, 1, 2, 2, 2])])
    >>> round(fit.a, 6), round(fit.b, 6), round(fit.c, 6), fit.n
    (-2.0, -3.0, 5.0, 6)
    """
    import numpy as np

    X = np.column_stack([np.ones(len(t)), np.log(np.asarray(x, float)), np.log(np.asarray(y, float))])
    Y = np.log(np.asarray(t, float))
    n = len(Y)
    if n < 4 or np.linalg.matrix_rank(X) < 3:
        raise ReportError(f"report: a power-law fit needs 4 points or more spread over two values of each axis; got {n}.")
    coef, *_ = np.linalg.lstsq(X, Y, rcond=None)
    resid = Y - X @ coef
    s2 = float(resid @ resid) / max(n - 3, 1)
    se = np.sqrt(np.maximum(np.diag(np.linalg.inv(X.T @ X)) * s2, 0.0))
    q = t_quantile(0.975, max(n - 3, 1))
    a, b = float(coef[1]), float(coef[2])
    return PowerLawFit(a, b, (a - q * se[1], a + q * se[1]), (b - q * se[2], b + q * se[2]), float(np.exp(coef[0])), n)


#: Symbols of the grid axes in figure labels.
SYMBOLS = {"sigma": "σ", "lr": "η", "init_scale": "α", "rho": "ρ", "flip_prob": "τ"}


def find_replica_table(run_dir: str | os.PathLike) -> Path:
    """The one ``replicas.csv`` under ``run_dir`` (searched recursively); :class:`ReportError` for none or several."""
    path = Path(run_dir)
    found = [path] if path.is_file() else sorted(path.rglob("replicas.csv"))
    if len(found) != 1:
        listed = ", ".join(str(p) for p in found[:5]) or "none"
        raise ReportError(
            f"report: --phase-diagram needs exactly one replicas.csv under {os.fspath(run_dir)!r} (written by a stacked "
            f"TwoLayerLinear run with a logger); found {listed}: give the version folder or the file."
        )
    return found[0]


def phase_diagram_figure(rows: Sequence[dict[str, float]], x: str, y: str) -> tuple[Any, PowerLawFit]:
    """Theorem 2's phase diagram of a grid run: the escape step over its ``y`` (rows) × ``x`` (columns) grid and the
    power law fitted through the replicas that escaped (see the module docstring); ``rows`` as
    :func:`~lightning_lnsgd.twolayer.replica_table.read_replica_table` gives them. Returns the figure and the fit."""
    import math

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    for name in (x, y):
        if not rows or name not in rows[0]:
            have = ", ".join(k for k in (rows[0] if rows else {}) if k not in ("replica", "escape_step", "step"))
            raise ReportError(f"report: --phase-diagram {name!r} is not a column of the replica table; it has: {have}.")
    xs, ys = sorted({r[x] for r in rows}), sorted({r[y] for r in rows})
    cells: dict[tuple[float, float], list[float]] = {}
    for r in rows:
        cells.setdefault((r[x], r[y]), []).append(r["escape_step"])
    mean = np.full((len(ys), len(xs)), np.nan)
    for (cx, cy), steps in cells.items():
        escaped = [t for t in steps if t > 0]
        if escaped:
            mean[ys.index(cy), xs.index(cx)] = sum(escaped) / len(escaped)
    done = [r for r in rows if r["escape_step"] > 0]
    fit = power_law_fit([r[x] for r in done], [r[y] for r in done], [r["escape_step"] for r in done])

    def edges(v: list[float]) -> np.ndarray:  # cell borders half-way between values on a log axis
        lv = np.log(v)
        mid = (lv[1:] + lv[:-1]) / 2 if len(v) > 1 else np.array([])
        step = (lv[-1] - lv[0]) / max(len(v) - 1, 1) or math.log(2)
        return np.exp(np.concatenate([[lv[0] - step / 2], mid, [lv[-1] + step / 2]]))

    fig, ax = plt.subplots(figsize=(6.4, 5), dpi=100)
    ex, ey = edges(xs), edges(ys)
    finite = mean[np.isfinite(mean)]
    mesh = ax.pcolormesh(ex, ey, np.ma.masked_invalid(mean), cmap="viridis", shading="flat",
                         norm=LogNorm(vmin=float(finite.min()), vmax=float(finite.max())) if finite.size else None)
    ax.set_facecolor("0.85")
    fig.colorbar(mesh, ax=ax, label="escape step (mean over the replicas that escaped)")
    for (cx, cy), steps in cells.items():
        n_out = sum(t > 0 for t in steps)
        if n_out == 0:
            ax.plot(cx, cy, "x", color="k", ms=8)
        elif n_out < len(steps):
            ax.plot(cx, cy, ".", color="w", ms=6)
    gx, gy = np.meshgrid(np.geomspace(ex[0], ex[-1], 100), np.geomspace(ey[0], ey[-1], 100))
    levels = np.geomspace(float(finite.min()), float(finite.max()), 6) if finite.size > 1 else None
    contours = ax.contour(gx, gy, fit(gx, gy), levels=levels, colors="w", linewidths=0.8)
    ax.clabel(contours, fmt=lambda v: f"{v:,.0f}", fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.minorticks_off()
    ax.set_xticks(xs, [f"{v:g}" for v in xs])
    ax.set_yticks(ys, [f"{v:g}" for v in ys])
    sx, sy = SYMBOLS.get(x, x), SYMBOLS.get(y, y)
    ax.set_xlabel(sx)
    ax.set_ylabel(sy)
    ax.set_title(
        f"fit T₁ ∝ {sx}^a {sy}^b: a = {fit.a:.2f} [{fit.a_interval[0]:.2f}, {fit.a_interval[1]:.2f}], "
        f"b = {fit.b:.2f} [{fit.b_interval[0]:.2f}, {fit.b_interval[1]:.2f}]",
        fontsize=9,
    )
    fig.text(0.01, 0.01, f"× no replica escaped, · some did not; lines: the fit ({fit.n} escaped replicas of "
             f"{len(rows)})", fontsize=7)
    fig.tight_layout()
    return fig, fit


def image_formats() -> list[str]:
    """The file extensions matplotlib writes (``png``, ``pdf``, ``svg``, ...), sorted."""
    from matplotlib.figure import Figure

    return sorted(Figure().canvas.get_supported_filetypes())


def output_path(out: str | os.PathLike, default_name: str = "phases.png") -> Path:
    """The file :func:`main` writes for ``--out out``: ``out`` itself when its extension is an image format
    (:func:`image_formats`); ``out`` + ``.png`` without extension; ``out/default_name`` for an existing directory
    or a path ending in a separator. Raises :class:`ReportError` for any other extension."""
    text = os.fspath(out)
    path = Path(text)
    if path.is_dir() or text.endswith(("/", os.sep)):
        return path / default_name
    ext = path.suffix[1:]
    if not ext:
        return path.with_name(path.name + ".png")
    formats = image_formats()
    if ext.lower() not in formats:
        raise ReportError(f"report: --out {text!r}: {ext!r} is not an image format matplotlib writes; "
                          f"use one of: {', '.join(formats)}.")
    return path


def main(argv: Sequence[str] | None = None) -> Path:
    """Entry point of ``python -m lightning_lnsgd report``; returns the path of the written figure."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_lnsgd report",
        description="Draw the phase figure (losses, mean ‖wᵢ‖², alignment, laziness) of one or more runs.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, searched recursively for event files")
    parser.add_argument(
        "--out", required=True, metavar="FILE",
        help="where to write the figure: FILE.png, .pdf, .svg, ... as given; no extension: FILE.png; "
        "a directory: DIR/phases.png",
    )
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per RUN_DIR (default: the directory names)")
    parser.add_argument("--layer", default=None, help="use the dynamics/LAYER/* tags of a DynamicsMonitor layer")
    parser.add_argument(
        "--escape-vs", default=None, metavar="PARAM", choices=["sigma", "lr", "init_scale"],
        help="instead of the phase figure: escape step of each replica against its σ (sigma) or η (lr), "
        "with Theorem 2's slope",
    )
    parser.add_argument(
        "--phase-diagram", nargs=2, default=None, metavar=("X", "Y"),
        help="instead of the phase figure: the escape step of a grid run over its X × Y axes (e.g. sigma lr) from its "
        "replicas.csv, with the fitted power law T₁ ∝ X^a Y^b; prints a and b with their 95%% intervals",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.phase_diagram:
        from .twolayer.replica_table import read_replica_table

        try:
            out = output_path(args.out, "phase_diagram.png")
            if len(args.run_dirs) != 1:
                raise ReportError(f"report: --phase-diagram draws one run; got {len(args.run_dirs)} RUN_DIRs.")
            table = find_replica_table(args.run_dirs[0])
            rows = read_replica_table(table)
            fig, fit = phase_diagram_figure(rows, *args.phase_diagram)
        except ReportError as err:
            parser.error(str(err))
        x, y = args.phase_diagram
        print(f"report: {table}: T₁ ∝ {x}^a · {y}^b fitted on {fit.n} escaped replicas:")
        print(f"  a ({x}) = {fit.a:.3f}  95% interval [{fit.a_interval[0]:.3f}, {fit.a_interval[1]:.3f}]")
        print(f"  b ({y}) = {fit.b:.3f}  95% interval [{fit.b_interval[0]:.3f}, {fit.b_interval[1]:.3f}]")
        whole = [r for r in rows if all(o["escape_step"] > 0 for o in rows if (o[x], o[y]) == (r[x], r[y]))]
        if len(whole) < len(rows):  # the fastest seeds of a partly escaped cell bias the fit; without those cells:
            try:
                only = power_law_fit([r[x] for r in whole], [r[y] for r in whole], [r["escape_step"] for r in whole])
                print(f"  on the {only.n} replicas of the cells where every replica escaped: a = {only.a:.3f} "
                      f"[{only.a_interval[0]:.3f}, {only.a_interval[1]:.3f}], b = {only.b:.3f} "
                      f"[{only.b_interval[0]:.3f}, {only.b_interval[1]:.3f}]")
            except ReportError:
                pass
        print("  Theorem 2: a = b = -2")
        return _save(fig, out)
    if args.labels is not None and len(args.labels) != len(args.run_dirs):
        parser.error(f"--labels: got {len(args.labels)} labels for {len(args.run_dirs)} run directories; give one per RUN_DIR.")
    labels = args.labels or [Path(d).resolve().name for d in args.run_dirs]
    try:
        out = output_path(args.out, f"escape_vs_{args.escape_vs}.png" if args.escape_vs else "phases.png")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ReportWarning)
            loaded = [load_run(d) for d in args.run_dirs]
        for w in caught:
            if issubclass(w.category, ReportWarning):
                print(f"warning: {w.message}", file=sys.stderr)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if args.escape_vs:
            fig = escape_figure([replicas for _, replicas in loaded], labels, args.escape_vs)
        else:  # a stacked run draws one line per replica
            pairs = [pair for label, run in zip(labels, loaded) for pair in expand_replicas(run[0], label, run[1])]
            fig = phase_figure([p[1] for p in pairs], [p[0] for p in pairs], layer=args.layer)
    except ReportError as err:
        parser.error(str(err))
    return _save(fig, out)


def _save(fig: Any, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format=out.suffix[1:].lower())
    import matplotlib.pyplot as plt

    plt.close(fig)
    print(f"report: wrote {out}")
    return out
