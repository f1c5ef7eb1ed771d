"""``efficient-attn-report --curves``: a sweep's validation curves, the mean ± std band over seeds per table row.

Owns the bands: per step where any of a row's runs validated, the mean and sample std of the monitored metric
over those runs, read from each run dir's ``curves.csv`` (efficient_attn_tasks/run/curves.py); runs without one
are left out and counted. Writes the bands as CSV beside the PNG (drawn by efficient_attn_tasks/plots.py).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from efficient_attn_tasks import plots
from efficient_attn_tasks.commands.cli import wrote
from efficient_attn_tasks.plots import Line, Panel
from efficient_attn_tasks.run.curves import CURVES_CSV, Series, read_curves

if TYPE_CHECKING:
    from efficient_attn_tasks.report.rows import Row


@dataclass
class Band:
    """One row's curve: per step the mean and sample std (nan for n < 2) over the runs that validated there."""

    label: str
    metric: str
    steps: list[int]
    mean: list[float]
    std: list[float]
    n: list[int]


def band(label: str, metric: str, curves: list[Series]) -> Band:
    """The mean and std over ``curves`` (one (steps, values) per run) at every step any of them has."""
    at: dict[int, list[float]] = {}
    for steps, values in curves:
        for step, value in zip(steps, values):
            at.setdefault(step, []).append(value)
    steps = sorted(at)
    return Band(label, metric, steps, [statistics.fmean(at[s]) for s in steps],
                [statistics.stdev(at[s]) if len(at[s]) > 1 else math.nan for s in steps], [len(at[s]) for s in steps])


def row_bands(rows: list[Row]) -> tuple[list[Band], list[str]]:
    """(a band per table row with curves, the run dirs without ``curves.csv``)."""
    bands, left_out = [], []
    for row in rows:
        monitors = sorted({str(r["metrics"]["monitor"]) for r in row.runs})
        if len(monitors) != 1:
            raise SystemExit(f"--curves: the runs of row {row.label!r} monitor different metrics {monitors}; "
                             "split them with --rows (e.g. add task)")
        curves = []
        for run in row.runs:
            path = Path(run["_dir"]) / CURVES_CSV
            if not path.is_file():
                left_out.append(run["_dir"])
                continue
            curves.append(read_curves(path).get(monitors[0], ([], [])))
        if any(steps for steps, _ in curves):
            bands.append(band(row.label, monitors[0], curves))
    return bands, left_out


def plot_bands(bands: list[Band], out: Path) -> Path:
    """One panel per metric, a line per band with its ± std shading (accuracies clipped to [0, 1])."""
    index = {label: i for i, label in enumerate(dict.fromkeys(b.label for b in bands))}  # one colour per row
    panels = []
    for metric in sorted({b.metric for b in bands}):
        lines = []
        for b in (b for b in bands if b.metric == metric):
            lo, hi = edges(b, *plots.bounds(metric))
            lines.append(Line(f"{b.label} (n={max(b.n)})", b.steps, b.mean, index=index[b.label], lo=lo, hi=hi))
        panels.append(Panel(lines, xlabel="step", ylabel=f"{metric} (mean ± std over seeds)"))
    return plots.seed_bands(panels, out)


def edges(b: Band, low: float = -math.inf, high: float = math.inf) -> tuple[list[float], list[float]]:
    """The shaded band, mean ∓ std clipped to [low, high]; nan (no band) where fewer than two runs validated."""
    lo = [math.nan if math.isnan(s) else max(low, m - s) for m, s in zip(b.mean, b.std)]
    hi = [math.nan if math.isnan(s) else min(high, m + s) for m, s in zip(b.mean, b.std)]
    return lo, hi


def write_band_csv(bands: list[Band], out: Path) -> Path:
    """The plotted numbers: row, metric, step, mean, std (empty for n < 2), n."""
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "metric", "step", "mean", "std", "n"])
        for b in bands:
            for row in zip(b.steps, b.mean, b.std, b.n):
                step, mean, std, n = row
                writer.writerow([b.label, b.metric, step, repr(mean), "" if math.isnan(std) else repr(std), n])
    return out


def curves_path(curves: str, out: Path | None) -> Path:
    """``--curves OUT.png`` as given; a bare ``--curves`` writes ``<out>_curves.png`` beside the tables."""
    if curves:
        if Path(curves).is_dir():
            raise SystemExit(f"--curves took {curves} as its file, but it is a directory; put --curves after the run "
                             "dirs or give it a file (--curves OUT.png)")
        return Path(curves)
    if out is None:
        raise SystemExit("--curves: give a file (--curves OUT.png) or --out (the plot goes beside the tables, "
                         "<out>_curves.png)")
    stem = out.with_suffix("")
    return stem.with_name(f"{stem.name}_curves.png")


def write_curves(args: argparse.Namespace, rows: list[Row] | None) -> list[Band]:
    """``--curves``: the plot and its numbers (``<plot>.csv``), each said in a ``wrote`` line; returns the bands."""
    if rows is None:
        raise SystemExit("--curves works on the grouped table, not --pivot")
    path = curves_path(args.curves, args.out)
    bands, left_out = row_bands(rows)
    if left_out:
        print(f"--curves: {len(left_out)} run(s) without {CURVES_CSV} left out, e.g. {left_out[0]}", file=sys.stderr)
    if not bands:
        raise SystemExit(f"--curves: no run has a {CURVES_CSV} with its validation metric")
    wrote(plot_bands(bands, path), write_band_csv(bands, path.with_suffix(".csv")))
    return bands

