"""The statistics behind ``efficient-attn-report``: cells as mean ± std or mean ± 95% CI over seeds,
Welch's t-test for independent groups, the paired t-test for seed-matched rows."""

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
