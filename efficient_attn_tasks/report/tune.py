"""``efficient-attn-report --tune KEY``: per table row, the value of a hyper-parameter (a learning rate, say) whose
runs have the best mean validation score, chosen on validation metrics only, whether that value lies at
either end of the values tried, and whether its score is the best the monitor can take."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Hashable
from typing import Any

from efficient_attn_tasks.report.cells import metric_bounds
from efficient_attn_tasks.report.rows import sort_key
from efficient_attn_tasks.report.runs import field
from efficient_attn_tasks.report.stats import finite_values

LOSS_LIKE = ("loss", "ppl", "bpc")  # --tune minimises a monitor whose name holds one of these


def _hashable(value: Any) -> Any:
    return value if isinstance(value, Hashable) else json.dumps(value, sort_keys=True)


def tune(runs: list[dict[str, Any]], key: str, label: str = "",
         failed: list[dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], Any, int, float]:
    """(the runs of the chosen ``key`` value, that value, how many values the runs tried, its mean score).

    The chosen value has the best mean of ``metrics.val_best`` over the seeds that every value was run with
    (all its runs when no seed is common): the largest, or the smallest when the monitor is loss-like (see
    ``minimises``); ties go to the smaller value. So a value given more seeds after a search (a confirm stage)
    is compared on the search seeds, as the others are. A ``failed`` run (diverged, say) counts as run with its
    seed and scores the worst possible, so its value is never chosen over one whose runs all finished. Test
    metrics are never looked at, so they stay an unbiased estimate for the chosen value.
    """
    by_value, scores = _scores(runs, key, failed)
    candidates = sorted((v for v, s in scores.items() if s), key=sort_key)  # ascending: min/max keep the first tie
    if not candidates:
        raise SystemExit(f"--tune {key}: no run of row {label!r} has a finite metrics.val_best")
    pick = min if minimises(runs) else max
    best = pick(candidates, key=lambda v: statistics.mean(scores[v]))
    return by_value[best], best, len(by_value), statistics.mean(scores[best])


def _scores(runs: list[dict[str, Any]], key: str, failed: list[dict[str, Any]] | None
            ) -> tuple[dict[Any, list[dict[str, Any]]], dict[Any, list[float]]]:
    """(the runs of each ``key`` value, the ``val_best`` scores ``tune`` compares for each value)."""
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
    return by_value, {v: [x for seed, x in score_of[v].items() if not common or seed in common] for v in by_value}


def at_ceiling(runs: list[dict[str, Any]], score: float) -> bool:
    """Whether ``score`` (the chosen value's mean in ``tune``) is the best the runs' monitor can take (1 for an
    accuracy-like monitor whose values lie in [0, 1], maximised), so that no value outside the grid can beat it;
    False for an unbounded one."""
    values = [r["metrics"]["val_best"] for r in runs]
    bounds = metric_bounds(str(runs[0]["metrics"]["monitor"]), values, {})
    return bounds is not None and score == (bounds[0] if minimises(runs) else bounds[1])


def at_edge(runs: list[dict[str, Any]], key: str, chosen: Any) -> bool:
    """Whether ``chosen`` is the smallest or the largest of the ``key`` values the runs tried (two or more; a
    failed run's value was tried)."""
    tried = sorted({_hashable(field(r, key)) for r in runs}, key=sort_key)
    return len(tried) >= 2 and chosen in (tried[0], tried[-1])


def minimises(runs: list[dict[str, Any]]) -> bool:
    """Whether the runs' (single) monitor is better lower: its name holds loss, ppl or bpc."""
    monitors = sorted({str(r["metrics"]["monitor"]) for r in runs})
    if len(monitors) != 1:
        raise SystemExit(f"--tune: the runs of one row monitor different metrics {monitors}")
    return any(word in monitors[0].lower() for word in LOSS_LIKE)

