"""``efficient-attn-report``: tables from run records (``results.json``), never from W&B files.

    efficient-attn-report multirun/2026-11-21 --out results/tables/quickstart
    efficient-attn-report runs/ --rows attention --pivot task --avg       # an LRA-style attention × task table
    efficient-attn-report runs/ --baseline "multi30k_small / softmax"      # Δ and Welch t-test p per row

Rows group runs by ``--rows`` (record fields or ``config.<dotted.key>``); cells are mean ± std over
the group's runs (seeds) with n. A run dir whose ``results.json`` is missing (crashed, killed, still
running) gets a row saying so.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from scipy import stats

RESOURCES = ("num_parameters", "train_tokens_per_s", "peak_memory_mib", "wall_time_s")
HEADLINE = {"translation": "test/bleu", "listops": "test/acc", "lm": "test/bpc"}  # --pivot task columns


def find_runs(roots: list[Path]) -> tuple[list[dict[str, Any]], list[Path]]:
    """(records, run dirs without results.json); a run dir is one with a .hydra/ folder."""
    records, missing = [], []
    for root in roots:
        for hydra_dir in sorted(root.rglob(".hydra")):
            result = hydra_dir.parent / "results.json"
            if result.exists():
                records.append({**json.loads(result.read_text()), "_dir": str(hydra_dir.parent)})
            else:
                missing.append(hydra_dir.parent)
    return records, missing


def field(record: dict[str, Any], key: str) -> Any:
    """A record field, or ``config.a.b`` for a resolved config value."""
    value: Any = record
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def metrics(record: dict[str, Any]) -> dict[str, float | None]:
    m = record["metrics"]
    row = {f"val {m['monitor']} (best)": m["val_best"], **dict(sorted(m["test"].items()))}
    return {**row, **{k: record.get(k) for k in RESOURCES}}


def mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return _num(values[0])
    return f"{_num(statistics.mean(values))} ± {_num(statistics.stdev(values))}"


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def welch(a: list[float], b: list[float]) -> str:
    """Two-sided Welch t-test p-value, or why there is none."""
    if len(a) < 2 or len(b) < 2:
        return "n<2"
    if statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0:
        return "1" if statistics.mean(a) == statistics.mean(b) else "0"
    return f"{stats.ttest_ind(a, b, equal_var=False).pvalue:.3g}"


def group(records: list[dict[str, Any]], keys: list[str]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[" / ".join(str(field(r, k)) for k in keys)].append(r)
    return dict(sorted(groups.items()))


def table(records: list[dict[str, Any]], missing: list[Path], rows: list[str] | None = None,
          baseline: str | None = None) -> tuple[list[str], list[list[str]]]:
    """One row per group: n, every metric as mean ± std, and Δ / p against ``baseline`` if given."""
    groups = group(records, rows or ["name", "task", "attention"])
    flat = {label: [metrics(r) for r in runs] for label, runs in groups.items()}
    names = list(dict.fromkeys(k for runs in flat.values() for row in runs for k in row))
    header = [" / ".join(rows or ["name", "task", "attention"]), "n", *names]
    tests = [k for k in names if k.startswith("test/")]
    if baseline is not None:
        if baseline not in flat:
            raise SystemExit(f"--baseline {baseline!r} is not a row; rows: {list(flat)}")
        header += [f"Δ {k} (p)" for k in tests]
    body = []
    for label, runs in flat.items():
        row = [label, str(len(runs)), *(mean_std([r.get(k) for r in runs]) for k in names)]
        if baseline is not None:
            row += [_delta([r.get(k) for r in runs], [r.get(k) for r in flat[baseline]]) for k in tests]
        body.append(row)
    body += [[f"{path} (missing results.json)", "0", *["n/a"] * (len(header) - 2)] for path in missing]
    return header, body


def _delta(values: list[float | None], base: list[float | None]) -> str:
    a, b = [v for v in values if v is not None], [v for v in base if v is not None]
    if not a or not b:
        return "n/a"
    return f"{statistics.mean(a) - statistics.mean(b):+.4g} ({welch(a, b)})"


def pivot(records: list[dict[str, Any]], missing: list[Path], rows: list[str], avg: bool) -> tuple[list[str], list[list[str]]]:
    """Rows × tasks: each task's headline test metric (mean ± std, n); Avg of the row's task means."""
    tasks = sorted({r["task"] for r in records})
    header = [" / ".join(rows), *(f"{t} {HEADLINE.get(t, '?')}" for t in tasks)] + (["Avg"] if avg else [])
    body = []
    for label, runs in group(records, rows).items():
        cells, means = [], []
        for t in tasks:
            values = [r["metrics"]["test"].get(HEADLINE.get(t, "")) for r in runs if r["task"] == t]
            values = [v for v in values if v is not None]
            cells.append(f"{mean_std(values)} (n={len(values)})" if values else "missing")
            means.append(statistics.mean(values) if values else None)
        if avg:
            cells.append(_num(statistics.mean(means)) if None not in means else "n/a")
        body.append([label, *cells])
    body += [[f"{path} (missing results.json)", *["n/a"] * (len(header) - 1)] for path in missing]
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Tables from efficient-attn run records (results.json).")
    parser.add_argument("dirs", nargs="+", type=Path, help="run or multirun dirs (searched recursively)")
    parser.add_argument("--rows", default="name,task,attention", help="comma-separated grouping keys")
    parser.add_argument("--baseline", help="a row label: adds Δ and Welch t-test p for every test metric")
    parser.add_argument("--pivot", choices=["task"], help="columns = tasks (each task's headline test metric)")
    parser.add_argument("--avg", action="store_true", help="with --pivot: an Avg column over tasks")
    parser.add_argument("--out", type=Path, help="write <out>.md and <out>.csv")
    args = parser.parse_args(argv)
    records, missing = find_runs(args.dirs)
    if not records and not missing:
        parser.error(f"no run dirs (with .hydra/) under {[str(d) for d in args.dirs]}")
    rows = args.rows.split(",")
    header, body = pivot(records, missing, rows, args.avg) if args.pivot else table(records, missing, rows, args.baseline)
    text = markdown(header, body)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        with open(args.out.with_suffix(".csv"), "w", newline="") as f:
            csv.writer(f).writerows([header, *body])


if __name__ == "__main__":
    main()
