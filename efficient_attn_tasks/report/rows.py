"""A table's rows: the runs of ``efficient-attn-report`` grouped by their ``--rows`` key values, the sort order of
those values, and the metric columns the rows share."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Any

from efficient_attn_tasks.report.runs import RESOURCES, field
from efficient_attn_tasks.report.stats import is_number


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
    ceiling: bool = False  # its validation score is the monitor's best possible (nothing outside can beat it)


def group(records: list[dict[str, Any]], keys: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Runs by their ``keys`` values, labelled "v1 / v2", sorted by the values (numbers numerically)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[_label(r, keys)].append(r)
    return dict(sorted(groups.items(), key=lambda item: [sort_key(field(item[1][0], k)) for k in keys]))


def _label(record: dict[str, Any], keys: list[str]) -> str:
    return " / ".join(str(field(record, k)) for k in keys)


def sort_key(value: Any) -> tuple[int, float, str]:
    """Sort key: numbers numerically, before anything else, which sorts as text."""
    if is_number(value) and not math.isnan(value):
        return (0, value, "")
    return (1, 0.0, str(value))


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


def numeric_column(flat: dict[str, list[dict[str, Any]]], key: str) -> bool:
    """Whether every value of metric ``key`` over the rows is a number or missing (not a bool or text)."""
    values = [row.get(key) for runs in flat.values() for row in runs]
    return all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values)
