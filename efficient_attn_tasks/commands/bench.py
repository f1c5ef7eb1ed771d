"""``efficient-attn-bench``: time forward+backward (or decoding, or LM training) and measure peak memory of every
attention against sequence length L (the work: efficient_attn_tasks/bench/kernels.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from efficient_attn_tasks.bench import train as bench_train
from efficient_attn_tasks.bench.points import DTYPES
from efficient_attn_tasks.commands.cli import parser as cli_parser
from efficient_attn_tasks.commands.cli import run_command, writable_folder

DEFAULT_LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384]
QUICK_LENGTHS = [256, 512, 1024]
MODES = ("causal", "noncausal", "decode", "train")

HELP = """\
Time forward+backward (or decoding) and measure peak memory of every attention against sequence length L,
each point in a fresh subprocess, with performer-pytorch, F.scaled_dot_product_attention and compiled FlexAttention
(flex beside softmax, flex_window beside sliding_window; forward only on CPU, where it has no backward) as baselines.

examples:
  efficient-attn-bench --quick --out /tmp/bench            # every attention, L = 256 512 1024, 1 repeat
  efficient-attn-bench --attentions softmax,favor,linear --lengths 1024 4096 16384 --out results/bench
  efficient-attn-bench --modes decode,train --attentions softmax,favor,retention --quick --out /tmp/gen

outputs:
  in --out (default bench_out/), <device> = cpu or the GPU's name:
  bench_<device>.csv   one row per attention x mode x L: status, time, peak memory, GFLOP/s, tokens/s
  bench_<device>.png   log-log time and peak memory against L
  summary_<device>.md  ratios to softmax and favor, crossovers, forward alone against FlexAttention (also printed)
  train_<device>.csv, train_<device>.png, train_summary_<device>.md   --modes train: one row per attention x L:
                       tokens/s, attention share of the step, peak memory; the L from which it beats softmax
"""


def parser() -> argparse.ArgumentParser:
    p = cli_parser("efficient-attn-bench", HELP)
    p.add_argument("--attentions", metavar="NAMES",
                   help="comma-separated registered attentions (default: every registered one)")
    p.add_argument("--modes", default="causal,noncausal",
                   help="comma-separated from causal, noncausal (forward+backward), decode (generation "
                        "after an L-token prefix) and train (LM training throughput, options below)")
    p.add_argument("--lengths", type=int, nargs="+", metavar="L",
                   help=f"sequence lengths (default: {' '.join(map(str, DEFAULT_LENGTHS))}; "
                        f"with --quick {' '.join(map(str, QUICK_LENGTHS))})")
    p.add_argument("--batch", type=int, default=1, help="batch size B")
    p.add_argument("--heads", type=int, default=8, help="heads H")
    p.add_argument("--head-dim", type=int, default=64, help="head size D")
    p.add_argument("--num-features", type=int, default=256, help="random features m of favor and performer-pytorch")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="input and parameter dtype")
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP / MKL threads per point")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...; auto = cuda when available, else cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per point after 1 warm-up (median reported)")
    p.add_argument("--decode-steps", type=int, default=32,
                   help="decode mode: timed generation steps per point, after 1 warm-up")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="per-point wall limit in seconds; a point over it ends its series")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="wall limit of the whole run: once spent, the remaining points are skipped")
    p.add_argument("--matmul-size", type=int, default=4096, help="n of the n x n matmul that measures peak GFLOP/s")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also time performer-pytorch FastAttention (if installed), sdpa, and compiled FlexAttention "
                        "(flex, flex_window: with softmax, sliding_window in the run; forward only on CPU)")
    p.add_argument("--quick", action="store_true",
                   help="lengths 256 512 1024 (unless --lengths), 1 repeat, <= 8 decode steps, <= 2048 matmul")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder")
    p.add_argument("--imports", nargs="+", default=[], metavar="MODULE",
                   help="modules to import first: your own attentions (@register_attention), for --attentions")
    bench_train.add_arguments(p)
    return p


def prepare(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the modes and --out, apply --quick, fill in the lengths and the train mode's sizes, resolve
    --device auto."""
    unknown = sorted(set(args.modes.split(",")) - set(MODES))
    if unknown:
        p.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    writable_folder(args.out, "--out")
    if args.quick:
        args.repeats, args.matmul_size = 1, min(args.matmul_size, 2048)
        args.decode_steps = min(args.decode_steps, 8)
    args.lengths = args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
    bench_train.resolve(args, p)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options as the benchmark runs them (:func:`prepare`)."""
    p = parser()
    args = p.parse_args(argv)
    prepare(p, args)
    return args


def main(argv: list[str] | None = None) -> None:
    """With no arguments at all, the help: a bare run would time every attention up to L = 16384 (tens of
    minutes on a CPU)."""
    run_command(parser, argv, _bench, check=prepare)


def _bench(args: argparse.Namespace) -> None:
    from efficient_attn_tasks.bench import kernels

    kernels.run(args)


if __name__ == "__main__":
    main()
