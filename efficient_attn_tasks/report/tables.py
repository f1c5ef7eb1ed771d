"""The tables of ``efficient-attn-report``: run records (``results.json``, never W&B files) as rows of cells over seeds.

Owns the grouping of runs into rows, the ``--tune`` choice per row (on validation metrics only, "(edge)" at either
end of the grid), the metric columns (bounded intervals, per-seed values, success rates, still-improving runs), Δ
against a baseline row (Welch's t-test) or a seed-matched attention (paired t-test, exact McNemar, Holm over the
table), the attention × task pivot, the ``_stats.csv`` and the W&B table. Failed and unfinished runs are listed
under a table, never averaged. The options are in efficient_attn_tasks/commands/report.py.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import re
import statistics
import warnings
from collections import defaultdict
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from efficient_attn_tasks.commands.cli import UsageError, wrote
from efficient_attn_tasks.report.runs import RESOURCES, column_name, field, find_runs, metrics, not_run_labels
from efficient_attn_tasks.report.stats import (
    ACCURACY_LIKE,
    BOOTSTRAP_RESAMPLES,
    as_number,
    bounded_interval,
    ci_halfwidth,
    finite_values,
    holm,
    is_number,
    mcnemar_p,
    mean_ci,
    mean_interval,
    mean_std,
    paired_p,
    per_seed,
    success_ci,
    welch,
)

# the --pivot task columns
HEADLINE = {"translation": "test/bleu", "listops": "test/acc", "lm": "test/bpc", "mqar": "test/acc"}
LOWER_IS_BETTER = {"lm"}  # left out of the Avg column: an average of accuracy and bits/byte means nothing
LOSS_LIKE = ("loss", "ppl", "bpc")  # --tune minimises a monitor whose name holds one of these
SIGNIFICANT = 0.05  # --paired appends " *" to a Holm-adjusted p below this


@dataclasses.dataclass(frozen=True)
class Success:
    """``--success METRIC>=THRESHOLD`` (or ``<=``): a run succeeds when its metric meets the threshold."""

    metric: str
    op: str  # ">=" or "<="
    threshold: float

    @property
    def label(self) -> str:
        return f"{self.metric}{self.op}{as_number(self.threshold)}"

    def met(self, value: Any) -> bool | None:
        """Whether ``value`` meets the threshold; None for a missing or non-finite value."""
        if not finite_values([value]):
            return None
        return value >= self.threshold if self.op == ">=" else value <= self.threshold


def parse_success(text: str) -> Success:
    """``test/acc>=0.9`` -> Success("test/acc", ">=", 0.9)."""
    for op in (">=", "<="):
        metric, found, threshold = text.partition(op)
        if found:
            try:
                return Success(column_name(metric.strip()), op, float(threshold))
            except ValueError:
                break
    raise SystemExit(f"--success {text!r}: expected METRIC>=THRESHOLD or METRIC<=THRESHOLD, e.g. test/acc>=0.9")


def parse_bounds(items: list[str] | None) -> dict[str, tuple[float, float]]:
    """``["test/bleu=0,100"]`` -> {"test/bleu": (0.0, 100.0)}."""
    bounds = {}
    for text in items or []:
        metric, _, rest = text.rpartition("=")
        try:
            lo, hi = (float(x) for x in rest.split(","))
        except ValueError:
            raise SystemExit(f"--bounds {text!r}: expected METRIC=LO,HI, e.g. test/bleu=0,100") from None
        if not metric or not lo < hi:
            raise SystemExit(f"--bounds {text!r}: expected METRIC=LO,HI with LO < HI")
        bounds[column_name(metric.strip())] = (lo, hi)
    return bounds


def metric_bounds(name: str, values: list[Any], given: dict[str, tuple[float, float]]) -> tuple[float, float] | None:
    """The range of metric ``name``: ``--bounds``, else [0, 1] for an accuracy-like name (acc, accuracy) whose
    values all lie in [0, 1] (accuracies in percent are left unbounded); None: unbounded."""
    finite = finite_values(values)
    if name in given:
        lo, hi = given[name]
        if any(not lo <= v <= hi for v in finite):
            raise SystemExit(f"--bounds {name}={lo:g},{hi:g}: some values lie outside: {sorted(finite)}")
        return given[name]
    words = re.findall(r"[A-Za-z]+", name)
    if any(w.lower() in ACCURACY_LIKE for w in words) and all(0.0 <= v <= 1.0 for v in finite):
        return (0.0, 1.0)
    return None


def still_improving(run: dict[str, Any]) -> bool | None:
    """Whether a run was still improving when it stopped: ``converged`` False, or (no ``converged``) its best
    checkpoint at its last step (``best_step`` == ``steps``); None when the record says neither."""
    converged = run.get("converged")
    if isinstance(converged, bool):
        return not converged
    best, steps = run.get("best_step"), run.get("steps")
    if is_number(best) and is_number(steps):
        return best >= steps
    return None


@dataclasses.dataclass
class Options:
    """The statistics options of the grouped table (see efficient_attn_tasks/commands/report.py)."""

    ci: bool = False
    per_seed: bool = False
    successes: list[Success] = dataclasses.field(default_factory=list)
    bounds: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Row:
    """One table row: its ``--rows`` key values and the runs (seeds) it summarises, after ``--tune``."""

    label: str
    keys: dict[str, Any]
    runs: list[dict[str, Any]]
    flat: list[dict[str, Any]]  # metrics(run) for each run
    tuned: Any = None  # the --tune value chosen
    tried: int = 0  # how many --tune values the row's runs had
    edge: bool = False  # the chosen --tune value is the smallest or largest tried (the best may lie outside)


def group(records: list[dict[str, Any]], keys: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Runs by their ``keys`` values, labelled "v1 / v2", sorted by the values (numbers numerically)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[_label(r, keys)].append(r)
    return dict(sorted(groups.items(), key=lambda item: [_order(field(item[1][0], k)) for k in keys]))


def _label(record: dict[str, Any], keys: list[str]) -> str:
    return " / ".join(str(field(record, k)) for k in keys)


def _order(value: Any) -> tuple[int, float, str]:
    """Sort key: numbers numerically, before anything else, which sorts as text."""
    if is_number(value) and not math.isnan(value):
        return (0, value, "")
    return (1, 0.0, str(value))




def _hashable(value: Any) -> Any:
    return value if isinstance(value, Hashable) else json.dumps(value, sort_keys=True)


def tune(runs: list[dict[str, Any]], key: str, label: str = "",
         failed: list[dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], Any, int]:
    """(the runs of the chosen ``key`` value, that value, how many values the runs tried).

    The chosen value has the best mean of ``metrics.val_best`` over the seeds that every value was run with
    (all its runs when no seed is common): the largest, or the smallest when the monitor is loss-like (see
    ``minimises``); ties go to the smaller value. So a value given more seeds after a search (a confirm stage)
    is compared on the search seeds, as the others are. A ``failed`` run (diverged, say) counts as run with its
    seed and scores the worst possible, so its value is never chosen over one whose runs all finished. Test
    metrics are never looked at, so they stay an unbiased estimate for the chosen value.
    """
    worst = math.inf if minimises(runs) else -math.inf
    by_value: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        by_value[_hashable(field(r, key))].append(r)
    score_of: dict[Any, dict[Any, float]] = defaultdict(dict)  # value -> seed -> val_best
    for r in failed or []:
        score_of[_hashable(field(r, key))][r.get("seed")] = worst
    for v, rs in by_value.items():
        for r in rs:
            if finite_values([r["metrics"]["val_best"]]):
                score_of[v][r.get("seed")] = r["metrics"]["val_best"]
    seeds = [set(score_of[v]) for v in by_value if score_of[v]]
    common = set.intersection(*seeds) if seeds else set()
    scores = {v: [x for seed, x in score_of[v].items() if not common or seed in common] for v in by_value}
    candidates = sorted((v for v, s in scores.items() if s), key=_order)  # ascending: min/max keep the first tie
    if not candidates:
        raise SystemExit(f"--tune {key}: no run of row {label!r} has a finite metrics.val_best")
    pick = min if minimises(runs) else max
    best = pick(candidates, key=lambda v: statistics.mean(scores[v]))
    return by_value[best], best, len(by_value)


def at_edge(runs: list[dict[str, Any]], key: str, chosen: Any) -> bool:
    """Whether ``chosen`` is the smallest or the largest of the ``key`` values the runs tried (two or more)."""
    tried = sorted({_hashable(field(r, key)) for r in runs}, key=_order)
    return len(tried) >= 2 and chosen in (tried[0], tried[-1])


def minimises(runs: list[dict[str, Any]]) -> bool:
    """Whether the runs' (single) monitor is better lower: its name holds loss, ppl or bpc."""
    monitors = sorted({str(r["metrics"]["monitor"]) for r in runs})
    if len(monitors) != 1:
        raise SystemExit(f"--tune: the runs of one row monitor different metrics {monitors}")
    return any(word in monitors[0].lower() for word in LOSS_LIKE)


