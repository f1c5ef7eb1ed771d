"""Every figure the application draws, and the only module that imports matplotlib.

The commands prepare their data as :class:`Panel` s of :class:`Line` s (the words on the axes come with
them); the functions here decide how they look and write the PNG: a ``Figure`` on the Agg canvas (the
pyplot state is never touched), the colour cycle with the reference attention drawn black, log axes,
legends, saving. matplotlib is imported inside the functions, so importing this module costs nothing
and a command's ``--help`` never waits for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

BOUNDS = {"acc": (0.0, 1.0), "accuracy": (0.0, 1.0)}  # metric name -> the range its bands are clipped to
MARKERS = "osD^vP*Xh<>"


def bounds(metric: str) -> tuple[float, float]:
    """The range a metric's values can take: [0, 1] for an accuracy (``val/acc``), else unbounded."""
    return BOUNDS.get(metric.rsplit("/", 1)[-1], (-math.inf, math.inf))


@dataclass
class Line:
    """One series: ``ys`` against ``xs``, optionally a shaded band [lo, hi] or error bars ``yerr``.

    ``index`` picks its colour (and marker) in the cycle; a ``reference`` line is drawn black and thicker.
    """

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    index: int = 0
    lo: Sequence[float] | None = None
    hi: Sequence[float] | None = None
    yerr: Sequence[float] | None = None
    linestyle: str = "-"
    reference: bool = False


@dataclass
class Panel:
    """One axes: its lines, the words on it, its y scale, and what else it shows."""

    lines: list[Line] = field(default_factory=list)
    title: str = ""
    xlabel: str = ""
    ylabel: str = ""
    yscale: str = "linear"
    ylim: tuple[float, float] | None = None
    ticks: tuple[list[float], list[str]] | None = None  # x ticks at these values with these labels
    legend: bool = True
    guides: list[Line] = field(default_factory=list)  # theory lines, grey and dotted
    hlines: list[tuple[float, str]] = field(default_factory=list)  # (y, label or "") grey and dotted
    note: str = ""  # written across an empty panel


# ----------------------------------------------------------------------------- shared pieces
def cycle(index: int) -> str:
    """The ``index``-th colour of matplotlib's ten-colour cycle (repeating past ten)."""
    return f"C{index % 10}"


def colour(line: Line) -> str:
    """Black for the reference, else the line's place in the colour cycle."""
    return "black" if line.reference else cycle(line.index)


def width(line: Line, base: float) -> float:
    """The line width: ``base``, one point more for the reference."""
    return base + 1.0 if line.reference else base


def figure(panels: int, size: tuple[float, float], *, ncols: int | None = None, constrained: bool = False,
           sharey: bool = False) -> tuple[Any, list[Any]]:
    """A Figure on the Agg canvas with ``panels`` axes in rows of ``ncols`` (all in one row by default);
    axes past ``panels`` are hidden."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = ncols or panels
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=size, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(nrows, ncols, squeeze=False, sharey=sharey).ravel())
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def label_axes(ax: Any, panel: Panel, *, title_size: str | int | None = None) -> None:
    """Title, axis labels, y scale, y range and x ticks of ``panel``."""
    if panel.title:
        ax.set_title(panel.title, **({"fontsize": title_size} if title_size else {}))
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.set_yscale(panel.yscale)
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    if panel.ticks is not None:
        x_ticks(ax, panel.ticks)


def log_x(ax: Any, base: int = 10, *, powers: bool = False) -> None:
    """A log x axis; with ``powers``, major ticks at powers of ``base`` written as such (2¹⁰, not 10³)."""
    ax.set_xscale("log", base=base)
    if powers:
        from matplotlib.ticker import LogFormatterSciNotation, LogLocator, NullLocator

        ax.xaxis.set_major_locator(LogLocator(base=base))
        ax.xaxis.set_major_formatter(LogFormatterSciNotation(base=base))
        ax.xaxis.set_minor_locator(NullLocator())


def x_ticks(ax: Any, ticks: tuple[list[float], list[str]], *, small: bool = False) -> None:
    """Major x ticks at given values with given labels, no minor ticks."""
    from matplotlib.ticker import NullLocator

    ax.set_xticks(ticks[0], ticks[1], fontsize="small" if small else None)
    ax.xaxis.set_minor_locator(NullLocator())


def band(ax: Any, line: Line, alpha: float = 0.2) -> None:
    """The shaded [lo, hi] of a line, in its colour."""
    if line.lo is not None and line.hi is not None and len(line.xs):
        ax.fill_between(line.xs, line.lo, line.hi, color=colour(line), alpha=alpha, linewidth=0)


def guides(ax: Any, panel: Panel) -> None:
    """A panel's theory lines and horizontal levels, grey and dotted."""
    style = {"color": "gray", "ls": ":", "lw": 1}
    for line in panel.guides:
        ax.plot(line.xs, line.ys, label=line.label, **style)
    for y, label in panel.hlines:
        ax.axhline(y, label=label or None, **style)


