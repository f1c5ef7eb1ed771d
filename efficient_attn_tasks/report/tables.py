"""The tables of ``efficient-attn-report``: run records (``results.json``, never W&B files) as rows of cells over seeds.

Owns the table itself: its rows built (rows.py groups the runs, tune.py makes the ``--tune`` choice per row), its
header and display cells (cells.py: bounded intervals, per-seed values, success rates, still-improving runs), Δ
against a baseline row (Welch's t-test) or a seed-matched attention (compare.py: paired t-test, exact McNemar, Holm
over the table), the footnotes, the attention × task pivot, the Markdown and CSV files (stats_csv.py: the
``_stats.csv``) and the W&B table. Failed and unfinished runs are listed under a table, never averaged. The options
are in efficient_attn_tasks/commands/report.py.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

from efficient_attn_tasks.commands.cli import UsageError, wrote
from efficient_attn_tasks.report.cells import (
    Options,
    cell,
    parse_bounds,
    parse_success,
    still_improving,
    success_cells,
    table_bounds,
)
from efficient_attn_tasks.report.compare import SIGNIFICANT, Test, compared, comparisons
from efficient_attn_tasks.report.rows import Row, columns, group, numeric_column
from efficient_attn_tasks.report.runs import (
    column_name,
    field,
    fill_defaults,
    find_runs,
    metrics,
    not_run_labels,
    parse_defaults,
    unknown_field,
)
from efficient_attn_tasks.report.stats import BOOTSTRAP_RESAMPLES, as_number, mean_std, per_seed, success_ci, welch
from efficient_attn_tasks.report.stats_csv import stats_table, write_stats
from efficient_attn_tasks.report.tune import at_ceiling, at_edge, tune

# the --pivot task columns
HEADLINE = {"translation": "test/bleu", "listops": "test/acc", "lm": "test/bpc", "mqar": "test/acc"}
LOWER_IS_BETTER = {"lm"}  # left out of the Avg column: an average of accuracy and bits/byte means nothing


def build(records: list[dict[str, Any]], keys: list[str], keep: list[str] | None = None,
          tune_key: str | None = None, failed: list[dict[str, Any]] | None = None) -> tuple[list[Row], list[str]]:
    """The table rows (grouped by ``keys``, then narrowed by ``tune``, which also reads the ``failed`` runs) and
    their metric column names."""
    rows = []
    failed_by = group(failed, keys) if failed and tune_key is not None else {}
    for label, runs in group(records, keys).items():
        tuned, tried, edge, ceiling = None, 0, False, False
        if tune_key is not None:
            searched = runs
            runs, tuned, tried, score = tune(runs, tune_key, label, failed_by.get(label))
            edge = at_edge(searched + failed_by.get(label, []), tune_key, tuned)
            ceiling = at_ceiling(searched, score)
        rows.append(Row(label, {k: field(runs[0], k) for k in keys}, runs, [metrics(r) for r in runs], tuned, tried,
                        edge, ceiling))
    return rows, columns({row.label: row.flat for row in rows}, keep)


def short(key: str) -> str:
    """``config.optim.lr`` -> ``optim.lr`` for headers."""
    return key.removeprefix("config.")


def table(records: list[dict[str, Any]], missing: list[Path], rows: list[str] | None = None,
          baseline: str | None = None, keep: list[str] | None = None, *, tune_key: str | None = None,
          ci: bool = False, paired: str | None = None,
          failed: list[dict[str, Any]] | None = None) -> tuple[list[str], list[list[str]]]:
    """One row per group: n, every metric as mean ± std, and Δ / p against ``baseline`` if given.

    ``keep``: only these metric columns, in this order (resources stay); unknown names are an error.
    ``tune_key``, ``ci``, ``paired``: as ``--tune``, ``--ci``, ``--paired`` (see ``render``).
    """
    keys = rows or ["name", "task", "attention"]
    built, names = build(records, keys, keep, tune_key, failed)
    return render(built, names, missing, keys, baseline=baseline, tune_key=tune_key, ci=ci, paired=paired,
                  failed=failed)


def render(rows: list[Row], names: list[str], missing: list[Path], keys: list[str], *,
           baseline: str | None = None, tune_key: str | None = None, ci: bool = False,
           paired: str | None = None, failed: list[dict[str, Any]] | None = None,
           options: Options | None = None, footer: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and display rows: label, n, [best <tune key> ("(edge)" at either end of the values tried, "(edge, at
    ceiling)" when its validation score there is the monitor's best possible), tried],
    metric cells, [per-seed values], [success rates], [still improving], [Δ columns], then failed and missing
    runs. ``footer``, if given, gets the lines that say which tests were run and corrected."""
    opts = options or Options()
    ci = ci or opts.ci
    deltas = compared(rows, names)
    by_label = {row.label: row for row in rows}
    bounds = table_bounds(rows, names, opts.bounds)
    unknown = [s.metric for s in opts.successes if s.metric not in bounds]
    if unknown:
        raise SystemExit(f"--success: unknown or non-numeric metric(s) {unknown}; metrics: {list(bounds)}")
    improving = [[still_improving(r) for r in row.runs] for row in rows]
    show_improving = any(v is not None for values in improving for v in values)
    header = [" / ".join(keys), "n"]
    if tune_key is not None:
        header += [f"best {short(tune_key)}", f"{short(tune_key)} tried"]
    header += names
    header += [f"{k} by seed" for k in deltas] if opts.per_seed else []
    for s in opts.successes:
        header += [f"{s.label} (95% CI)", f"{s.metric} if {s.label}"]
    header += ["still improving"] if show_improving else []
    if baseline is not None:
        if baseline not in by_label:
            raise SystemExit(f"--baseline {baseline!r} is not a row; rows: {list(by_label)}")
        header += [f"Δ {k} (p)" for k in deltas]
    tests = comparisons(rows, names, paired, opts.successes, ci)
    if paired is not None:
        header += [f"Δ {k} vs {paired} (paired p)" for k in deltas]
        header += [f"{s.label} vs {paired} (McNemar p)" for s in opts.successes]
        header += [f"{k} Holm p" for k in [*deltas, *(s.label for s in opts.successes)]]
    body = []
    for row, runs_improving in zip(rows, improving):
        line = [row.label, str(len(row.runs))]
        if tune_key is not None:
            line += [f"{row.tuned}" + edge_mark(row), str(row.tried)]
        line += [cell(k, [r.get(k) for r in row.flat], ci, bounds.get(k)) for k in names]
        if opts.per_seed:
            line += [per_seed([(run["seed"], r.get(k)) for run, r in zip(row.runs, row.flat)]) for k in deltas]
        for s in opts.successes:
            k, n, hits = success_cells(row, s)
            if n:
                lo, hi = success_ci(k, n)
                line += [f"{k}/{n} [{lo:.3g}, {hi:.3g}]", mean_std(hits) if hits else "n/a"]
            else:
                line += ["n/a", "n/a"]
        if show_improving:
            known = [v for v in runs_improving if v is not None]
            text = f"{sum(known)}/{len(known)}" if known else "n/a"
            line += [text + (f" ({len(runs_improving) - len(known)} n/a)" if known and None in runs_improving else "")]
        if baseline is not None:
            base = by_label[baseline].flat
            line += [_delta([r.get(k) for r in row.flat], [r.get(k) for r in base]) for k in deltas]
        if paired is not None:
            row_tests = [tests[row.label, k] for k in [*deltas, *(s.label for s in opts.successes)]]
            line += [t.text + (" *" if t.adjusted is not None and t.adjusted < SIGNIFICANT else "") for t in row_tests]
            line += [f"{t.adjusted:.3g}" if t.adjusted is not None else "" for t in row_tests]
        body.append(line)
    body += [[label, "0", *["n/a"] * (len(header) - 2)] for label in not_run_labels(missing, failed)]
    if footer is not None:
        footer += _footer(rows, tests, bounds, opts, ci, tune_key is not None, show_improving, paired)
    return header, body