def is_state_size(name: str) -> bool:
    """``test/state_size`` (or ``val/state_size (last)``): a property of the model, not of the seed."""
    return name.split(" ")[0].rsplit("/", 1)[-1] == "state_size"


def cell(name: str, values: list[float | None], ci: bool = False, bounds: tuple[float, float] | None = None) -> str:
    """A metric cell: mean ± std, or with ``ci`` mean ± 95% CI half-width (t), or for a metric with ``bounds``
    "mean [lo, hi]" (a bootstrap percentile interval inside the bounds); a state size that is the same for
    every seed as an integer (no "± 0")."""
    if is_state_size(name):
        finite = finite_values(values)
        if finite and all(v == finite[0] for v in finite):
            return f"{round(finite[0]):,}"
    if ci and bounds is not None:
        return mean_interval(values, bounds)
    return mean_ci(values) if ci else mean_std(values)


def build(records: list[dict[str, Any]], keys: list[str], keep: list[str] | None = None,
          tune_key: str | None = None, failed: list[dict[str, Any]] | None = None) -> tuple[list[Row], list[str]]:
    """The table rows (grouped by ``keys``, then narrowed by ``tune``, which also reads the ``failed`` runs) and
    their metric column names."""
    rows = []
    failed_by = group(failed, keys) if failed and tune_key is not None else {}
    for label, runs in group(records, keys).items():
        tuned, tried, edge = None, 0, False
        if tune_key is not None:
            edge_of = runs
            runs, tuned, tried = tune(runs, tune_key, label, failed_by.get(label))
            edge = at_edge(edge_of, tune_key, tuned)
        rows.append(Row(label, {k: field(runs[0], k) for k in keys}, runs, [metrics(r) for r in runs], tuned, tried,
                        edge))
    return rows, columns({row.label: row.flat for row in rows}, keep)


