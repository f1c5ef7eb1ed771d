"""The statistics behind ``efficient-attn-report``: cells as mean ± std or mean ± 95% CI over seeds, a bootstrap
interval that stays inside a bounded metric's range, per-seed values, success rates with exact (Clopper–Pearson)
intervals, Welch's t-test for independent groups, the paired t-test and the exact McNemar test for seed-matched
rows, and Holm's adjustment over a table's tests."""

from __future__ import annotations

import math
import statistics
from typing import Any

CI_LEVEL = 0.95  # --ci, <out>_stats.csv and the --plot bands


def mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return as_number(values[0])
    return f"{as_number(statistics.mean(values))} ± {as_number(statistics.stdev(values))}"


def as_number(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def welch(a: list[float], b: list[float]) -> str:
    """Two-sided Welch t-test p-value, or why there is none."""
    if len(a) < 2 or len(b) < 2:
        return "n<2"
    if statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0:
        return "1" if statistics.mean(a) == statistics.mean(b) else "0"
    from scipy import stats  # here, not at the top: the commands' --help must not wait for scipy

    return f"{stats.ttest_ind(a, b, equal_var=False).pvalue:.3g}"

def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite_values(values: list[Any]) -> list[float]:
    """The numbers among ``values`` that are neither None nor nan/inf."""
    return [float(v) for v in values if is_number(v) and math.isfinite(v)]


def ci_halfwidth(values: list[float]) -> float:
    """Half-width of the 95% confidence interval of the mean: t(0.975, n-1) · s / √n; 0 for n < 2."""
    n = len(values)
    if n < 2:
        return 0.0
    from scipy import stats

    return float(stats.t.ppf(0.5 + CI_LEVEL / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)


def mean_ci(values: list[float | None]) -> str:
    """The cell "mean ± 95% CI half-width" over the finite values; just the mean for one value."""
    finite = finite_values(values)
    if not finite:
        return "n/a"
    if len(finite) == 1:
        return as_number(finite[0])
    return f"{as_number(statistics.mean(finite))} ± {as_number(ci_halfwidth(finite))}"


def paired_p(a: list[float], b: list[float]) -> float:
    """Two-sided paired t-test p of a vs b (n ≥ 2); 1 when every difference is 0, 0 when they are all one
    non-zero number (the t statistic is undefined there and scipy says nan)."""
    diffs = [x - y for x, y in zip(a, b)]
    if all(d == diffs[0] for d in diffs):
        return 1.0 if diffs[0] == 0 else 0.0
    from scipy import stats

    return float(stats.ttest_rel(a, b).pvalue)


# ---------------------------------------------------------------- statistics that fit few, bounded seeds

ACCURACY_LIKE = ("acc", "accuracy")  # a metric whose last name part is one of these lies in [0, 1]
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # the bootstrap interval is the same on every call


def bounded_interval(values: list[float], bounds: tuple[float, float] | None = None) -> tuple[float, float]:
    """95% bootstrap percentile interval of the mean (scipy.stats.bootstrap, seeded), clipped to ``bounds``.

    A percentile interval of the mean lies inside [min, max] of the values, so never outside the metric's
    range; with a few seeds it is narrow (it cannot reach past the values seen). (v, v) for one value or
    equal values.
    """
    if not values:
        raise ValueError("no values")
    if len(values) == 1 or all(v == values[0] for v in values):
        lo = hi = float(values[0])
    else:
        import numpy as np
        from scipy import stats

        res = stats.bootstrap((np.asarray(values, dtype=float),), np.mean, confidence_level=CI_LEVEL,
                              n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                              rng=np.random.default_rng(BOOTSTRAP_SEED))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if bounds is not None:
        lo, hi = min(max(lo, bounds[0]), bounds[1]), min(max(hi, bounds[0]), bounds[1])
    return lo, hi


def mean_interval(values: list[float | None], bounds: tuple[float, float] | None) -> str:
    """The cell "mean [lo, hi]" with ``bounded_interval``; just the mean for one value."""
    finite = finite_values(values)
    if not finite:
        return "n/a"
    if len(finite) == 1:
        return as_number(finite[0])
    lo, hi = bounded_interval(finite, bounds)
    return f"{as_number(statistics.mean(finite))} [{as_number(lo)}, {as_number(hi)}]"


def per_seed(pairs: list[tuple[Any, Any]], show: Any = None) -> str:
    """The values of (seed, value) pairs in seed order (numbers numerically), joined by "/" (e.g. "0.99/0.13/0.98");
    "n/a" for a missing or non-finite value; ``show`` formats a value (default ``as_number``)."""
    def order(seed: Any) -> tuple[int, float, str]:
        return (0, seed, "") if is_number(seed) else (1, 0.0, str(seed))

    show = show or as_number
    return "/".join(show(v) if finite_values([v]) else "n/a" for _, v in sorted(pairs, key=lambda p: order(p[0])))


def success_ci(k: int, n: int) -> tuple[float, float]:
    """Exact (Clopper–Pearson) 95% interval of a success rate k/n (scipy.stats.binomtest)."""
    from scipy import stats

    ci = stats.binomtest(k, n).proportion_ci(confidence_level=CI_LEVEL, method="exact")
    return float(ci.low), float(ci.high)


def mcnemar_p(row_only: int, base_only: int) -> float:
    """Exact McNemar p (two-sided) from the discordant pairs: seeds where only the row succeeds, only the
    baseline does; the binomial test of one count among their sum at 1/2; 1 without discordant pairs."""
    if row_only + base_only == 0:
        return 1.0
    from scipy import stats

    return float(stats.binomtest(row_only, row_only + base_only, 0.5).pvalue)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order: the i-th smallest p times
    (m − i + 1), made non-decreasing along that order, capped at 1 (Holm 1979, Scand. J. Statist. 6:65–70)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
