"""The metric cells of ``efficient-attn-report``'s grouped table and the options that shape them: ``--success``
thresholds, ``--bounds`` (and the [0, 1] range of accuracies), still-improving runs, state sizes, and a cell's
text (mean ± std, a t interval, or a bootstrap interval inside the bounds)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from efficient_attn_tasks.report.rows import Row, numeric_column
from efficient_attn_tasks.report.runs import column_name
from efficient_attn_tasks.report.stats import (
    ACCURACY_LIKE,
    as_number,
    finite_values,
    is_number,
    mean_ci,
    mean_interval,
    mean_std,
)


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


def table_bounds(rows: list[Row], names: list[str], given: dict[str, tuple[float, float]]
                 ) -> dict[str, tuple[float, float] | None]:
    """Each numeric metric column's range (``metric_bounds`` over every row's values)."""
    flat = {row.label: row.flat for row in rows}
    return {k: metric_bounds(k, [r.get(k) for row in rows for r in row.flat], given)
            for k in names if numeric_column(flat, k)}


def success_cells(row: Row, success: Success) -> tuple[int, int, list[float]]:
    """(successes, runs with a finite value, the values of the successful runs) of one row."""
    values = finite_values([r.get(success.metric) for r in row.flat])
    hits = [v for v in values if success.met(v)]
    return len(hits), len(values), hits