def compared(rows: list[Row], names: list[str]) -> list[str]:
    """The Δ columns: numeric val/ (last) and test/ metrics, except state sizes (nothing varies by seed there)
    and the monitor's best validation value (a model-selection score, not compared)."""
    flat = {row.label: row.flat for row in rows}
    return [k for k in names if k.startswith(("test/", "val/")) and not k.endswith(" (best)") and _numeric(flat, k)
            and not is_state_size(k)]


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


def table_bounds(rows: list[Row], names: list[str], given: dict[str, tuple[float, float]]
                 ) -> dict[str, tuple[float, float] | None]:
    """Each numeric metric column's range (``metric_bounds`` over every row's values)."""
    flat = {row.label: row.flat for row in rows}
    return {k: metric_bounds(k, [r.get(k) for row in rows for r in row.flat], given)
            for k in names if _numeric(flat, k)}


def success_cells(row: Row, success: Success) -> tuple[int, int, list[float]]:
    """(successes, runs with a finite value, the values of the successful runs) of one row."""
    values = finite_values([r.get(success.metric) for r in row.flat])
    hits = [v for v in values if success.met(v)]
    return len(hits), len(values), hits


@dataclasses.dataclass
class Test:
    """One paired comparison of a row with its ``--paired`` baseline row: a t-test on a metric or an exact
    McNemar test on a ``--success`` outcome; ``p`` None where there is no test (the baseline, n < 2)."""

    value: Any  # the mean difference (t-test), or (row-only, baseline-only) successes (McNemar)
    p: float | None
    text: str  # the cell without its significance mark
    adjusted: float | None = None  # Holm over every test of the table


