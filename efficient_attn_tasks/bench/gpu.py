"""The GPU benchmark in one command (``tools/gpu_bench.sh``): kernels, decoding and training throughput, in bf16
and fp32, against SDPA and FlashAttention, within a total time budget.

Owns the plan (four ``efficient-attn-bench`` runs: :mod:`efficient_attn_tasks.bench.kernels` does the work),
the split of ``--budget`` among them (what one run leaves passes on to the next) and the ``run.md`` that lists
the commands, the machine and each run's points.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import Counter
from pathlib import Path

DTYPES = ("bf16", "fp32")
ATTENTIONS = "softmax,favor,linear"
BASELINES = "sdpa,sdpa_flash"
LENGTHS = {"full": [1024, 4096, 16384, 65536], "quick": [32]}
TRAIN_TOKENS = {"full": 65536, "quick": 64}
# (name, --modes, share of the budget): ~60 kernel/decode points and ~16 training points per dtype
RUNS = (("kernel", "causal,noncausal,decode", 0.35), ("train", "train", 0.15))


def plan(args: argparse.Namespace, folder: Path) -> list[tuple[str, str, list[str], float]]:
    """The runs in order: (dtype, run name, efficient-attn-bench argv, share of the budget)."""
    size = "quick" if args.quick else "full"
    lengths = [str(L) for L in LENGTHS[size]]
    names = args.attentions or ("softmax" if args.quick else ATTENTIONS)
    common = ["--device", args.device, "--attentions", f"{names},{BASELINES}", "--no-baselines",
              "--lengths", *lengths, "--timeout", f"{args.timeout:g}", "--threads", "1" if args.quick else "4"]
    common += ["--quick", "--matmul-size", "256"] if args.quick else []
    runs = []
    for dtype in DTYPES:
        for name, modes, share in RUNS:
            extra = ["--tokens-per-batch", str(TRAIN_TOKENS[size])] if name == "train" else []
            runs.append((dtype, name, [*common, "--dtype", dtype, "--modes", modes, *extra,
                                       "--out", str(folder / dtype)], share))
    return runs


def count_points(out: Path, pattern: str = "*.csv") -> Counter:
    """Status counts over every point of the CSVs in ``out`` matching ``pattern`` (the matmul row excluded)."""
    counts: Counter = Counter()
    for path in sorted(out.glob(pattern)):
        with open(path) as f:
            counts.update(row["status"] for row in csv.DictReader(f) if row["attention"] != "matmul")
    return counts


def run(args: argparse.Namespace) -> None:
    """Run the plan on ``args.device`` (a checked one: efficient_attn_tasks/commands/gpu_bench.py); write run.md;
    print one closing line with where the files went."""
    from efficient_attn_tasks.bench.report import machine_info
    from efficient_attn_tasks.commands import bench

    machine, slug = machine_info(args.device, 1)
    folder = args.out / f"gpu_{slug}"
    folder.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    runs, log = plan(args, folder), []
    for i, (dtype, name, argv_run, share) in enumerate(runs):
        left = args.budget - (time.monotonic() - start)
        budget = left * share / sum(s for *_, s in runs[i:])  # what earlier runs did not spend passes on
        argv_run = [*argv_run, "--budget", f"{max(budget, 0):.0f}"]
        print(f"== {dtype} {name}: efficient-attn-bench {' '.join(argv_run)}", file=sys.stderr, flush=True)
        began, problem = time.monotonic(), ""
        try:
            bench.main(argv_run)
        except Exception as exc:  # one run's failure must not lose the others
            problem = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            print(f"error in the {dtype} {name} run: {problem}", file=sys.stderr)
        log.append((dtype, name, argv_run, time.monotonic() - began, problem))
    total = count_points(folder / DTYPES[0]) + count_points(folder / DTYPES[1])
    write_log(folder / "run.md", machine, args, log, time.monotonic() - start)
    counts = ", ".join(f"{n} {status}" for status, n in total.most_common())
    print(f"gpu benchmark: {sum(total.values())} points ({counts}) in {time.monotonic() - start:.0f} s "
          f"on {machine.split(';')[0]}; files in {folder}/")


def write_log(path: Path, machine: str, args: argparse.Namespace, log: list[tuple], seconds: float) -> None:
    """run.md: the machine, and per run its command, wall time, point counts and any error."""
    import torch

    lines = ["# GPU benchmark run", "", f"- machine: {machine}",
             f"- torch {torch.__version__}, CUDA {torch.version.cuda}; fp32 matmuls with TF32 "
             f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}",
             f"- budget {args.budget:g} s, per-point timeout {args.timeout:g} s; took {seconds:.0f} s", "",
             "| dtype | run | seconds | points | command |", "|---|---|---|---|---|"]
    for dtype, name, argv_run, took, problem in log:
        counts = count_points(path.parent / dtype, "train_*.csv" if name == "train" else "bench_*.csv")
        shown = ", ".join(f"{n} {s}" for s, n in counts.most_common()) + (f"; error: {problem}" if problem else "")
        lines.append(f"| {dtype} | {name} | {took:.0f} | {shown} | `efficient-attn-bench {' '.join(argv_run)}` |")
    path.write_text("\n".join(lines) + "\n")
