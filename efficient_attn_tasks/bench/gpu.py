"""The GPU benchmark in one command (``tools/gpu_bench.sh``): kernels, decoding and training throughput,
in bf16 and fp32, against SDPA and FlashAttention, within a total time budget.

What: four ``efficient-attn-bench`` runs (:mod:`efficient_attn_tasks.bench.kernels`, nothing re-implemented):
for each dtype (bf16, then fp32) the kernel modes (causal, noncausal forward+backward, and decode)
and then the train mode (:mod:`efficient_attn_tasks.bench.train`), at L = 1K, 4K, 16K, 64K, for the
attentions in ``--attentions`` plus ``sdpa`` (torch's default SDPA dispatch) and ``sdpa_flash``
(SDPA pinned to FlashAttention; ``n/a`` in fp32 on CUDA). The training runs keep 64K tokens per
batch (batch 64 at 1K, 1 at 64K). Every point is a subprocess with a per-point ``--timeout``
(a point that runs out of memory or time ends its series, as bench does), and every run gets a
share of ``--budget`` (the unspent part of one run passes on to the next), so the whole script
stays under ~10 minutes on an H100/H200-class GPU: ~136 points at an estimated 2-4 s each, most
of it interpreter and CUDA start-up (an estimate: not yet run on a GPU; the budget is the bound).
Needs only the project's install (no network).

Outputs: ``<out>/gpu_<gpu name>/<dtype>/`` holds each run's ``bench_<gpu>.csv``/``.png``/
``summary_<gpu>.md`` and ``train_<gpu>.csv``/``.png``/``train_summary_<gpu>.md``;
``<out>/gpu_<gpu name>/run.md`` the commands, the machine and each run's time and point counts.
The last line printed says where the files went. ``--quick --device cpu`` runs the same plan
with tiny sizes (the tests do).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import Counter
from pathlib import Path

from efficient_attn_tasks.commands.cli import parser as cli_parser

DTYPES = ("bf16", "fp32")
ATTENTIONS = "softmax,favor,linear"
BASELINES = "sdpa,sdpa_flash"
LENGTHS = {"full": [1024, 4096, 16384, 65536], "quick": [32]}
TRAIN_TOKENS = {"full": 65536, "quick": 64}
# (name, --modes, share of the budget): ~60 kernel/decode points and ~16 training points per dtype
RUNS = (("kernel", "causal,noncausal,decode", 0.35), ("train", "train", 0.15))


def parser() -> argparse.ArgumentParser:
    """The command line (no torch imported)."""
    p = cli_parser(
        "tools/gpu_bench.sh", "Kernel (causal, noncausal), decode and training-throughput benchmarks in bf16 and fp32 "
        "against SDPA\nand FlashAttention at L = 1K ... 64K, within a total time budget, into a folder named "
        "by the GPU.",
        ("tools/gpu_bench.sh                                   # on a CUDA machine: ~10 minutes",
         "tools/gpu_bench.sh --budget 300 --attentions softmax,favor",
         "tools/gpu_bench.sh --quick --device cpu --out /tmp/gpu_dry_run   # the same plan, tiny, on CPU"),
        ("<out>/gpu_<gpu>/<dtype>/  bench_<gpu>.csv|png, summary_<gpu>.md (kernels, decode),",
         "                          train_<gpu>.csv|png, train_summary_<gpu>.md (training throughput)",
         "<out>/gpu_<gpu>/run.md    commands, machine, time and point counts per run"))
    p.add_argument("--device", default="auto", help="cuda, cuda:1, ... or cpu (with --quick); auto = cuda, "
                                                    "an error without one")
    p.add_argument("--attentions",
                   help=f"registered attentions to run; {BASELINES} are always added (train: softmax is "
                        f"the SDPA one) (default: {ATTENTIONS}; --quick softmax)")
    p.add_argument("--budget", type=float, default=540.0, help="total wall seconds for all runs")
    p.add_argument("--timeout", type=float, default=60.0, help="per-point wall limit in seconds")
    p.add_argument("--quick", action="store_true", help=f"L = {LENGTHS['quick']}, tiny model, 1 repeat: a dry run "
                                                        "(1-3 minutes on a 2-core CPU)")
    p.add_argument("--out", type=Path, default=Path("results/benchmarks"),
                   help="parent of the gpu_<gpu> folder (relative to the repository root with tools/gpu_bench.sh)")
    return p


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


def main(argv: list[str] | None = None) -> None:
    """Run the plan; write run.md; print one closing line with where the files went."""
    p = parser()
    args = p.parse_args(argv)
    import torch

    from efficient_attn_tasks.bench import kernels as bench
    from efficient_attn_tasks.bench.report import machine_info

    if args.device == "auto":
        if not torch.cuda.is_available():
            p.error("--device auto: no CUDA device here; this script is for a GPU (a dry run: --quick --device cpu)")
        args.device = "cuda"
    if args.device == "cpu" and not args.quick:
        p.error("--device cpu runs only the --quick plan (the full one goes to L = 64K); add --quick")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA device (torch {torch.__version__})")
    import efficient_attn as ea

    for name in args.attentions.split(",") if args.attentions else []:
        if name not in ea.list_attentions():
            p.error(f"--attentions: {name!r} is not a registered attention; choose from {ea.list_attentions()}")
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


if __name__ == "__main__":
    main()