def comparisons(rows: list[Row], names: list[str], paired: str | None,
                successes: list[Success]) -> dict[tuple[str, str], Test]:
    """Every paired test of the table, by (row label, metric or success label), with Holm-adjusted p over all
    of them (one family: each metric t-test and each McNemar test of every row)."""
    if paired is None:
        return {}
    partners = partner_rows(rows, paired)
    tests: dict[tuple[str, str], Test] = {}
    for row in rows:
        for k in compared(rows, names):
            tests[row.label, k] = Test(*paired_test(row, partners[row.label], k))
        for s in successes:
            tests[row.label, s.label] = mcnemar_test(row, partners[row.label], s)
    family = [t for t in tests.values() if t.p is not None]
    for t, adjusted in zip(family, holm([t.p for t in family])):
        t.adjusted = adjusted
    return tests


def mcnemar_test(row: Row, base: Row | None, success: Success) -> Test:
    """Exact McNemar test of the row's per-seed successes against its baseline's (seeds in both rows)."""
    if base is None:
        return Test(None, None, "no baseline")
    if base is row:
        return Test(None, None, "—")
    a, b = by_seed(row, success.metric), by_seed(base, success.metric)
    seeds = sorted(a.keys() & b.keys(), key=_order)
    if not seeds:
        return Test(None, None, "n/a")
    row_only = sum(bool(success.met(a[s])) and not success.met(b[s]) for s in seeds)
    base_only = sum(bool(success.met(b[s])) and not success.met(a[s]) for s in seeds)
    p = mcnemar_p(row_only, base_only)
    return Test((row_only, base_only), p, f"{row_only}/{base_only} of {len(seeds)} ({p:.3g})")


