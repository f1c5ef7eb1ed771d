"""Translate lines with a trained translation checkpoint (loaded by checkpoint.py), a batch at a time, in input order.

Blank lines stay blank. Batches of the test split's lines in order are the batches ``evaluate`` decodes, so the
translations are its hypotheses.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from itertools import islice
from pathlib import Path
from typing import Any, ContextManager, Iterable, Iterator, TextIO


def run(a: argparse.Namespace, lines: Iterable[str], out: TextIO) -> None:
    """Translate ``lines`` batch by batch, writing each batch's translations to ``out`` as soon as it is done."""
    import torch

    from efficient_attn_tasks.inference.checkpoint import ConfigError, device, load

    loaded = load(a.checkpoint, {"batch_size": a.batch_size})
    if loaded.cfg.task.name != "translation":
        raise ConfigError(f"{loaded.path} is a {loaded.cfg.task.name} checkpoint; efficient-attn-translate needs a "
                          "translation one (efficient-attn-eval scores any task)")
    beam = loaded.cfg.task.beam_size if a.beam is None else a.beam
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

    from efficient_attn_tasks.inference.checkpoint import check_lengths
    from efficient_attn_tasks.tasks.translation_data import collate

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


def open_input(path: Path | None) -> ContextManager[Iterable[str]]:
    """The lines to translate: the UTF-8 file ``path``, or stdin (and stdout) as UTF-8 whatever the locale;
    stdin is not closed when done."""
    from efficient_attn_tasks.inference.checkpoint import ConfigError

    if path is not None:
        if not path.is_file():
            raise ConfigError(f"--input {path} is not a file")
        return open(path, encoding="utf-8")
    for stream in (sys.stdin, sys.stdout):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8")
    return contextlib.nullcontext(sys.stdin)
