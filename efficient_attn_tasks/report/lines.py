"""``efficient-attn-report --plot``: the table rows as lines, the mean with its 95% CI band.

Turns the rows of ``<out>_stats.csv`` into panels (one per value of the ``panel`` keys) of lines (one per value
of the ``series`` keys), x sorted numerically; ``x`` is a rows key or a metric's per-row mean (as in the
Zoology/Based "accuracy vs recurrent state size" plots). :func:`efficient_attn_tasks.plots.table_rows` draws them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from efficient_attn_tasks import plots
from efficient_attn_tasks.plots import Line, Panel

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
    low, high = plots.bounds(y)  # an accuracy's CI stops at 0 and 1
    bounded = math.isfinite(low) and math.isfinite(high)
    ylim = (low - 0.03 * (high - low), high + 0.03 * (high - low)) if bounded else None
    panels = [Panel(lines(pts, x_col, y, series, logx, (low, high)), xlabel=x, ylabel=f"{y} (mean ± 95% CI)",
                    title=", ".join(f"{k}={v}" for k, v in zip(panel, value)), ylim=ylim,
                    ticks=ticks(pts, x, xlabel_key, logx) if x_col == x else None)
              for value, pts in _split(points, panel).items()]
    order = sorted({_values(pt, series) for pt in points}, key=_order_all)
    return plots.table_rows(panels, out, [_label(s) for s in order], " / ".join(series), logx=logx)


def x_column(point: Point, x: str) -> str:
    """``x`` itself for a rows key, ``<x>_mean`` for a metric."""
    for column in (x, f"{x}_mean"):
        if column in point:
            return column
    raise SystemExit(f"--plot: --x {x!r} is neither a --rows key nor a metric of the table")


def lines(points: list[Point], x_col: str, y: str, series: list[str], logx: bool,
          clip: tuple[float, float]) -> list[Line]:
    """One line per series value, x ascending, with its mean ± CI band clipped to ``clip``; points
    without a mean, and x ≤ 0 on a log axis, left out."""
    by_series: dict[tuple[Any, ...], list[tuple[float, float, float]]] = defaultdict(list)
    for pt in points:
        xv, mean, ci = pt[x_col], pt.get(f"{y}_mean"), pt.get(f"{y}_ci") or 0.0
        if not _number(xv):
            raise SystemExit(f"--plot: x values must be numbers; got {xv!r} in {x_col}")
        if _number(mean) and math.isfinite(xv) and (xv > 0 or not logx):
            by_series[_values(pt, series)].append((float(xv), float(mean), float(ci)))
    low, high = clip
    drawn = []
    for s, line in sorted(by_series.items(), key=lambda item: _order_all(item[0])):
        line.sort()
        xs, means, cis = zip(*line)
        drawn.append(Line(_label(s), xs, means, lo=[max(low, m - h) for m, h in zip(means, cis)],
                          hi=[min(high, m + h) for m, h in zip(means, cis)]))
    return drawn


def ticks(points: list[Point], x: str, xlabel_key: str | None, logx: bool) -> tuple[list[float], list[str]]:
    """Ticks at the rows key's values, each with the ``xlabel_key`` values of its rows beneath: "64\\n(kv 4)"."""
    at: dict[float, set[str]] = defaultdict(set)
    for pt in points:
        if _number(pt[x]):
            at[float(pt[x])].add(_fmt(pt[xlabel_key]) if xlabel_key else "")
    values = sorted(v for v in at if v > 0 or not logx)
    name = xlabel_key.rsplit(".", 1)[-1] if xlabel_key else ""
    labels = [_fmt(t) + (f"\n({name} {', '.join(sorted(at[t], key=_order))})" if xlabel_key else "") for t in values]
    return values, labels


def _label(values: tuple[Any, ...]) -> str:
    return " / ".join(map(str, values))


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