def render(rows: list[Row], names: list[str], missing: list[Path], keys: list[str], *,
           baseline: str | None = None, tune_key: str | None = None, ci: bool = False,
           paired: str | None = None, failed: list[dict[str, Any]] | None = None,
           options: Options | None = None, footer: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and display rows: label, n, [best <tune key> ("(edge)" at either end of the values tried), tried],
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
    tests = comparisons(rows, names, paired, opts.successes)
    if paired is not None:
        header += [f"Δ {k} vs {paired} (paired p)" for k in deltas]
        header += [f"{s.label} vs {paired} (McNemar p)" for s in opts.successes]
        header += [f"{k} Holm p" for k in [*deltas, *(s.label for s in opts.successes)]]
    body = []
    for row, runs_improving in zip(rows, improving):
        line = [row.label, str(len(row.runs))]
        if tune_key is not None:
            line += [f"{row.tuned}" + (" (edge)" if row.edge else ""), str(row.tried)]
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
    if tuned and any(row.edge for row in rows):
        lines.append("(edge): the chosen value is the smallest or largest tried; a better one may lie outside "
                     "the grid.")
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


def partner_rows(rows: list[Row], attention: str) -> dict[str, Row | None]:
    """Each row's ``--paired`` baseline: the row with the same other key values whose attention is ``attention``."""
    def others(row: Row) -> tuple[str, ...]:
        return tuple(str(v) for k, v in row.keys.items() if k != "attention")

    bases = {others(row): row for row in rows if str(row.keys.get("attention")) == attention}
    if not bases:
        raise SystemExit(f"--paired {attention!r}: no row has that attention; "
                         f"attentions: {sorted({str(row.keys.get('attention')) for row in rows})}")
    return {row.label: bases.get(others(row)) for row in rows}


def by_seed(row: Row, key: str) -> dict[Any, float]:
    """The row's finite ``key`` values by seed; two runs of one row with one seed cannot be paired."""
    values: dict[Any, float] = {}
    seen = set()
    for run, flat in zip(row.runs, row.flat):
        seed = run["seed"]
        if seed in seen:
            raise SystemExit(f"--paired: row {row.label!r} has several runs with seed {seed}; add the key that "
                             "tells them apart to --rows, or keep one per seed with --tune")
        seen.add(seed)
        if finite_values([flat.get(key)]):
            values[seed] = float(flat[key])
    return values


def paired_test(row: Row, base: Row | None, key: str) -> tuple[float | None, float | None, str]:
    """(mean over matched seeds of row − base, paired t-test p, the cell text) for one metric.

    Cell text: "+Δ (p)" (``render`` marks it by its Holm-adjusted p); "+Δ (n<2)" with one matched seed; "—" on
    the baseline row itself; "n/a" without matched seeds; "no baseline" when the grid lacks that row.
    """
    if base is None:
        return None, None, "no baseline"
    if base is row:
        return None, None, "—"
    a, b = by_seed(row, key), by_seed(base, key)
    seeds = sorted(a.keys() & b.keys(), key=_order)
    if not seeds:
        return None, None, "n/a"
    delta = statistics.mean(a[s] - b[s] for s in seeds)
    if len(seeds) < 2:
        return delta, None, f"{delta:+.4g} (n<2)"
    p = paired_p([a[s] for s in seeds], [b[s] for s in seeds])
    return delta, p, f"{delta:+.4g} ({p:.3g})"


def stats_table(rows: list[Row], names: list[str], keys: list[str], tune_key: str | None = None,
                paired: str | None = None, options: Options | None = None) -> tuple[list[str], list[list[Any]]]:
    """Numbers for plots (``<out>_stats.csv``): per row its key values, n, [tuned value, tried]; per numeric metric
    ``_mean``, ``_ci`` (t 95% half-width, 0 for n=1), ``_lo``, ``_hi`` (the table's interval: bootstrap inside the
    bounds for a bounded metric, else mean ∓ t half-width) and ``_values`` (per seed); the seeds, [edge]; per
    ``--success`` ``_k``, ``_n``, ``_lo``, ``_hi``, ``_mean_if``; ``still_improving``; then with ``paired`` the
    McNemar ``_p`` and every test's ``_p_holm``, and last ``_delta`` and ``_p`` per compared metric."""
    opts = options or Options()
    flat = {row.label: row.flat for row in rows}
    numeric = [k for k in names if _numeric(flat, k)]
    bounds = table_bounds(rows, names, opts.bounds)
    deltas = compared(rows, names) if paired is not None else []
    successes = [s for s in opts.successes if s.metric in numeric]
    header = [*keys, "n", *([tune_key, f"{tune_key} tried"] if tune_key is not None else [])]
    header += [f"{k}_{s}" for k in numeric for s in ("mean", "ci", "lo", "hi", "values")]
    header += ["seeds", *([f"{tune_key} edge"] if tune_key is not None else [])]
    header += [f"{s.label}_{x}" for s in successes for x in ("k", "n", "lo", "hi", "mean_if")]
    header += ["still_improving"]
    if paired is not None:
        header += [f"{s.label}_mcnemar_p" for s in successes]
        header += [f"{k}_p_holm" for k in [*deltas, *(s.label for s in successes)]]
    header += [f"{k}_{s}" for k in deltas for s in ("delta", "p")]
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
        line += [row.edge] if tune_key is not None else []
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
            line += [tests[row.label, k].value, tests[row.label, k].p]
        body.append(line)
    return header, body


def columns(flat: dict[str, list[dict[str, Any]]], keep: list[str] | None = None) -> list[str]:
    """Column names in first-seen order; with ``keep``, only those metrics (in its order) and resources."""
    names = list(dict.fromkeys(k for runs in flat.values() for row in runs for k in row))
    if keep is None:
        return names
    known = [k for k in names if k not in RESOURCES]
    unknown = [k for k in keep if k not in known]
    if unknown:
        raise SystemExit(f"--metrics: unknown metric(s) {unknown}; known: {known}")
    return [*dict.fromkeys(keep), *(k for k in names if k in RESOURCES)]


def _numeric(flat: dict[str, list[dict[str, Any]]], key: str) -> bool:
    values = [row.get(key) for runs in flat.values() for row in runs]
    return all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values)


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
        lines.append(f"Δ vs {args.paired}: mean over seeds present in both rows of the per-seed difference; p: "
                     "two-sided paired t-test (raw).")
    lines += footer or []
    return "\n" + "\n".join(lines) + "\n" if lines else ""


def plot_rows(args: argparse.Namespace, rows: list[str], built: list[Row], names: list[str],
              records: list[dict[str, Any]]) -> None:
    """``--plot``: the table rows' means and 95% CI bands (efficient_attn_tasks/report/lines.py, imported only here)."""
    from efficient_attn_tasks.report.lines import plot

    tasks = {r.get("task") for r in records}
    y = column_name(args.y) if args.y else (HEADLINE.get(tasks.pop()) if len(tasks) == 1 else None)
    numeric = [k for k in names if _numeric({row.label: row.flat for row in built}, k)]
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
