"""``efficient-attn-translate``: translate sentences, one per line from stdin or ``--input``, with a trained
translation checkpoint, one translation per line to stdout (the work: efficient_attn_tasks/inference/translate.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from efficient_attn_tasks.commands.cli import CommandError, check_checkpoint_args, checkpoint_parser, run_command

HELP = """\
Translate sentences (one per line, from stdin or --input) with a trained translation checkpoint;
write one translation per line to stdout. The checkpoint runs alone: its tokenizer is inside it.

examples:
  efficient-attn-translate outputs/<date>/<run> < test.en > test.hyp.de     # its best checkpoint
  efficient-attn-translate <run>/checkpoints/best-step=<n>.ckpt --input test.en --beam 8
  efficient-attn-translate <run> --input test.en --beam 1 --batch-size 128 --device cuda   # greedy, fast

outputs:
  stdout: one translation per input line, in order (detokenized, as sacreBLEU scores them)
  stderr: errors only (error: ..., exit status 2)
"""


def parser() -> argparse.ArgumentParser:
    p = checkpoint_parser("efficient-attn-translate", HELP, "a translation .ckpt file")
    p.add_argument("--input", type=Path, metavar="FILE", help="a UTF-8 file, one sentence per line (default: stdin)")
    p.add_argument("--beam", type=int, metavar="N", help="beam size, 1 = greedy (default: the run's task.beam_size)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="sentences translated at once (default: the run's task.batch_size)")
    return p


def main(argv: list[str] | None = None) -> None:
    """With no arguments at all, the help (a bare command would wait on stdin)."""
    run_command(parser, argv, _translate, check=check)


def check(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """The paths and numbers, before torch loads."""
    check_checkpoint_args(a, positive=("beam", "batch_size"))
    if a.input is not None and not a.input.is_file():
        raise CommandError(f"--input {a.input} is not a file")


def _translate(a: argparse.Namespace) -> None:
    from efficient_attn_tasks.inference.translate import open_input, run  # torch loads here

    with open_input(a.input) as lines:
        run(a, lines, sys.stdout)


if __name__ == "__main__":
    main()
