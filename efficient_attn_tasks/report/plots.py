"""Line plots of ``efficient-attn-report`` table rows: the mean with a shaded 95% CI band.

``efficient-attn-report --plot OUT.png --x KEY`` imports this module only then (matplotlib is slow to
import). Input: the rows of ``<out>_stats.csv`` as dicts (each ``--rows`` key as a column, then
``<metric>_mean`` and ``<metric>_ci``). One panel per value of the ``panel`` keys, one line (with markers)
per value of the ``series`` keys, x sorted numerically. ``x`` is a rows key (e.g. ``config.task.seq_len``;
ticks at its values) or a metric (e.g. ``test/state_size``: its per-row mean, as in the Zoology/Based
"accuracy vs recurrent state size" plots). Drawn with the Agg canvas; the pyplot state is never touched.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatterSciNotation, LogLocator, NullLocator

MARKERS = "osD^vP*Xh<>"
Point = dict[str, Any]  # one row of <out>_stats.csv


def plot(points: list[Point], out: Path, *, x: str, y: str, series: list[str] | None = None,
         panel: list[str] | None = None, logx: bool = False, xlabel_key: str | None = None) -> Path:
    """Write the figure to ``out`` (PNG, or whatever its suffix names) and return it."""
    series = ["attention"] if series is None else series
    panel = panel or []
    if not points:
        raise SystemExit("--plot: no table rows to plot")
    x_col = x_column(points[0], x)
    if f"{y}_mean" not in points[0]:
        raise SystemExit(f"--plot: no column {y}_mean")
    if x_col == x:  # a rows key: one point per (panel, series, x)
        _check_unique(points, [*panel, *series, x])
    panels = _split(points, panel)
    styles = {s: (f"C{i % 10}", MARKERS[i % len(MARKERS)])
              for i, s in enumerate(sorted({_values(pt, series) for pt in points}, key=_order_all))}
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.6 * ncols + 1.6, 3.4 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    for i, (ax, (value, pts)) in enumerate(zip(axes, panels.items())):
        draw(ax, pts, x_col, y, series, styles, logx)
        if x_col == x:
            _ticks(ax, pts, x, xlabel_key)
        elif logx:  # a metric, e.g. state sizes: powers of two read better than 2×10³ 3×10³ ...
            ax.xaxis.set_major_locator(LogLocator(base=2))
            ax.xaxis.set_major_formatter(LogFormatterSciNotation(base=2))
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(x)
        if i % ncols == 0:
            ax.set_ylabel(f"{y} (mean ± 95% CI)")
        if panel:
            ax.set_title(", ".join(f"{k}={v}" for k, v in zip(panel, value)), fontsize="medium")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=c, marker=m, label=" / ".join(map(str, s))) for s, (c, m) in styles.items()]
    fig.legend(handles=handles, title=" / ".join(series), loc="outside right upper", fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    return out


BOUNDS = {"acc": (0.0, 1.0), "accuracy": (0.0, 1.0)}  # metric name -> range its CI band is clipped to


def x_column(point: Point, x: str) -> str:
    """``x`` itself for a rows key, ``<x>_mean`` for a metric."""
    for column in (x, f"{x}_mean"):
        if column in point:
            return column
    raise SystemExit(f"--plot: --x {x!r} is neither a --rows key nor a metric of the table")


def draw(ax: Any, points: list[Point], x_col: str, y: str, series: list[str],
         styles: dict[tuple[Any, ...], tuple[str, str]], logx: bool) -> None:
    """One line with markers per series value, x ascending, and its mean ± CI band."""
    lines: dict[tuple[Any, ...], list[tuple[float, float, float]]] = defaultdict(list)
    for pt in points:
        xv, mean, ci = pt[x_col], pt.get(f"{y}_mean"), pt.get(f"{y}_ci") or 0.0
        if not _number(xv):
            raise SystemExit(f"--plot: x values must be numbers; got {xv!r} in {x_col}")
        if _number(mean) and math.isfinite(xv) and (xv > 0 or not logx):
            lines[_values(pt, series)].append((float(xv), float(mean), float(ci)))
    low, high = BOUNDS.get(y.rsplit("/", 1)[-1], (-math.inf, math.inf))  # an accuracy's CI stops at 0 and 1
    for s, line in sorted(lines.items(), key=lambda item: _order_all(item[0])):
        line.sort()
        xs, means, cis = zip(*line)
        lo = [max(low, m - h) for m, h in zip(means, cis)]
        hi = [min(high, m + h) for m, h in zip(means, cis)]
        color, marker = styles[s]
        ax.plot(xs, means, color=color, marker=marker, markersize=4, linewidth=1.2)
        ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
        ax.errorbar(xs, means, yerr=[[m - a for m, a in zip(means, lo)], [b - m for m, b in zip(means, hi)]],
                    fmt="none", ecolor=color, elinewidth=0.8, capsize=2, alpha=0.7)  # shows a lone point's CI
    if math.isfinite(low) and math.isfinite(high):
        ax.set_ylim(low - 0.03 * (high - low), high + 0.03 * (high - low))
    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)


def _ticks(ax: Any, points: list[Point], x: str, xlabel_key: str | None) -> None:
    """Ticks at the rows key's values, each with the ``xlabel_key`` values of its rows beneath: "64\\n(kv 4)"."""
    at: dict[float, set[str]] = defaultdict(set)
    for pt in points:
        if _number(pt[x]):
            at[float(pt[x])].add(_fmt(pt[xlabel_key]) if xlabel_key else "")
    ticks = sorted(v for v in at if v > 0 or ax.get_xscale() != "log")
    name = xlabel_key.rsplit(".", 1)[-1] if xlabel_key else ""
    labels = [_fmt(t) + (f"\n({name} {', '.join(sorted(at[t], key=_order))})" if xlabel_key else "") for t in ticks]
    ax.set_xticks(ticks, labels, fontsize="small" if xlabel_key else None)
    ax.xaxis.set_minor_locator(NullLocator())


def _split(points: list[Point], keys: list[str]) -> dict[tuple[Any, ...], list[Point]]:
    """Points by their ``keys`` values, sorted (numbers numerically)."""
    groups: dict[tuple[Any, ...], list[Point]] = defaultdict(list)
    for pt in points:
        groups[_values(pt, keys)].append(pt)
    return dict(sorted(groups.items(), key=lambda item: _order_all(item[0])))


def _check_unique(points: list[Point], keys: list[str]) -> None:
    seen: set[tuple[Any, ...]] = set()
    for pt in points:
        value = _values(pt, keys)
        if value in seen:
            raise SystemExit(f"--plot: several table rows have {dict(zip(keys, value))}; give the --rows key that "
                             "tells them apart as --panel or --series (or leave it out of --rows)")
        seen.add(value)


def _values(point: Point, keys: list[str]) -> tuple[Any, ...]:
    return tuple(point.get(k) for k in keys)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _order(value: Any) -> tuple[int, float, str]:
    """Sort key: numbers numerically, before anything else, which sorts as text."""
    if _number(value) and not math.isnan(value):
        return (0, value, "")
    try:
        return (0, float(value), "")  # a number kept as text
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def _order_all(values: tuple[Any, ...]) -> list[tuple[int, float, str]]:
    return [_order(v) for v in values]


def _fmt(value: Any) -> str:
    """64.0 -> "64", 0.001 -> "0.001"."""
    if _number(value):
        return str(int(value)) if float(value).is_integer() else f"{value:g}"
    return str(value)
