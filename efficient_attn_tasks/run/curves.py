"""One run's learning curves: ``curves.csv`` (what :class:`efficient_attn_tasks.run.callbacks.CurveLog` recorded) and
``curves.png`` (train loss, the task's validation metric and the learning rate against optimizer steps).

``run()`` writes both into the run dir at its end, whatever the logger: W&B runs (offline without an
account) write no ``metrics.csv``, and Lightning's CSV logger deletes its ``metrics.csv`` when a run
resumes into the same dir, so the curves come from the app's own record. ``efficient-attn-report --curves``
(efficient_attn_tasks/report/curve_bands.py) reads the same file. Drawn by efficient_attn_tasks/plots.py.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable

from efficient_attn_tasks.plots import Line, Panel, run_curves

CURVES_CSV = "curves.csv"
CURVES_PNG = "curves.png"
Series = tuple[list[int], list[float]]  # (steps, values)


def write_curves(rows: Iterable[tuple[int, str, float]], out_dir: Path) -> Path:
    """``<out_dir>/curves.csv``: one line per step, a column per key (``step``, ``train/loss``,
    ``train/lr``, then the ``val/`` metrics), empty where a key has no value at that step."""
    by_step: dict[int, dict[str, float]] = {}
    for step, key, value in rows:
        by_step.setdefault(int(step), {})[key] = value
    keys = sorted({k for values in by_step.values() for k in values}, key=_column_order)
    path = out_dir / CURVES_CSV
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *keys])
        for step in sorted(by_step):
            writer.writerow([step, *(_cell(by_step[step].get(k)) for k in keys)])
    return path


def read_curves(path: Path) -> dict[str, Series]:
    """Each column of a ``curves.csv`` as (steps, values), its empty cells left out."""
    series: dict[str, Series] = {}
    with open(path, newline="") as f:
        for line in csv.DictReader(f):
            step = int(line.pop("step"))
            for key, cell in line.items():
                if cell not in ("", None):
                    steps, values = series.setdefault(key, ([], []))
                    steps.append(step)
                    values.append(float(cell))
    return series


def plot_run(series: dict[str, Series], monitor: str, out: Path, title: str = "") -> dict[str, Series]:
    """Draw ``out`` (PNG): three panels against steps, train/loss, ``monitor`` (the task's validation
    metric) and train/lr; a key without values leaves its panel empty with a note. Returns what it drew."""
    drawn = {key: series.get(key, ([], [])) for key in ("train/loss", monitor, "train/lr")}
    run_curves([Panel([Line(key, steps, values, index=i)] if steps else [], title=key, xlabel="step",
                      note="" if steps else f"no {key} recorded")
                for i, (key, (steps, values)) in enumerate(drawn.items())], out, title)
    return drawn


def _column_order(key: str) -> tuple[int, str]:
    return ({"train/loss": 0, "train/lr": 1}.get(key, 2 if key.startswith("train/") else 3), key)


def _cell(value: Any) -> str:
    return "" if value is None else repr(float(value))  # round-trips exactly; nan and inf as such
