"""``efficient-attn-approx``: FAVOR+ approximation error against exact softmax.

Without ``--checkpoint``: the library's sweeps on random inputs (output MSE and KL(P ‖ P̂) of the
attention rows, vs m and vs input scale; :mod:`efficient_attn.analysis.approx`).
With ``--checkpoint <run>/checkpoints/best-*.ckpt``: on the real queries and keys of a trained model
(captured by forward hooks on every core attention, one validation batch), per attention site, and
the error of each layer's output when every attention of the model is swapped to FAVOR+
(Performer App. D.1 / Fig. 14; :mod:`efficient_attn_tasks.approx.checkpoint`).
With ``--study sqrt_dk``: why logits are scaled by 1/√d_k (Vaswani et al. 2017, footnote 4) — logit
variance, softmax saturation and softmax gradient norm against d_k, unscaled vs scaled
(:mod:`efficient_attn_tasks.approx.scaling`; options ``--dims --length --keys --draws --seed --out``).

    efficient-attn-approx --study sqrt_dk --out results/sqrt_dk

Building the parsers imports neither torch nor Lightning (``--help`` is fast); a study imports them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from efficient_attn_tasks.approx import report as approx_report
from efficient_attn_tasks.approx import scaling
from efficient_attn_tasks.commands.cli import parser as cli_parser

STUDIES = ("favor", "sqrt_dk")
FAVOR_EXAMPLES = (
    "efficient-attn-approx --quick --out /tmp/approx                # seconds: L=512, 5 draws",
    "efficient-attn-approx --out results/approx_error               # Performer protocol: L=4096, d=16, 15 draws",
    "efficient-attn-approx --checkpoint outputs/<run>/checkpoints/best-step=<n>.ckpt --out approx_ckpt",
)
FAVOR_OUTPUTS = (
    "in --out (default approx_out/); each CSV has its PNG beside it (log-log, ±1 std bands):",
    "error_vs_features.csv/.png   MSE and KL(P ‖ P̂) against random features m, per estimator",
    "error_vs_scale.csv/.png      the same against the input scale at fixed m",
    "with --checkpoint instead: error_by_site.csv/.png, error_by_depth.csv/.png",
    "both are also logged to the active W&B run, if any",
)
SQRT_DK_EXAMPLES = (
    "efficient-attn-approx --study sqrt_dk --out results/sqrt_dk      # d_k 16…256, L = S = 256, 20 draws",
    "efficient-attn-approx --study sqrt_dk --dims 16 64 256 --length 64 --draws 5 --out /tmp/sqrt_dk",
    "efficient-attn-approx --study sqrt_dk --keys 64 --out /tmp/sqrt_dk_s64   # fewer keys than queries",
)
SQRT_DK_OUTPUTS = (
    "in --out (default approx_out/):",
    "sqrt_dk.csv   one row per d_k x scaling: logit variance, max prob, entropy, Jacobian norm (mean, std)",
    "sqrt_dk.png   one panel per statistic against d_k, unscaled vs scaled",
)


def main(argv: list[str] | None = None) -> None:
    """Dispatch on ``--study``: each study has its own options (``--study sqrt_dk --help`` lists them).
    With no arguments at all it prints the help rather than start the full study (minutes on a CPU)."""
    if argv is None and len(sys.argv) == 1:
        favor_parser().print_help()
        return
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--study", choices=STUDIES, default="favor")
    if pre.parse_known_args(argv)[0].study == "sqrt_dk":
        sqrt_dk_main(argv)
    else:
        favor_main(argv)


def sqrt_dk_parser() -> argparse.ArgumentParser:
    """Options of ``--study sqrt_dk``."""
    p = cli_parser("efficient-attn-approx --study sqrt_dk", "Why logits are scaled by 1/√d_k: logit variance, "
                   "softmax saturation and softmax gradient norm against d_k,\nunscaled vs scaled, on random "
                   "q, k in float64.", SQRT_DK_EXAMPLES, SQRT_DK_OUTPUTS)
    _add_study(p)
    scaling.add_arguments(p)
    return p


def favor_parser() -> argparse.ArgumentParser:
    """Options of the default study: FAVOR+ error on random inputs, or on a checkpoint's q, k."""
    p = cli_parser("efficient-attn-approx", "FAVOR+ approximation error against exact softmax attention: on random "
                   "q, k, v (the registry's own favor\nmodules, several feature kinds), or with --checkpoint on a "
                   "trained model's real queries and keys.", FAVOR_EXAMPLES, FAVOR_OUTPUTS)
    _add_study(p)
    approx_report.add_arguments(p)
    p.add_argument("--checkpoint", type=Path, help="a trained run's checkpoint: errors on its real q, k "
                                                    "(default: random inputs)")
    p.add_argument("--batch-size", type=int, default=32, help="validation sequences for --checkpoint")
    p.add_argument("--layer-features", type=int, nargs="+", default=[16, 64, 256], help="m for --checkpoint")
    return p


def sqrt_dk_main(argv: list[str] | None = None) -> None:
    scaling.run(sqrt_dk_parser().parse_args(argv))


def favor_main(argv: list[str] | None = None) -> None:
    a = favor_parser().parse_args(argv)
    if a.checkpoint is None:
        approx_report.run(a)
        return
    from efficient_attn_tasks.approx import checkpoint as approx_checkpoint  # torch, Lightning and the task's code load here

    approx_checkpoint.run(a)


def _add_study(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", choices=STUDIES, default="favor",
                   help="favor: FAVOR+ error; sqrt_dk: the 1/√d_k study (see --study sqrt_dk --help)")


if __name__ == "__main__":
    main()
