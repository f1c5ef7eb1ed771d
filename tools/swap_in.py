"""Swap-in evaluation of trained runs: each run's best checkpoint scored on its test split as trained and with
each other attention swapped in, untrained (``efficient-attn-eval RUN --attention NAME``, in one process).

    python -m tools.swap_in RUN_DIR [RUN_DIR ...] --swap favor_plus:num_features=256 linear --out DIR

Writes DIR/swap_in.csv (one row per run and attention: run, seed, attention, kwargs, each test metric) and
DIR/swap_in.md (per attention: mean [95% bootstrap interval inside the metric's range: [0, 1] for an accuracy,
``--bounds`` for another metric, e.g. ``--metric bleu --bounds bleu=0,100``], per-seed values, and the change from the
run's own attention), plus every evaluation's JSON record under DIR/records/.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from efficient_attn_tasks.commands.evaluate import parser as eval_parser
from efficient_attn_tasks.report.cells import metric_bounds, parse_bounds
from efficient_attn_tasks.report.stats import mean_interval, per_seed


def parse_swap(text: str) -> tuple[str, list[str]]:
    """``favor_plus:num_features=256,redraw_interval=null`` → ("favor_plus", ["num_features=256", ...])."""
    name, _, kwargs = text.partition(":")
    return name, [kv for kv in kwargs.split(",") if kv]


def evaluate(run: Path, swap: tuple[str, list[str]] | None, records: Path) -> dict[str, Any]:
    from efficient_attn_tasks.inference.evaluate import run as score

    label = "as trained" if swap is None else ":".join([swap[0], ",".join(swap[1])]).rstrip(":")
    out = records / f"{run.name}.{label.replace(':', '.').replace(' ', '_')}.json"
    argv = [str(run), "--split", "test", "--out", str(out)]
    if swap is not None:
        argv += ["--attention", swap[0]] + (["--attention-kwargs", *swap[1]] if swap[1] else [])
    record = json.loads(out.read_text()) if out.is_file() else score(eval_parser().parse_args(argv))
    return {"run": run.name, "seed": record["seed"], "attention": label, **record["metrics"]}


def summary(rows: list[dict[str, Any]], metric: str, given: dict[str, tuple[float, float]] | None = None) -> list[str]:
    """The table's lines; the interval is clipped to the metric's range in ``given`` (``--bounds``), else to
    [0, 1] for an accuracy, else unbounded."""
    bounds = metric_bounds(metric, [r[metric] for r in rows], given or {})
    base = {r["run"]: r[metric] for r in rows if r["attention"] == "as trained"}
    lines = [f"| attention | n | {metric} mean [95% interval] | by seed | change from as trained (mean) |",
             "|---|---|---|---|---|"]
    for label in dict.fromkeys(r["attention"] for r in rows):
        mine = [r for r in rows if r["attention"] == label]
        change = sum(r[metric] - base[r["run"]] for r in mine) / len(mine)
        lines.append(f"| {label} | {len(mine)} | {mean_interval([r[metric] for r in mine], bounds)} "
                     f"| {per_seed([(r['seed'], r[metric]) for r in mine])} | {change:+.4g} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--swap", nargs="+", required=True, help="NAME or NAME:key=value,key=value")
    p.add_argument("--metric", default="acc")
    p.add_argument("--bounds", action="append", metavar="METRIC=LO,HI",
                   help="a metric's range, as in efficient-attn-report, e.g. bleu=0,100 (default: [0, 1] for acc)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    records = a.out / "records"
    records.mkdir(parents=True, exist_ok=True)
    rows = [evaluate(run, swap, records) for run in a.runs for swap in [None, *map(parse_swap, a.swap)]]
    with open(a.out / "swap_in.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    (a.out / "swap_in.md").write_text("\n".join(summary(rows, a.metric, parse_bounds(a.bounds))) + "\n")
    print((a.out / "swap_in.md").read_text())


if __name__ == "__main__":
    main()
