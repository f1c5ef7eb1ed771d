"""``efficient-attn-report``: tables from run records (``results.json``), never from W&B files.

    efficient-attn-report multirun/2026-11-21 outputs/ --out results/tables/quickstart

Rows group runs by (experiment name, task, attention); cells are mean ± std over seeds with n.
A run dir whose ``results.json`` is missing (crashed, killed, still running) is listed as such.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

COLUMNS = ("val_best", "test", "num_parameters", "train_tokens_per_s", "peak_memory_mib", "wall_time_s")


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


def flatten(record: dict[str, Any]) -> dict[str, float | None]:
    m = record["metrics"]
    row = {f"val {m['monitor']} (best)": m["val_best"]}
    row.update({k: v for k, v in sorted(m["test"].items())})
    row.update({k: record.get(k) for k in COLUMNS[2:]})
    return row


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return _num(values[0])
    return f"{_num(statistics.mean(values))} ± {_num(statistics.stdev(values))}"


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def table(records: list[dict[str, Any]], missing: list[Path]) -> tuple[list[str], list[list[str]]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["name"], r["task"], r["attention"])].append(flatten(r))
    metrics = list(dict.fromkeys(k for rows in groups.values() for row in rows for k in row))
    header = ["experiment", "task", "attention", "n", *metrics]
    body = [
        [*key, str(len(rows)), *(mean_std([row.get(k) for row in rows]) for k in metrics)]
        for key, rows in sorted(groups.items())
    ]
    body += [[str(path), "", "", "0", *(["missing results.json"] + [""] * (len(metrics) - 1))] for path in missing]
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run or multirun dirs (searched recursively)")
    parser.add_argument("--out", type=Path, help="write <out>.md and <out>.csv")
    args = parser.parse_args(argv)
    records, missing = find_runs(args.dirs)
    if not records and not missing:
        parser.error(f"no run dirs (with .hydra/) under {[str(d) for d in args.dirs]}")
    header, body = table(records, missing)
    text = markdown(header, body)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        with open(args.out.with_suffix(".csv"), "w", newline="") as f:
            csv.writer(f).writerows([header, *body])


if __name__ == "__main__":
    main()
