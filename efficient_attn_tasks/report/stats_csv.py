"""``<out>_stats.csv`` of ``efficient-attn-report``: the numbers behind the grouped table (means, intervals,
per-seed values, success counts, tests), one row per table row, for plots and further analysis."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

from efficient_attn_tasks.commands.cli import wrote
from efficient_attn_tasks.report.cells import Options, still_improving, success_cells, table_bounds
from efficient_attn_tasks.report.compare import compared, comparisons
from efficient_attn_tasks.report.rows import Row, numeric_column
from efficient_attn_tasks.report.stats import bounded_interval, ci_halfwidth, finite_values, per_seed, success_ci


def stats_table(rows: list[Row], names: list[str], keys: list[str], tune_key: str | None = None,
                paired: str | None = None, options: Options | None = None) -> tuple[list[str], list[list[Any]]]:
    """Numbers for plots (``<out>_stats.csv``): per row its key values, n, [tuned value, tried]; per numeric metric
    ``_mean``, ``_ci`` (t 95% half-width, 0 for n=1), ``_lo``, ``_hi`` (the table's interval: bootstrap inside the
    bounds for a bounded metric, else mean ∓ t half-width) and ``_values`` (per seed); the seeds, [edge, at
    ceiling]; per ``--success`` ``_k``, ``_n``, ``_lo``, ``_hi``, ``_mean_if``; ``still_improving``; then with
    ``paired`` the McNemar ``_p`` and every test's ``_p_holm``, and last ``_delta``, ``_p`` and the 95%
    ``_delta_lo``, ``_delta_hi`` per compared metric."""
    opts = options or Options()
    flat = {row.label: row.flat for row in rows}
    numeric = [k for k in names if numeric_column(flat, k)]
    bounds = table_bounds(rows, names, opts.bounds)
    deltas = compared(rows, names) if paired is not None else []
    successes = [s for s in opts.successes if s.metric in numeric]
    header = [*keys, "n", *([tune_key, f"{tune_key} tried"] if tune_key is not None else [])]
    header += [f"{k}_{s}" for k in numeric for s in ("mean", "ci", "lo", "hi", "values")]
    header += ["seeds", *([f"{tune_key} edge", f"{tune_key} at ceiling"] if tune_key is not None else [])]
    header += [f"{s.label}_{x}" for s in successes for x in ("k", "n", "lo", "hi", "mean_if")]
    header += ["still_improving"]
    if paired is not None:
        header += [f"{s.label}_mcnemar_p" for s in successes]
        header += [f"{k}_p_holm" for k in [*deltas, *(s.label for s in successes)]]
    header += [f"{k}_{s}" for k in deltas for s in ("delta", "p", "delta_lo", "delta_hi")]
    tests = comparisons(rows, names, paired, successes)
    body = []
    for row in rows:
        line = [*(row.keys[k] for k in keys), len(row.runs)]
        line += [row.tuned, row.tried] if tune_key is not None else []
        for k in numeric:
            values = finite_values([r.get(k) for r in row.flat])
            if not values:
                line += [None] * 5
                continue
            mean, half = statistics.mean(values), ci_halfwidth(values)
            lo, hi = bounded_interval(values, bounds[k]) if bounds[k] is not None else (mean - half, mean + half)
            line += [mean, half, lo, hi, per_seed([(run["seed"], r.get(k)) for run, r in zip(row.runs, row.flat)])]
        line += [per_seed([(run["seed"], run["seed"]) for run in row.runs], lambda seed: str(seed))]
        line += [row.edge, row.ceiling] if tune_key is not None else []
        for s in successes:
            k, n, hits = success_cells(row, s)
            mean_if = statistics.mean(hits) if hits else None
            line += [k, n, *success_ci(k, n), mean_if] if n else [0, 0, None, None, None]
        known = [v for v in map(still_improving, row.runs) if v is not None]
        line += [sum(known) if known else None]
        if paired is not None:
            line += [tests[row.label, s.label].p for s in successes]
            line += [tests[row.label, k].adjusted for k in [*deltas, *(s.label for s in successes)]]
        for k in deltas:
            t = tests[row.label, k]
            line += [t.value, t.p, *(t.interval or (None, None))]
        body.append(line)
    return header, body


def stats_path(out: Path) -> Path:
    """<out>_stats.csv, beside <out>.md."""
    stem = out.with_suffix("")
    return stem.with_name(f"{stem.name}_stats.csv")


def write_stats(header: list[str], body: list[list[Any]], out: Path) -> None:
    """<out>_stats.csv: ``stats_table`` with empty cells for missing numbers."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(stats_path(out), "w", newline="") as f:
        csv.writer(f).writerows([header, *body])
    wrote(stats_path(out))
