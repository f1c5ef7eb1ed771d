"""``efficient-attn-translate``: translate sentences with a trained translation checkpoint.

Reads one sentence per line (stdin, or ``--input``), translates ``--batch-size`` lines at a time with
beam search (the run's test decoding: ``task.beam_size``, length penalty and length limit), and writes
one translation per line to stdout, in input order, after each batch. Blank lines stay blank. The
checkpoint runs alone (efficient_attn_tasks/run/checkpoint.py): its tokenizer is inside it. Batches of the test split's
lines in order are the batches ``efficient-attn-eval`` decodes, so the translations are its hypotheses.

    echo 'A man is riding a bike.' | efficient-attn-translate outputs/<date>/<run>

Building the parser imports neither torch nor Lightning (``--help`` is fast); translating imports them.
"""

from __future__ import annotations

import argparse
import sys
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

from efficient_attn_tasks.commands.cli import parser as cli_parser

EXAMPLES = (
    "efficient-attn-translate outputs/<date>/<run> < test.en > test.hyp.de     # its best checkpoint",
    "efficient-attn-translate <run>/checkpoints/best-step=<n>.ckpt --input test.en --beam 8",
    "efficient-attn-translate <run> --input test.en --beam 1 --batch-size 128 --device cuda   # greedy, fast",
)
OUTPUTS = (
    "stdout: one translation per input line, in order (detokenized, as sacreBLEU scores them)",
    "stderr: errors only (error: ..., exit status 2)",
)


def parser() -> argparse.ArgumentParser:
    p = cli_parser("efficient-attn-translate", "Translate sentences (one per line, from stdin or --input) with a "
                   "trained translation checkpoint;\nwrite one translation per line to stdout. The checkpoint "
                   "runs alone: its tokenizer is inside it.", EXAMPLES, OUTPUTS)
    p.add_argument("checkpoint", type=Path, help="a translation .ckpt file, or a run dir (its best checkpoint)")
    p.add_argument("--input", type=Path, metavar="FILE", help="a UTF-8 file, one sentence per line (default: stdin)")
    p.add_argument("--beam", type=int, metavar="N", help="beam size, 1 = greedy (default: the run's task.beam_size)")
    p.add_argument("--batch-size", type=int, metavar="N", help="sentences translated at once (default: the run's task.batch_size)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA if there is one")
    return p


def main(argv: list[str] | None = None) -> None:
    """With no arguments at all, the help (a bare command would wait on stdin)."""
    if argv is None and len(sys.argv) == 1:
        parser().print_help()
        return
    a = parser().parse_args(argv)
    from efficient_attn_tasks.run.checkpoint import command_errors  # torch loads here

    with command_errors():
        if a.input is not None and not a.input.is_file():
            from efficient_attn_tasks.run.checkpoint import ConfigError

            raise ConfigError(f"--input {a.input} is not a file")
        with (open(a.input, encoding="utf-8") if a.input else _stdin()) as lines:
            run(a, lines, sys.stdout)


def run(a: argparse.Namespace, lines: Iterable[str], out: TextIO) -> None:
    """Translate ``lines`` batch by batch, writing each batch's translations to ``out`` as soon as it is done."""
    import torch

    from efficient_attn_tasks.run.checkpoint import ConfigError, device, load

    loaded = load(a.checkpoint, {"batch_size": a.batch_size})
    if loaded.cfg.task.name != "translation":
        raise ConfigError(f"{loaded.path} is a {loaded.cfg.task.name} checkpoint; efficient-attn-translate needs a "
                          "translation one (efficient-attn-eval scores any task)")
    beam = a.beam or loaded.cfg.task.beam_size
    if beam < 1 or loaded.cfg.task.batch_size < 1:
        raise ConfigError(f"--beam and --batch-size must be >= 1, got {beam} and {loaded.cfg.task.batch_size}")
    module = loaded.module.to(device(a.device))
    where = str(a.input) if a.input else "stdin"
    first = 1
    for chunk in _chunks(lines, loaded.cfg.task.batch_size):
        with torch.no_grad():
            out.write("".join(f"{t}\n" for t in translate_lines(module, chunk, beam, where, first)))
        out.flush()
        first += len(chunk)


def translate_lines(module: Any, lines: list[str], beam: int, where: str = "input", first: int = 1) -> list[str]:
    """Translations of ``lines`` as one batch (blank lines stay blank; ``where``/``first`` name lines in errors)."""
    import torch

    from efficient_attn_tasks.run.checkpoint import check_lengths
    from efficient_attn_tasks.tasks.translation import collate

    ids = module.sp.encode(lines)
    check_lengths(ids, module.model.cfg.max_len, where, first)
    keep = [i for i, line in enumerate(lines) if line.strip()]
    out = [""] * len(lines)
    if keep:
        batch = collate([(ids[i], [], "") for i in keep])
        on = next(module.parameters()).device
        batch = {k: v.to(on) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        for i, text in zip(keep, module.translate(batch, beam)):
            out[i] = text
    return out


def _chunks(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    """Lines without their line ends, ``size`` at a time (the last chunk may be shorter)."""
    stripped = (line.rstrip("\r\n") for line in lines)
    while chunk := list(islice(stripped, size)):
        yield chunk


def _stdin() -> Any:
    """stdin (and stdout) as UTF-8 text whatever the locale; stdin is not closed when done."""
    import contextlib

    for stream in (sys.stdin, sys.stdout):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8")
    return contextlib.nullcontext(sys.stdin)


if __name__ == "__main__":
    main()