def marker_if_few(xs: Sequence[float], marker: str = "o", few: int = 30) -> str | None:
    """A marker on each point of a short series; a long one reads better as a bare line."""
    return marker if len(xs) < few else None


def legend_outside(fig: Any, axes: list[Any], title: str | None = None) -> None:
    """One legend right of the axes: every labelled line of every panel, each label once."""
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, title=title, loc="outside right upper", fontsize="small")


def save(fig: Any, path: Path, dpi: int = 120, *, tight: bool = False) -> Path:
    """Write the figure to ``path`` (its parent made if missing; the suffix names the format) and return it."""
    if tight:
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


# ----------------------------------------------------------------------------- the figures
def table_rows(panels: list[Panel], out: Path, series: list[str], series_title: str, *, logx: bool = False) -> Path:
    """``efficient-attn-report --plot``: per panel a line with markers per series, its mean ± CI band and
    error bars (a lone point's CI shows), in up to three columns sharing y; one legend for all panels."""
    from matplotlib.lines import Line2D

    ncols = min(len(panels), 3)
    fig, axes = figure(len(panels), (4.6 * ncols + 1.6, 3.4 * math.ceil(len(panels) / ncols)), ncols=ncols,
                       constrained=True, sharey=True)
    index = {label: i for i, label in enumerate(series)}
    for i, (ax, panel) in enumerate(zip(axes, panels)):
        for line in (replace(line, index=index[line.label]) for line in panel.lines):
            ax.plot(line.xs, line.ys, color=colour(line), marker=MARKERS[line.index % len(MARKERS)], markersize=4,
                    linewidth=1.2)
            band(ax, line)
            ax.errorbar(line.xs, line.ys, yerr=[[m - a for m, a in zip(line.ys, line.lo or line.ys)],
                                                [b - m for m, b in zip(line.ys, line.hi or line.ys)]],
                        fmt="none", ecolor=colour(line), elinewidth=0.8, capsize=2, alpha=0.7)
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        if logx:
            log_x(ax)
        ax.grid(alpha=0.3)
        if panel.ticks is not None:
            x_ticks(ax, panel.ticks, small=any("\n" in label for label in panel.ticks[1]))  # two-line labels
        elif logx:  # e.g. state sizes: powers of two read better than 2×10³ 3×10³ ...
            log_x(ax, 2, powers=True)
        ax.set_xlabel(panel.xlabel)
        if i % ncols == 0:
            ax.set_ylabel(panel.ylabel)
        if panel.title:
            ax.set_title(panel.title, fontsize="medium")
    handles = [Line2D([], [], color=cycle(i), marker=MARKERS[i % len(MARKERS)], label=s) for s, i in index.items()]
    fig.legend(handles=handles, title=series_title, loc="outside right upper", fontsize="small")
    return save(fig, out, dpi=150)


def seed_bands(panels: list[Panel], out: Path) -> Path:
    """``efficient-attn-report --curves``: per panel (a metric) each row's mean line and its ± std band
    against steps; one legend for all panels."""
    fig, axes = figure(len(panels), (5.2 * len(panels) + 2.4, 3.6), constrained=True)
    for ax, panel in zip(axes, panels):
        for line in panel.lines:
            ax.plot(line.xs, line.ys, color=colour(line), linewidth=1.4, label=line.label,
                    marker=marker_if_few(line.xs), markersize=3)
            band(ax, line)
        label_axes(ax, panel)
        ax.grid(alpha=0.3)
    legend_outside(fig, axes)
    return save(fig, out, dpi=150)


def run_curves(panels: list[Panel], out: Path, title: str = "") -> Path:
    """A run's ``curves.png``: a panel per recorded key against steps, a note on a panel with no values."""
    fig, axes = figure(len(panels), (13, 3.4), constrained=True)
    for ax, panel in zip(axes, panels):
        for line in panel.lines:
            ax.plot(line.xs, line.ys, color=colour(line), marker=marker_if_few(line.xs), markersize=3, linewidth=1.2)
        if panel.note:
            ax.text(0.5, 0.5, panel.note, ha="center", va="center", transform=ax.transAxes)
        label_axes(ax, panel, title_size="medium")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save(fig, out, dpi=120)


