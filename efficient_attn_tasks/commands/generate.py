"""``efficient-attn-generate``: continue a text with a trained byte-level language model (task=lm), one byte per
decoding step on the model's incremental state (the work: efficient_attn_tasks/inference/generate.py)."""

from __future__ import annotations

import argparse
import sys

from efficient_attn_tasks.commands.cli import CommandError, check_checkpoint_args, checkpoint_parser, run_command

HELP = """\
Continue a text with a trained byte-level language model (task=lm), one byte per decoding
step on the model's incremental state. The checkpoint runs alone.

examples:
  efficient-attn-generate outputs/<date>/<run> --prompt 'ROMEO:'       # its best checkpoint, 200 bytes
  efficient-attn-generate <run>/checkpoints/last.ckpt --prompt 'To be' --max-new-tokens 500 --top-k 10
  efficient-attn-generate <run> --prompt 'KING' --temperature 0         # greedy: the most likely bytes

outputs:
  stdout: the prompt followed by its continuation (bytes that are not UTF-8 shown as U+FFFD)
  stderr: errors only (error: ..., exit status 2)
"""


def parser() -> argparse.ArgumentParser:
    p = checkpoint_parser("efficient-attn-generate", HELP, "an lm .ckpt file")
    p.add_argument("--prompt", default="\n", help="the text to continue (default: a newline, i.e. a line's start)")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="bytes to generate")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0 = greedy; < 1 sharper, > 1 flatter")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="draw among the K most likely bytes; 0 = all")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (the same seed, the same text)")
    return p


def main(argv: list[str] | None = None) -> None:
    run_command(parser, argv, _generate, check=check)


def check(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """The checkpoint's path, the prompt and the numbers, before torch loads."""
    check_checkpoint_args(a, non_negative=("max_new_tokens", "temperature", "top_k"))
    if not a.prompt:
        raise CommandError("--prompt is empty: give the text to continue, e.g. --prompt 'ROMEO:' "
                           "(leave --prompt out to start at a line's start)")


def _generate(a: argparse.Namespace) -> None:
    from efficient_attn_tasks.inference.generate import run  # torch loads here

    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")
    run(a, sys.stdout)


if __name__ == "__main__":
    main()
