"""``efficient-attn-approx``: approximation error against exact softmax. The default study is FAVOR+ on random
q, k, v (efficient_attn_tasks/approx/report.py) or on a trained model's queries and keys (``--checkpoint``:
efficient_attn_tasks/approx/checkpoint.py); ``--study sqrt_dk`` is why logits are scaled by 1/√d_k
(efficient_attn_tasks/approx/scaling.py). Each study has its own options."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from efficient_attn.analysis import KL_ROWS
from efficient_attn_tasks.approx import report as approx_report
from efficient_attn_tasks.approx import scaling
from efficient_attn_tasks.commands.cli import existing, run_command, writable_folder
from efficient_attn_tasks.commands.cli import parser as cli_parser

STUDIES = ("favor", "sqrt_dk")
FAVOR_HELP = """\
FAVOR+ approximation error against exact softmax attention: on random q, k, v (the registry's own favor
modules, several feature kinds), or with --checkpoint on a trained model's real queries and keys.

examples:
  efficient-attn-approx --quick --out /tmp/approx                # seconds: L=512, 5 draws
  efficient-attn-approx --out results/approx_error               # Performer protocol: L=4096, d=16, 15 draws
  efficient-attn-approx --checkpoint outputs/<run>/checkpoints/best-step=<n>.ckpt --out approx_ckpt

outputs:
  in --out (default approx_out/); each CSV has its PNG beside it (log-log, ±1 std bands):
  error_vs_features.csv/.png   MSE and KL(P ‖ P̂) against random features m, per estimator
  error_vs_scale.csv/.png      the same against the input scale at fixed m
  with --checkpoint instead: error_by_site.csv/.png (MSE and KL of FAVOR+), error_by_depth.csv/.png, and
  model_rows.csv/.md (the model's own attention rows against softmax's: KL both ways, softmax mass covered)
  the PNG outputs are also logged to the active W&B run, if any
"""
SQRT_DK_HELP = """\
Why logits are scaled by 1/√d_k: logit variance, softmax saturation and softmax gradient norm against d_k,
unscaled vs scaled, on random q, k in float64.

examples:
  efficient-attn-approx --study sqrt_dk --out results/sqrt_dk      # d_k 16…256, L = S = 256, 20 draws
  efficient-attn-approx --study sqrt_dk --dims 16 64 256 --length 64 --draws 5 --out /tmp/sqrt_dk
  efficient-attn-approx --study sqrt_dk --keys 64 --out /tmp/sqrt_dk_s64   # fewer keys than queries

outputs:
  in --out (default approx_out/):
  sqrt_dk.csv   one row per d_k x scaling: logit variance, max prob, entropy, Jacobian norm (mean, std)
  sqrt_dk.png   one panel per statistic against d_k, unscaled vs scaled
"""


def main(argv: list[str] | None = None) -> None:
    """Run the ``--study`` asked for (no arguments at all: the default study's help, not a run of minutes)."""
    study = _study(argv)
    run_command(functools.partial(parser, study), argv, _favor if study == "favor" else scaling.run, check=check)


def check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A missing --checkpoint or an --out that cannot be written: one line, before anything loads or is created."""
    if getattr(args, "checkpoint", None) is not None:
        existing(args.checkpoint, "--checkpoint", "checkpoint file or run dir")
    writable_folder(args.out, "--out")


def parser(study: str = "favor") -> argparse.ArgumentParser:
    """The options of ``study`` (``--study sqrt_dk --help`` lists that study's)."""
    if study == "sqrt_dk":
        p, add = cli_parser("efficient-attn-approx --study sqrt_dk", SQRT_DK_HELP), _sqrt_dk_arguments
    else:
        p, add = cli_parser("efficient-attn-approx", FAVOR_HELP), _favor_arguments
    p.add_argument("--study", choices=STUDIES, default="favor",
                   help="favor: FAVOR+ error; sqrt_dk: the 1/√d_k study (see --study sqrt_dk --help)")
    add(p)
    return p


def _study(argv: list[str] | None) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--study", choices=STUDIES, default="favor")
    return pre.parse_known_args(argv)[0].study


def _favor_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--length", type=int, default=4096, help="sequence length L of the random q, k, v")
    p.add_argument("--dim", type=int, default=16, help="head size d")
    p.add_argument("--features", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512],
                   help="random features m of the error-vs-m sweep")
    p.add_argument("--draws", type=int, default=15, help="independent feature draws per point")
    p.add_argument("--scale", type=float, default=1.0, help="std of q, k entries for the m sweep")
    p.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0],
                   help="input scales (std of q, k entries) of the error-vs-scale sweep")
    p.add_argument("--scale-features", type=int, default=256, help="m for the scale sweep")
    p.add_argument("--seed", type=int, default=0, help="seed of q, k, v")
    p.add_argument("--kl-rows", type=int, default=KL_ROWS,
                   help="query rows the KL(P ‖ P̂) is measured on (the first ones; 0: no KL)")
    p.add_argument("--attentions", metavar="NAMES", default="",
                   help="more registered attentions to compare (comma-separated, default options; KL only for kernel "
                        "attentions), e.g. cosformer,hedgehog or your own")
    p.add_argument("--imports", nargs="+", default=[], metavar="MODULE",
                   help="modules to import first: your own attentions (@register_attention), for --attentions")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--quick", action="store_true", help="L=512, 5 draws, 3 m values, 3 scales: seconds")
    p.add_argument("--out", type=Path, default=Path("approx_out"), help="output folder")
    p.add_argument("--checkpoint", type=Path, help="a trained run's checkpoint: errors on its real q, k "
                                                    "(default: random inputs)")
    p.add_argument("--batch-size", type=int, default=32, help="validation sequences for --checkpoint")
    p.add_argument("--layer-features", type=int, nargs="+", default=[16, 64, 256], help="m for --checkpoint")


def _sqrt_dk_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dims", type=int, nargs="+", default=list(scaling.DIMS), help="head sizes d_k")
    p.add_argument("--length", type=int, default=256, help="queries L per draw")
    p.add_argument("--keys", type=int, default=None, help="keys S per draw (default: --length)")
    p.add_argument("--draws", type=int, default=20, help="independent draws of q, k per d_k")
    p.add_argument("--seed", type=int, default=0, help="seed of q, k (each d_k adds its own offset)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--out", type=Path, default=Path("approx_out"), help="output folder for sqrt_dk.csv and .png")


def _favor(a: argparse.Namespace) -> None:
    if a.checkpoint is None:
        approx_report.run(a)
        return
    from efficient_attn_tasks.approx import checkpoint as approx_checkpoint  # torch, Lightning, the task's code

    approx_checkpoint.run(a)


if __name__ == "__main__":
    main()
