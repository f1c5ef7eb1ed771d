"""``tools/gpu_bench.sh``: the GPU benchmark in one command, four ``efficient-attn-bench`` runs (kernels, decoding,
training throughput; bf16 and fp32) within a total time budget (the work: efficient_attn_tasks/bench/gpu.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from efficient_attn_tasks.bench.gpu import ATTENTIONS, BASELINES, LENGTHS
from efficient_attn_tasks.commands.cli import parser as cli_parser
from efficient_attn_tasks.commands.cli import run_command, writable_folder

HELP = """\
Kernel (causal, noncausal), decode and training-throughput benchmarks in bf16 and fp32 against SDPA
and FlashAttention at L = 1K ... 64K, within a total time budget, into a folder named by the GPU.

examples:
  tools/gpu_bench.sh                                   # on a CUDA machine: ~10 minutes
  tools/gpu_bench.sh --budget 300 --attentions softmax,favor
  tools/gpu_bench.sh --quick --device cpu --out /tmp/gpu_dry_run   # the same plan, tiny, on CPU

outputs:
  <out>/gpu_<gpu>/<dtype>/  bench_<gpu>.csv|png, summary_<gpu>.md (kernels, decode),
                            train_<gpu>.csv|png, train_summary_<gpu>.md (training throughput)
  <out>/gpu_<gpu>/run.md    commands, machine, time and point counts per run
"""


def parser() -> argparse.ArgumentParser:
    p = cli_parser("tools/gpu_bench.sh", HELP)
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


def check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A device and attentions the plan can run on (``--device auto`` becomes cuda) and an --out that can be
    written, before anything runs."""
    writable_folder(args.out, "--out")
    import torch

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


def main(argv: list[str] | None = None) -> None:
    """Without arguments: the full plan on the GPU (this command's purpose, so no help instead)."""
    run_command(parser, argv, _gpu_bench, check=check, help_when_bare=False)


def _gpu_bench(args: argparse.Namespace) -> None:
    from efficient_attn_tasks.bench import gpu

    gpu.run(args)


if __name__ == "__main__":
    main()
