"""The compute a grid took, from its run records, summed by rows: every run of a row (every learning rate and
seed, failed ones too), not only the runs a table keeps.

    python -m tools.run_compute results/ablations/mqar_v2 --rows attention,config.task.seq_len --out OUT

Per row: ``runs`` (finished), ``failed`` (failed records: a diverged run is part of a grid), ``wall_h`` (the
sum of ``wall_time_s`` over both), ``train_h`` (the sum over finished runs of training seconds,
``train_tokens / train_tokens_per_s``: forward, backward and optimiser steps only, counted across resumed
attempts), ``resumed`` (finished runs that resumed from a checkpoint: a record written before records carried
the run's whole wall time counts only its last attempt in ``wall_h``, while ``train_h`` counts them all). A
last row sums the table. Writes OUT.csv and OUT.md.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

from efficient_attn_tasks.report.rows import group
from efficient_attn_tasks.report.runs import find_runs

COLUMNS = ["row", "runs", "failed", "wall_h", "train_h", "resumed"]


def train_seconds(record: dict[str, Any]) -> float:
    """Training seconds of a finished run: its tokens over its tokens per second (0 when it has neither)."""
    tokens, rate = record.get("train_tokens"), record.get("train_tokens_per_s")
    return tokens / rate if tokens and rate else 0.0


def compute_rows(finished: list[dict[str, Any]], failed: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """One dict per row of ``keys`` values (sorted as the report sorts them), then the total."""
    out = []
    for label, runs in group([*finished, *failed], keys).items():
        ok = [r for r in runs if r.get("status") == "ok"]
        out.append({"row": label, "runs": len(ok), "failed": sum(r.get("status") == "failed" for r in runs),
                    "wall_h": sum(r.get("wall_time_s") or 0.0 for r in runs) / 3600,
                    "train_h": sum(train_seconds(r) for r in ok) / 3600,
                    "resumed": sum(bool(r.get("resumed_from")) for r in ok)})
    total = {"row": "total", **{k: sum(r[k] for r in out) for k in COLUMNS[1:]}}
    return [*out, total]


def write(rows: list[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({**r, "wall_h": f"{r['wall_h']:.3f}", "train_h": f"{r['train_h']:.3f}"} for r in rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [f"| {r['row']} | {r['runs']} | {r['failed']} | {r['wall_h']:.2f} | {r['train_h']:.2f} | {r['resumed']} |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("roots", type=Path, nargs="+", help="dirs of run records (sweep dirs or results/ablations/NAME)")
    p.add_argument("--rows", required=True, help="record fields, comma-separated, as efficient-attn-report --rows")
    p.add_argument("--out", type=Path, required=True, help="OUT.csv and OUT.md are written")
    args = p.parse_args(argv)
    finished, _, stopped = find_runs(args.roots)
    failed = [r for r in stopped if r.get("status") == "failed"]  # interrupted attempts are resumed or re-run
    rows = compute_rows(finished, failed, args.rows.split(","))
    write(rows, args.out)
    print(args.out.with_suffix(".md").read_text(), end="")


if __name__ == "__main__":
    main()