def edge_mark(row: Row) -> str:
    """The tuned value's mark: "" inside the grid, " (edge)", or " (edge, at ceiling)"."""
    if not row.edge:
        return ""
    return " (edge, at ceiling)" if row.ceiling else " (edge)"


def _footer(rows: list[Row], tests: dict[tuple[str, str], Test], bounds: dict[str, tuple[float, float] | None],
            opts: Options, ci: bool, tuned: bool, show_improving: bool, paired: str | None) -> list[str]:
    """The lines under the table that say what the new cells mean and which tests were corrected."""
    lines = []
    ranged = [k for k, b in bounds.items() if b is not None]
    if ci and ranged:
        lines.append(f"Bounded metrics ({', '.join(f'{k} in [{bounds[k][0]:g}, {bounds[k][1]:g}]' for k in ranged)}): "
                     "mean [lo, hi], a 95% bootstrap percentile interval of the mean (scipy.stats.bootstrap, "
                     f"{BOOTSTRAP_RESAMPLES} resamples, seeded); it stays inside the seeds' range, so with few "
                     "seeds it is narrow: read it with the per-seed values.")
    if opts.per_seed:
        lines.append("by seed: each run's value, runs sorted by seed, joined by /.")
    if opts.successes:
        lines.append("Successes: runs meeting the threshold / runs, [exact Clopper–Pearson 95% interval]; "
                     "\"if\": mean ± std over the successful runs only.")
    if tuned and any(row.edge and not row.ceiling for row in rows):
        lines.append("(edge): the chosen value is the smallest or largest tried; a better one may lie outside "
                     "the grid.")
    if tuned and any(row.edge and row.ceiling for row in rows):
        lines.append("(edge, at ceiling): the chosen value is the smallest or largest tried, but its mean validation "
                     "score is the monitor's best possible (1 for an accuracy), so no value outside the grid can "
                     "beat it.")
    if show_improving:
        lines.append("still improving: runs whose early stopping did not fire (converged false) or, without that "
                     "field, whose best validation checkpoint was their last step / runs that say either.")
    if paired is not None:
        kinds: dict[str, int] = defaultdict(int)
        for (_, name), t in tests.items():
            if t.p is not None:
                kinds["exact McNemar" if isinstance(t.value, tuple) else "paired t"] += 1
        counted = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        lines.append(f"Holm correction over all {sum(kinds.values())} tests of the table ({counted or 'none'}); "
                     f"* Holm-adjusted p < {SIGNIFICANT}. McNemar cells: seeds where only this row / only {paired} "
                     "succeeds, of the seeds in both (p).")
    return lines