def against_length(panels: list[Panel], out: Path, title: str) -> Path:
    """The benchmarks (``efficient-attn-bench``): each panel against L on a log₂ axis, a line with dots per
    attention (the reference black and thicker), a legend in the panels that ask for one."""
    fig, axes = figure(len(panels), (6.3 * len(panels) + 0.4, 5))
    for ax, panel in zip(axes, panels):
        for line in panel.lines:
            ax.plot(line.xs, line.ys, line.linestyle, marker="o", ms=3, color=colour(line),
                    lw=width(line, 1.5), label=line.label)
        log_x(ax, 2)
        label_axes(ax, panel)
        ax.grid(True, which="both", alpha=0.3)
        if panel.legend and panel.lines:
            ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    return save(fig, out, tight=True)


def error_bands(panels: list[Panel], out: Path, *, x_base: int | None) -> Path:
    """``efficient-attn-approx``: log mean error per estimator with its ±1 std band, a panel per error
    (log x with base ``x_base``, linear for None); an estimator without a finite point only in the legend."""
    fig, axes = figure(len(panels), (7 * len(panels), 4.5))
    for ax, panel in zip(axes, panels):
        for line in panel.lines:
            ax.plot(line.xs, line.ys, marker="o" if line.xs else None, ms=3, color=colour(line), label=line.label)
            band(ax, line)
        if x_base:
            log_x(ax, x_base)
        label_axes(ax, panel, title_size=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, out, tight=True)


def error_bars(panels: list[Panel], out: Path, title: str) -> Path:
    """The √d_k study: a panel per statistic against d_k on a log₂ axis, mean ± std error bars per
    line, grey dotted theory lines."""
    fig, axes = figure(len(panels), (4 * len(panels), 3.8))
    for ax, panel in zip(axes, panels):
        for line in panel.lines:
            ax.errorbar(line.xs, line.ys, yerr=line.yerr, marker="o", ms=3, capsize=2, color=colour(line),
                        ls=line.linestyle, label=line.label)
        guides(ax, panel)
        log_x(ax, 2)
        label_axes(ax, panel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save(fig, out, tight=True)


@dataclass
class HeatMap:
    """One heat map: ``values`` (rows × columns, ±inf and NaN allowed) coloured on a diverging scale
    centred at 0 and clipped to ±``limit``, ``text`` written in each cell."""

    values: Sequence[Sequence[float]]
    text: Sequence[Sequence[str]]
    xticks: Sequence[str]
    yticks: Sequence[str]
    title: str = ""
    xlabel: str = ""
    ylabel: str = ""
    limit: float = 2.0


def heat_maps(maps: list[HeatMap], out: Path, title: str, colorbar: str, ncols: int = 4) -> Path:
    """``efficient-attn-approx``: a grid of heat maps sharing one colour bar (blue below 0, red above; a
    cell that is not finite is grey, its text says why)."""
    import numpy as np

    ncols = min(ncols, len(maps))
    nrows = math.ceil(len(maps) / ncols)
    fig, axes = figure(len(maps), (3.6 * ncols + 1.2, 3.0 * nrows + 0.6), ncols=ncols, constrained=True)
    image = None
    for ax, hm in zip(axes, maps):
        values = np.array(hm.values, dtype=float)
        shown = np.ma.masked_invalid(np.clip(values, -hm.limit, hm.limit))
        cmap = _grey_bad("RdBu_r")
        image = ax.imshow(shown, cmap=cmap, vmin=-hm.limit, vmax=hm.limit, aspect="auto", origin="lower")
        for (i, j), text in np.ndenumerate(np.array(hm.text, dtype=object)):
            dark = abs(float(values[i, j])) > 0.6 * hm.limit if np.isfinite(values[i, j]) else False
            ax.text(j, i, text, ha="center", va="center", fontsize=6.5, color="white" if dark else "black")
        ax.set_xticks(range(len(hm.xticks)), hm.xticks, fontsize="small")
        ax.set_yticks(range(len(hm.yticks)), hm.yticks, fontsize="small")
        ax.set_title(hm.title, fontsize=9)
        ax.set_xlabel(hm.xlabel, fontsize="small")
        ax.set_ylabel(hm.ylabel, fontsize="small")
    if image is not None:
        fig.colorbar(image, ax=axes, label=colorbar, shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return save(fig, out)


def _grey_bad(name: str) -> Any:
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="lightgrey")
