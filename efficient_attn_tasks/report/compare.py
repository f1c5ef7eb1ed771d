"""The comparisons of ``efficient-attn-report``'s grouped table: which metrics get a Δ column, and ``--paired``:
each row against a seed-matched baseline row (paired t-test per metric, exact McNemar per ``--success``),
with Holm's correction over every test of the table."""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

from efficient_attn_tasks.report.cells import Success, is_state_size
from efficient_attn_tasks.report.rows import Row, numeric_column, sort_key
from efficient_attn_tasks.report.stats import ci_halfwidth, finite_values, holm, mcnemar_p, paired_p

SIGNIFICANT = 0.05  # --paired appends " *" to a Holm-adjusted p below this


def compared(rows: list[Row], names: list[str]) -> list[str]:
    """The Δ columns: numeric val/ (last) and test/ metrics, except state sizes (nothing varies by seed there)
    and the monitor's best validation value (a model-selection score, not compared)."""
    flat = {row.label: row.flat for row in rows}
    return [k for k in names if k.startswith(("test/", "val/")) and not k.endswith(" (best)")
            and numeric_column(flat, k) and not is_state_size(k)]


@dataclasses.dataclass
class Test:
    """One paired comparison of a row with its ``--paired`` baseline row: a t-test on a metric or an exact
    McNemar test on a ``--success`` outcome; ``p`` None where there is no test (the baseline, n < 2)."""

    value: Any  # the mean difference (t-test), or (row-only, baseline-only) successes (McNemar)
    p: float | None
    text: str  # the cell without its significance mark
    interval: tuple[float, float] | None = None  # t-test: 95% t-interval of the mean difference (n ≥ 2)
    adjusted: float | None = None  # Holm over every test of the table


def comparisons(rows: list[Row], names: list[str], paired: str | None,
                successes: list[Success], ci: bool = False) -> dict[tuple[str, str], Test]:
    """Every paired test of the table, by (row label, metric or success label), with Holm-adjusted p over all
    of them (one family: each metric t-test and each McNemar test of every row); ``ci``: each t-test's cell
    gives the 95% interval of the mean difference."""
    if paired is None:
        return {}
    partners = partner_rows(rows, paired)
    tests: dict[tuple[str, str], Test] = {}
    for row in rows:
        for k in compared(rows, names):
            tests[row.label, k] = paired_test(row, partners[row.label], k, ci)
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
    seeds = sorted(a.keys() & b.keys(), key=sort_key)
    if not seeds:
        return Test(None, None, "n/a")
    row_only = sum(bool(success.met(a[s])) and not success.met(b[s]) for s in seeds)
    base_only = sum(bool(success.met(b[s])) and not success.met(a[s]) for s in seeds)
    p = mcnemar_p(row_only, base_only)
    return Test((row_only, base_only), p, f"{row_only}/{base_only} of {len(seeds)} ({p:.3g})")


def paired_spec(paired: str) -> dict[str, str]:
    """``--paired``'s baseline as {--rows key: value}: an attention name, or ``KEY=VALUE[,KEY=VALUE...]``."""
    if "=" not in paired:
        return {"attention": paired}
    parts = [part.split("=", 1) for part in paired.split(",")]
    spec = dict(part for part in parts if len(part) == 2 and all(part))
    if len(spec) != len(parts):
        raise SystemExit(f"--paired {paired!r}: expected ATTENTION or KEY=VALUE[,KEY=VALUE...] with --rows keys")
    return spec


def partner_rows(rows: list[Row], paired: str) -> dict[str, Row | None]:
    """Each row's ``--paired`` baseline: the row whose keys named in ``paired`` have the values given there
    (compared as printed, e.g. ``None``) and whose other keys are this row's."""
    spec = paired_spec(paired)

    def others(row: Row) -> tuple[str, ...]:
        return tuple(str(v) for k, v in row.keys.items() if k not in spec)

    def is_base(row: Row) -> bool:
        return all(str(row.keys.get(k)) == v for k, v in spec.items())

    bases = {others(row): row for row in rows if is_base(row)}
    if not bases:
        seen = {k: sorted({str(row.keys.get(k)) for row in rows}) for k in spec}
        raise SystemExit(f"--paired {paired!r}: no row has those values; values of those keys: {seen}")
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


def paired_test(row: Row, base: Row | None, key: str, ci: bool = False) -> Test:
    """The paired t-test of one metric: the mean over matched seeds of row − base, its p, and with n ≥ 2 the
    95% t-interval of that mean difference (raw, like p; Holm adjusts only p).

    Cell text: "+Δ (p)", with ``ci`` "+Δ [lo, hi] (p)" (``render`` marks it by its Holm-adjusted p); "+Δ (n<2)"
    with one matched seed; "—" on the baseline row itself; "n/a" without matched seeds; "no baseline" when the
    grid lacks that row.
    """
    if base is None:
        return Test(None, None, "no baseline")
    if base is row:
        return Test(None, None, "—")
    a, b = by_seed(row, key), by_seed(base, key)
    seeds = sorted(a.keys() & b.keys(), key=sort_key)
    if not seeds:
        return Test(None, None, "n/a")
    diffs = [a[s] - b[s] for s in seeds]
    delta = statistics.mean(diffs)
    if len(seeds) < 2:
        return Test(delta, None, f"{delta:+.4g} (n<2)")
    p = paired_p([a[s] for s in seeds], [b[s] for s in seeds])
    half = ci_halfwidth(diffs)
    interval = (delta - half, delta + half)
    shown = f" [{interval[0]:+.4g}, {interval[1]:+.4g}]" if ci else ""
    return Test(delta, p, f"{delta:+.4g}{shown} ({p:.3g})", interval)