def _delta(values: list[float | None], base: list[float | None]) -> str:
    a, b = [v for v in values if v is not None], [v for v in base if v is not None]
    if not a or not b:
        return "n/a"
    return f"{statistics.mean(a) - statistics.mean(b):+.4g} ({welch(a, b)})"


def pivot(records: list[dict[str, Any]], missing: list[Path], rows: list[str], avg: bool,
          failed: list[dict[str, Any]] | None = None) -> tuple[list[str], list[list[str]]]:
    """Rows × tasks: each task's headline test metric (mean ± std, n); Avg of the row's task means
    over the higher-is-better tasks (accuracy, BLEU), as LRA averages accuracies."""
    tasks = sorted({r["task"] for r in records})
    averaged = [t for t in tasks if t not in LOWER_IS_BETTER]
    avg_header = "Avg" if averaged == tasks else f"Avg ({', '.join(averaged)})"
    header = [" / ".join(rows), *(f"{t} {HEADLINE.get(t, '?')}" for t in tasks)] + ([avg_header] if avg else [])
    body = []
    for label, runs in group(records, rows).items():
        cells, means = [], []
        for t in tasks:
            values = [r["metrics"]["test"].get(HEADLINE.get(t, "")) for r in runs if r["task"] == t]
            values = [v for v in values if v is not None]
            cells.append(f"{mean_std(values)} (n={len(values)})" if values else "missing")
            if t in averaged:
                means.append(statistics.mean(values) if values else None)
        if avg:
            cells.append(as_number(statistics.mean(means)) if None not in means else "n/a")
        body.append([label, *cells])
    body += [[label, *["n/a"] * (len(header) - 1)] for label in not_run_labels(missing, failed)]
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body]) + "\n"


def log_to_wandb(project: str, header: list[str], body: list[list[str]], config: dict[str, Any]) -> None:
    """Log the table as ``report/table`` in a new W&B run (job_type "report"), always finished."""
    import wandb

    try:
        run = _start_wandb(project, config)
        run.log({"report/table": wandb.Table(columns=header, data=body)})
    finally:
        wandb.finish()


def _start_wandb(project: str, config: dict[str, Any]) -> Any:
    """A W&B run in ``wandb_mode(None)``; an online start that fails falls back to offline, as training does."""
    import wandb

    from efficient_attn_tasks.run.loggers import wandb_mode

    mode = wandb_mode(None)
    try:
        return wandb.init(project=project, job_type="report", mode=mode, config=config)
    except Exception as err:  # noqa: BLE001 - any failure to reach W&B: bad key, no network, timeout
        if mode != "online":
            raise
        warnings.warn(f"W&B online start failed ({type(err).__name__}: {err}); logging offline instead")
        return wandb.init(project=project, job_type="report", mode="offline", config=config)


