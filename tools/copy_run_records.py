"""Copy a sweep's finished run records (results.json, .hydra/ and curves.csv) into results/, for tables and
learning curves that rebuild without re-training: ``python -m tools.copy_run_records SWEEP_DIR results/ablations/NAME``.

A record written before run records carried ``best_step`` gets it from the run's own best checkpoint
file name (``checkpoints/best-step=N.ckpt``), so the report can tell runs still improving at their cap.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def copy_records(sweep: Path, dest: Path) -> int:
    """Copy every run dir of ``sweep`` whose results.json has status ok or failed (not interrupted); returns how
    many."""
    copied = 0
    for run in sorted(p for p in sweep.iterdir() if (p / "results.json").is_file()):
        record = json.loads((run / "results.json").read_text())
        if record.get("status") not in ("ok", "failed"):  # a diverged run is part of the grid: --tune reads it
            continue
        best = sorted(run.glob("checkpoints/best-step=*.ckpt"))
        if best and record.get("best_step") is None:
            record["best_step"] = int(best[0].stem.split("=")[1])
        out = dest / run.name
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
        shutil.copytree(run / ".hydra", out / ".hydra", dirs_exist_ok=True)
        if (run / "curves.csv").is_file():  # validation metrics by step: efficient-attn-report --curves
            shutil.copy2(run / "curves.csv", out / "curves.csv")
        copied += 1
    return copied


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path, help="a sweep dir (hydra.sweep.dir)")
    parser.add_argument("dest", type=Path, help="where the records go, e.g. results/ablations/mqar_gated")
    args = parser.parse_args(argv)
    print(f"{copy_records(args.sweep, args.dest)} records -> {args.dest}")


if __name__ == "__main__":
    main()
