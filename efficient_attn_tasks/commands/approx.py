"""``efficient-attn-approx``: approximation error against exact softmax. The default study is FAVOR+ on random
q, k, v (efficient_attn_tasks/approx/report.py) or on a trained model's queries and keys (``--checkpoint``:
efficient_attn_tasks/approx/checkpoint.py); ``--study sqrt_dk`` is why logits are scaled by 1/√d_k
(efficient_attn_tasks/approx/scaling.py). Each study has its own options."""

from __future__ import annotations

import argparse
import functools
import sys
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
On random inputs every sample draws a fresh q, k, v and fresh features, over a grid of logit scales
(the std of q·k/√d: q, k entries have std √scale) × random features m, next to the uniform average
(mean of v, ignoring q and k) and the exact rows' entropy.

examples:
  efficient-attn-approx --quick --out /tmp/approx                # seconds: L=256, 3 samples, 2 m, 2 scales
  efficient-attn-approx --threads 1 --out results/approx_error   # L=4096, d=16, 15 samples: minutes
  efficient-attn-approx --checkpoint outputs/<run>/checkpoints/best-step=<n>.ckpt --out approx_ckpt

outputs:
  in --out (default approx_out/); each CSV has its PNG beside it:
  grid.csv/.png                MSE and KL(P ‖ P̂) per logit std × m × estimator, with the baselines;
                               heat maps of each estimator's MSE over positive orthogonal features'
  error_vs_features.csv/.png   the grid at logit std --scale against m (log-log, ±1 std bands)
  error_vs_scale.csv/.png      the grid at m = --scale-features against the logit std
  summary.md                   per logit std, which of the Performer paper's claims hold, with the numbers
  with --checkpoint instead: error_by_site.csv/.png (MSE and KL of FAVOR+), error_by_depth.csv/.png, and
  model_rows.csv/.md (the model's own attention rows against softmax's: KL both ways, softmax mass covered)
  all are also logged to the active W&B run, if any
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
    favor = functools.partial(_favor, argv=list(sys.argv[1:] if argv is None else argv))
    run_command(functools.partial(parser, study), argv, favor if study == "favor" else scaling.run, check=check)


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
    p.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128, 256],
                   help="random features m of the grid")
    p.add_argument("--samples", "--draws", dest="draws", type=int, default=15,
                   help="samples per point, each a fresh q, k, v and fresh features (with --checkpoint: feature "
                        "draws on the model's q, k, v)")
    p.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0],
                   help="logit stds of the grid: the std of q·k/√d (q, k entries have std √scale)")
    p.add_argument("--scale", type=float, default=1.0, help="logit std of error_vs_features (added to the grid)")
    p.add_argument("--scale-features", type=int, default=256, help="m of error_vs_scale (added to the grid)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs (sample s: seed * 1000 + s)")
    p.add_argument("--kl-rows", type=int, default=KL_ROWS,
                   help="query rows the KL(P ‖ P̂) is measured on (the first ones; 0: no KL)")
    p.add_argument("--attentions", metavar="NAMES", default="",
                   help="more registered attentions to compare (comma-separated, default options; KL only for kernel "
                        "attentions), e.g. cosformer,hedgehog or your own")
    p.add_argument("--imports", nargs="+", default=[], metavar="MODULE",
                   help="modules to import first: your own attentions (@register_attention), for --attentions")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--quick", action="store_true", help="L=256, 3 samples, m 16 and 64, logit std 0.5 and 1: seconds")
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


def _favor(a: argparse.Namespace, argv: list[str] | None = None) -> None:
    a.argv = argv or []  # for the command line summary.md names
    if a.checkpoint is None:
        approx_report.run(a)
        return
    from efficient_attn_tasks.approx import checkpoint as approx_checkpoint  # torch, Lightning, the task's code

    approx_checkpoint.run(a)


if __name__ == "__main__":
    main()