def run(args: argparse.Namespace) -> None:
    """The table of the runs under ``args.dirs`` (``efficient-attn-report``'s options), printed; then the files
    and logs its options ask for (--out, --plot, --curves, --wandb)."""
    rows = args.rows.split(",")
    records, missing, failed = find_runs(args.dirs)
    if not records and not missing and not failed:
        raise UsageError(f"no run dirs (with .hydra/) under {[str(d) for d in args.dirs]}")
    fill_defaults(records + failed, parse_defaults(getattr(args, "default", None)))
    for option, key in [("--rows", k) for k in rows] + ([("--tune", args.tune)] if args.tune else []):
        why = unknown_field(records + failed, key)  # a misspelt key would put every run in one "None" row
        if why is not None:
            raise UsageError(f"{option} {key}: {why}")
    keep = [column_name(k) for k in _keys(args.metrics)] or None
    built: list[Row] | None = None
    names: list[str] = []
    footer: list[str] = []
    if args.pivot:
        header, body = pivot(records, missing, rows, args.avg, failed)
    else:
        built, names = build(records, rows, keep, args.tune, failed)
        header, body = render(built, names, missing, rows, baseline=args.baseline, tune_key=args.tune, ci=args.ci,
                              paired=args.paired, failed=failed, options=options(args), footer=footer)
    text = markdown(header, body) + notes(args, footer)
    print(text)
    if args.out:
        write(header, body, text, args.out)
        if built is not None:
            write_stats(*stats_table(built, names, rows, args.tune, args.paired, options(args)), args.out)
    if args.plot and built is not None:
        plot_rows(args, rows, built, names, records)
    if args.curves is not None:
        from efficient_attn_tasks.report.curve_bands import write_curves

        write_curves(args, built)
    if args.wandb:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "wandb"}
        log_to_wandb(args.wandb, header, body, {**config, "dirs": [str(d) for d in args.dirs]})


def _keys(text: str | None) -> list[str]:
    return [k.strip() for k in text.split(",")] if text else []


def options(args: argparse.Namespace) -> Options:
    """The statistics options (--ci, --per-seed, --success, --bounds) of ``efficient-attn-report``."""
    return Options(ci=args.ci, per_seed=getattr(args, "per_seed", False),
                   successes=[parse_success(t) for t in getattr(args, "success", None) or []],
                   bounds=parse_bounds(getattr(args, "bounds", None)))


def notes(args: argparse.Namespace, footer: list[str] | None = None) -> str:
    """Footnotes under the Markdown table saying what the --ci, --tune and --paired cells mean, then ``footer``
    (``render``'s lines on bounded intervals, successes, edges and the corrected tests)."""
    lines = []
    if args.ci:
        lines.append("Cells: mean ± 95% confidence half-width of the mean over seeds (t-distribution; bounded metrics: "
                     "see below); n = seeds.")
    if args.tune:
        lines.append(f"Per row, the {short(args.tune)} with the best mean over seeds of the monitored validation "
                     "metric (val_best); every metric is from its runs only.")
    if args.paired:
        lines.append(f"Δ vs {args.paired}: mean over seeds present in both rows of the per-seed difference"
                     + (" [its 95% t-interval, raw]" if args.ci else "") + "; p: two-sided paired t-test (raw).")
    lines += footer or []
    return "\n" + "\n".join(lines) + "\n" if lines else ""


def plot_rows(args: argparse.Namespace, rows: list[str], built: list[Row], names: list[str],
              records: list[dict[str, Any]]) -> None:
    """``--plot``: the table rows' means and 95% CI bands (efficient_attn_tasks/report/lines.py, imported only here)."""
    from efficient_attn_tasks.report.lines import plot

    tasks = {r.get("task") for r in records}
    y = column_name(args.y) if args.y else (HEADLINE.get(tasks.pop()) if len(tasks) == 1 else None)
    numeric = [k for k in names if numeric_column({row.label: row.flat for row in built}, k)]
    if y is None:
        raise SystemExit(f"--plot: give --y (the runs are not of one task with a headline metric); metrics: {numeric}")
    if y not in numeric:
        raise SystemExit(f"--plot: --y {y!r} is not a numeric metric column; metrics: {numeric}")
    if args.x not in rows and args.x not in numeric:
        raise SystemExit(f"--plot: --x {args.x!r} is neither a --rows key ({rows}) nor a metric ({numeric})")
    header, body = stats_table(built, names, rows, args.tune)
    plot([dict(zip(header, line)) for line in body], args.plot, x=args.x, y=y, series=_keys(args.series),
         panel=_keys(args.panel), logx=args.logx, xlabel_key=args.xlabel_key)
    wrote(args.plot)


def write(header: list[str], body: list[list[str]], text: str, out: Path) -> None:
    """<out>.md (the Markdown text) and <out>.csv."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        csv.writer(f).writerows([header, *body])
    wrote(out.with_suffix(".md"), out.with_suffix(".csv"))
